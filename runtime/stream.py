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

Several cameras (``frames`` a dict: name -> source) share the one model. Each camera has its own
reader thread and its own slots, and so its own latest frame and drop count; one preparation
thread serves every camera in turn (so one frame's preprocessing memory is in use at a time). The
model thread serves them in rounds: a round takes the waiting frame of **every** camera that has
one (at most one per camera, in the dict's order) and runs them together (``DensePredictor.
_batch``: frames of one size share the vision encoder and the prefill where the backend batches
them), so a fast camera cannot starve a slow one: each waits at most one round. When every
camera keeps every frame (files, videos, bags: no drop), a round waits until each camera that
has not ended has its next frame, so frame k of every camera runs together; with a live camera
a round starts as soon as any frame waits. Items come out round by round, tagged with their
``camera``.
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
                                # (of this camera)
    latency: float              # seconds from the frame's arrival to its result
    error: Exception | None = None
    camera: str | None = None   # the camera's name (a stream of several sources); None for one
    batch: int = 1              # frames of its round that ran the batched stages with it


class LatestSlot:
    """A one-item hand-over between threads. ``drop``: a put replaces an item nobody took yet
    (counted in ``dropped``); otherwise a put waits until the item is taken. Slots may share one
    condition (``cv``): a consumer of several then waits for any of them."""

    def __init__(self, drop: bool, cv: threading.Condition | None = None):
        self.drop = drop
        self._cv = cv or threading.Condition()
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
            return self.take()

    @property
    def ready(self) -> bool:
        """An item waits (read under the condition)."""
        return self._full

    @property
    def done(self) -> bool:
        """Closed and empty: nothing more will come."""
        return self.closed and not self._full

    def take(self):
        """The waiting item without waiting, or ``_END`` when there is none."""
        with self._cv:
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


def prepare_frame(pred, spec: TaskSpec, frame: Frame, tm):
    """Decode and preprocess ``frame`` as the task's call would (depth: the focal rescale)."""
    if getattr(frame, "error", None) is not None:
        raise frame.error
    if spec.rescales:
        return pred.prepare(frame.image, frame_focal(frame, spec), spec.options.get("preset"), tm)
    return pred.prepare(frame.image, timings=tm)


def frame_focal(frame: Frame, spec: TaskSpec) -> float | None:
    f = getattr(frame, "focal", None)
    return f if f is not None else spec.options.get("focal")


def call_options(spec: TaskSpec, frame: Frame) -> dict:
    """The task call's keyword options for ``frame`` (its own focal length, where it has one)."""
    options = dict(spec.options)
    if "focal" in REGISTRY[spec.task].options:
        options["focal"] = frame_focal(frame, spec)
    return options


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


class _Camera:
    """One source: its reader thread, its raw slot (the latest frame read) and its ready slot
    (the frame prepared for the model). All slots of a stream share one condition."""

    def __init__(self, name: str | None, frames, drop: bool | None, cv: threading.Condition,
                 stop: threading.Event, failure: list):
        self.name, self.frames = name, frames
        self.live = bool(getattr(frames, "live", False)) if drop is None else drop
        self.raw = LatestSlot(drop=self.live, cv=cv)
        self.ready = LatestSlot(drop=False, cv=cv)
        self.stop, self.failure = stop, failure
        tag = "" if name is None else f"-{name}"
        self.reader = threading.Thread(target=self._read, name=f"densert-stream-read{tag}", daemon=True)

    def _read(self):
        try:
            it = iter(as_frames(self.frames))
            while not self.stop.is_set():
                t0 = time.perf_counter()
                try:
                    frame = next(it)
                except StopIteration:
                    break
                now = time.perf_counter()
                if not self.raw.put(_Raw(frame, now - t0, now)):
                    break
        except BaseException as e:  # a source that fails mid-stream ends the stream with its error
            self.failure.append(e)
        finally:
            self.raw.finish()

    def close(self) -> None:
        self.raw.close()
        self.ready.close()
        interrupt = getattr(self.frames, "interrupt", None)
        if interrupt is not None:  # a reader waiting on a pushed source wakes up
            interrupt()


def _next_to_prepare(cameras: list[_Camera], start: int):
    """(index, camera) whose prepared frame was taken and that has a frame read or has ended,
    the first from ``start`` on (round-robin); None when there is none. Under the condition."""
    for k in range(len(cameras)):
        i = (start + k) % len(cameras)
        c = cameras[i]
        if not c.ready.closed and not c.ready.ready and (c.raw.ready or c.raw.done):
            return i, c
    return None


def _preparer(pred, spec: TaskSpec, cameras: list[_Camera], cv: threading.Condition,
              stop: threading.Event, failure: list) -> None:
    """The one preparation thread of a stream: decodes and preprocesses each camera's latest
    frame in turn, so one frame's preprocessing memory is in use at a time whatever the number
    of cameras."""
    try:
        turn = 0
        while not stop.is_set():
            with cv:
                while (found := _next_to_prepare(cameras, turn)) is None:
                    if stop.is_set() or all(c.ready.closed for c in cameras):
                        return
                    cv.wait()
                i, cam = found
                turn = i + 1
                r = cam.raw.take()
                if r is _END:           # its reader ended and everything read was prepared
                    cam.ready.finish()
                    continue
                dropped = cam.raw.take_dropped()
            tm = Timings(read=r.read_s)
            try:
                pre = prepare_frame(pred, spec, r.frame, tm)
                item = _Prepared(r.frame, pre, dict(tm), r.arrived, dropped)
            except Exception as e:  # one bad frame: reported, the stream goes on
                item = _Prepared(r.frame, None, dict(tm), r.arrived, dropped, error=e)
            cam.ready.put(item)         # its slot is empty: this never waits
    except BaseException as e:
        failure.append(e)
    finally:
        for c in cameras:
            c.ready.finish()


_TRIM: list = []


def release_freed_memory() -> None:
    """Return the heap's free blocks to the system after a round (glibc's ``malloc_trim``;
    nothing elsewhere). glibc keeps freed blocks of a round's tensors (its mmap threshold rises
    to the largest block freed), so without it a process's resident memory holds every round's
    largest temporaries on top of the next round's: measured in benchmarks/results/rig.md."""
    if not _TRIM:
        import ctypes
        try:
            _TRIM.append(ctypes.CDLL(None).malloc_trim)
        except (OSError, AttributeError):   # not glibc
            _TRIM.append(None)
    if _TRIM[0] is not None:
        _TRIM[0](0)


def _round(cameras: list[_Camera], cv: threading.Condition) -> list[tuple[_Camera, _Prepared]]:
    """The next round (module docstring): one waiting frame of each camera that has one; empty
    once every camera has ended."""
    lockstep = not any(c.live for c in cameras)
    with cv:
        while True:
            going = [c for c in cameras if not c.ready.done]
            if not going:
                return []
            waiting = [c for c in going if c.ready.ready]
            if waiting and (not lockstep or len(waiting) == len(going)):
                return [(c, c.ready.take()) for c in waiting]
            cv.wait()


def stream(pred, frames, spec: TaskSpec, drop: bool | None = None) -> Iterator[StreamItem]:
    """Results for ``frames`` in order (module docstring): a source, or a dict name -> source
    for several cameras. ``drop`` None: each source's ``live`` flag. A frame that fails
    (unreadable file, bad size) is an item with ``error`` set; the stream goes on. Closing the
    generator stops the threads."""
    sources = frames if isinstance(frames, dict) else {None: frames}
    cv = threading.Condition()
    stop = threading.Event()
    failure: list[BaseException] = []
    cameras = [_Camera(name, src, drop, cv, stop, failure) for name, src in sources.items()]
    threads = [c.reader for c in cameras] + [threading.Thread(
        target=_preparer, args=(pred, spec, cameras, cv, stop, failure),
        name="densert-stream-prepare", daemon=True)]
    for t in threads:
        t.start()
    try:
        while rig := _round(cameras, cv):
            yield from _run_round(pred, spec, rig)
            release_freed_memory()
        if failure:
            raise failure[0]
    finally:
        stop.set()
        for c in cameras:
            c.close()
        for t in threads:
            t.join(timeout=1.0)
        if not any(t.is_alive() for t in threads):
            for c in cameras:
                close = getattr(c.frames, "close", None)
                if close is not None:
                    close()


def _run_round(pred, spec: TaskSpec, rig: list[tuple[_Camera, _Prepared]]) -> Iterator[StreamItem]:
    good = [p for _, p in rig if p.error is None]
    try:
        results = pred._batch(spec.task, [(p.pre, call_options(spec, p.frame)) for p in good])
    except Exception as e:  # a batched stage failed: every frame of the round reports it
        results = [(e, len(good))] * len(good)
    done = dict(zip(map(id, good), results))
    for c, p in rig:
        r, batch = done.get(id(p), (p.error, 1))
        latency = time.perf_counter() - p.arrived
        if isinstance(r, Exception):
            yield StreamItem(p.frame, None, p.timings, p.dropped, latency, error=r, camera=c.name,
                             batch=batch)
            continue
        result = _label(r, p.frame)
        yield StreamItem(p.frame, result, {**p.timings, **result.timings}, p.dropped, latency,
                         camera=c.name, batch=batch)
