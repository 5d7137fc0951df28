"""Frame sources: one loader for everything a robot or a user points densert at.

``open_source(spec, topic=None)`` reads ``spec`` as, in this order:

- a ``.mcap`` file, or a rosbag2 folder holding ``.mcap`` files: ``sensor_msgs/Image`` or
  ``sensor_msgs/CompressedImage`` messages of ``topic`` (the only image topic when there is one),
  read with the ``mcap`` / ``mcap-ros2-support`` packages: no ROS install needed;
- a camera index (``0``) or a stream URL (``rtsp://``, ``http(s)://``, ...), read with OpenCV;
  these sources are *live*: a consumer slower than the camera sees the latest frame (see
  ``stream.py``);
- a video file (``.mp4``, ``.avi``, ``.mkv``, ...), every frame in order, read with OpenCV;
- an image file, a folder of images (sorted, not recursive) or a glob (``"frames/*.png"``).

A camera rig names each source (``--source front=SRC``, ``pred.stream({"front": SRC})``,
``densert ros2 --cameras front,rear``): the name becomes an output folder and a ROS namespace, so
it is a letter followed by letters, digits and underscores (``CAMERA_NAME``).

Every source yields ``Frame``s: RGB uint8 arrays (image files stay paths, so the predictor's
decoder applies EXIF orientation and its size gate) with a 0-based index, a name for output files
and, when the source has one, a time stamp. A source that cannot be opened is one
``SourceError`` line naming it.
"""
from __future__ import annotations

import glob as globlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from densert.errors import SourceError
from densert.extras import require
from densert.image.decode import IMAGE_EXTENSIONS

VIDEO_EXTENSIONS = (".mp4", ".m4v", ".mov", ".avi", ".mkv", ".webm", ".mpg", ".mpeg", ".wmv",
                    ".flv", ".ts")
BAG_EXTENSIONS = (".mcap",)
STREAM_SCHEMES = ("rtsp", "rtsps", "rtmp", "http", "https", "udp", "tcp", "srt")
IMAGE_TYPES = ("sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage")
# OpenCV's camera index is a C int; no machine has more video devices than this.
MAX_CAMERA_INDEX = 9999
# ROS image encodings densert reads (sensor_msgs/image_encodings.hpp names).
ENCODINGS = ("rgb8", "bgr8", "mono8", "rgba8", "bgra8")
# A camera's name in a rig: a folder name anywhere and a ROS name token.
CAMERA_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")


@dataclass
class Frame:
    index: int                 # 0-based position in the source
    image: Any                 # RGB uint8 [H, W, 3] array, or an image file path
    name: str                  # output stem: the file's stem, else frame_<index:06d>
    stamp: float | None = None  # seconds: video position, bag log time or message header stamp
    focal: float | None = None  # px, when the source knows it (ROS camera_info); beats --focal
    meta: Any = None            # the source's own record of the frame (a ROS message header)
    # A message the source could not turn into an image (a bag's undecodable message): the
    # stream reports it as that frame's failure and goes on, as a folder does with a bad file.
    error: Exception | None = None


def frame_name(index: int) -> str:
    return f"frame_{index:06d}"


class Source:
    """An iterable of ``Frame``. ``live`` sources (cameras, network streams) run at their own
    rate, so a slow consumer skips frames; the others yield every frame once."""

    live = False
    description = ""

    def __iter__(self) -> Iterator[Frame]:
        raise NotImplementedError

    def __len__(self) -> int:  # frames, when known up front; 0 when not
        return 0

    def close(self) -> None:
        pass


class ImageFiles(Source):
    def __init__(self, paths: list[Path], names: list[str] | None = None):
        self.paths = paths
        self.names = names or [p.stem for p in paths]
        self.description = f"{len(paths)} image file(s)"

    def __len__(self):
        return len(self.paths)

    def __iter__(self):
        for i, (p, n) in enumerate(zip(self.paths, self.names)):
            yield Frame(i, p, n)


