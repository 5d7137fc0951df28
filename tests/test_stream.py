"""Frame sources, ``DensePredictor.stream`` and the ``--source`` commands: a video made here, a ROS 2
bag written here, folders and globs, sources that cannot be opened, the latest-frame policy, and
the console lines."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from densert.cli import main
from densert.errors import SourceError
from densert.runtime.options import DenseOptions
from densert.runtime.predictor import DensePredictor
from densert.runtime.sources import Frame, ImageFiles, Source, image_msg_to_rgb, open_source
from densert.runtime.speed import SpeedReport

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="module")
def pred():
    return DensePredictor()


def _clip(path: Path, n: int = 6, hw=(64, 96)) -> list[np.ndarray]:
    """A short mp4 (mp4v) of a bar sweeping right; returns the frames as OpenCV decodes them
    back (the codec is lossy)."""
    import cv2
    h, w = hw
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (w, h))
    assert writer.isOpened()
    for i in range(n):
        bgr = np.full((h, w, 3), 40, np.uint8)
        bgr[:, : 10 + i * (w - 10) // n] = (30, 140, 250)
        bgr[h // 2:] //= 2
        writer.write(bgr)
    writer.release()
    cap, frames = cv2.VideoCapture(str(path)), []
    while True:
        ok, bgr = cap.read()
        if not ok:
            break
        frames.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB))
    cap.release()
    assert len(frames) == n
    return frames


def test_depth_source_video_writes_one_map_per_frame(tmp_path, pred):
    """The issue's command, as a user types it: a depth map per frame of a video, named by index."""
    frames = _clip(tmp_path / "clip.mp4")
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "densert", "depth", "--source", str(tmp_path / "clip.mp4"),
                        "--out", str(out)], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    maps = sorted(out.glob("*.depth.npy"))
    assert [p.name for p in maps] == [f"frame_{i:06d}.depth.npy" for i in range(len(frames))]
    assert len(list(out.glob("frame_*.json"))) == len(frames)
    for p, rgb in zip(maps, frames):
        d = np.load(p)
        assert d.shape == rgb.shape[:2] and d.dtype == np.float32
        np.testing.assert_array_equal(d, pred.depth(rgb).depth)  # the same frame, one call
    lines = [ln for ln in r.stderr.splitlines() if ln.startswith("frame ")]
    assert len(lines) == len(frames) and "prefill" in lines[0] and "fps" in lines[0]
    assert f"{len(frames)} frame(s) in" in r.stderr and "p50 ms" in r.stderr and "0 dropped" in r.stderr
    q = subprocess.run([sys.executable, "-m", "densert", "depth", "--source", str(tmp_path / "clip.mp4"),
                        "--out", str(tmp_path / "q"), "--quiet"], capture_output=True, text=True, cwd=ROOT)
    assert q.returncode == 0 and q.stderr == ""


def test_sources_of_files_folders_and_globs(tmp_path):
    for i in (3, 0):
        shutil.copy(SAMPLES / f"scene_{i}.png", tmp_path / f"s{i}.png")
    (tmp_path / "notes.txt").write_text("not an image")
    folder = open_source(str(tmp_path))
    assert isinstance(folder, ImageFiles) and not folder.live
    assert [f.name for f in folder] == ["s0", "s3"] and len(folder) == 2
    assert [f.image for f in open_source(str(tmp_path / "s*.png"))] == [tmp_path / "s0.png", tmp_path / "s3.png"]
    assert [f.index for f in open_source(str(tmp_path / "s3.png"))] == [0]
    with pytest.raises(SourceError, match="matches no image"):
        open_source(str(tmp_path / "*.jpg"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SourceError, match="holds no image"):
        open_source(str(empty))
    with pytest.raises(SourceError, match="no such file"):
        open_source(str(tmp_path / "missing.png"))
    with pytest.raises(SourceError, match="--topic applies to ROS 2 bags"):
        open_source(str(tmp_path), topic="/cam")


def test_sources_that_cannot_be_opened_say_so():
    import socket
    with socket.socket() as s:  # a loopback port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(SourceError, match=r"cannot open stream 'http://127\.0\.0\.1:\d+/cam\.mjpg'"):
        open_source(f"http://127.0.0.1:{port}/cam.mjpg")
    with pytest.raises(SourceError, match="cannot open camera 97"):
        open_source("97")
    with pytest.raises(SourceError, match="unsupported stream scheme 'ftp'"):
        open_source("ftp://127.0.0.1/x")


def test_cli_source_errors_are_one_line(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video")
    for args, msg in ((["depth", "--source", str(bad)], "cannot open video"),
                      (["depth", "--source", str(SAMPLES / "scene_0.png"), str(SAMPLES / "scene_3.png")],
                       "either IMAGE arguments or --source"),
                      (["depth"], "no input: give IMAGE arguments or --source"),
                      (["dense", "--source", str(SAMPLES), "--no-depth"], "nothing to compute"),
                      (["depth", "--source", str(SAMPLES / "scene_0.png"), "--show"],
                       "--show needs a display")):
        env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
        r = subprocess.run([sys.executable, "-m", "densert", *args, "--out", str(tmp_path / "o")],
                           capture_output=True, text=True, cwd=ROOT, env=env)
        assert r.returncode == 2, r.stderr
        assert msg in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr


IMAGE_MSGDEF = """std_msgs/Header header
uint32 height
uint32 width
string encoding
uint8 is_bigendian
uint32 step
uint8[] data
================================================================================
MSG: std_msgs/Header
builtin_interfaces/Time stamp
string frame_id
================================================================================
MSG: builtin_interfaces/Time
int32 sec
uint32 nanosec
"""


def _bag(path: Path, frames: list[np.ndarray]) -> None:
    pytest.importorskip("mcap_ros2", reason="densert[bag] (mcap, mcap-ros2-support) is not installed")
    from mcap_ros2.writer import Writer
    with open(path, "wb") as f:
        w = Writer(f)
        image = w.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSGDEF)
        other = w.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSGDEF)
        text = w.register_msgdef("std_msgs/msg/String", "string data\n")
        for i, rgb in enumerate(frames):
            h, wd = rgb.shape[:2]
            bgr = np.ascontiguousarray(rgb[..., ::-1])
            msg = {"header": {"stamp": {"sec": 10 + i, "nanosec": 500}, "frame_id": "cam"},
                   "height": h, "width": wd, "encoding": "bgr8", "is_bigendian": 0, "step": wd * 3,
                   "data": bgr.tobytes()}
            w.write_message("/cam/image", image, msg, log_time=(10 + i) * 10**9)
            w.write_message("/cam/image_other", other, msg, log_time=(10 + i) * 10**9)
            w.write_message("/chatter", text, {"data": f"hello {i}"}, log_time=(10 + i) * 10**9)
        w.finish()


