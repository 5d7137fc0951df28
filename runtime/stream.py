"""``DensePredictor.stream(frames)``: a long-lived frame loop around one loaded predictor.

Three stages run at once: a reader thread pulls frames from the source, a preparation thread
decodes and preprocesses the newest one (the processor's resize and patchify), and the caller's
thread runs the model on the frame before it. The predictor keeps its backend, vision metadata
per patch grid and subset weights per class list between frames, so frame t+1 costs only its own
work.

Between the stages sit one-frame slots. For a live source (camera, network stream, ROS topic) a
slot keeps the latest frame: a frame the model had no time for is replaced by a newer one and
counted as dropped (``StreamItem.dropped``, ``SpeedReport``). For files, videos and bags every
frame is processed in order (the reader waits), unless ``drop=True`` is asked for.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

from .registry import REGISTRY
from .sources import Frame, Source
from .speed import Timings

TASKS = tuple(name for name, task in REGISTRY.items() if task.streams)
_END = object()


@dataclass
class StreamItem:
    frame: Frame
    result: Any                 # what the task's call returns; None when ``error``
    timings: dict               # stage -> seconds: read, preprocess, then the task's stages
    dropped: int                # frames dropped (latest-frame policy) since the previous item
    latency: float              # seconds from the frame's arrival to its result
    error: Exception | None = None


class LatestSlot:
    """A one-item hand-over between threads. ``drop``: a put replaces an item nobody took yet
    (counted in ``dropped``); otherwise a put waits until the item is taken."""

    def __init__(self, drop: bool):
        self.drop = drop
        self._cv = threading.Condition()
        self._item: Any = _END
        self._full = False
        self.closed = False
        self.dropped = 0

    def put(self, item) -> bool:
        """False when the slot was closed (the consumer went away)."""
        with self._cv:
            while self._full and not self.drop and not self.closed:
                self._cv.wait()
            if self.closed:
                return False
            if self._full:
                self.dropped += 1
            self._item, self._full = item, True
            self._cv.notify_all()
            return True

    def get(self):
        """The next item, or ``_END`` once closed and empty."""
        with self._cv:
            while not self._full and not self.closed:
                self._cv.wait()
            if not self._full:
                return _END
            item, self._item, self._full = self._item, _END, False
            self._cv.notify_all()
            return item

    def take_dropped(self) -> int:
        """Frames dropped since the last call (read and reset under the lock)."""
        with self._cv:
            n, self.dropped = self.dropped, 0
            return n

    def close(self) -> None:
        with self._cv:
            self.closed = True
            self._cv.notify_all()

    def finish(self) -> None:
        """No more puts: the consumer drains what is there, then ends."""
        self.close()


class LiveFrames(Source):
    """Frames pushed by a callback (a ROS subscription): a live source whose waiting frame is
    replaced by a newer one (``dropped`` counts them) until ``close``."""

    live = True
    description = "pushed frames"

    def __init__(self):
        self._slot = LatestSlot(drop=True)

    @property
    def dropped(self) -> int:
        return self._slot.dropped

    def push(self, frame: Frame) -> None:
        self._slot.put(frame)

    def __iter__(self):
        while (f := self._slot.get()) is not _END:
            yield f

    def close(self) -> None:
        self._slot.close()

    interrupt = close


@dataclass
class _Prepared:
    frame: Frame
    pre: Any
    timings: dict
    arrived: float
    dropped: int = 0
    error: Exception | None = None


@dataclass
class _Raw:
    frame: Frame
    read_s: float
    arrived: float


@dataclass
class TaskSpec:
    """What the stream runs on each frame: a task of the registry that streams, and the keyword
    options of its call (``DensePredictor.stream`` checks their values)."""
    task: str = "depth"
    options: dict = field(default_factory=dict)

    @classmethod
    def of(cls, task, options: dict) -> "TaskSpec":
        """``DensePredictor.stream``'s ``task`` and ``**task_options``, checked by name."""
        from densert.errors import OptionError
        if not isinstance(task, str) or not getattr(REGISTRY.get(task), "streams", False):
            raise OptionError(f"task {task!r}: expected one of "
                              f"{tuple(n for n, t in REGISTRY.items() if t.streams)}")
        names = REGISTRY[task].options
        bad = sorted(set(options) - set(names))
        if bad:
            raise OptionError(f"unknown task option(s) {', '.join(bad)}; a {task} stream takes "
                              f"{', '.join(names)}")
        return cls(task, dict(options))

    @property
    def rescales(self) -> bool:
        """Its depth map is asked for: frames get the depth call's focal rescale."""
        return "focal" in REGISTRY[self.task].options and self.options.get("depth", True)


