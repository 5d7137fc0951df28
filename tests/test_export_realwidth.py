"""Real widths (vision 1152 / 16 heads, LLM 2560 / 32 heads, MLA 512 + 64, vocab 283,386) with
2 + 2 layers: engine sizes per precision, the documented verify thresholds, the memory of one
large photo, and running with the checkpoint moved away. Slow (about an hour on 2 shared
cores, the 3000x4000 photo alone ~25 min; ~9 GB peak while verifying):
``pytest -m slow tests/test_export_realwidth.py``."""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

LARGE = (3000, 4000)


def _dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _photo(path: Path, hw) -> Path:
    from PIL import Image
    rng = np.random.default_rng(0)
    low = rng.random((12, 16, 3))
    img = np.kron(low, np.ones((-(-hw[0] // 12), -(-hw[1] // 16), 1)))[: hw[0], : hw[1]]
    Image.fromarray((img * 255).astype(np.uint8)).save(path, quality=90)
    return path


def _peak_run(args: list[str]) -> tuple[int, float]:
    """Exit status and peak resident memory (GiB, the process's own VmHWM) of a densert command
    run in a fresh process (the benchmark's measurement: ``bench_engines.run_child``)."""
    from densert.benchmarks.bench_engines import run_child
    r = run_child("cli", [args], limit_gb=12.0)
    return r.get("rc", 1), r["peak_rss_mib"] / 1024


@pytest.fixture(scope="module")
def real(tmp_path_factory):
    from densert.checkpoint.random_init import make_test_checkpoint
    from densert.export.onnx_export import export_engine
    root = tmp_path_factory.mktemp("realwidth")
    ck = make_test_checkpoint(root / "ck", "youtu-vl-4b", text_layers=2, vision_layers=2, seed=0,
                              dtype="bfloat16")
    engines = {}
    for p in ("fp32", "int8", "int4"):   # for the processor's whole 36,864-patch cap
        kw = {"max_image_tokens": 9216} if p != "int4" else {}
        engines[p] = root / p
        export_engine(ck, engines[p], precision=p, progress=False, **kw)
    return root, ck, engines


def test_quantized_directories_are_small(real):
    _, _, eng = real
    fp32 = _dir_bytes(eng["fp32"])
    assert _dir_bytes(eng["int4"]) <= 0.35 * fp32      # the embedding table included
    assert _dir_bytes(eng["int8"]) <= 0.6 * fp32


@pytest.mark.parametrize("precision", ["int4", "int8", "fp32"])
def test_engines_pass_their_documented_thresholds(real, precision):
    from densert.export.verify import verify
    _, ck, eng = real
    rep = verify(eng[precision], ck, log=lambda s: None)
    assert rep.ok, rep.format()


def test_large_photo_under_6_gb_and_parity_where_torch_runs(real, tmp_path):
    """``densert depth --backend onnxruntime`` on a 3000x4000 photo at the default patch cap
    (36,864 patches, 9,216 vision tokens) peaks under 6 GB (10^9 bytes) with the int8 engine
    (measured 4.7 GB; the fp32 engine's memory-mapped weights alone are 3.8 GB: 5.8 GiB peak, in
    benchmarks/results/engines.md); at a size the torch reference runs, the fp32 engine's depth
    map equals torch's."""
    from densert.runtime.predictor import DensePredictor
    _, ck, eng = real
    big = _photo(tmp_path / "big.jpg", LARGE)
    rc, peak_gib = _peak_run(["depth", str(big), "--backend", "onnxruntime", "--engine-dir", str(eng["int8"]),
                              "--out", str(tmp_path / "out")])
    assert rc == 0 and (tmp_path / "out" / "big.depth.npy").is_file()
    assert peak_gib * 2**30 < 6e9, f"peak resident memory {peak_gib * 2**30 / 1e9:.2f} GB"
    mid = _photo(tmp_path / "mid.jpg", (768, 1024))
    ref = DensePredictor(ck, backend="torch").depth(mid)
    got = DensePredictor(None, backend="onnxruntime", engine_dir=str(eng["fp32"])).depth(mid)
    assert (got.bins == ref.bins).mean() >= 0.999


def test_runs_after_the_checkpoint_moved_away(real, tmp_path):
    root, ck, eng = real
    moved = Path(shutil.move(str(ck), str(root / "elsewhere")))
    try:
        img = _photo(tmp_path / "f.jpg", (480, 640))
        for p in ("int4", "fp32"):
            common = ["--backend", "onnxruntime", "--engine-dir", str(eng[p])]
            assert _peak_run(["depth", str(img), *common, "--out", str(tmp_path / p)])[0] == 0
            assert _peak_run(["segment", str(img), *common, "--classes", "floor,wall",
                              "--out", str(tmp_path / p)])[0] == 0
    finally:
        shutil.move(str(moved), str(ck))
