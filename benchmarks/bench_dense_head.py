"""Subset dense head vs naive full-vocabulary head, at Youtu-VL dimensions (d=2560, |V|=283,386).

Every (variant, task, L) runs in a fresh subprocess so that peak memory is measured honestly:
after the weight and inputs exist, the process resets its RSS high-water mark
(``echo 5 > /proc/self/clear_refs``) and reports VmHWM - VmRSS after warm-up + timed runs, i.e. the
extra resident memory the head needs on top of the model weight and its inputs. Times are medians.

Tasks: ``depth`` = 1000 single-id bins, upsampled x2 before the argmax (paper appendix D.3) and
dequantised through a LUT; ``seg`` = 150 classes of two sub-word ids each, upsampled to pixel
resolution (32 px per merged token). The lm_head weight is bf16 (the checkpoint dtype); the naive
head runs its GEMM in bf16 like a model forward; the subset head pre-averages the K rows once per
task (timed separately as ``prep``) and runs the small GEMM in fp32.

Usage: python -m densert.benchmarks.bench_dense_head [--reps 5] [--out benchmarks/results/kernels_dense_head]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

D = 2560
V = 283_386
GRIDS = {300: (15, 20), 1200: (30, 40), 2040: (34, 60)}


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(field)


def reset_peak() -> int:
    """Reset VmHWM to the current RSS; returns the current RSS in kB."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kb("VmRSS")


def peak_extra_mb(base_kb: int) -> float:
    return (_status_kb("VmHWM") - base_kb) / 1024.0


def write_report(out: str, text: str, payload: dict) -> None:
    """Print the Markdown table and write it as OUT.md beside the raw numbers in OUT.json."""
    print(text)
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as f:
        f.write(text)
    with open(out + ".json", "w") as f:
        json.dump(payload, f, indent=1)


def run_worker(args: list[str], timeout: int = 1800) -> dict:
    cmd = [sys.executable, "-m", __spec_name(), "--worker", *args]
    # Large blocks via mmap and immediate trim: freed memory leaves RSS, so the high-water mark
    # after the warm-up measures each call's own peak rather than glibc's cached heap.
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def __spec_name() -> str:
    return "densert.benchmarks.bench_dense_head"


