"""Hostile frame sources: a source that cannot be opened is one line (exit 2) and leaves no
``--out``; a bad message inside a bag is one line, counted as skipped, and the run goes on."""
from __future__ import annotations

import numpy as np
import pytest

# The Header part of sensor_msgs definitions: test_stream's Image definition, after its fields.
from test_stream import IMAGE_MSGDEF

from densert.cli import main
from densert.errors import SourceError
from densert.runtime.sources import image_msg_to_rgb, open_source

COMPRESSED_MSGDEF = "std_msgs/Header header\nstring format\nuint8[] data\n" + \
    IMAGE_MSGDEF[IMAGE_MSGDEF.index("=" * 80):]


def _one_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith(f"densert {command}: error: "), err
    return lines[0].split("error: ", 1)[1]


def _bag(path, messages, with_images=True):
    """``messages``: (kind, payload) with kind "raw" (an RGB array, or a dict of Image fields)
    or "jpeg" (bytes of a CompressedImage)."""
    from mcap_ros2.writer import Writer
    with open(path, "wb") as f:
        w = Writer(f)
        raw = w.register_msgdef("sensor_msgs/msg/Image", IMAGE_MSGDEF)
        comp = w.register_msgdef("sensor_msgs/msg/CompressedImage", COMPRESSED_MSGDEF)
        text = w.register_msgdef("std_msgs/msg/String", "string data\n")
        for i, (kind, p) in enumerate(messages):
            head = {"stamp": {"sec": 1 + i, "nanosec": 0}, "frame_id": "cam"}
            if not with_images:
                w.write_message("/chatter", text, {"data": "x"}, log_time=(1 + i) * 10**9)
            elif kind == "jpeg":
                w.write_message("/cam", comp, {"header": head, "format": "jpeg", "data": p},
                                log_time=(1 + i) * 10**9)
            else:
                fields = p if isinstance(p, dict) else {
                    "height": p.shape[0], "width": p.shape[1], "encoding": "rgb8",
                    "step": p.shape[1] * 3, "data": p.tobytes()}
                w.write_message("/cam/raw", raw, {"header": head, "is_bigendian": 0, **fields},
                                log_time=(1 + i) * 10**9)
        w.finish()


def test_huge_camera_index_is_one_line(tmp_path, capsys):
    with pytest.raises(SourceError, match="camera index 99999999999999999999 is out of range"):
        open_source("99999999999999999999")
    out = tmp_path / "o"
    assert main(["depth", "--source", "99999999999999999999", "--out", str(out)]) == 2
    assert "out of range" in _one_line(capsys.readouterr().err, "depth")
    assert not out.exists()  # the failed run leaves no empty --out


def test_missing_source_leaves_no_out(tmp_path, capsys):
    out = tmp_path / "o" / "deeper"
    assert main(["dense", "--source", str(tmp_path / "nothing.mp4"), "--out", str(out)]) == 2
    assert "no such video file" in _one_line(capsys.readouterr().err, "dense")
    assert not (tmp_path / "o").exists()


def test_empty_image_message_says_so():
    with pytest.raises(SourceError, match="rgb8 image message is 0x0: an empty image"):
        image_msg_to_rgb("rgb8", 0, 0, 0, b"", "bag message 3")


def test_bag_without_image_topics_says_so(tmp_path):
    pytest.importorskip("mcap_ros2")
    bag = tmp_path / "t.mcap"
    _bag(bag, [("raw", None)], with_images=False)
    with pytest.raises(SourceError, match=r"the bag has no image topic .*its topics: /chatter"):
        open_source(str(bag))


def test_bad_bag_messages_are_skipped_and_the_run_goes_on(tmp_path, capsys):
    pytest.importorskip("mcap_ros2")
    import io

    from PIL import Image
    rng = np.random.default_rng(0)
    good = [rng.integers(0, 256, (32, 48, 3), dtype=np.uint8) for _ in range(2)]
    buf = io.BytesIO()
    Image.fromarray(good[1]).save(buf, "PNG")
    bag = tmp_path / "c.mcap"
    _bag(bag, [("jpeg", b"garbage"), ("jpeg", buf.getvalue()), ("jpeg", b"")])
    frames = list(open_source(str(bag)))
    assert [f.error is not None for f in frames] == [True, False, True]
    assert "compressed image cannot be decoded" in str(frames[0].error)
    bag2 = tmp_path / "r.mcap"
    _bag(bag2, [("raw", {"height": 32, "width": 48, "encoding": "yuv422", "step": 96,
                         "data": bytes(32 * 96)}), ("raw", good[0]),
                ("raw", {"height": 0, "width": 0, "encoding": "rgb8", "step": 0, "data": b""})])
    out = tmp_path / "o"
    rc = main(["depth", "--source", str(bag2), "--out", str(out), "--preset", "open-world"])
    err = capsys.readouterr().err
    assert rc == 1, err  # some frame failed: the others are written
    assert len(list(out.glob("*.depth.npy"))) == 1 and (out / "frame_000001.depth.npy").is_file()
    errors = [ln for ln in err.splitlines() if ": error: " in ln]
    assert len(errors) == 2 and "encoding 'yuv422' is not supported" in errors[0]
    assert "0x0: an empty image" in errors[1]
    assert "1 frame(s) in" in err and "2 skipped (failed)" in err and "Traceback" not in err
