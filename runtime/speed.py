"""Time per stage: ``Timings`` (what one call spent in each stage, kept by every result), and the
console feedback of a frame loop: one speed line per frame and a closing summary (frames, fps,
p50/p90 milliseconds per stage, frames dropped), the lines users know from ultralytics' per-image
speed and trtexec's percentiles. The ROS node logs the same summary."""
from __future__ import annotations

import time
from contextlib import contextmanager

import numpy as np


class Timings(dict):
    """stage -> seconds; a stage timed twice accumulates."""

    @contextmanager
    def stage(self, name: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - t0


class SpeedReport:
    def __init__(self, label: str, total: int = 0):
        self.label, self.total = label, total
        self.stages: dict[str, list[float]] = {}
        self.latency: list[float] = []
        self.frames = 0
        self.failed = 0
        self.dropped = 0
        self.t0 = time.perf_counter()
        self._last = self.t0

    def add(self, timings: dict, dropped: int = 0, latency: float | None = None,
            failed: bool = False) -> None:
        """Record one frame: ``timings`` stage -> seconds."""
        self.frames += not failed
        self.failed += failed
        self.dropped += dropped
        for k, v in timings.items():
            self.stages.setdefault(k, []).append(float(v))
        if latency is not None:
            self.latency.append(float(latency))
        self._last = time.perf_counter()

    @property
    def elapsed(self) -> float:
        return self._last - self.t0

    @property
    def fps(self) -> float:
        return self.frames / self.elapsed if self.elapsed > 0 else 0.0

    def line(self, index: int, name: str, hw, task: str, timings: dict, dropped: int = 0) -> str:
        """``frame 3/100 frame_000003 640x480 depth: read 0.1ms, preprocess 9.8ms, ... | 7.9 fps``"""
        of = f"/{self.total}" if self.total else ""
        size = f" {hw[1]}x{hw[0]}" if hw else ""
        stages = ", ".join(f"{k} {v * 1e3:.1f}ms" for k, v in timings.items())
        drop = f", {dropped} dropped" if dropped else ""
        return f"frame {index + 1}{of} {name}{size} {task}: {stages} | {self.fps:.1f} fps{drop}"

    def summary(self) -> str:
        """Several lines: totals, then p50 / p90 / mean milliseconds per stage."""
        head = (f"{self.label}: {self.frames} frame(s) in {self.elapsed:.2f} s, {self.fps:.2f} fps, "
                f"{self.dropped} dropped" + (f", {self.failed} skipped (failed)" if self.failed else ""))
        rows = dict(self.stages)
        if self.latency:
            rows["latency"] = self.latency
        if not rows:
            return head
        width = max(len(k) for k in rows)
        lines = [head, f"  {'stage':<{width}}  {'p50 ms':>8} {'p90 ms':>8} {'mean ms':>8}"]
        for k, v in rows.items():
            a = np.asarray(v) * 1e3
            lines.append(f"  {k:<{width}}  {np.percentile(a, 50):8.1f} {np.percentile(a, 90):8.1f} "
                         f"{a.mean():8.1f}")
        return "\n".join(lines)