def test_ros2_bag_source_and_command(tmp_path, pred):
    rng = np.random.default_rng(0)
    frames = [rng.integers(0, 256, (48, 64, 3), dtype=np.uint8) for _ in range(3)]
    bag = tmp_path / "run.mcap"
    _bag(bag, frames)
    with pytest.raises(SourceError, match="pass --topic; image topics in the bag: /cam/image, /cam/image_other"):
        open_source(str(bag))
    with pytest.raises(SourceError, match="carries std_msgs/msg/String, not an image"):
        open_source(str(bag), topic="/chatter")
    src = open_source(str(bag), topic="/cam/image")
    got = list(src)
    assert [f.stamp for f in got] == [10.0000005, 11.0000005, 12.0000005]
    for f, rgb in zip(got, frames):
        np.testing.assert_array_equal(f.image, rgb)  # bgr8 on the wire, RGB out
    out = tmp_path / "out"
    assert main(["depth", "--source", str(bag), "--topic", "/cam/image", "--out", str(out), "--quiet"]) == 0
    maps = sorted(out.glob("*.depth.npy"))
    assert len(maps) == 3
    np.testing.assert_array_equal(np.load(maps[1]), pred.depth(frames[1]).depth)


def test_image_message_decoding_checks_its_payload():
    a = np.arange(2 * 3 * 3, dtype=np.uint8).reshape(2, 3, 3)
    padded = np.zeros((2, 12), np.uint8)
    padded[:, :9] = a.reshape(2, 9)
    np.testing.assert_array_equal(image_msg_to_rgb("rgb8", 2, 3, 12, padded.tobytes()), a)
    np.testing.assert_array_equal(image_msg_to_rgb("bgr8", 2, 3, 9, a.tobytes()), a[..., ::-1])
    mono = image_msg_to_rgb("mono8", 2, 3, 3, a[..., 0].tobytes())
    assert mono.shape == (2, 3, 3) and (mono[..., 0] == mono[..., 2]).all()
    with pytest.raises(SourceError, match="encoding '32FC1' is not supported"):
        image_msg_to_rgb("32FC1", 2, 3, 12, bytes(24))
    with pytest.raises(SourceError, match="needs 18 bytes, the message holds 10"):
        image_msg_to_rgb("rgb8", 2, 3, 9, bytes(10))


class _Camera(Source):
    """A live source faster than the model: frames every ``period`` seconds."""

    live = True

    def __init__(self, n: int, period: float):
        self.n, self.period = n, period

    def __iter__(self):
        for i in range(self.n):
            time.sleep(self.period)
            yield Frame(i, np.full((32, 48, 3), i * 8 % 256, np.uint8), f"frame_{i:06d}")


def test_stream_keeps_the_latest_frame_of_a_live_source(pred):
    items = []
    for item in pred.stream(_Camera(40, 0.005), task="depth"):
        time.sleep(0.05)  # a consumer slower than the camera
        items.append(item)
    idx = [it.frame.index for it in items]
    assert idx == sorted(idx) and idx[-1] == 39  # in order, and the newest frame is never lost
    dropped = sum(it.dropped for it in items)
    assert dropped > 0 and len(items) + dropped == 40  # every frame is processed or counted


