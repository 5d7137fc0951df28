"""`densert verify`'s gate in the units users read: depth AbsRel / delta1, segmentation mIoU and
greedy-token agreement of the engine against the torch reference through the runtime's own
calls, with thresholds whose measurement is committed (benchmarks/results/verify_gates.json); a
corrupted int4 table fails it; a random-weights checkpoint is reported as such."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from densert.benchmarks import measure_verify_gates as MV
from densert.checkpoint.random_init import (
    RANDOM_MARK_FILE,
    is_current,
    make_test_checkpoint,
    read_random_mark,
)
from densert.export import verify as V
from densert.resources import bundled_model_dir
from densert.training import engine_gate as G

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "verify_gates.json"
# One outdoor and one indoor shipped sample (render_scene(0 / 3, 256, 320), two of the gate's
# eight default scenes): the default suite's images.
SAMPLES = [str(REPO / "samples" / "scene_0.png"), str(REPO / "samples" / "scene_3.png")]


@pytest.fixture(scope="module")
def bundled():
    from densert.checkpoint.loader import load_model
    return bundled_model_dir(), load_model(bundled_model_dir(), torch.float32)


def _export(bundled, root: Path, precision: str) -> Path:
    from densert.export.onnx_export import export_engine
    ck, model = bundled
    export_engine(ck, root / precision, precision=precision, progress=False, model=model)
    return root / precision


@pytest.fixture(scope="module")
def int4(bundled, tmp_path_factory):
    return _export(bundled, tmp_path_factory.mktemp("gates"), "int4")


def _verify_cli(engine, ck, images, capsys, *extra) -> tuple[int, str]:
    from densert.cli import main
    rc = main(["verify", str(engine), "--model", str(ck), *images, "--grids", "4x4",
               "--decode-steps", "1", *extra])
    return rc, capsys.readouterr().out


def _gate_lines(out: str) -> dict[str, str]:
    return {label: next(line for line in out.splitlines() if line.startswith("mean of")
                        and label in line)
            for label in V.GATE_LABELS.values()}


def test_int4_engine_of_the_trained_model_passes_in_user_units(bundled, int4, capsys):
    rc, out = _verify_cli(int4, bundled[0], SAMPLES, capsys)
    assert rc == 0, out
    gates = _gate_lines(out)
    assert all(line.rstrip().endswith("ok") for line in gates.values()), out
    assert "AbsRel" in out and "delta1" in out and "mIoU" in out and "depth preset cityscapes" in out
    assert out.rstrip().splitlines()[-1] == "PASS"


@pytest.mark.slow
@pytest.mark.parametrize("precision", ["int4", "int8"])
def test_engines_pass_on_the_default_scenes(bundled, precision, tmp_path, capsys):
    """The images the thresholds were measured on (no images given: GATE_SCENES); the numbers
    equal the committed measurement (ONNX Runtime CPU is deterministic on one machine)."""
    eng = _export(bundled, tmp_path, precision)
    rep = G.verify_engine(eng, bundled[0], grids=((8, 8),), decode_steps=1, model=bundled[1],
                          log=lambda s: None)
    assert rep.ok, rep.format()
    assert len(rep.metrics) == len(G.GATE_SCENES) and rep.random_weights is False
    measured = json.loads(RESULTS.read_text())["precisions"][precision]["mean"]
    for k, v in rep.metric_means.items():
        assert v == pytest.approx(measured[k], abs=0.02), (k, v, measured[k])


def test_reversed_depth_rows_fail_the_gate_but_not_the_tensor_checks(bundled, int4, tmp_path):
    """The runtime's depth head reads the exact head rows beside the int4 table; with them out
    of order the graph's own scores still agree, and only the gate in metres catches it."""
    bad = Path(shutil.copytree(int4, tmp_path / "bad"))
    assert MV.corrupt_depth_rows(bad) == 1000
    rep = G.verify_engine(bad, bundled[0], images=SAMPLES[1:], grids=((4, 4),), decode_steps=1,
                          model=bundled[1], log=lambda s: None)
    assert rep.tensors_ok and not rep.ok
    gates = {k: ok for k, _, _, ok in rep.metric_gates}
    assert not gates["abs_rel"] and not gates["delta1"] and gates["miou"], rep.format()
    out = rep.format()
    assert out.rstrip().endswith("FAIL") and _gate_lines(out)["depth AbsRel"].rstrip().endswith("FAIL")


def _small_scene(path: Path) -> str:
    from PIL import Image

    from densert.training.scenes import render_scene
    Image.fromarray(render_scene(3, 64, 96).image).save(path)
    return str(path)