class VideoCapture(Source):
    """Video files, cameras and network streams through OpenCV's ``VideoCapture``."""

    def __init__(self, target: str | int, live: bool):
        # FFmpeg's own log lines ("moov atom not found") would precede our one-line error; a
        # user who wants them sets OPENCV_FFMPEG_LOGLEVEL themselves.
        os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")
        os.environ.setdefault("OPENCV_LOG_LEVEL", "ERROR")  # V4L's "can't open camera by index"
        cv2 = require("cv2", "video, camera and stream sources")
        self.target, self.live = target, live
        kind = "camera" if isinstance(target, int) else ("stream" if live else "video")
        self.description = f"{kind} {target}"
        self.cap = cv2.VideoCapture(target)
        if not self.cap.isOpened():
            self.cap.release()
            hint = {"camera": "is a camera connected at that index, and readable by this user?",
                    "stream": "is the URL right and the server reachable?",
                    "video": "is it a video file OpenCV's FFmpeg can decode?"}[kind]
            raise SourceError(f"cannot open {kind} {target!r}: {hint}")
        n = int(self.cap.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        self._count = max(n, 0) if not live else 0
        self.fps = float(self.cap.get(cv2.CAP_PROP_FPS) or 0.0)
        self._cv2 = cv2

    def __len__(self):
        return self._count

    def __iter__(self):
        cv2, i = self._cv2, 0
        try:
            while True:
                ok, bgr = self.cap.read()
                if not ok:
                    break
                ms = self.cap.get(cv2.CAP_PROP_POS_MSEC)
                yield Frame(i, cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB), frame_name(i),
                            stamp=ms / 1e3 if ms and ms > 0 else (i / self.fps if self.fps else None))
                i += 1
        finally:
            self.close()
        if i == 0:
            raise SourceError(f"{self.description}: no frame could be read")

    def close(self):
        self.cap.release()


class McapImages(Source):
    """``sensor_msgs/Image`` / ``CompressedImage`` messages of one topic of ROS 2 bag files."""

    def __init__(self, files: list[Path], topic: str | None):
        require("mcap_ros2.decoder", "reading ROS 2 bags (.mcap)")
        from mcap.reader import make_reader
        self.files = files
        topics: dict[str, str] = {}
        for f in files:
            try:
                with open(f, "rb") as fh:
                    summary = make_reader(fh).get_summary()
            except Exception as e:  # the mcap reader raises its own error types
                raise SourceError(f"{f}: not a readable MCAP file ({type(e).__name__}: {e})") from None
            if summary is None:
                continue
            for ch in summary.channels.values():
                schema = summary.schemas.get(ch.schema_id)
                if schema is not None:
                    topics[ch.topic] = schema.name
        images = sorted(t for t, s in topics.items() if s in IMAGE_TYPES)
        where = ", ".join(map(str, files))
        if not images and topic is None:
            raise SourceError(f"{where}: the bag has no image topic ({' or '.join(IMAGE_TYPES)}); "
                              f"its topics: {', '.join(sorted(topics)) or 'none'}")
        if topic is None:
            if len(images) != 1:
                listed = ", ".join(images) if images else "none"
                raise SourceError(f"{where}: pass --topic; image topics in the bag: {listed}")
            topic = images[0]
        elif topic not in topics:
            raise SourceError(f"{where}: no topic {topic!r}; image topics in the bag: "
                              f"{', '.join(images) or 'none'}")
        elif topics[topic] not in IMAGE_TYPES:
            raise SourceError(f"{where}: topic {topic!r} carries {topics[topic]}, not an image "
                              f"({' or '.join(IMAGE_TYPES)})")
        self.topic = topic
        self.description = f"bag {where} topic {topic}"

    def __iter__(self):
        from mcap.reader import make_reader
        from mcap_ros2.decoder import DecoderFactory
        i = 0
        for f in self.files:
            with open(f, "rb") as fh:
                reader = make_reader(fh, decoder_factories=[DecoderFactory()])
                for schema, _, message, msg in reader.iter_decoded_messages(topics=[self.topic]):
                    h = msg.header.stamp
                    stamp = h.sec + h.nanosec * 1e-9 if (h.sec or h.nanosec) else message.log_time * 1e-9
                    try:
                        if schema.name.endswith("CompressedImage"):
                            rgb = _decode_compressed(bytes(msg.data), f"{f} message {i}")
                        else:
                            rgb = image_msg_to_rgb(msg.encoding, msg.height, msg.width, msg.step,
                                                   bytes(msg.data), f"{f} message {i}")
                    except SourceError as e:  # one bad message: that frame fails, the bag goes on
                        yield Frame(i, None, frame_name(i), stamp=stamp, error=e)
                    else:
                        yield Frame(i, rgb, frame_name(i), stamp=stamp)
                    i += 1


def image_msg_to_rgb(encoding: str, height: int, width: int, step: int, data: bytes,
                     where: str = "image") -> np.ndarray:
    """A ``sensor_msgs/Image`` payload -> RGB uint8 [H, W, 3] (rows may be padded to ``step``)."""
    channels = {"rgb8": 3, "bgr8": 3, "mono8": 1, "rgba8": 4, "bgra8": 4}.get(encoding)
    if channels is None:
        raise SourceError(f"{where}: image encoding {encoding!r} is not supported; expected one "
                          f"of {', '.join(ENCODINGS)}")
    row = width * channels
    if height <= 0 or width <= 0:
        raise SourceError(f"{where}: {encoding} image message is {width}x{height}: an empty image")
    if step < row or len(data) < step * (height - 1) + row:
        raise SourceError(f"{where}: {encoding} image {width}x{height} with step {step} needs "
                          f"{step * height} bytes, the message holds {len(data)}")
    buf = np.frombuffer(data, dtype=np.uint8)
    if len(buf) < step * height:  # the last row may come unpadded
        buf = np.concatenate([buf, np.zeros(step * height - len(buf), np.uint8)])
    a = buf[: step * height].reshape(height, step)[:, :row].reshape(height, width, channels)
    if encoding == "mono8":
        return np.repeat(a, 3, axis=2)
    if encoding.startswith("bgr"):
        return np.ascontiguousarray(a[..., 2::-1])
    return np.ascontiguousarray(a[..., :3])