def _prepare(pred, spec: TaskSpec, frame: Frame, tm):
    """Decode and preprocess ``frame`` as the task's call would (depth: the focal rescale)."""
    if getattr(frame, "error", None) is not None:
        raise frame.error
    if spec.rescales:
        return pred.prepare(frame.image, frame_focal(frame, spec), spec.options.get("preset"), tm)
    return pred.prepare(frame.image, timings=tm)


def frame_focal(frame: Frame, spec: TaskSpec) -> float | None:
    f = getattr(frame, "focal", None)
    return f if f is not None else spec.options.get("focal")


def _run(pred, spec: TaskSpec, frame: Frame, pre):
    """The task's call on the prepared frame; an option left None keeps the call's default."""
    task = REGISTRY[spec.task]
    options = dict(spec.options)
    if "focal" in task.options:
        options["focal"] = frame_focal(frame, spec)
    return getattr(pred, task.method)(pre, **{k: v for k, v in options.items() if v is not None})


def as_frames(frames) -> Iterable[Frame] | Source:
    """A ``Source`` or iterable of ``Frame`` as is; any other iterable (arrays, paths, PIL
    images) numbered as frames."""
    if isinstance(frames, Source):
        return frames

    def wrap():
        from .sources import frame_name
        for i, f in enumerate(frames):
            yield f if isinstance(f, Frame) else Frame(i, f, frame_name(i))
    return wrap()


def _label(result, frame: Frame):
    """Sidecars name the frame (the predictor saw a preprocessed array, not the file)."""
    label = str(frame.image) if not hasattr(frame.image, "shape") else frame.name
    for r in getattr(result, "results", None) or [result]:
        r.info = {**(r.info or {}), "image": label}
    return result


def stream(pred, frames: Iterable[Frame] | Source, spec: TaskSpec,
           drop: bool | None = None) -> Iterator[StreamItem]:
    """Results for ``frames`` in order (module docstring). ``drop`` None: the source's ``live``
    flag. A frame that fails (unreadable file, bad size) is an item with ``error`` set; the
    stream goes on. Closing the generator stops the threads."""
    live = bool(getattr(frames, "live", False)) if drop is None else drop
    raw = LatestSlot(drop=live)
    ready = LatestSlot(drop=False)
    stop = threading.Event()
    failure: list[BaseException] = []

    def reader():
        try:
            it = iter(as_frames(frames))
            while not stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(it)
                except StopIteration:
                    break
                now = time.perf_counter()
                if not raw.put(_Raw(frame, now - t0, now)):
                    break
        except BaseException as e:  # a source that fails mid-stream ends the stream with its error
            failure.append(e)
        finally:
            raw.finish()

    def preparer():
        try:
            while not stop.is_set():
                r = raw.get()
                if r is _END:
                    break
                dropped = raw.take_dropped()
                tm = Timings(read=r.read_s)
                try:
                    pre = _prepare(pred, spec, r.frame, tm)
                    item = _Prepared(r.frame, pre, dict(tm), r.arrived, dropped)
                except Exception as e:  # one bad frame: reported, the stream goes on
                    item = _Prepared(r.frame, None, dict(tm), r.arrived, dropped, error=e)
                if not ready.put(item):
                    break
        except BaseException as e:
            failure.append(e)
        finally:
            ready.finish()

    threads = [threading.Thread(target=reader, name="densert-stream-read", daemon=True),
               threading.Thread(target=preparer, name="densert-stream-prepare", daemon=True)]
    for t in threads:
        t.start()
    try:
        while True:
            p = ready.get()
            if p is _END:
                break
            if p.error is not None:
                yield StreamItem(p.frame, None, p.timings, p.dropped,
                                 time.perf_counter() - p.arrived, error=p.error)
                continue
            try:
                result = _label(_run(pred, spec, p.frame, p.pre), p.frame)
            except Exception as e:
                yield StreamItem(p.frame, None, p.timings, p.dropped,
                                 time.perf_counter() - p.arrived, error=e)
                continue
            timings = {**p.timings, **result.timings}
            yield StreamItem(p.frame, result, timings, p.dropped, time.perf_counter() - p.arrived)
        if failure:
            raise failure[0]
    finally:
        stop.set()
        raw.close()
        ready.close()
        close = getattr(frames, "close", None)
        interrupt = getattr(frames, "interrupt", None)
        if interrupt is not None:  # a reader waiting on a pushed source wakes up
            interrupt()
        for t in threads:
            t.join(timeout=1.0)
        if close is not None and not any(t.is_alive() for t in threads):
            close()
