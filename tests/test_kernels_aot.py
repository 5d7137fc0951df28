"""Ahead-of-time compile check (python -m densert.kernels.aot): every Triton kernel in every
launch configuration it runs with compiles for sm_87 and sm_90 without register spills; and the
dry run of benchmarks/gpu_check.sh, which runs the check's small set.

Runs in subprocesses: compiling for a GPU needs triton imported without TRITON_INTERPRET, which
this test process (interpreter tests) cannot offer. Triton's cache goes to a temp dir.
"""
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(importlib.util.find_spec("triton") is None,
                                reason="triton not installed (the train extra)")


def _run(args, tmp_path, timeout=1200):
    env = dict(os.environ, TRITON_INTERPRET="0", TRITON_CACHE_DIR=str(tmp_path / "triton-cache"))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_gpu_check_dry_run(tmp_path):
    """benchmarks/gpu_check.sh --dry-run: every GPU step reported as skipped with its reason,
    the AOT step (the small set: the dense tail's 3 modes and the NTP-M backward, both
    architectures) passes with zero spills, and the summary is written as JSON and Markdown."""
    out = tmp_path / "gc"
    r = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--dry-run", str(out)],
                       capture_output=True, text=True, timeout=900,
                       env=dict(os.environ, PYTHON=sys.executable,
                                TRITON_CACHE_DIR=str(tmp_path / "triton-cache")))
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    summary = json.loads((out / "summary.json").read_text())
    status = {s["step"]: s for s in summary["steps"]}
    gpu_steps = ("kernels_gpu", "ctest_cuda", "timing_dense", "timing_ntpm", "bench_cuda")
    assert all(status[s]["status"] == "SKIPPED" and "dry run" in status[s]["detail"]
               for s in gpu_steps), status
    assert status["env"]["status"] == status["aot"]["status"] == "pass"
    assert "SKIPPED" in (out / "summary.md").read_text()
    rows = json.loads((out / "aot.json").read_text())["rows"]
    assert {x["arch"] for x in rows} == {87, 90} and len(rows) >= 10
    assert all(x["error"] is None and x["spill_stores"] == x["spill_loads"] == 0 for x in rows)
    assert {x["kernel"] for x in rows} >= {"dense_tail argmax", "dense_tail probs",
                                          "dense_tail depth", "ntpm_dh fp32", "ntpm_dw bf16"}


@pytest.mark.slow
def test_aot_every_kernel_no_spills(tmp_path):
    """The whole table (32 variants, minutes on 2 cores): the NTP-M forward for every operand
    kind included, printed per architecture."""
    out = tmp_path / "aot.json"
    r = _run(["-m", "densert.kernels.aot", "--json", str(out)], tmp_path)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) >= 32 and {x["arch"] for x in rows} == {87, 90}
    for x in rows:
        assert x["error"] is None and x["registers"] and x["registers"] <= 255, x
        assert x["spill_stores"] == 0 and x["spill_loads"] == 0, x
    for arch in ("sm_87 (Jetson AGX Orin)", "sm_90 (H100/H200)"):
        assert arch in r.stdout
    assert any(x["kernel"].startswith("ntpm_fwd autocast-bf16") for x in rows)


def test_aot_reports_a_spilling_kernel(tmp_path):
    """The check can fail: a kernel that keeps 256 fp32 values per thread live across a
    reduction needs more than the 255 registers a thread has, spills, and the row says so."""
    (tmp_path / "spilly.py").write_text(textwrap.dedent("""
        import triton
        import triton.language as tl

        @triton.jit
        def spilly(x_ptr, y_ptr, N: tl.constexpr):
            i = tl.arange(0, N)
            x = tl.load(x_ptr + i)
            tl.store(y_ptr + i, x / tl.sum(x * x))
    """))
    script = textwrap.dedent(f"""
        import sys
        sys.path.insert(0, {str(tmp_path)!r})
        from densert.kernels import aot
        from spilly import spilly
        row = aot.compile_one(90, "spilly", spilly, {{"x_ptr": "*fp32", "y_ptr": "*fp32",
                              "N": "constexpr"}}, {{"N": 8192}}, {{"num_warps": 1}})
        print(row.registers, row.spill_stores, row.ok)
        print(aot.format_table([row]))
    """)
    r = _run(["-c", script], tmp_path, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    regs, spills, ok = r.stdout.splitlines()[0].split()
    assert int(spills) > 0 and ok == "False" and "SPILLS" in r.stdout
