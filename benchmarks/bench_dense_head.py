"""Subset dense head vs naive full-vocabulary head, at Youtu-VL dimensions (d=2560, |V|=283,386).

Every (variant, task, L) runs in a fresh subprocess so that peak memory is measured honestly:
after the weight and inputs exist, the process resets its RSS high-water mark
(``echo 5 > /proc/self/clear_refs``) and reports VmHWM - VmRSS after warm-up + timed runs, i.e. the
extra resident memory the head needs on top of the model weight and its inputs. Times are medians.

Tasks: ``depth`` = 1000 single-id bins, upsampled x2 before the argmax (paper appendix D.3) and
dequantised through a LUT; ``seg`` = 150 classes of two sub-word ids each, upsampled to pixel
resolution (32 px per merged token). The lm_head weight is bf16 (the checkpoint dtype). Naive
variants: ``naive`` runs the full-vocabulary GEMM in bf16 like a model forward; ``naive-fp32``
in fp32 over 16k-row slices of the upcast weight (fp32 [L, |V|] logits), the fastest
full-vocabulary head on a CPU without bf16 arithmetic. The subset head pre-averages the K rows
once per task (timed separately as ``prep``) and runs the small GEMM in fp32. Each row's cells
run back to back; the load average before and after each cell is recorded (shared machine).

Usage: python -m densert.benchmarks.bench_dense_head [--tasks depth seg] [--L 300 1200 2040]
       [--naive bf16 fp32] [--reps 5] [--naive-reps 3] [--out benchmarks/results/kernels_dense_head]
GPU:   python -m densert.benchmarks.bench_dense_head --gpu --reps 100 --out DIR/kernels_gpu_dense_head
       (CUDA-event timings at the kernel-anchors shapes against their bounds; benchmarks/gpu_check.sh)
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


NAIVE = {"bf16": "naive", "fp32": "naive-fp32"}


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

        def fn():
            return dense_head(hidden, Wk, (gh, gw), out_hw, mode, depth_values=depth_values)
    else:
        gemm = torch.float32 if variant == "naive-fp32" else None

        def fn():
            return naive_full_vocab_head(hidden, W, groups, (gh, gw), out_hw, mode=mode,
                                         depth_values=depth_values, gemm_dtype=gemm)
    load0 = os.getloadavg()[0]
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
           "checksum": float(out.double().sum()), "load_avg": [load0, os.getloadavg()[0]]}
    return res


def machine() -> dict:
    """CPU model, the ISA extensions that decide GEMM speed, threads, torch version."""
    import platform

    import torch
    model, flags = platform.processor(), set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and not model:
                    model = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    isa = [x for x in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16") if x in flags]
    return {"cpu": model, "isa": isa, "cpus": os.cpu_count(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
            "cpu_capability": torch.backends.cpu.get_cpu_capability()}


# GPU bounds from ../shared/research/kernel-anchors.md sec. 9 (subset GEMM + fused tail at
# L = 1024, d = 2560), per compute capability: sm_90 = H100/H200, sm_87 = Jetson AGX Orin.
GPU_BOUNDS_US = {90: {"seg": 20.0, "depth-logits": 60.0}, 87: {"seg": 300.0}}
GPU_MIN_SPEEDUP = {90: {"seg": 45.0}}  # naive full-vocab head (|V| = 151,936) / subset head
GPU_CASES = {  # name: (grid, K, out_hw, mode)
    "seg": ((32, 32), 150, (512, 512), "argmax"),
    "depth-logits": ((32, 32), 1000, (512, 512), "depth"),
    "depth-patch": ((32, 32), 1000, (64, 64), "depth"),
}


def device_time_ms(fn, reps: int, device) -> list[float]:
    """Per-call times in ms: CUDA events on a GPU (after a synchronising warm-up), wall clock
    elsewhere (the interpreter smoke run)."""
    import torch
    fn()
    if torch.device(device).type != "cuda":
        out = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            out.append((time.perf_counter() - t) * 1e3)
        return out
    torch.cuda.synchronize()
    ev = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
          for _ in range(reps)]
    for a, b in ev:
        a.record()
        fn()
        b.record()
    torch.cuda.synchronize()
    return [a.elapsed_time(b) for a, b in ev]


def gpu_arch(device) -> int | None:
    import torch
    if torch.device(device).type != "cuda":
        return None
    major, minor = torch.cuda.get_device_capability(device)
    return 10 * major + minor


def device_label(device, arch: int | None) -> str:
    import torch
    return torch.cuda.get_device_name(device) if arch else f"{device} (interpreter smoke run)"


def verdict(value: float, bound: float | None, higher_is_better: bool = False) -> str:
    if bound is None:
        return "no bound for this device"
    ok = value >= bound if higher_is_better else value <= bound
    return "pass" if ok else "OVER BOUND"


def gpu_main(out: str, reps: int, device: str, small: bool) -> int:
    """Dense head on a GPU: subset GEMM, fused Triton tail and the whole head timed with CUDA
    events at the anchor shapes, against the bounds for the device, and the naive full-vocab
    head (|V| = 151,936, bf16) for the ratio."""
    import torch

    from densert.kernels import _triton_dense_head as tdh
    from densert.kernels.dense_head import dense_head, dense_scores, naive_full_vocab_head
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("bench_dense_head --gpu: no CUDA device, nothing measured", file=sys.stderr)
        return 2
    arch = gpu_arch(device)
    d, v_naive = (64, 4096) if small else (D, 151_936)
    g = torch.Generator().manual_seed(0)
    rows = []
    for name, ((gh, gw), K, out_hw, mode) in GPU_CASES.items():
        if small:
            gh, gw, K, out_hw = 4, 4, min(K, 16), (16, 16)
        hidden = torch.randn(gh * gw, d, generator=g).to(device, torch.bfloat16)
        weight = (torch.randn(K, d, generator=g) * 0.02).to(device)
        lut = torch.linspace(0.1, 10.0, K, device=device)
        scores = dense_scores(hidden, weight)
        t_gemm = device_time_ms(lambda: dense_scores(hidden, weight), reps, device)
        t_tail = device_time_ms(lambda: tdh.dense_tail(scores, gh, gw, *out_hw, mode, 0.2, lut),
                                reps, device)
        t_head = device_time_ms(lambda: dense_head(hidden, weight, (gh, gw), out_hw, mode,
                                                   depth_values=lut), reps, device)
        head_us = statistics.median(t_head) * 1e3
        bound = GPU_BOUNDS_US.get(arch, {}).get(name)
        row = {"case": name, "grid": [gh, gw], "K": K, "out_hw": list(out_hw), "mode": mode,
               "gemm_us": statistics.median(t_gemm) * 1e3,
               "tail_us": statistics.median(t_tail) * 1e3, "head_us": head_us,
               "bound_us": bound, "verdict": verdict(head_us, bound)}
        if name in GPU_MIN_SPEEDUP.get(arch, {}) or small:
            W = (torch.randn(v_naive, d, generator=g) * 0.02).to(device, torch.bfloat16)
            groups = [[i] for i in range(K)]
            t_naive = device_time_ms(lambda: naive_full_vocab_head(
                hidden, W, groups, (gh, gw), out_hw, mode, depth_values=lut), max(3, reps // 10),
                device)
            sp = statistics.median(t_naive) * 1e3 / head_us
            need = GPU_MIN_SPEEDUP.get(arch, {}).get(name)
            row.update(naive_us=statistics.median(t_naive) * 1e3, naive_vocab=v_naive,
                       speedup=sp, speedup_bound=need,
                       speedup_verdict=verdict(sp, need, higher_is_better=True))
            del W
        rows.append(row)
    name = device_label(device, arch)
    cmd = "python -m densert.benchmarks.bench_dense_head " + " ".join(sys.argv[1:])
    text = (f"# Dense head on {name} (sm_{arch})\n\nCommand: `{cmd}`  \n"
            f"L = gh x gw tokens, d = {d}, bf16 hidden states, fp32 subset weight; medians of "
            f"{reps} CUDA-event timings after a warm-up. Bounds: kernel-anchors.md sec. 9 "
            f"(subset GEMM + fused tail).\n\n| case | K | out HxW | GEMM us | tail us | head us "
            f"| bound us | verdict | naive us | speed-up | speed-up bound |\n"
            f"|---|---:|---|---:|---:|---:|---:|---|---:|---:|---|\n")
    for r in rows:
        text += (f"| {r['case']} | {r['K']} | {r['out_hw'][0]}x{r['out_hw'][1]} | "
                 f"{r['gemm_us']:.1f} | {r['tail_us']:.1f} | {r['head_us']:.1f} | "
                 f"{r['bound_us'] or '-'} | {r['verdict']} | "
                 f"{r.get('naive_us', float('nan')):.0f} | {r.get('speedup', float('nan')):.0f}x | "
                 f"{r.get('speedup_bound') or '-'} {r.get('speedup_verdict', '')} |\n")
    write_report(out, text, {"command": cmd, "device": name, "arch": arch, "rows": rows})
    bad = [r for r in rows if "OVER" in r["verdict"] or "OVER" in r.get("speedup_verdict", "")]
    return 1 if bad else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=5, metavar=("VARIANT", "TASK", "L", "REPS", "HIDDEN"))
    ap.add_argument("--gpu", action="store_true",
                    help="time the head on a CUDA device against the kernel-anchors bounds")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu: interpreter smoke run)")
    ap.add_argument("--small", action="store_true", help="--gpu: tiny shapes (smoke run)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--naive-reps", type=int, default=3)
    ap.add_argument("--L", type=int, nargs="*", default=[300, 1200, 2040])
    ap.add_argument("--tasks", nargs="*", default=["depth", "seg"], choices=["depth", "seg"])
    ap.add_argument("--naive", nargs="+", default=["bf16", "fp32"], choices=list(NAIVE),
                    help="naive variants: bf16 GEMM (a model forward), fp32 GEMM over weight slices")
    ap.add_argument("--out", default="benchmarks/results/kernels_dense_head")
    a = ap.parse_args(argv)
    if a.worker:
        v, t, L, r, hk = a.worker
        print(json.dumps(_worker(v, t, int(L), int(r), hk)))
        return 0
    if a.gpu:
        return gpu_main(a.out, max(a.reps, 20), a.device, a.small)
    mach = machine()
    rows = []
    # Depth's tail is small at the patch grid either way; segmentation's depends on the map.
    kinds_of = {"depth": ("random",), "seg": ("random", "regions")}
    for task in a.tasks:
        for kind, L in ((k, L) for k in kinds_of[task] for L in a.L):
            cells = {NAIVE[n]: run_worker([NAIVE[n], task, str(L), str(a.naive_reps), kind])
                     for n in a.naive}
            sub = run_worker(["subset", task, str(L), str(a.reps), kind])
            rows.append({"task": task, "L": L, "hidden": kind, "subset": sub, "naive": cells,
                         "speedup": {k: c["median_s"] / sub["median_s"] for k, c in cells.items()},
                         "mem_ratio": {k: c["peak_extra_mb"] / max(sub["peak_extra_mb"], 1e-3)
                                       for k, c in cells.items()}})
            print(f"{task} {kind} L={L} done", file=sys.stderr)
    cmd = "python -m densert.benchmarks.bench_dense_head " + " ".join(argv or sys.argv[1:])
    names = [NAIVE[n] for n in a.naive]
    hdr = (f"# Dense head: subset vs naive full-vocabulary (CPU)\n\n"
           f"Command: `{cmd.strip()}`  \n"
           f"Machine: {mach['cpu']} ({', '.join(mach['isa'])}; torch CPU capability "
           f"{mach['cpu_capability']}), {mach['cpus']} CPU threads visible, torch threads "
           f"{mach['torch_threads']}, torch {mach['torch']}; d={D}, |V|={V}, bf16 lm_head. "
           f"Peak = VmHWM - VmRSS after the weight and inputs exist (fresh process per cell). "
           f"Medians of {a.naive_reps} (naive) / {a.reps} (subset) runs after one warm-up (the "
           f"peak window starts after it). The machine is shared (2 cores, other engineers' jobs): "
           f"the cells of a row ran back to back, and `load` is the 1-minute load average at the "
           f"start of each cell (naive ... / subset).\n\n"
           "Naive variants: `naive` = bf16 GEMM as a model forward runs it; `naive-fp32` = fp32 GEMM "
           "over 16k-row slices of the upcast weight (this CPU has no bf16 arithmetic, so this is the "
           "faster full-vocabulary head here). Hidden states: `random` = i.i.d. tokens, so every cell "
           "borders another label (worst case for the tail); `regions` = 8 Voronoi regions of "
           "near-identical tokens, like a scene map.\n\n")
    cols = "".join(f" {n} ms | speed-up vs {n} | {n} peak MB |" for n in names)
    hdr += ("| task | hidden | L | out HxW |" + cols + " subset ms | subset peak MB | "
            + " | ".join(f"memory ratio vs {n}" for n in names)
            + " | subset prep ms | load |\n|---|---|---:|---|"
            + "---:|---:|---:|" * len(names) + "---:|---:|" + "---:|" * len(names) + "---:|---|\n")
    lines = []
    for r in rows:
        s_ = r["subset"]
        cells = "".join(f" {r['naive'][n]['median_s'] * 1e3:.0f} | **{r['speedup'][n]:.0f}x** | "
                        f"{r['naive'][n]['peak_extra_mb']:.0f} |" for n in names)
        mem = " | ".join(f"{r['mem_ratio'][n]:.0f}x" for n in names)
        load = " / ".join(f"{r['naive'][n]['load_avg'][0]:.1f}" for n in names)
        lines.append(f"| {r['task']} | {r['hidden']} | {r['L']} | {s_['out_hw'][0]}x{s_['out_hw'][1]} |"
                     f"{cells} {s_['median_s'] * 1e3:.1f} | {s_['peak_extra_mb']:.1f} | {mem} | "
                     f"{s_['prep_s'] * 1e3:.0f} | {load} / {s_['load_avg'][0]:.1f} |")
    write_report(a.out, hdr + "\n".join(lines) + "\n",
                 {"command": cmd.strip(), "machine": mach, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
