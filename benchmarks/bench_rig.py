"""Several cameras through one loaded model: memory, frames per second per camera, and a rig's
frames batched against one by one, on torch and ONNX Runtime.

    python -m densert.benchmarks.bench_rig --json benchmarks/results/rig.json \\
        --md benchmarks/results/rig.md

Frames: rendered scenes of ``--size`` (480x640), ``--frames`` PNG files per camera, each camera
its own scenes. Models: torch runs the bundled densert-tiny; ONNX Runtime an engine directory
(``--engine-dir``, else one exported here from the bundled model, sized for ``--cameras``' most
frames of ``--size`` packed, so the vision row below can pack them). Task: depth with the
model's preset (the bundled model's, cityscapes: its own prefill after the image prompt).

1. **Memory and fps**: for each camera count N, one process streams all N cameras
   (``pred.stream({name: folder})``, the files of every camera in lockstep: frame k of each runs
   in one round, batched) and reports its peak resident memory (VmHWM) and frames per second per
   camera; then N processes of one camera each run at the same time (the sum of their peaks,
   and their fps per camera: the alternative a rig has today). Each is a fresh process
   (``--worker``), started after nothing else of this benchmark is loaded.
2. **Time per rig**: in this process, the N frames prepared ahead (decoded and preprocessed, as
   the stream's threads do), ``pred.batch(frames)`` against ``pred.depth`` on each, alternating
   which goes first, ``--rounds`` rounds (medians); the model stages only. The maps of the two are
   compared pixel by pixel (torch runs in its auto dtype: bfloat16 on a CPU that computes it).
3. **ONNX Runtime stage alternatives**: the vision graph on N frames packed into one call (its
   full-attention layers then mask N x N images' patches) against one call each; the LLM graph's
   batch axis against one sequence of the N prompts end to end (no mask: a lower bound of what a
   packed sequence with per-image attention masks would cost).

``--threads`` (default 1) sets torch's intra-op threads and ONNX Runtime's
(``DENSERT_ORT_THREADS``) in every process: on a shared 2-core machine more threads than free
cores make single timings swing by 10x, which no batching effect survives. The load average is
recorded with every section.
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

MIB = 1024


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def load() -> float:
    return round(os.getloadavg()[0], 2)


def make_cameras(root: Path, cameras: int, frames: int, hw: tuple[int, int]) -> list[Path]:
    """A folder of ``frames`` PNG files per camera, each camera its own rendered scenes."""
    from PIL import Image

    from densert.training.scenes import render_scene
    scenes = {}
    out = []
    for c in range(cameras):
        d = root / f"cam{c}"
        d.mkdir(parents=True, exist_ok=True)
        for i in range(frames):
            s = (c * 7 + i) % 8          # 8 scenes, cycled: rendering is the slow part
            if s not in scenes:
                scenes[s] = render_scene(s, *hw).image
            Image.fromarray(scenes[s]).save(d / f"frame_{i:04d}.png")
        out.append(d)
    return out


def _threads(n: int) -> None:
    """torch's and ONNX Runtime's intra-op threads for this process (and its workers)."""
    import torch
    torch.set_num_threads(n)
    os.environ["DENSERT_ORT_THREADS"] = str(n)


def _predictor(backend: str, engine_dir: str | None, device: str = "auto", dtype: str = "auto"):
    from densert.runtime.predictor import DensePredictor
    if backend == "torch":
        return DensePredictor(device=device, dtype=dtype)
    return DensePredictor(None, backend=backend, engine_dir=engine_dir)


# ---------------------------------------------------------------- 1. a worker process
def worker(a) -> int:
    """One process: load the model, stream the given camera folders, print a JSON line."""
    if a.no_trim:   # the heap as glibc leaves it between rounds (what the trim saves)
        import densert.runtime.stream as stream
        stream.release_freed_memory = lambda: None
    t0 = time.perf_counter()
    pred = _predictor(a.backend, a.engine_dir)
    load_s = time.perf_counter() - t0
    folders = [Path(f) for f in a.worker]
    first = sorted(folders[0].glob("*.png"))[0]
    pred.depth(first)   # warm-up: weights paged in, the metadata of this grid cached
    rss_ready = _status_kb("VmRSS")
    sources = {f.name: str(f) for f in folders} if len(folders) > 1 else str(folders[0])
    t0 = time.perf_counter()
    frames, batches = 0, set()
    for it in pred.stream(sources, task="depth"):   # each result let go, as a robot would
        if it.error is not None:
            raise RuntimeError(f"{it.camera or ''} {it.frame.name}: {it.error}")
        frames += 1
        batches.add(it.batch)
    stream_s = time.perf_counter() - t0
    per_camera = frames / len(folders)
    print(json.dumps({"backend": a.backend, "cameras": len(folders), "frames_per_camera": per_camera,
                      "load_s": load_s, "stream_s": stream_s, "fps_per_camera": per_camera / stream_s,
                      "batch_sizes": sorted(batches),
                      "rss_ready_mib": rss_ready / MIB, "peak_rss_mib": _status_kb("VmHWM") / MIB,
                      "dtype": pred.info["dtype"]}))
    return 0


def run_workers(groups: list[list[Path]], backend: str, engine_dir: str | None, threads: int,
                trim: bool = True) -> list[dict]:
    """One worker per group of camera folders, all at once; their reports."""
    procs = []
    for folders in groups:
        cmd = [sys.executable, "-m", "densert.benchmarks.bench_rig", "--backends", backend,
               "--threads", str(threads), *([] if trim else ["--no-trim"]), "--worker", *map(str, folders)]
        if engine_dir:
            cmd += ["--engine-dir", engine_dir]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    out = []
    for p in procs:
        so, se = p.communicate()
        if p.returncode:
            raise RuntimeError(f"bench_rig worker failed ({p.returncode}): {se[-2000:]}")
        out.append(json.loads(so.strip().splitlines()[-1]))
    return out


def memory_section(backend: str, engine_dir: str | None, folders: list[Path], counts: list[int],
                   threads: int) -> list[dict]:
    rows = []
    for n in counts:
        before = load()
        one = run_workers([folders[:n]], backend, engine_dir, threads)[0]
        untrimmed = run_workers([folders[:n]], backend, engine_dir, threads, trim=False)[0]
        many = run_workers([[f] for f in folders[:n]], backend, engine_dir, threads) if n > 1 else [one]
        rows.append({"backend": backend, "cameras": n, "one_process": one, "processes": many,
                     "one_process_no_trim": untrimmed,
                     "processes_peak_sum_mib": sum(w["peak_rss_mib"] for w in many),
                     "load_before": before, "load_after": load()})
        print(f"memory {backend} x{n}: one process {one['peak_rss_mib']:.0f} MiB, "
              f"{n} processes {rows[-1]['processes_peak_sum_mib']:.0f} MiB", file=sys.stderr)
    one = next((r for r in rows if r["cameras"] == 1), None)
    for r in rows:
        for key, ratio in (("one_process", "vs_one_camera"), ("one_process_no_trim", "no_trim_vs_one_camera")):
            r[ratio] = r[key]["peak_rss_mib"] / one[key]["peak_rss_mib"] if one else None
    return rows


# ---------------------------------------------------------------- 2. time per rig
def rig_section(pred, folders: list[Path], counts: list[int], rounds: int) -> list[dict]:
    import numpy as np
    paths = [sorted(f.glob("*.png"))[0] for f in folders]
    rows = []
    for n in counts:
        pres = [pred.prepare(p) for p in paths[:n]]
        pred.batch(pres, task="depth")          # warm-up: the batch's metadata and prompt
        for p in pres:
            pred.depth(p)
        one_s, batch_s, stages_one, stages_batch = [], [], [], []
        before = load()
        for r in range(rounds):
            order = ("one", "batch") if r % 2 == 0 else ("batch", "one")
            for mode in order:
                t0 = time.perf_counter()
                got = pred.batch(pres, task="depth") if mode == "batch" else [pred.depth(p) for p in pres]
                dt = time.perf_counter() - t0
                stages = {}
                for res in got:
                    for k, v in res.timings.items():
                        stages[k] = stages.get(k, 0.0) + v
                (batch_s if mode == "batch" else one_s).append(dt)
                (stages_batch if mode == "batch" else stages_one).append(stages)
                if mode == "batch":
                    b_maps = [res.depth for res in got]
                else:
                    o_maps = [res.depth for res in got]
        equal = sum(int(np.sum(a == b)) for a, b in zip(b_maps, o_maps))
        total = sum(a.size for a in b_maps)

        def med(runs):
            return {k: statistics.median(s.get(k, 0.0) for s in runs) * 1e3 for k in runs[0]}
        rows.append({"backend": pred.backend_name, "dtype": f"{pred.info['dtype']} on {pred.info['device']}",
                     "cameras": n,
                     "one_by_one_ms": statistics.median(one_s) * 1e3,
                     "batched_ms": statistics.median(batch_s) * 1e3,
                     "speedup": statistics.median(one_s) / statistics.median(batch_s),
                     "rounds_one_ms": [x * 1e3 for x in one_s], "rounds_batched_ms": [x * 1e3 for x in batch_s],
                     "stages_one_ms": med(stages_one), "stages_batched_ms": med(stages_batch),
                     "pixels_equal": equal / total, "load_before": before, "load_after": load()})
        print(f"rig {pred.backend_name} x{n}: one by one {rows[-1]['one_by_one_ms']:.0f} ms, "
              f"batched {rows[-1]['batched_ms']:.0f} ms", file=sys.stderr)
    return rows


# ---------------------------------------------------------------- 3. ONNX Runtime alternatives
def ort_section(pred, folders: list[Path], counts: list[int], rounds: int) -> list[dict]:
    import torch

    from densert.model.vision_meta import build_vision_meta
    from densert.runtime.multitask import image_first_ids
    be = pred.backend
    vc = be.config.vision_config
    pres = [pred.prepare(sorted(f.glob("*.png"))[0]) for f in folders]
    m = pres[0].num_image_tokens
    prefix, rest = image_first_ids(pred.vocab, m, pred.chat_template)
    ids = torch.cat([prefix, rest], dim=1)
    rows = []
    for n in [c for c in counts if c > 1]:
        px = [p.pixel_values for p in pres[:n]]
        meta1 = build_vision_meta([pres[0].grid], vc)
        metan = build_vision_meta([pres[0].grid] * n, vc)
        packed = torch.cat(px)
        embeds = torch.cat([be.encode_image(x, meta1) for x in px])
        long_ids = ids.repeat(1, n)      # the n prompts one after another: one sequence
        runs = {"vision_one_by_one": lambda: [be.encode_image(x, meta1) for x in px],
                "vision_packed": lambda: be.encode_image(packed, metan),
                "prefill_one_by_one": lambda: [be.prefill(ids, embeds[i * m:(i + 1) * m]) for i in range(n)],
                "prefill_batch_axis": lambda: be.prefill_batch(ids.expand(n, -1), embeds),
                "prefill_one_sequence": lambda: be.prefill(long_ids, embeds)}
        for f in runs.values():    # warm-up
            f()
        times = {k: [] for k in runs}
        before = load()
        for r in range(rounds):
            for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                t0 = time.perf_counter()
                runs[k]()
                times[k].append(time.perf_counter() - t0)
        rows.append({"cameras": n, "tokens_per_prompt": int(ids.shape[1]),
                     **{f"{k}_ms": statistics.median(v) * 1e3 for k, v in times.items()},
                     "load_before": before, "load_after": load()})
        print(f"ort stages x{n}: {json.dumps({k: round(v, 1) for k, v in rows[-1].items() if k.endswith('_ms')})}",
              file=sys.stderr)
    return rows


# ---------------------------------------------------------------- report
def markdown(rep: dict) -> str:
    lines = [f"# Several cameras, one model\n\n`{rep['command']}`\n",
             f"Machine: {rep['machine']}; commit {rep['commit']}. Frames: {rep['size']} px rendered "
             f"scenes, {rep['frames']} per camera; task depth with the model's preset. torch: the "
             f"bundled densert-tiny ({rep['torch_dtype']}); onnxruntime: `{rep['engine_dir']}` "
             f"({rep['engine']}). {rep['threads']} torch / ONNX Runtime thread(s) per process. The "
             "machine is shared with other work: load averages (1 min) are given per row; rows of a "
             "table ran one after another.\n"]
    if rep["memory"]:
        lines += ["## Memory and frames per second per camera\n",
              "One process streaming N cameras against N processes of one camera each, all at once. "
              "Peak resident memory (VmHWM) of each process; fps per camera over the stream (model "
              "loaded and warmed up). The stream hands the heap's freed blocks back to the system "
              "after each round (`runtime.stream.release_freed_memory`); the column without it is "
              "the same run with that step left out.\n",
              "| backend | cameras | one process: peak MiB | vs one camera | without the heap trim: "
              "peak MiB, vs one camera | N processes: peaks summed MiB | fps per camera, one process "
              "| fps per camera, N processes | batch sizes | load |",
              "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for r in rep["memory"]:
        one, many, raw = r["one_process"], r["processes"], r["one_process_no_trim"]
        fps_many = statistics.mean(w["fps_per_camera"] for w in many)
        lines.append(f"| {r['backend']} | {r['cameras']} | {one['peak_rss_mib']:.0f} | "
                     f"{r['vs_one_camera']:.2f}x | {raw['peak_rss_mib']:.0f}, {r['no_trim_vs_one_camera']:.2f}x | "
                     f"{r['processes_peak_sum_mib']:.0f} | "
                     f"{one['fps_per_camera']:.2f} | {fps_many:.2f} | "
                     f"{', '.join(map(str, one['batch_sizes']))} | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    if rep["rig"]:
        lines += ["\n## Time per rig: batched against one by one\n",
                  "The N frames prepared ahead; the model stages of `pred.batch(frames)` against "
                  f"`pred.depth` on each, medians of {rep['rounds']} alternating rounds. Stage "
                  "columns: vision + prefill milliseconds summed over the rig (one by one / "
                  "batched). Pixels equal: the depth maps of the two, pixel by pixel.\n",
                  "| backend | dtype | cameras | one by one ms | batched ms | speed-up | vision ms "
                  "| prefill ms | pixels equal | load |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rep["rig"]:
        so, sb = r["stages_one_ms"], r["stages_batched_ms"]
        lines.append(f"| {r['backend']} | {r['dtype']} | {r['cameras']} | {r['one_by_one_ms']:.0f} | "
                     f"{r['batched_ms']:.0f} | {r['speedup']:.2f}x | {so.get('vision', 0):.0f} / "
                     f"{sb.get('vision', 0):.0f} | {so.get('prefill', 0):.0f} / {sb.get('prefill', 0):.0f} | "
                     f"{100 * r['pixels_equal']:.3f}% | {r['load_before']:.1f}-{r['load_after']:.1f} |")
    if rep["ort_stages"]:
        lines += ["\n## ONNX Runtime: which batching pays\n",
                  "Milliseconds per rig (medians). Vision: one call per frame, or the frames packed "
                  "into one call (the graph's full-attention layers then mask the whole rig's "
                  "patches). Prefill: one call per prompt, the LLM graph's batch axis, or the N "
                  "prompts as one sequence with no mask (a lower bound of a packed sequence with "
                  "per-image attention masks, which would add the masking).\n",
                  "| cameras | tokens per prompt | vision one by one | vision packed | prefill one by one "
                  "| prefill batch axis | one sequence of N prompts | load |",
                  "|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in rep["ort_stages"]:
            lines.append(f"| {r['cameras']} | {r['tokens_per_prompt']} | {r['vision_one_by_one_ms']:.0f} | "
                         f"{r['vision_packed_ms']:.0f} | {r['prefill_one_by_one_ms']:.0f} | "
                         f"{r['prefill_batch_axis_ms']:.0f} | {r['prefill_one_sequence_ms']:.0f} | "
                         f"{r['load_before']:.1f}-{r['load_after']:.1f} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cameras", type=int, nargs="+", default=[1, 2, 4],
                    help="camera counts (default: 1 2 4)")
    ap.add_argument("--size", type=hw_size, default=(480, 640), metavar="HxW",
                    help="frame size (default: 480x640)")
    ap.add_argument("--frames", type=int, default=4,
                    help="frames per camera in the memory and fps runs (default: 4)")
    ap.add_argument("--rounds", type=int, default=3,
                    help="alternating rounds of the timing sections (default: 3)")
    ap.add_argument("--backends", nargs="+", default=["torch", "onnxruntime"],
                    help="backends (default: torch onnxruntime)")
    ap.add_argument("--engine-dir", default=None,
                    help="the onnxruntime engine directory (default: exported from the bundled "
                         "model into --work)")
    ap.add_argument("--work", default=None, help="folder for frames and the engine (default: a "
                                                 "temporary one)")
    ap.add_argument("--json", default=None, help="write the report as JSON (default: none)")
    ap.add_argument("--md", default=None, help="write the report as Markdown (default: print)")
    ap.add_argument("--sections", nargs="+", default=["memory", "rig", "ort"],
                    choices=("memory", "rig", "ort"),
                    help="what to measure (default: memory rig ort)")
    ap.add_argument("--device", default="auto",
                    help="torch backend's device for the rig section (default: auto)")
    ap.add_argument("--dtype", default="auto",
                    help="torch backend's dtype for the rig section (default: auto)")
    ap.add_argument("--worker", nargs="+", default=None, metavar="FOLDER",
                    help="internal: be one measured process streaming these camera folders")
    ap.add_argument("--no-trim", action="store_true",
                    help="internal, with --worker: leave the heap as glibc keeps it between rounds")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and ONNX Runtime intra-op threads in every process (default: 1)")
    a = ap.parse_args(argv)
    _threads(a.threads)
    if a.worker:
        a.backend = a.backends[0]
        return worker(a)
    with tempfile.TemporaryDirectory(prefix="densert-rig-") as td:
        work = Path(a.work or td)
        folders = make_cameras(work / "frames", max(a.cameras), a.frames, a.size)
        engine_dir = a.engine_dir
        if "onnxruntime" in a.backends and engine_dir is None:
            engine_dir = str(work / "engine")
            if not (Path(engine_dir) / "manifest.json").is_file():
                from densert.export.onnx_export import export_engine
                from densert.image import DEFAULT_MAX_PATCHES, PATCH
                from densert.image.preprocess import target_size
                from densert.resources import bundled_model_dir
                th, tw = target_size(*a.size, DEFAULT_MAX_PATCHES)
                tokens = (th // PATCH) * (tw // PATCH) // 4 * max(a.cameras)
                export_engine(bundled_model_dir(), engine_dir, max_image_tokens=tokens, progress=False)
        memory = []
        if "memory" in a.sections:
            for backend in a.backends:
                memory += memory_section(backend, engine_dir, folders, a.cameras, a.threads)
        rig, ort_rows, dtypes = [], [], {}
        for backend in a.backends:
            if not {"rig", "ort"} & set(a.sections):
                break
            pred = _predictor(backend, engine_dir, a.device, a.dtype)
            dtypes[backend] = f"{pred.info['dtype']} on {pred.info['device']}"
            if "rig" in a.sections:
                rig += rig_section(pred, folders, a.cameras, a.rounds)
            if backend == "onnxruntime" and "ort" in a.sections:
                ort_rows = ort_section(pred, folders, a.cameras, a.rounds)
            del pred
        engine = "none"
        if engine_dir:
            m = json.loads((Path(engine_dir) / "manifest.json").read_text())
            engine = f"{m['precision']}, exported for {m['max_image_tokens']} image tokens"
    rep = {"command": "python -m densert.benchmarks.bench_rig " + " ".join(sys.argv[1:] if argv is None else argv),
           "machine": f"{cpu_model()}, {os.cpu_count()} cores", "commit": source_commit(),
           "size": f"{a.size[0]}x{a.size[1]}", "frames": a.frames, "rounds": a.rounds, "threads": a.threads,
           "torch_dtype": dtypes.get("torch"), "engine_dir": a.engine_dir or "exported into --work",
           "engine": engine, "memory": memory, "rig": rig, "ort_stages": ort_rows}
    save(rep, markdown(rep), a.json, a.md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