def _hidden(L: int, gh: int, gw: int, kind: str):
    """``random``: i.i.d. tokens, every cell a label boundary (the tail's worst case).
    ``regions``: 8 Voronoi regions of near-identical tokens, boundaries like a real scene map."""
    import torch
    noise = torch.randn(L, D) * 2.0
    if kind == "random":
        return noise.to(torch.bfloat16)
    g = torch.Generator().manual_seed(2)
    centres = torch.rand(8, 2, generator=g) * torch.tensor([gh, gw])
    cells = torch.stack(torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij"), -1)
    region = torch.cdist(cells.reshape(-1, 2).float(), centres).argmin(dim=1)
    base = torch.randn(8, D, generator=g) * 2.0
    return (base[region] + 0.05 * noise).to(torch.bfloat16)


def _worker(variant: str, task: str, L: int, reps: int, hidden_kind: str = "random") -> dict:
    import torch

    from densert.kernels.dense_head import dense_head, naive_full_vocab_head, subset_weight

    torch.manual_seed(0)
    W = torch.empty(V, D, dtype=torch.bfloat16).uniform_(-0.04, 0.04)  # in place: no fp32 temp
    gh, gw = GRIDS[L]
    hidden = _hidden(L, gh, gw, hidden_kind)
    g = torch.Generator().manual_seed(1)
    if task == "depth":
        groups = [[151_000 + i] for i in range(1000)]
        out_hw = (2 * gh, 2 * gw)
        mode = "depth"
        depth_values = torch.linspace(0.01, 10.0, 1000)
    else:
        ids = torch.randperm(V, generator=g)[:300].tolist()
        groups = [ids[2 * i:2 * i + 2] for i in range(150)]
        out_hw = (32 * gh, 32 * gw)
        mode = "argmax"
        depth_values = None
    prep_s = None
    if variant == "subset":
        t = time.perf_counter()
        Wk = subset_weight(W, groups)
        prep_s = time.perf_counter() - t
        fn = lambda: dense_head(hidden, Wk, (gh, gw), out_hw, mode, depth_values=depth_values)  # noqa: E731
    else:
        fn = lambda: naive_full_vocab_head(hidden, W, groups, (gh, gw), out_hw, mode=mode,  # noqa: E731
                                           depth_values=depth_values)
    out = fn()  # warm-up first: one-time library scratch (GEMM packing, thread pools) is not per-call memory
    del out
    base = reset_peak()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    res = {"variant": variant, "task": task, "L": L, "hidden": hidden_kind, "out_hw": list(out_hw),
           "median_s": statistics.median(times), "times_s": times,
           "peak_extra_mb": peak_extra_mb(base), "prep_s": prep_s,
           "checksum": float(out.double().sum())}
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5, metavar=("VARIANT", "TASK", "L", "REPS", "HIDDEN"))
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive-reps", type=int, default=3)
    ap.add_argument("--L", type=int, nargs="*", default=[300, 1200, 2040])
    ap.add_argument("--out", default="benchmarks/results/kernels_dense_head")
    a = ap.parse_args(argv)
    if a.worker:
        v, t, L, r, hk = a.worker
        print(json.dumps(_worker(v, t, int(L), int(r), hk)))
        return 0
    import torch
    rows = []
    # Depth's tail is small at the patch grid either way; segmentation's depends on the map.
    for task, kinds in (("depth", ("random",)), ("seg", ("random", "regions"))):
        for kind, L in ((k, L) for k in kinds for L in a.L):
            naive = run_worker(["naive", task, str(L), str(a.naive_reps), kind])
            sub = run_worker(["subset", task, str(L), str(a.reps), kind])
            rows.append({"task": task, "L": L, "hidden": kind, "naive": naive, "subset": sub,
                         "speedup": naive["median_s"] / sub["median_s"],
                         "mem_ratio": naive["peak_extra_mb"] / max(sub["peak_extra_mb"], 1e-3)})
            print(f"{task} {kind} L={L} done", file=sys.stderr)
    cmd = "python -m densert.benchmarks.bench_dense_head " + " ".join(argv or sys.argv[1:])
    hdr = (f"# Dense head: subset vs naive full-vocabulary (CPU)\n\n"
           f"Command: `{cmd.strip()}`  \n"
           f"torch {torch.__version__}, {os.cpu_count()} CPU threads visible, "
           f"torch threads {torch.get_num_threads()}; d={D}, |V|={V}, bf16 lm_head. "
           f"Peak = VmHWM - VmRSS after the weight and inputs exist (fresh process per cell). "
           f"Medians of {a.naive_reps} (naive) / {a.reps} (subset) runs after one warm-up (the peak window starts after it). The machine is shared (2 cores, other jobs running): absolute times are noisy; the two cells of a row ran back to back.\n\n"
           "Hidden states: `random` = i.i.d. tokens, so every cell borders another label (worst case "
           "for the tail); `regions` = 8 Voronoi regions of near-identical tokens, like a scene map.\n\n"
           "| task | hidden | L | out HxW | naive ms | subset ms | speed-up | naive peak MB | subset peak MB "
           "| memory ratio | subset prep ms |\n|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|\n")
    lines = []
    for r in rows:
        n, s = r["naive"], r["subset"]
        lines.append(f"| {r['task']} | {r['hidden']} | {r['L']} | {n['out_hw'][0]}x{n['out_hw'][1]} | "
                     f"{n['median_s'] * 1e3:.1f} | {s['median_s'] * 1e3:.2f} | {r['speedup']:.0f}x | "
                     f"{n['peak_extra_mb']:.1f} | {s['peak_extra_mb']:.1f} | {r['mem_ratio']:.0f}x | "
                     f"{s['prep_s'] * 1e3:.1f} |")
    write_report(a.out, hdr + "\n".join(lines) + "\n", {"command": cmd.strip(), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
