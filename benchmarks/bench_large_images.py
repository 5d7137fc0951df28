"""Peak memory of ``densert depth`` and ``densert segment`` (20 classes) against the input's size.

    python -m densert.benchmarks.bench_large_images --sizes 1000x1500 2000x3000 4000x6000 \\
        --json benchmarks/results/large_images.json --md benchmarks/results/large_images.md

Each run is a fresh process (the CLI on a JPEG made by upscaling a rendered sample scene) that
reports its own peak resident memory (VmHWM, Linux) when it ends; the table fits peak = base +
slope x megapixels per task, the figure docs/tasks-and-outputs.md quotes. Default model: the
bundled one.
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

from densert.machine import cpu_model
from densert.options import hw_size

from .report import save

CLASSES_20 = ("sky,road,sidewalk,grass,tree,car,building,person,pole,traffic sign,rock,bench,"
              "floor,wall,ceiling,table,chair,sofa,bed,lamp")
TASK_ARGS = {"depth": [], "segment": ["--classes", CLASSES_20]}

_CHILD = """
import json, sys
from densert.cli import main
rc = main(json.loads(sys.argv[1]))
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM"))
print(json.dumps({"rc": rc, "peak_rss_mb": hwm / 1024}))
"""


def make_photo(path: Path, hw: tuple[int, int]) -> Path:
    """A JPEG of ``hw`` pixels: rendered scene 0 upscaled (smooth regions, like a photo)."""
    from PIL import Image

    from densert.training.scenes import render_scene
    img = Image.fromarray(render_scene(0, 256, 320).image)
    img.resize((hw[1], hw[0]), Image.BILINEAR).save(path, quality=90)
    return path


def measure(task: str, image: Path, model: str | None, out: Path, extra=()) -> dict:
    args = [task, str(image), "--out", str(out), "--quiet", *TASK_ARGS[task], *extra]
    if model:
        args += ["--model", model]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, "-c", _CHILD, json.dumps(args)], capture_output=True,
                       text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise RuntimeError(f"{task} on {image} failed ({r.returncode}): {r.stderr[-2000:]}")
    rec = json.loads(r.stdout.strip().splitlines()[-1])
    if rec["rc"] != 0:
        raise RuntimeError(f"densert {task} exited {rec['rc']}: {r.stderr[-2000:]}")
    return {"task": task, "wall_s": wall, **rec}


def fit(points: list[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares (base, slope) of peak MB against megapixels."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    if len(points) == 1:
        return ys[0], 0.0
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    slope = sum((x - mx) * (y - my) for x, y in points) / sum((x - mx) ** 2 for x in xs)
    return my - slope * mx, slope


def markdown(rep: dict) -> str:
    lines = [f"# Peak memory against image size\n\n`{rep['command']}`\n",
             f"Machine: {rep['machine']}; model: {rep['model']}. Peak resident memory (VmHWM) of "
             "one `densert` process per run, the whole command: load, preprocessing, model, dense "
             "head and every output file.\n",
             "| image | megapixels | task | peak RSS (MB) | wall (s) |", "|---|---|---|---|---|"]
    for r in rep["runs"]:
        lines.append(f"| {r['size']} | {r['megapixels']:.1f} | {r['task']} | {r['peak_rss_mb']:.0f} | "
                     f"{r['wall_s']:.1f} |")
    lines.append("\nFit, peak = base + slope x megapixels:\n")
    lines.append("| task | base (MB) | slope (MB per MP) | at 24 MP (MB) | at 100 MP (MB) |")
    lines.append("|---|---|---|---|---|")
    for t, (b, s) in rep["fit"].items():
        lines.append(f"| {t} | {b:.0f} | {s:.1f} | {b + 24 * s:.0f} | {b + 100 * s:.0f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", nargs="+", default=["1000x1500", "2000x3000", "4000x6000"],
                    type=hw_size, metavar="HxW", help="input sizes (default: 1.5, 6 and 24 MP)")
    ap.add_argument("--tasks", nargs="+", default=list(TASK_ARGS), choices=list(TASK_ARGS),
                    help="tasks measured")
    ap.add_argument("--model", default=None, help="checkpoint directory (default: the bundled one)")
    ap.add_argument("--json", default=None, help="write the report as JSON (default: none)")
    ap.add_argument("--md", default=None, help="write the report as Markdown (default: print)")
    a = ap.parse_args(argv)
    runs = []
    with tempfile.TemporaryDirectory(prefix="densert-large-") as td:
        for hw in a.sizes:
            img = make_photo(Path(td) / f"photo_{hw[0]}x{hw[1]}.jpg", hw)
            for task in a.tasks:
                r = measure(task, img, a.model, Path(td) / "out")
                r.update(size=f"{hw[0]}x{hw[1]}", megapixels=hw[0] * hw[1] / 1e6)
                print(json.dumps(r), file=sys.stderr)
                runs.append(r)
    args = sys.argv[1:] if argv is None else argv
    rep = {"command": "python -m densert.benchmarks.bench_large_images " + " ".join(args),
           "machine": f"{cpu_model()}, {os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f}",
           "model": a.model or "bundled densert-tiny", "runs": runs,
           "fit": {t: fit([(r["megapixels"], r["peak_rss_mb"]) for r in runs if r["task"] == t])
                   for t in a.tasks}}
    save(rep, markdown(rep), a.json, a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
