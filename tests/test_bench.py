"""densert bench: the quick CI run end to end (JSON valid against benchmarks/schema.json), the
roofline arithmetic against hand-computed numbers, the schema check rejecting bad reports."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from densert.benchmarks import roofline
from densert.benchmarks.report import schema, validate
from densert.model.config import sized_config


def _check(doc):
    import jsonschema
    jsonschema.Draft202012Validator.check_schema(schema())
    validate(doc)


def test_bench_quick_cli(tiny_checkpoint, tmp_path):
    out = tmp_path / "bench_quick.json"
    md = tmp_path / "b.md"
    proc = subprocess.run([sys.executable, "-m", "densert", "bench", "--model", str(tiny_checkpoint),
                           "--backend", "torch", "tensorrt", "--quick", "--json", str(out),
                           "--md", str(md), "--plots", str(tmp_path / "plots")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    doc = json.loads(out.read_text())
    _check(doc)
    by = {b["backend"]: b for b in doc["backends"]}
    assert by["torch"]["status"] == "ok"
    assert by["tensorrt"]["status"] in ("skipped", "ok")  # no tensorrt here: skipped, with a reason
    if by["tensorrt"]["status"] == "skipped":
        assert by["tensorrt"]["reason"]
    cases = by["torch"]["cases"]
    assert {(c["task"], c["size"]) for c in cases} == {(t, s) for t in ("depth", "segment")
                                                       for s in ("64x64", "96x128")}
    for c in cases:
        assert c["stages"]["llm_prefill"]["n"] == 3
        assert c["naive_head"]["argmax_agreement"] > 0.99
        assert c["generate_path"]["rle_tokens"] > 0
        assert c["roofline"]["this_cpu_s"]["llm_prefill"] > 0
    assert by["torch"]["memory"]["peak_rss_mb_pipeline"] > 0
    text = md.read_text()
    assert doc["command"] in text and "| tensorrt | skipped |" in text
    assert len(list((tmp_path / "plots").glob("bench_quick_*.png"))) == 2


def test_bench_bad_size_is_user_error(tiny_checkpoint):
    from densert.cli import main
    assert main(["bench", "--model", str(tiny_checkpoint), "--sizes", "12by7", "--quick"]) == 2


def _req(**kw):
    base = dict(grid=(32, 32), window_seqlens=[256] * 4, prompt_tokens=300, num_classes=1000,
                out_hw=(512, 512))
    base.update(kw)
    return roofline.Request(**base)


def test_roofline_head_matches_kernel_anchors():
    cfg = sized_config("youtu-vl-4b")
    # kernel-anchors sec. 8.2: L=1024, d=2560, |S|=1000 -> 5.24 GFLOP; |V|=283,386 -> 1.486 TFLOP
    c = roofline.stage_costs(cfg, _req(grid=(64, 64)))
    assert c["dense_head"]["detail"]["gemm_flops"] == pytest.approx(5.24e9, rel=1e-3)
    assert c["naive_full_vocab_head"]["flops"] == pytest.approx(1.486e12 + 7 * 1000 * 512 * 512, rel=1e-3)
    h100 = roofline.bound_seconds(c["naive_full_vocab_head"], roofline.DEVICES["H100-SXM"].flops,
                           roofline.DEVICES["H100-SXM"].bandwidth)
    assert h100["bound"] == "compute" and h100["seconds"] == pytest.approx(1.50e-3, rel=0.02)


def test_roofline_prefill_and_vision_shapes():
    cfg = sized_config("youtu-vl-4b")
    c = roofline.stage_costs(cfg, _req())
    # Linear FLOPs = 2 * T * (params per layer) * layers; 104.2 M params/layer (spec sec. 2.3)
    per_layer = c["llm_prefill"]["detail"]["linear_flops"] / (2 * 300 * 40)
    assert per_layer == pytest.approx(104.2e6, rel=0.01)
    v = c["vision_encoder"]["detail"]
    # 4 windows of 256 patches are 4x cheaper than full attention over 1024 patches
    assert v["attention_flops"] < v["attention_if_all_full_flops"]
    # decode is memory-bound on every device: it reads all weights for one token
    for dev in roofline.DEVICES.values():
        assert roofline.bound_seconds(c["decode_step"], dev.flops, dev.bandwidth)["bound"] == "memory"


def test_cpu_peaks_positive():
    p = roofline.measure_cpu_peaks(gemm_n=128, copy_mb=4, repeats=3)
    assert p["flops"] > 0 and p["bandwidth"] > 0


def test_schema_check_rejects():
    with pytest.raises(ValueError, match="schema_version"):
        validate({"schema_version": 2})
    good = json.loads(
        (Path(__file__).resolve().parents[1] / "benchmarks/results/bench_densert-tiny.json").read_text())
    validate(good)
    stats = good["backends"][0]["cases"][0]["stages"]["llm_prefill"]
    stats["p50"] = "fast"
    with pytest.raises(ValueError, match="p50"):
        validate(good)