def test_stream_of_files_keeps_every_frame_and_overlaps_preprocessing(pred, monkeypatch):
    from densert.runtime import stream
    threads = {}
    real = stream.prepare_frame

    def spy(p, spec, frame, tm):
        threads.setdefault("prepare", set()).add(threading.current_thread().name)
        return real(p, spec, frame, tm)
    monkeypatch.setattr(stream, "prepare_frame", spy)
    paths = [SAMPLES / f"scene_{i}.png" for i in (0, 3, 4, 6)] * 2
    items = list(pred.stream([str(p) for p in paths], task="segment", classes=["floor", "wall"]))
    assert [it.frame.index for it in items] == list(range(8)) and sum(it.dropped for it in items) == 0
    assert threads["prepare"] == {"densert-stream-prepare"}  # not the model's (this) thread
    assert {"read", "preprocess", "vision", "prefill", "dense_head"} <= set(items[0].timings)
    ref = pred.segment(paths[1], classes=["floor", "wall"])
    np.testing.assert_array_equal(items[1].result.labels, ref.labels)
    assert items[1].result.info["image"] == str(paths[1])


def test_a_prepared_image_gives_the_calls_own_result(pred):
    """``prepare`` is what the stream's preparation thread runs: a task call on its result equals
    the call on the file, the focal rescale included."""
    img = SAMPLES / "scene_3.png"
    plain = pred.prepare(img)
    np.testing.assert_array_equal(pred.depth(plain).depth, pred.depth(img).depth)
    scaled = pred.prepare(img, focal=1000.0, preset="open-world")
    assert scaled.resized_hw != plain.resized_hw  # 2000 px canonical focal: twice the size
    ref = pred.depth(img, preset="open-world", focal=1000.0)
    got = pred.depth(scaled, preset="open-world", focal=1000.0)
    np.testing.assert_array_equal(got.depth, ref.depth)
    assert got.effective_focal == ref.effective_focal


def test_stream_reports_a_bad_frame_and_goes_on(tmp_path, pred):
    shutil.copy(SAMPLES / "scene_0.png", tmp_path / "a.png")
    (tmp_path / "b.png").write_bytes(b"\x89PNG broken")
    shutil.copy(SAMPLES / "scene_3.png", tmp_path / "c.png")
    items = list(pred.stream(str(tmp_path), task="depth"))
    assert [it.error is None for it in items] == [True, False, True]
    assert "b.png" in str(items[1].error)
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "densert", "depth", "--source", str(tmp_path), "--out", str(out)],
                       capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 1
    assert sorted(p.name for p in out.glob("*.npy")) == ["a.depth.npy", "c.depth.npy"]
    assert "densert depth: error:" in r.stderr and "b.png" in r.stderr and "1 frame(s) failed" in r.stderr


def test_dense_command_writes_depth_and_segment_sets(tmp_path, pred):
    src = tmp_path / "in"
    src.mkdir()
    for i in (0, 4):
        shutil.copy(SAMPLES / f"scene_{i}.png", src / f"scene_{i}.png")
    out = tmp_path / "out"
    code = main(["dense", "--source", str(src), "--classes", "floor,wall", "--preset", "open-world",
                 "--out", str(out), "--quiet"])
    assert code == 0
    assert sorted(p.name for p in (out / "depth").glob("*.npy")) == ["scene_0.depth.npy", "scene_4.depth.npy"]
    assert sorted(p.name for p in (out / "segment").glob("*.labels.npy")) == ["scene_0.labels.npy",
                                                                              "scene_4.labels.npy"]
    # dense's segmentation is segment()'s one-prefill flow (every given class scored)
    fast = DensePredictor(options=DenseOptions(fast=True))
    np.testing.assert_array_equal(np.load(out / "segment" / "scene_4.labels.npy"),
                                  fast.segment(src / "scene_4.png", classes=["floor", "wall"]).labels)


def test_speed_report_percentiles():
    rep = SpeedReport("t", total=4)
    for ms in (10, 20, 30, 40):
        rep.add({"prefill": ms / 1e3}, dropped=1, latency=ms / 1e3)
    s = rep.summary()
    assert "4 frame(s)" in s and "4 dropped" in s
    row = next(ln for ln in s.splitlines() if ln.strip().startswith("prefill")).split()
    assert row[1:] == ["25.0", "37.0", "25.0"]  # p50, p90, mean
    assert rep.line(0, "f", (2, 3), "depth", {"prefill": 0.0125}).startswith("frame 1/4 f 3x2 depth: prefill 12.5ms")


@pytest.mark.parametrize("module,args,extra", [
    ("rclpy", ["ros2"], "ros2"),
    ("mcap_ros2", ["depth", "--source", "run.mcap"], "bag"),
])
def test_missing_extra_of_a_source_is_one_line(tmp_path, module, args, extra):
    for name in ("clip.mp4", "run.mcap"):
        (tmp_path / name).write_bytes(b"x")
    code = (f"import sys\nsys.modules[{module!r}] = None\nfrom densert.cli import main\n"
            f"sys.exit(main({args!r}))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().endswith(f"which is not installed: pip install 'densert[{extra}]'"), r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
