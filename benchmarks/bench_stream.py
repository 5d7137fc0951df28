"""Frames per second of a long-lived stream against single calls, and one prefill for depth +
segmentation against two task calls.

    python -m densert.benchmarks.bench_stream --json benchmarks/results/stream.json \\
        --md benchmarks/results/stream.md

Inputs: ``--frames`` PNG files of rendered scenes (``--size``) in a temporary folder, the same
files for every mode. Three ways to get a depth map of each:

- ``stream``: ``DensePredictor.stream(folder)``, one process, one loaded model; reading and
  preprocessing frame t+1 on threads while the model runs frame t;
- ``loop``: ``pred.depth(path)`` for each file in the same process and predictor;
- ``process per image``: ``densert depth IMAGE --out DIR --quiet``, a fresh process per file
  (imports, model load, the file set written): what one file per process costs. Measured on the
  first ``--process-frames`` files (it is slow) and quoted per frame.

``stream`` and ``loop`` run alternately ``--rounds`` times, which one goes first swapping every
round (medians and per-round ratios quoted: the machine may be shared, and its load drifts).
``--threads N`` sets torch's intra-op threads, here and in the per-image processes
(OMP_NUM_THREADS); by default torch's own choice. Then ``dense``: ``pred.dense(frame, classes=...)``
(one prefill, open-world depth) against ``pred.depth`` + ``pred.segment(classes=...)`` in its
one-prefill flow (``--fast``), per backend, medians over the frames; the dataset preset row shows
its own prefill (the prompt precedes the image; the image is encoded once).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from densert.machine import cpu_model, source_commit
from densert.options import hw_size

from .report import save

CLASSES = ["floor", "wall", "sky", "road", "tree", "car"]


def make_frames(folder: Path, n: int, hw: tuple[int, int]) -> list[Path]:
    from PIL import Image

    from densert.training.scenes import render_scene
    scenes = [render_scene(s, *hw).image for s in range(8)]  # a few scenes, cycled like a camera
    paths = []
    for i in range(n):
        p = folder / f"frame_{i:04d}.png"
        Image.fromarray(scenes[i % len(scenes)]).save(p)
        paths.append(p)
    return paths


def run_stream(pred, folder: Path, n: int) -> float:
    t0 = time.perf_counter()
    got = sum(1 for it in pred.stream(str(folder), task="depth") if it.error is None)
    if got != n:
        raise RuntimeError(f"stream gave {got} of {n} frames")
    return time.perf_counter() - t0


def run_loop(pred, paths: list[Path]) -> float:
    t0 = time.perf_counter()
    for p in paths:
        pred.depth(p)
    return time.perf_counter() - t0


def run_processes(paths: list[Path], out: Path, model: str | None, threads: int) -> list[float]:
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    times = []
    for p in paths:
        args = [sys.executable, "-m", "densert", "depth", str(p), "--out", str(out), "--quiet"]
        if model:
            args += ["--model", model]
        t0 = time.perf_counter()
        r = subprocess.run(args, capture_output=True, text=True, env=env)
        times.append(time.perf_counter() - t0)
        if r.returncode != 0:
            raise RuntimeError(f"densert depth {p} failed: {r.stderr[-1000:]}")
    return times


def median_ms(xs) -> float:
    return statistics.median(xs) * 1e3


def bench_dense(pred, paths: list[Path], preset: str) -> dict:
    import numpy as np
    from PIL import Image
    frames = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    pred.dense(frames[0], classes=CLASSES, preset=preset)  # warm-up: weights, prefix cache
    pred.depth(frames[0], preset=preset)
    pred.segment(frames[0], classes=CLASSES)
    one, two, equal, prefills = [], [], True, set()
    for f in frames:
        t0 = time.perf_counter()
        r = pred.dense(f, classes=CLASSES, preset=preset)
        t1 = time.perf_counter()
        d = pred.depth(f, preset=preset)
        s = pred.segment(f, classes=CLASSES)
        t2 = time.perf_counter()
        one.append(t1 - t0)
        two.append(t2 - t1)
        prefills.add(r.prefills)
        equal &= bool(np.array_equal(r.depth.depth, d.depth) and np.array_equal(r.segmentation.labels, s.labels))
    return {"backend": pred.backend_name, "preset": preset, "frames": len(frames),
            "prefills": sorted(prefills), "maps_equal": equal,
            "one_prefill_ms": median_ms(one), "two_calls_ms": median_ms(two),
            "speedup": statistics.median(two) / statistics.median(one)}


def markdown(rep: dict) -> str:
    s = rep["stream"]
    lines = [f"# Stream vs single calls; one prefill vs two task calls\n\n`{rep['command']}`\n",
             f"Machine: {rep['machine']}; model: {rep['model']}; commit {rep['commit']}. "
             f"{s['frames']} frames of {rep['size']} px (rendered scenes, PNG files), depth with the "
             f"model's preset; torch backend, CPU, {rep['torch_threads']} torch thread(s). "
             f"Medians of {rep['rounds']} alternating rounds "
             "(the machine is shared: absolute numbers are noisy, the rows of a table ran side by "
             "side).\n",
             "## Frames per second\n",
             "| mode | frames | seconds (median) | frames/s | vs one process per image |",
             "|---|---:|---:|---:|---:|"]
    per_proc = s["process_per_image_s"]
    for name, key in (("`pred.stream(folder)`", "stream_s"), ("loop of `pred.depth(path)`", "loop_s")):
        sec = statistics.median(s[key])
        lines.append(f"| {name} | {s['frames']} | {sec:.2f} | {s['frames'] / sec:.2f} | "
                     f"{per_proc / (sec / s['frames']):.0f}x |")
    lines.append(f"| `densert depth IMAGE` per image (fresh process) | {s['process_frames']} | "
                 f"{per_proc * s['process_frames']:.1f} | {1 / per_proc:.3f} | 1x |")
    lines.append(f"\nStream over loop: {statistics.median(s['loop_s']) / statistics.median(s['stream_s']):.2f}x "
                 f"(per round: {', '.join(f'{b / a:.2f}' for a, b in zip(s['stream_s'], s['loop_s']))}). "
                 f"One process per image: {per_proc:.2f} s median per image (imports, model load, "
                 "file set).\n")
    lines += ["## One prefill (`pred.dense`) vs `pred.depth` + `pred.segment`\n",
              f"Classes: {', '.join(CLASSES)}. Median milliseconds per frame.\n",
              "| backend | depth preset | frames | prefills | maps equal | one call ms | two calls ms | speed-up |",
              "|---|---|---:|---:|---|---:|---:|---:|"]
    for d in rep["dense"]:
        lines.append(f"| {d['backend']} | {d['preset']} | {d['frames']} | {'/'.join(map(str, d['prefills']))} | "
                     f"{'yes' if d['maps_equal'] else 'NO'} | {d['one_prefill_ms']:.1f} | "
                     f"{d['two_calls_ms']:.1f} | {d['speedup']:.2f}x |")
    lines.append("\nThe dataset presets put the prompt before the image: depth runs its own prefill "
                 "there, and only the vision encoding is shared.\n")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--frames", type=int, default=100, help="frames in the stream (default: 100)")
    ap.add_argument("--size", type=hw_size, default=(240, 320), metavar="HxW",
                    help="frame size (default: 240x320)")
    ap.add_argument("--rounds", type=int, default=4, help="alternating stream / loop rounds (default: 4)")
    ap.add_argument("--process-frames", type=int, default=8,
                    help="files run as one process each (default: 8)")
    ap.add_argument("--dense-frames", type=int, default=16,
                    help="frames of the one-prefill comparison (default: 16)")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                    help="backends of the one-prefill comparison (default: torch onnxruntime)")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled one)")
    ap.add_argument("--json", default=None, help="write the report as JSON (default: none)")
    ap.add_argument("--md", default=None, help="write the report as Markdown (default: print)")
    ap.add_argument("--threads", type=int, default=0,
                    help="torch intra-op threads (default: 0, torch's own choice)")
    a = ap.parse_args(argv)
    import torch
    if a.threads:
        torch.set_num_threads(a.threads)
    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    with tempfile.TemporaryDirectory(prefix="densert-stream-") as td:
        folder = Path(td) / "frames"
        folder.mkdir()
        paths = make_frames(folder, a.frames, a.size)
        pred = DensePredictor(a.model)
        run_loop(pred, paths[:3])  # warm-up: weights paged in, metadata per grid cached
        stream_s, loop_s = [], []
        for r in range(a.rounds):
            if r % 2:
                loop_s.append(run_loop(pred, paths))
                stream_s.append(run_stream(pred, folder, a.frames))
            else:
                stream_s.append(run_stream(pred, folder, a.frames))
                loop_s.append(run_loop(pred, paths))
            print(f"round {r + 1}: stream {stream_s[-1]:.2f} s, loop {loop_s[-1]:.2f} s", file=sys.stderr)
        proc = run_processes(paths[:a.process_frames], Path(td) / "out", a.model, a.threads)
        print(f"process per image: {statistics.median(proc):.2f} s median", file=sys.stderr)
        dense = []
        # dense() is segment()'s one-prefill flow (every given class scored): compare like with like
        fast = DenseOptions(fast=True)
        for backend in a.backends:
            p = DensePredictor(a.model, fast, backend=backend)
            for preset in ("open-world", "cityscapes"):
                dense.append(bench_dense(p, paths[:a.dense_frames], preset))
                print(json.dumps(dense[-1]), file=sys.stderr)
    rep = {"command": "python -m densert.benchmarks.bench_stream " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
           "model": a.model or "bundled densert-tiny", "commit": source_commit(),
           "size": f"{a.size[0]}x{a.size[1]}", "rounds": a.rounds, "torch_threads": torch.get_num_threads(),
           "stream": {"frames": a.frames, "stream_s": stream_s, "loop_s": loop_s,
                      "process_frames": len(proc), "process_times_s": proc,
                      "process_per_image_s": statistics.median(proc)},
           "dense": dense}
    save(rep, markdown(rep), a.json, a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
