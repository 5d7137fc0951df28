"""End to end on a tiny random checkpoint: every CLI command exits 0 and writes its files; bad
inputs get a clear error and leave no output file. Random weights generate garbage text, so the
generation paths also exercise the forgiving parsers (no <ref> -> background only, no box ->
whole image)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from densert.checkpoint.loader import auto_dtype
from densert.cli import main
from densert.runtime.results import validate_sidecar
from densert.tasks import rle


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    d = tmp_path_factory.mktemp("imgs")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 90, 3), np.uint8)).save(d / "a.png")
    Image.fromarray(rng.integers(0, 256, (40, 33, 3), np.uint8)).save(d / "b.jpg")
    return d


def _run(args, capsys):
    rc = main(args)
    return rc, capsys.readouterr()


def _no_temp_files(out):
    return not [p for p in out.rglob("*") if p.name.endswith(".tmp")]


def _sidecar(path):
    side = json.loads(path.read_text())
    validate_sidecar(side)
    assert sorted(side["files"]) == sorted(p.name for p in path.parent.glob(f"{side['stem']}.*"))
    return side


def test_depth(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["depth", str(images), "--model", str(tiny_checkpoint), "--out", str(out),
                    "--preset", "nyuv2"], capsys)
    assert rc == 0, cap.err
    for stem, hw in (("a", (70, 90)), ("b", (40, 33))):
        d = np.load(out / f"{stem}.depth.npy")
        assert d.dtype == np.float32 and d.shape == hw and (d > 0).all() and (d <= 10).all()
        assert Image.open(out / f"{stem}.depth.png").size[1] == hw[0]
        codes = rle.decode_depth((out / f"{stem}.depth.txt").read_text(), hw)
        assert codes.shape == (max(1, hw[0] // 16), max(1, hw[1] // 16))
        side = _sidecar(out / f"{stem}.json")
        r = side["result"]
        assert side["task"] == "depth" and r["preset"] == "nyuv2" and r["metric"] is True
        assert r["units"] == "m" and side["backend"] == "torch" and "densert_version" in side
        assert {"preprocess", "vision", "prefill", "dense_head"} <= set(side["timings_ms"])
        assert side["total_ms"] == pytest.approx(sum(side["timings_ms"].values()), abs=0.01)
        # --dtype auto: the checkpoint's bf16 where this CPU computes it natively, else float32
        auto = str(auto_dtype(tiny_checkpoint, "cpu")).removeprefix("torch.")
        assert side["device"] == "cpu" and side["dtype"] == auto and side["load_s"] > 0
        assert len(side["model"]["fingerprint"]) == 64 and side["model"]["demo"] is False
        mm = np.asarray(Image.open(out / f"{stem}.depth.mm.png"))
        assert mm.dtype == np.uint16 and np.array_equal(mm, np.rint(d * 1000).astype(np.uint16))
    assert _no_temp_files(out)


def test_depth_open_world_focal(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["depth", str(images / "a.png"), "--model", str(tiny_checkpoint), "--out",
                    str(out), "--focal", "500"], capsys)
    assert rc == 0, cap.err
    r = _sidecar(out / "a.json")["result"]
    assert r["metric"] is True and r["focal"] == 500 and r["effective_focal"] > 1000


def test_segment_closed_set(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["segment", str(images / "a.png"), "--model", str(tiny_checkpoint), "--out",
                    str(out), "--classes", "floor, wall,traffic light", "--fast"], capsys)
    assert rc == 0, cap.err
    lab = np.load(out / "a.labels.npy")
    assert lab.dtype == np.uint16 and lab.shape == (70, 90) and lab.max() <= 2
    names, back = rle.decode_segmentation((out / "a.seg.txt").read_text(), (70, 90))
    assert names == ["floor", "wall", "traffic light"] and np.array_equal(back, lab)
    for f in ("a.labels.png", "a.overlay.png"):
        assert Image.open(out / f).size == (90, 70)
    indexed = Image.open(out / "a.labels.png")
    assert indexed.mode == "P" and np.array_equal(np.asarray(indexed), lab)
    side = _sidecar(out / "a.json")
    r = side["result"]
    assert r["mode"] == "closed-set" and r["class_names"] == names
    assert side["flow"] == "closed-set:one-prefill" and side["options"]["fast"] is True
    pal = np.array(indexed.getpalette()[: 3 * len(names)]).reshape(-1, 3).tolist()
    assert pal == [r["class_colours"][n] for n in names]


def test_segment_open_set_generates(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["segment", str(images / "b.jpg"), "--model", str(tiny_checkpoint), "--out",
                    str(out), "--max-new-tokens", "6"], capsys)
    assert rc == 0, cap.err
    side = _sidecar(out / "b.json")
    r = side["result"]
    assert r["mode"] == "open-set" and r["generated_text"] is not None
    # garbage names no class: no detection stage, the naming pass's map, all background
    assert side["flow"] == "open-set:direct" and r["class_names"] == ["<OTHERS>"]
    assert side["options"]["generation"] == {
        "max_new_tokens": 6, "repetition_penalty": 1.05,
        "source": {"max_new_tokens": "option", "repetition_penalty": "generation_config.json"}}
    assert np.load(out / "b.labels.npy").shape == (40, 33)


def test_refer(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["refer", str(images / "a.png"), "--model", str(tiny_checkpoint), "--out",
                    str(out), "--expression", "the red ball", "--refer-short-side", "64",
                    "--max-new-tokens", "6"], capsys)
    assert rc == 0, cap.err
    m = np.load(out / "a.mask.npy")
    assert m.dtype == np.uint8 and m.shape == (70, 90) and set(np.unique(m)) <= {0, 1}
    r = _sidecar(out / "a.json")["result"]
    assert r["expression"] == "the red ball" and r["crop_box"] is not None
    assert (out / "a.refer.png").is_file() and (out / "a.refer.txt").is_file()


def test_chat_with_and_without_image(tiny_checkpoint, images, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["chat", str(images / "a.png"), "--model", str(tiny_checkpoint), "--out",
                    str(out), "--prompt", "What is this?", "--max-new-tokens", "5"], capsys)
    assert rc == 0, cap.err
    assert (out / "a.chat.txt").is_file() and _sidecar(out / "a.json")["result"]["tokens"] <= 5
    rc, cap = _run(["chat", "--model", str(tiny_checkpoint), "--out", str(out), "--prompt", "Hi",
                    "--max-new-tokens", "3"], capsys)
    assert rc == 0, cap.err


def test_bad_files_reported_others_processed(tiny_checkpoint, images, tmp_path, capsys):
    src = tmp_path / "mixed"
    src.mkdir()
    (src / "good.png").write_bytes((images / "a.png").read_bytes())
    (src / "corrupt.jpg").write_bytes(b"\xff\xd8\xff\xe0" + b"\x00" * 50)
    (src / "empty.png").write_bytes(b"")
    (src / "text.png").write_text("not an image at all")
    (src / "notes.txt").write_text("ignored: not an image extension")
    out = tmp_path / "o"
    rc, cap = _run(["depth", str(src), "--model", str(tiny_checkpoint), "--out", str(out)], capsys)
    assert rc == 1
    for name in ("corrupt.jpg", "empty.png", "text.png"):
        assert f"error: {src / name}" in cap.err
    assert "empty file" in cap.err and "3 of 4 image(s) failed" in cap.err
    # open world without a focal length: relative depth, so no millimetre PNG
    assert sorted(p.name for p in out.iterdir()) == ["good.depth.npy", "good.depth.png",
                                                       "good.depth.txt", "good.json"]
    assert _sidecar(out / "good.json")["result"]["units"] == "relative"


def test_missing_model_dir_and_impossible_size(images, tmp_path, capsys):
    rc, cap = _run(["depth", str(images / "a.png"), "--model", str(tmp_path / "nope"), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and f"{tmp_path / 'nope'}: no such checkpoint directory" in cap.err
    assert not (tmp_path / "o").exists()
    rc, cap = _run(["depth", str(images / "a.png"), "--model", str(tmp_path), "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "not a checkpoint directory (no config.json)" in cap.err
    rc, cap = _run(["depth", str(images / "a.png"), "--max-patches", "2", "--out",
                    str(tmp_path / "o")], capsys)
    assert rc == 2 and "max_patches must be an integer >= 4, got 2" in cap.err


def test_missing_image_file(tiny_checkpoint, tmp_path, capsys):
    out = tmp_path / "o"
    rc, cap = _run(["segment", str(tmp_path / "ghost.png"), "--classes", "a", "--model",
                    str(tiny_checkpoint), "--out", str(out)], capsys)
    assert rc == 1 and f"{tmp_path / 'ghost.png'}: no such file" in cap.err
    assert not out.exists()  # a run that wrote nothing leaves no --out


def test_crf_on_image_files_from_disk(tiny_checkpoint, images, tmp_path, capsys):
    """`densert segment FILE --crf` (and refer) on PNG and JPEG files read from disk: decoded
    files are read-only arrays, which pydensecrf refuses unless the runtime hands it a copy."""
    from densert.image.decode import load_rgb
    assert not load_rgb(images / "a.png").flags.writeable
    out = tmp_path / "o"
    rc, cap = _run(["segment", str(images / "a.png"), str(images / "b.jpg"), "--crf", "--classes",
                    "floor,wall", "--fast", "--model", str(tiny_checkpoint), "--out", str(out)],
                   capsys)
    assert rc == 0, cap.err
    for stem in ("a", "b"):
        assert _sidecar(out / f"{stem}.json")["options"]["crf"] is True
    rc, cap = _run(["refer", str(images / "b.jpg"), "--expression", "x", "--max-new-tokens", "3",
                    "--refer-short-side", "48", "--model", str(tiny_checkpoint), "--out",
                    str(out / "refer")], capsys)
    assert rc == 0, cap.err
    assert _sidecar(out / "refer" / "b.json")["options"]["crf"] is True


# Every task of the official demo, its densert command, and the files it documents (runtime/cli.py).
DEMO_TASKS = {
    "vqa": (["chat", "--prompt", "How many objects are in the image?"], ["chat.txt"], "generate"),
    "grounding": (["ground", "--expression", "the box"], ["ground.png", "ground.txt"], "generate"),
    "detection": (["detect"], ["detect.png", "detect.txt", "coco.json"], "generate"),
    "semantic": (["segment", "--classes", "floor,wall,sky"],
                 ["labels.npy", "labels.png", "overlay.png", "seg.txt", "coco.json"], None),
    "referring": (["refer", "--expression", "the box"],
                  ["mask.npy", "refer.png", "refer.txt", "coco.json"], "ground-then-segment"),
    "open-set": (["segment"], ["labels.npy", "labels.png", "overlay.png", "seg.txt", "coco.json"],
                 None),
    "depth": (["depth"], ["depth.npy", "depth.png", "depth.mm.png", "depth.txt"], "one-prefill"),
    "pose": (["pose"], ["pose.png", "pose.txt", "coco.json"], "generate"),
}


@pytest.mark.parametrize("task", list(DEMO_TASKS))
def test_every_demo_task_runs_on_the_bundled_model(task, tmp_path, capsys):
    """The bundled densert-tiny answers the demo's prompts badly (it was trained on rendered
    scenes); each command still writes its documented files and a valid sidecar naming its flow,
    with the release's defaults (DenseCRF on) and a short token budget."""
    args, files, flow = DEMO_TASKS[task]
    out = tmp_path / "o"
    img = Path(__file__).resolve().parents[1] / "samples" / "scene_3.png"
    rc, cap = _run([*args, str(img), "--out", str(out), "--max-new-tokens", "48", "--quiet",
                    *(["--refer-short-side", "96"] if args[0] in ("refer", "segment") else [])],
                   capsys)
    assert rc == 0, cap.err
    assert sorted(p.name for p in out.iterdir()) == sorted([f"scene_3.{f}" for f in files]
                                                           + ["scene_3.json"])
    side = _sidecar(out / "scene_3.json")
    assert side["model"]["demo"] is True and side["options"]["generation"]["repetition_penalty"] == 1.05
    if flow is not None:
        assert side["flow"] == flow
    elif task == "semantic":
        assert side["flow"].startswith("closed-set:")
    else:
        assert side["flow"].startswith("open-set:")