def _decode_compressed(data: bytes, where: str) -> np.ndarray:
    from densert.image.decode import load_rgb
    try:
        return load_rgb(data)
    except Exception as e:
        raise SourceError(f"{where}: compressed image cannot be decoded ({e})") from None


def check_camera_name(name) -> str:
    """A rig's camera name (``CAMERA_NAME``), or a ``SourceError`` saying what is wrong."""
    if not isinstance(name, str) or not CAMERA_NAME.fullmatch(name):
        raise SourceError(f"camera name {name!r}: use a letter followed by letters, digits and "
                          "underscores (it names an output folder and a ROS namespace)")
    return name


def camera_sources(specs: list[str]) -> dict[str, str] | None:
    """``--source`` values: one plain SRC (None: no rig), or NAME=SRC each, the names distinct."""
    if len(specs) == 1 and not _named(specs[0]):
        return None
    out: dict[str, str] = {}
    for spec in specs:
        if not _named(spec):
            raise SourceError(f"--source {spec!r}: with several sources name each camera, "
                              "--source NAME=SRC (e.g. --source front=0 --source rear=1)")
        name, src = spec.split("=", 1)
        if name in out:
            raise SourceError(f"--source: camera {name!r} given twice")
        out[check_camera_name(name)] = src
    return out


def _named(spec: str) -> bool:
    """NAME=SRC, not a path or URL that holds '=' (``rtsp://h/?a=b``, ``./x=1.png``)."""
    name = spec.split("=", 1)[0]
    return "=" in spec and not any(c in name for c in "/\\:.") and not Path(spec).exists()


def _is_glob(spec: str) -> bool:
    return any(c in spec for c in "*?[")


def open_source(spec: str | int, topic: str | None = None) -> Source:
    """The source ``spec`` names (module docstring); ``topic`` for bags only."""
    s = str(spec).strip()
    if not s:
        raise SourceError("empty --source")
    if topic is not None and not _is_bag(s):
        raise SourceError(f"--topic applies to ROS 2 bags (.mcap), not to {s!r}")
    if _is_bag(s):
        p = Path(s)
        files = sorted(p.glob("*.mcap")) if p.is_dir() else [p]
        if not p.exists():
            raise SourceError(f"{s}: no such file")
        return McapImages(files, topic)
    if re.fullmatch(r"\d+", s):
        if int(s) > MAX_CAMERA_INDEX:
            raise SourceError(f"camera index {s} is out of range (0..{MAX_CAMERA_INDEX}); for a "
                              "file of that name pass ./" + s)
        return VideoCapture(int(s), live=True)
    scheme = s.split("://", 1)[0].lower() if "://" in s else None
    if scheme is not None:
        if scheme not in STREAM_SCHEMES:
            raise SourceError(f"{s}: unsupported stream scheme {scheme!r}; expected one of "
                              f"{', '.join(STREAM_SCHEMES)}")
        return VideoCapture(s, live=True)
    p = Path(s)
    if p.suffix.lower() in VIDEO_EXTENSIONS:
        if not p.is_file():
            raise SourceError(f"{s}: no such video file")
        return VideoCapture(str(p), live=False)
    if _is_glob(s) and not p.exists():
        paths = [Path(q) for q in sorted(globlib.glob(s))
                 if Path(q).is_file() and Path(q).suffix.lower() in IMAGE_EXTENSIONS]
        if not paths:
            raise SourceError(f"{s}: the pattern matches no image file")
        return ImageFiles(paths)
    if p.is_dir():
        paths = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        if not paths:
            raise SourceError(f"{s}: the folder holds no image files ({', '.join(IMAGE_EXTENSIONS)}), "
                              "video or .mcap bag")
        return ImageFiles(paths)
    if not p.exists():
        raise SourceError(f"{s}: no such file, folder, camera index or stream URL")
    return ImageFiles([p])


def _is_bag(s: str) -> bool:
    p = Path(s)
    if p.suffix.lower() in BAG_EXTENSIONS:
        return True
    return p.is_dir() and any(p.glob("*.mcap")) and not any(
        q.suffix.lower() in IMAGE_EXTENSIONS for q in p.iterdir())
