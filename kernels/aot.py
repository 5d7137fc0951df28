"""Ahead-of-time compile check: every Triton kernel, in every launch configuration it runs with,
compiled for the GPUs densert targets, with registers, spills and shared memory per kernel.

    python -m densert.kernels.aot [--arch 87 90] [--kernel SUBSTRING ...] [--json PATH]

No GPU is needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32))`` lowers a
kernel to PTX and ptxas to a cubin. Registers, spill stores/loads and the stack frame come from
ptxas's own report of that cubin (Triton prints it with ``dump_ptxas_log``), shared memory from
the compiled metadata. Each kernel module lists the launches it makes on an architecture
(``aot_variants(arch)``, built from the same launch tables its wrappers read), so this checks the
configurations that actually run. sm_87 = Jetson AGX Orin, sm_90 = H100/H200.

Exit status: 0 when every variant compiles without spilling, 1 otherwise (the table says which).
Compiling always runs ptxas (Triton's cache is bypassed) so every row is measured, not recalled.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import sys
import time
from dataclasses import asdict, dataclass

ARCHS = (87, 90)
ARCH_NAMES = {87: "sm_87 (Jetson AGX Orin)", 90: "sm_90 (H100/H200)"}


@dataclass
class Row:
    arch: int
    kernel: str
    config: str
    registers: int | None = None
    spill_stores: int | None = None
    spill_loads: int | None = None
    stack_bytes: int | None = None
    shared_bytes: int | None = None
    compile_s: float = 0.0
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.error is None and self.spill_stores == 0 and self.spill_loads == 0


def _load_triton():
    """Import triton compiling for real GPUs (not the CPU interpreter) and the kernel modules."""
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "0"
    try:
        import triton
    except ImportError:
        raise SystemExit("densert.kernels.aot needs triton (pip install 'densert[train]')") from None
    from triton.runtime.jit import JITFunction

    from . import _triton_dense_head, _triton_ntpm
    if not isinstance(_triton_dense_head._dense_tail_kernel, JITFunction):
        raise SystemExit("densert.kernels.aot: triton was imported with TRITON_INTERPRET=1 in this "
                         "process; run `python -m densert.kernels.aot` in a fresh process")
    return triton, (_triton_dense_head, _triton_ntpm)


def variants(arch: int):
    _, modules = _load_triton()
    for mod in modules:
        yield from mod.aot_variants(arch)


def _config_text(constexprs: dict, options: dict) -> str:
    parts = [f"{k}={v}" for k, v in constexprs.items()]
    parts += [f"{k}={v}" for k, v in options.items()]
    return " ".join(parts)


def compile_one(arch: int, label: str, fn, signature: dict, constexprs: dict, options: dict,
                div16: tuple = ()) -> Row:
    """Compile one kernel variant for ``arch`` and read ptxas's resource report. ``div16``:
    integer arguments the launch passes as multiples of 16 (the JIT specialises those)."""
    triton, _ = _load_triton()
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    row = Row(arch, label, _config_text(constexprs, options))
    # Pointer arguments get the 16-byte alignment hint every torch allocation satisfies, as the
    # JIT would specialise them at launch.
    attrs = {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
             if signature.get(name, "").startswith("*") or name in div16}
    src = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    log = io.StringIO()
    t0 = time.perf_counter()
    try:
        with knobs.nvidia.scope(), knobs.compilation.scope():
            knobs.nvidia.dump_ptxas_log = True
            knobs.compilation.always_compile = True
            with contextlib.redirect_stdout(log):
                kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
    except Exception as e:  # a kernel that does not compile is a row of the report, not a crash
        row.error = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        return row
    finally:
        row.compile_s = time.perf_counter() - t0
    text = log.getvalue()
    m = re.search(r"Used (\d+) registers", text)
    s = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads",
                  text)
    if not m or not s:
        row.error = "no ptxas resource report in the compile log"
        return row
    row.registers = int(m.group(1))
    row.stack_bytes, row.spill_stores, row.spill_loads = (int(x) for x in s.groups())
    row.shared_bytes = int(kernel.metadata.shared)
    return row


def run(archs=ARCHS, kernel_filters=(), progress=True) -> list[Row]:
    rows = []
    for arch in archs:
        for label, fn, sig, cx, opts, *div16 in variants(arch):
            if kernel_filters and not any(f in label for f in kernel_filters):
                continue
            row = compile_one(arch, label, fn, sig, cx, opts, *div16)
            rows.append(row)
            if progress:
                print(f"  sm_{arch} {label}: {row.compile_s:.1f}s", file=sys.stderr, flush=True)
    return rows


def format_table(rows: list[Row]) -> str:
    out = []
    for arch in sorted({r.arch for r in rows}):
        out.append(f"\n{ARCH_NAMES.get(arch, f'sm_{arch}')}\n")
        out.append("| kernel | config | registers | spill stores B | spill loads B | stack B "
                   "| shared B | compile s | status |")
        out.append("|---|---|---:|---:|---:|---:|---:|---:|---|")
        for r in (r for r in rows if r.arch == arch):
            status = "ok" if r.ok else (r.error or "SPILLS")
            cells = [r.registers, r.spill_stores, r.spill_loads, r.stack_bytes, r.shared_bytes]
            cells = ["-" if c is None else str(c) for c in cells]
            out.append(f"| {r.kernel} | {r.config} | " + " | ".join(cells)
                       + f" | {r.compile_s:.1f} | {status} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m densert.kernels.aot", description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", type=int, nargs="+", default=list(ARCHS),
                    help="compute capabilities to compile for (default: 87 90)")
    ap.add_argument("--kernel", nargs="*", default=[],
                    help="only variants whose label contains one of these substrings")
    ap.add_argument("--json", help="also write the rows as JSON to this path")
    a = ap.parse_args(argv)
    triton, _ = _load_triton()
    print(f"Triton {triton.__version__}: ahead-of-time compile, ptxas resource usage per launch "
          "configuration", flush=True)
    rows = run(a.arch, a.kernel)
    if not rows:
        print(f"no kernel variant matches --kernel {' '.join(a.kernel)}; run without --kernel to "
              "list every variant's label", file=sys.stderr)
        return 2
    print(format_table(rows))
    bad = [r for r in rows if not r.ok]
    print(f"{len(rows)} variants, {len(bad)} with spills or errors")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"triton": triton.__version__, "rows": [asdict(r) for r in rows]}, f, indent=1)
    return 1 if bad or not rows else 0


if __name__ == "__main__":
    sys.exit(main())