def test_random_weights_are_reported_not_judged(tiny_checkpoint, tmp_path, capsys):
    from densert.export.onnx_export import export_engine
    mark = read_random_mark(tiny_checkpoint)
    assert mark is not None and is_current(mark) and mark.made_with["seed"] == 0
    eng = tmp_path / "eng"
    export_engine(tiny_checkpoint, eng, precision="int8", tasks=["depth", "segment"],
                  image_size=("64x96",), progress=False)
    img = _small_scene(tmp_path / "scene.png")
    rc, out = _verify_cli(eng, tiny_checkpoint, [img], capsys, "--classes", "sky,road,car")
    assert rc == 0, out
    assert "random weights: metric gates not applied (numbers shown for information)" in out
    assert out.rstrip().splitlines()[-1] == \
        "PASS (tensor checks; random weights: metric gates not applied)"
    assert all(line.rstrip().endswith("info") for line in _gate_lines(out).values())
    assert "segmentation one-prefill over 3 classes" in out
    # The same engine without the mark: judged like a trained model (documented behaviour).
    ck = Path(shutil.copytree(tiny_checkpoint, tmp_path / "ck"))
    (ck / RANDOM_MARK_FILE).unlink()
    assert read_random_mark(ck) is None
    rep = G.verify_engine(eng, ck, images=[img], grids=((2, 2),), decode_steps=0,
                          classes=["sky", "road", "car"], log=lambda s: None)
    assert rep.random_weights is False and len(rep.metric_gates) == 4
    assert "random weights" not in rep.format()


def test_mark_follows_the_weights(tmp_path):
    """Weights written over a marked directory are no longer random: the mark goes stale, and
    verify then judges them. make-test-checkpoint again writes the same bytes and a fresh mark."""
    ck = make_test_checkpoint(tmp_path / "ck", "tiny", text_layers=1, vision_layers=1)
    first = (ck / "model.safetensors").read_bytes()
    assert is_current(read_random_mark(ck))
    from densert.checkpoint.loader import load_model
    from densert.checkpoint.model_dir import write_checkpoint
    model = load_model(ck, torch.float32)
    with torch.no_grad():
        model.model.norm.weight.mul_(1.5)
    write_checkpoint(model, ck, ck / "tokenizer.json", overwrite=True)
    mark = read_random_mark(ck)
    assert mark is not None and not is_current(mark)
    make_test_checkpoint(ck, "tiny", text_layers=1, vision_layers=1, overwrite=True)
    assert (ck / "model.safetensors").read_bytes() == first and is_current(read_random_mark(ck))
    (ck / RANDOM_MARK_FILE).write_text("{not json")
    from densert.errors import CheckpointError
    with pytest.raises(CheckpointError, match="random_weights.json: not a random-weights mark"):
        read_random_mark(ck)


def test_thresholds_are_the_committed_measurement():
    """export.verify.GATES is the measurement's output, and follows from its means by the
    documented margin rule; the corrupted int4 engine of that run failed them."""
    res = json.loads(RESULTS.read_text())
    assert V.GATES == res["thresholds"]
    assert set(V.GATES) == {"fp32", "fp16", "int8", "int4"}
    for p, x in res["precisions"].items():
        assert {k: MV.threshold(k, v) for k, v in x["mean"].items()} == res["thresholds"][p]
        assert MV.passes(x["mean"], res["thresholds"][p]) and x["tensors_ok"]
        assert len(x["per_image"]) == len(G.GATE_SCENES) and x["mean"].keys() == V.GATE_LABELS.keys()
    assert res["gate_tokens"] == G.GATE_TOKENS
    assert res["corrupted_int4"]["tensors_ok"] and not res["corrupted_int4"]["gate_ok"]


def test_margin_rule():
    # error doubled, floored, rounded outward; agreements as 1 - error
    assert MV.threshold("abs_rel", 0.0) == MV.ERROR_FLOOR["abs_rel"]
    assert MV.threshold("abs_rel", 0.0301) == 0.061
    assert MV.threshold("delta1", 0.95) == 0.9
    assert MV.threshold("miou", 1.0) == 1 - MV.ERROR_FLOOR["miou"]
    assert MV.threshold("tokens", 0.2) == 0.0


def test_token_agreement_and_miou_definitions():
    assert G.token_agreement([1, 2, 3, 4], [1, 2, 9, 4]) == 0.75
    assert G.token_agreement([1, 2, 7], [1, 2, 7, 8, 9]) == 0.6       # stopped early: differs there
    assert G.token_agreement([], []) == 1.0
    assert G.token_agreement(list(range(40)), list(range(40)) + [1], n=16) == 1.0
    ref = np.array([[0, 0, 1, 1], [0, 0, 1, 1]], np.uint16)
    got = np.array([[0, 0, 0, 1], [0, 0, 0, 1]], np.uint16)
    # class 0: 4 / 6, class 1: 2 / 4; class 2 (absent from both) not counted
    assert G.label_miou(got, ref, 3) == pytest.approx((4 / 6 + 2 / 4) / 2)
    assert G.label_miou(ref, ref, 300) == 1.0


def test_verify_refuses_bad_classes_before_work(capsys):
    from densert.cli import main
    from densert.errors import DensertError
    with pytest.raises(DensertError, match="given more than once"):
        G.metric_gate("CK", classes=["sky", "sky"])
    with pytest.raises(DensertError, match="classes is empty"):
        G.metric_gate("CK", classes=[])
    # the CLI: exit 2 before any engine is opened (this one does not exist)
    assert main(["verify", "NO-ENGINE", "--model", "CK", "--classes", "sky,sky"]) == 2
    assert "given more than once" in capsys.readouterr().err
