"""Export memory does not grow with depth: real widths (27 ViT layers, 2560-wide MLA decoder,
the 283k-row table), 4 and 12 decoder layers, int4. Each export runs in its own process
(``bench_engines.run_child``: peak RSS of the process tree). Slow (~6 min on 2 cores, 3 GB of
checkpoints): ``pytest -m slow tests/test_export_depth_memory.py``."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.slow


def test_export_peak_of_4_and_12_decoder_layers_differs_by_under_0_4_gib(tmp_path):
    from densert.benchmarks.bench_engines import run_child
    from densert.checkpoint.random_init import make_test_checkpoint
    peaks = {}
    for layers in (4, 12):
        ck = make_test_checkpoint(tmp_path / f"ck{layers}", "youtu-vl-4b", text_layers=layers, seed=0,
                                  dtype="bfloat16")
        r = run_child("cli", [["export", "--model", str(ck), "--out", str(tmp_path / f"e{layers}"),
                               "--precision", "int4", "--image-size", "480x640", "--quiet"]], limit_gb=12.0)
        assert r.get("rc") == 0, r
        peaks[layers] = r["peak_rss_mib"] / 1024
    print(f"export peak RSS GiB by decoder layers: {peaks}")
    assert abs(peaks[12] - peaks[4]) < 0.4, peaks
    assert peaks[12] < 8.0, peaks    # the full model's budget holds at any depth
