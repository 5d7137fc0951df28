"""Several cameras through one loaded model: ``DensePredictor.batch`` / ``stream({name: source})``
give each frame its own call's result on torch and ONNX Runtime, frames of one size share the
batched stages, frames of other sizes run alone, every camera is served each round, and the
``--source NAME=SRC`` command writes one folder per camera.

The maps are compared exactly, in float32: each frame's rows go through the operations of its own
call (the torch tower attends per image, the batched prefill's rows are independent), so only a
GEMM's summation order could differ, and on the CPUs measured here it does not (the stage-level
tolerances are in test_backend_conformance.py). bfloat16 is not held to this: its GEMM rounds a
batch differently (benchmarks/results/rig.md counts the pixels)."""
from __future__ import annotations

import importlib.util
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from densert.cli import main
from densert.errors import SourceError
from densert.runtime.options import DenseOptions
from densert.runtime.predictor import DensePredictor
from densert.runtime.sources import Frame, Source

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


def _frames(n: int, hw=(64, 96), seed: int = 0) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        a = rng.integers(0, 256, (*hw, 3), dtype=np.uint8)
        a[hw[0] // 2:] //= 3     # some structure: a darker lower half
        out.append(a)
    return out


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    if not HAS_ORT:
        pytest.skip("onnxruntime / onnx not installed (pip install 'densert[export]')")
    from densert.export.onnx_export import export_engine
    from densert.resources import bundled_model_dir
    out = tmp_path_factory.mktemp("rig") / "eng"
    export_engine(bundled_model_dir(), out, max_image_tokens=256, progress=False)
    return out


def _predictor(backend: str, engine=None, fast: bool = True) -> DensePredictor:
    """torch packs the rig's images through the tower here whatever the device (declared on a GPU
    only, where it pays), so the packed path is what is checked."""
    opts = DenseOptions(fast=fast, crf=False)
    if backend == "torch":
        pred = DensePredictor(None, opts, dtype="float32")
        pred.backend.supports_image_batch = True
        return pred
    return DensePredictor(None, opts, backend="onnxruntime", engine_dir=str(engine))


class _Counting:
    """Counts the backend's one-image stage calls (the batched ones are separate methods)."""

    def __init__(self, pred):
        self.be, self.calls = pred.backend, {"encode_image": 0, "prefill": 0, "prefill_batch": 0}
        for name in self.calls:
            real = getattr(self.be, name)

            def wrapped(*a, _real=real, _name=name, **k):
                self.calls[_name] += 1
                return _real(*a, **k)
            setattr(self.be, name, wrapped)

    def reset(self):
        for k in self.calls:
            self.calls[k] = 0

    def close(self):
        for name in self.calls:
            delattr(self.be, name)


def _maps(r) -> list[np.ndarray]:
    return [x.depth if x.task == "depth" else x.labels for x in getattr(r, "results", None) or [r]]


CASES = [("depth", {}),                                                  # cityscapes: its own prefill
         ("depth", {"preset": "open-world", "focal": 300.0}),            # rescaled frames, one size
         ("dense", {"classes": ["floor", "wall"], "preset": "open-world"}),  # the shared prefill
         ("dense", {"classes": ["floor", "wall"]}),                      # shared + depth's own
         ("segment", {"classes": ["floor", "wall"]})]                    # --fast: one prefill


@pytest.mark.parametrize("backend", ["torch", "onnxruntime"])
def test_batched_results_equal_one_by_one(backend, request):
    eng = request.getfixturevalue("engine") if backend == "onnxruntime" else None
    pred = _predictor(backend, eng)
    be = pred.backend
    assert be.supports_prefill_batch and be.supports_image_batch == (backend == "torch")
    # ONNX Runtime's vision graph would mask the packed rig's patches as one image: not declared
    images = _frames(3) + _frames(1, hw=(64, 64), seed=1)      # three of one size, one other
    count = _Counting(pred)
    try:
        for task, o in CASES:
            count.reset()
            got = pred.batch(images, task=task, **o)
            calls = dict(count.calls)
            ref = [getattr(pred, task)(im, **o) for im in images]
            for k, (g, r) in enumerate(zip(got, ref)):
                for a, b in zip(_maps(g), _maps(r)):
                    np.testing.assert_array_equal(a, b, err_msg=f"{backend} {task} {o} frame {k}")
            # the three of one size ran the batched stages; only the odd one ran its own
            assert calls["prefill"] == 1 and calls["prefill_batch"] >= 1, (task, o, calls)
            assert calls["encode_image"] == (2 if backend == "torch" else 4), (task, o, calls)
    finally:
        count.close()


def test_torch_declares_the_packed_tower_on_a_gpu_only():
    from densert.backend import TorchBackend
    be = DensePredictor(dtype="float32", device="cpu").backend
    assert isinstance(be, TorchBackend) and be.device == "cpu" and be.supports_image_batch is False
    assert be.supports_prefill_batch is True


def test_the_tower_attends_image_by_image_in_a_rig():
    """Packed images of one size: each one's embeddings are its own call's (windowed and full
    attention per image), fp32."""
    import torch

    from densert.model.vision_meta import build_vision_meta
    pred = _predictor("torch")
    vc = pred.config.vision_config
    pres = [pred.prepare(im) for im in _frames(3, hw=(96, 160), seed=4)]
    grid = pres[0].grid
    one = [pred.backend.encode_image(p.pixel_values, build_vision_meta([grid], vc)) for p in pres]
    packed = pred.backend.encode_image(torch.cat([p.pixel_values for p in pres]),
                                       build_vision_meta([grid] * 3, vc))
    torch.testing.assert_close(packed, torch.cat(one), atol=1e-5, rtol=1e-5)


def test_generating_flows_batch_the_vision_only():
    """The release's segmentation flow generates from its prefill (a cache a batched prefill does
    not keep): its frames share the vision encoder and prefill one by one."""
    pred = _predictor("torch", fast=False)
    images = _frames(2)
    count = _Counting(pred)
    try:
        got = pred.batch(images, task="segment", classes=["floor", "wall"])
        calls = dict(count.calls)
    finally:
        count.close()
    assert calls["encode_image"] == 1 and calls["prefill_batch"] == 0 and calls["prefill"] >= 2
    for g, im in zip(got, images):
        np.testing.assert_array_equal(g.labels, pred.segment(im, classes=["floor", "wall"]).labels)


class _Live(Source):
    """A live camera: a frame every ``period`` seconds (``n`` of them; None: until closed)."""

    live = True

    def __init__(self, period: float, n: int | None, hw=(32, 48)):
        self.period, self.n, self.hw = period, n, hw
        self.stopped = threading.Event()

    def __iter__(self):
        i = 0
        while (self.n is None or i < self.n) and not self.stopped.is_set():
            time.sleep(self.period)
            yield Frame(i, np.full((*self.hw, 3), i * 8 % 256, np.uint8), f"frame_{i:06d}")
            i += 1

    def close(self):
        self.stopped.set()

    interrupt = close


@pytest.fixture(scope="module")
def pred():
    return DensePredictor(dtype="float32")


def test_a_fast_camera_does_not_starve_a_slow_one(pred):
    """'fast' always has a new frame waiting; 'slow' sends 6. Every round serves every camera
    with a frame, so each slow frame is processed or (replaced by a newer one) counted dropped,
    and its last frame is never lost; each camera keeps its own drop count."""
    fast, slow = _Live(0.001, None), _Live(0.04, 6)
    items = []
    for item in pred.stream({"fast": fast, "slow": slow}, task="depth"):
        items.append(item)
        got = [it for it in items if it.camera == "slow"]
        if got and got[-1].frame.index == 5:
            break
    slow_items = [it for it in items if it.camera == "slow"]
    fast_items = [it for it in items if it.camera == "fast"]
    idx = [it.frame.index for it in slow_items]
    assert idx == sorted(idx) and idx[-1] == 5 and len(idx) + sum(it.dropped for it in slow_items) == 6
    assert sum(it.dropped for it in fast_items) > 0   # the fast one outruns the model: its own drops
    assert all(it.batch in (1, 2) for it in items)    # a round holds at most one frame per camera
    # fast always has a frame waiting when a round starts, so slow's frames share rounds with it
    # (one size: the batched stages)
    assert any(it.batch == 2 for it in slow_items)


def test_recorded_cameras_run_in_lockstep_and_end_apart(pred):
    """Files keep every frame: frame k of each camera runs in one round (batched: one size),
    a camera that ends leaves the others going."""
    a, b = _frames(3, seed=2), _frames(2, seed=3)
    items = list(pred.stream({"left": a, "right": b}, task="depth"))
    assert [(it.camera, it.frame.index) for it in items] == [
        ("left", 0), ("right", 0), ("left", 1), ("right", 1), ("left", 2)]
    assert [it.batch for it in items] == [2, 2, 2, 2, 1]
    assert all(it.error is None and it.dropped == 0 for it in items)
    assert {"read", "preprocess", "vision", "prefill", "dense_head"} <= set(items[0].timings)
    for it, im in zip(items, [a[0], b[0], a[1], b[1], a[2]]):
        np.testing.assert_array_equal(it.result.depth, pred.depth(im).depth)


def test_round_policy_takes_one_waiting_frame_of_every_camera():
    """``stream._round``: live cameras - whatever waits, one each; all recorded - every camera
    that has not ended."""
    from densert.runtime.stream import _END, LatestSlot, _round

    class Cam:
        def __init__(self, live, cv, item=None, done=False):
            self.live, self.ready = live, LatestSlot(drop=False, cv=cv)
            if item is not None:
                self.ready.put(item)
            if done:
                self.ready.finish()

    cv = threading.Condition()
    cams = [Cam(True, cv, "a0"), Cam(True, cv), Cam(True, cv, "c0")]
    assert [(cams.index(c), p) for c, p in _round(cams, cv)] == [(0, "a0"), (2, "c0")]
    ended = [Cam(False, cv, "x0"), Cam(False, cv, None, done=True)]
    assert [p for _, p in _round(ended, cv)] == ["x0"]
    assert _round([Cam(False, cv, None, done=True)], cv) == []
    waiting = [Cam(False, cv, "y0"), Cam(False, cv)]
    late = threading.Timer(0.2, lambda: waiting[1].ready.put("z0"))
    late.start()
    t0 = time.perf_counter()
    assert [p for _, p in _round(waiting, cv)] == ["y0", "z0"]   # lockstep: waited for z0
    assert time.perf_counter() - t0 >= 0.15
    assert waiting[0].ready.take() is _END


def test_cli_source_per_camera_writes_one_folder_each(tmp_path, pred):
    front, rear = tmp_path / "front_in", tmp_path / "rear_in"
    front.mkdir(), rear.mkdir()
    for i in (0, 3):
        shutil.copy(SAMPLES / f"scene_{i}.png", front / f"scene_{i}.png")
    shutil.copy(SAMPLES / "scene_4.png", rear / "scene_4.png")
    out = tmp_path / "out"
    code = main(["depth", "--source", f"front={front}", "--source", f"rear={rear}", "--out", str(out),
                 "--dtype", "float32", "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (out / "front").glob("*.npy")) == ["scene_0.depth.npy", "scene_3.depth.npy"]
    assert sorted(p.name for p in (out / "rear").glob("*.npy")) == ["scene_4.depth.npy"]
    np.testing.assert_array_equal(np.load(out / "rear" / "scene_4.depth.npy"),
                                  pred.depth(rear / "scene_4.png").depth)
    dense = tmp_path / "dense"
    code = main(["dense", "--source", f"front={front}", "--source", f"rear={rear}", "--classes", "floor,wall",
                 "--out", str(dense), "--quiet", "--no-crf"])
    assert code == 0
    assert sorted(p.relative_to(dense).as_posix() for p in dense.rglob("*.npy")) == [
        "front/depth/scene_0.depth.npy", "front/depth/scene_3.depth.npy", "front/segment/scene_0.labels.npy",
        "front/segment/scene_3.labels.npy", "rear/depth/scene_4.depth.npy", "rear/segment/scene_4.labels.npy"]


@pytest.mark.parametrize("argv, words", [
    (["--source", "samples", "--source", "samples"], "with several sources name each camera"),
    (["--source", "a=samples", "--source", "a=samples"], "camera 'a' given twice"),
    (["--source", "2cam=samples", "--source", "b=samples"], "camera name '2cam': use a letter"),
    (["--source", "a=samples", "--source", "b=samples", "--topic", "c=/img"], "NAME one of a, b"),
])
def test_cli_rig_usage_errors_are_one_line(capsys, argv, words):
    assert main(["depth", *argv, "--out", "unused"]) == 2
    err = capsys.readouterr().err
    assert words in err and len(err.strip().splitlines()) == 1
    assert not Path("unused").exists()


def test_camera_source_parsing_keeps_paths_and_urls_whole(tmp_path):
    from densert.runtime.sources import camera_sources
    odd = tmp_path / "a=b.png"
    shutil.copy(SAMPLES / "scene_0.png", odd)
    assert camera_sources([str(odd)]) is None
    assert camera_sources(["rtsp://host/cam?user=x"]) is None
    assert camera_sources(["front=0", "rear=rtsp://host/cam?user=x"]) == {
        "front": "0", "rear": "rtsp://host/cam?user=x"}
    with pytest.raises(SourceError, match="name each camera"):
        camera_sources(["front=0", str(odd)])


@pytest.mark.parametrize("text, words", [
    (" , ", "names no camera"),
    ("front,front", "front given more than once"),
    ("front,rear/x", "camera name 'rear/x': use a letter"),
])
def test_ros2_camera_list_is_checked_before_the_model_loads(text, words):
    from densert.errors import CLIError
    from densert.runtime.ros2_node import camera_names
    with pytest.raises(CLIError, match=words):
        camera_names(text)
    assert camera_names("front, rear") == ["front", "rear"]
