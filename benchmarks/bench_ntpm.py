"""Chunked NTP-M (densert.kernels.ntpm, torch path) vs the naive dense-logits NTP-M, CPU.

Shape: L=1024 tokens, d=2560, |V|=283,386 (Youtu-VL), k=32, 8 positives per token, bf16 hidden and
lm_head (both require grad). Both variants run their GEMM in bf16 and the loss in fp32.
Measured: forward + backward (gradients to hidden and weight), median time, and the extra peak
resident memory on top of weight + inputs (fresh process per variant, RSS high-water mark reset
after a warm-up step, with no gradients alive; see bench_dense_head). Both variants return the
same dense |V| x d bf16 weight gradient; the report also gives the peak beyond it.

Naive = the direct autograd graph: full [L, |V|] logits upcast to fp32, positives gathered,
positives and invalid ids masked to -inf in a copy, torch.topk, softplus terms, dense backward.

Usage: python -m densert.benchmarks.bench_ntpm [--reps 3] [--out benchmarks/results/kernels_ntpm]
GPU:   python -m densert.benchmarks.bench_ntpm --gpu --reps 20 --out DIR/kernels_gpu_ntpm
       (Triton NTP-M at L=4096, |V|=151,936, bf16, against the kernel-anchors bounds)
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from .bench_dense_head import D, V, peak_extra_mb, reset_peak, write_report

L, K, P = 1024, 32, 8
DW_MB = V * D * 2 / 2**20  # the bf16 weight gradient both variants return


def naive_ntpm(hidden, weight, pos, k):
    import torch

    from densert.kernels.ntpm import softplus
    z = (hidden @ weight.t()).float()  # [L, V]
    zpos = z.gather(1, pos)
    masked = z.detach().scatter(1, pos, float("-inf"))
    neg = torch.topk(masked, k, dim=1).indices
    zneg = z.gather(1, neg)
    return softplus(-zpos).mean(dim=1).sum() + softplus(zneg).sum() / k


def _worker(variant: str, reps: int) -> dict:
    import torch

    from densert.kernels.ntpm import ntpm_loss
    torch.manual_seed(0)
    W = torch.empty(V, D, dtype=torch.bfloat16).uniform_(-0.04, 0.04).requires_grad_(True)
    H = (torch.randn(L, D) * 2.0).to(torch.bfloat16).requires_grad_(True)
    # Distinct positives per token: a random offset plus a fixed stride never collides.
    pos = (torch.randint(0, V - 8 * 997, (L, 1)) + torch.arange(P)[None, :] * 997)
    if variant == "naive":
        def fn():
            return naive_ntpm(H, W, pos, K)
    else:
        def fn():
            return ntpm_loss(H, W, pos, k=K, chunk_size=8192)

    def step():
        W.grad = None
        H.grad = None
        loss = fn()
        loss.backward()
        return float(loss)

    step()
    # The warm-up's gradients must not sit in the baseline: each step's peak includes the
    # gradients it produces (dense for naive; touched rows only for chunked), as in training.
    gnorm = (float(H.grad.float().norm()), float(W.grad.float().norm()))
    W.grad = H.grad = None
    base = reset_peak()
    times, loss = [], None
    for _ in range(reps):
        t = time.perf_counter()
        loss = step()
        times.append(time.perf_counter() - t)
    return {"variant": variant, "median_s": statistics.median(times), "times_s": times,
            "peak_extra_mb": peak_extra_mb(base), "loss": loss,
            "grad_h_norm": gnorm[0], "grad_w_norm": gnorm[1]}


# kernel-anchors.md sec. 9, training at L = 4096, |V| = 151,936 on H100/H200 (sm_90).
GPU_BOUNDS = {90: {"fwd_over_gemm": 1.25, "bwd_ms": 1.0, "extra_mb": 64.0, "loss_rel": 1e-5}}


def gpu_main(out: str, reps: int, device: str, small: bool) -> int:
    """NTP-M on a GPU at the anchor shape (bf16 hidden and weight, tensor cores): the fused
    forward against a plain bf16 GEMM of the same shape, the sparse backward, the extra memory
    beyond the bf16 weight gradient, and the loss against the float64 reference on the same
    (bf16) operands; each against the bounds for the device."""
    import torch

    from densert.kernels import _triton_ntpm as tn
    from densert.kernels.ntpm import ntpm_loss_reference

    from .bench_dense_head import device_label, device_time_ms, gpu_arch, verdict
    if torch.device(device).type == "cuda" and not torch.cuda.is_available():
        print("bench_ntpm --gpu: no CUDA device, nothing measured", file=sys.stderr)
        return 2
    arch = gpu_arch(device)
    Lg, Vg, d, k, P = (32, 512, 64, 8, 4) if small else (4096, 151_936, D, K, 8)
    cfg = dict(BM=16, BN=32, BK=16, n_splits=2) if small else {}
    g = torch.Generator().manual_seed(0)
    h = (torch.randn(Lg, d, generator=g) / d ** 0.25).to(device, torch.bfloat16).requires_grad_(True)
    w = (torch.randn(Vg, d, generator=g) / d ** 0.25).to(device, torch.bfloat16).requires_grad_(True)
    pos = (torch.randint(0, Vg - P * 97, (Lg, 1), generator=g) + torch.arange(P) * 97).to(device)
    t_gemm = device_time_ms(lambda: h.detach() @ w.detach().t(), reps, device)
    t_fwd = device_time_ms(lambda: tn.ntpm_loss_triton(h, w, pos, k, **cfg), reps, device)
    loss = tn.ntpm_loss_triton(h, w, pos, k, **cfg)

    def bwd():
        h.grad = w.grad = None
        tn.ntpm_loss_triton(h, w, pos, k, **cfg).backward()

    t_step = device_time_ms(bwd, reps, device)
    h.grad = w.grad = None
    extra_mb = None
    if arch:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        bwd()
        torch.cuda.synchronize()
        extra_mb = (torch.cuda.max_memory_allocated() - base - w.numel() * 2) / 2 ** 20
    ref = ntpm_loss_reference(h.detach().double(), w.detach().double(), pos, k)
    rel = abs(float(loss) - float(ref)) / abs(float(ref))
    gemm, fwd, step = (statistics.median(t) for t in (t_gemm, t_fwd, t_step))
    b = GPU_BOUNDS.get(arch, {})
    checks = [("forward / plain bf16 GEMM", fwd / gemm, b.get("fwd_over_gemm")),
              ("backward ms (step - forward)", step - fwd, b.get("bwd_ms")),
              ("extra MB beyond dW", extra_mb, b.get("extra_mb")),
              ("loss rel. error vs float64", rel, b.get("loss_rel"))]
    rows = [{"check": c, "value": v, "bound": bd,
             "verdict": "not measured" if v is None else verdict(v, bd)} for c, v, bd in checks]
    name = device_label(device, arch)
    cmd = "python -m densert.benchmarks.bench_ntpm " + " ".join(sys.argv[1:])
    text = (f"# NTP-M on {name} (sm_{arch})\n\nCommand: `{cmd}`  \n"
            f"L={Lg}, |V|={Vg}, d={d}, k={k}, {P} positives/token, bf16 hidden + weight (tensor "
            f"cores); medians of {reps}: plain GEMM {gemm:.3f} ms, fused forward {fwd:.3f} ms, "
            f"forward + backward {step:.3f} ms. Bounds: kernel-anchors.md sec. 9.\n\n"
            "| check | value | bound | verdict |\n|---|---:|---:|---|\n")
    for r in rows:
        v = "-" if r["value"] is None else f"{r['value']:.4g}"
        text += f"| {r['check']} | {v} | {r['bound'] or '-'} | {r['verdict']} |\n"
    write_report(out, text, {"command": cmd, "device": name, "arch": arch, "gemm_ms": gemm,
                             "forward_ms": fwd, "step_ms": step, "rows": rows})
    return 1 if any("OVER" in r["verdict"] for r in rows) else 0


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("VARIANT", "REPS"))
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--out", default="benchmarks/results/kernels_ntpm")
    ap.add_argument("--gpu", action="store_true",
                    help="time the Triton NTP-M on a CUDA device against the kernel-anchors bounds")
    ap.add_argument("--device", default="cuda", help="--gpu: the device (cpu: interpreter smoke run)")
    ap.add_argument("--small", action="store_true", help="--gpu: tiny shapes (smoke run)")
    a = ap.parse_args(argv)
    if a.worker:
        print(json.dumps(_worker(a.worker[0], int(a.worker[1]))))
        return 0
    if a.gpu:
        return gpu_main(a.out, max(a.reps, 10), a.device, a.small)
    import torch
    res = {}
    for variant in ("naive", "chunked"):
        cmd = [sys.executable, "-m", "densert.benchmarks.bench_ntpm", "--worker", variant, str(a.reps)]
        env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", MALLOC_TRIM_THRESHOLD_="0")
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=3600, env=env)
        if out.returncode != 0:
            raise RuntimeError(out.stderr[-3000:])
        res[variant] = json.loads(out.stdout.strip().splitlines()[-1])
    n, c = res["naive"], res["chunked"]
    cmdline = "python -m densert.benchmarks.bench_ntpm " + " ".join(argv or sys.argv[1:])
    text = (f"# NTP-M: chunked (sparse backward) vs naive dense logits (CPU)\n\n"
            f"Command: `{cmdline.strip()}`  \n"
            f"torch {torch.__version__}, torch threads {torch.get_num_threads()}; L={L}, d={D}, |V|={V}, "
            f"k={K}, {P} positives/token, bf16 hidden + weight, forward+backward to both. "
            f"Median of {a.reps} steps after one warm-up; peak = VmHWM - VmRSS over the timed steps, "
            f"baseline taken with no gradients alive, so the peak includes the gradients each step produces "
            f"(fresh process per variant). Both variants return the same dense |V| x d bf16 weight "
            f"gradient ({DW_MB:.0f} MB, the size of the weight itself, fully resident in both); the "
            f"'working' column is the peak beyond it: what the loss itself needs. "
            f"Shared 2-core machine: absolute times are noisy.\n\n"
            "| variant | median s | peak extra MB | working MB (peak - dW) | loss | ‖dH‖ | ‖dW‖ |\n"
            "|---|---:|---:|---:|---:|---:|---:|\n")
    for r in (n, c):
        text += (f"| {r['variant']} | {r['median_s']:.2f} | {r['peak_extra_mb']:.0f} | "
                 f"{r['peak_extra_mb'] - DW_MB:.0f} | {r['loss']:.6g} | "
                 f"{r['grad_h_norm']:.6g} | {r['grad_w_norm']:.6g} |\n")
    text += (f"\nchunked / naive: time {c['median_s'] / n['median_s']:.2f}x, "
             f"peak memory {c['peak_extra_mb'] / n['peak_extra_mb']:.3f}x, working memory "
             f"{(c['peak_extra_mb'] - DW_MB) / (n['peak_extra_mb'] - DW_MB):.3f}x; "
             f"loss rel. diff {abs(c['loss'] - n['loss']) / abs(n['loss']):.2e}\n")
    write_report(a.out, text, {"command": cmdline.strip(), "results": res})
    return 0


if __name__ == "__main__":
    sys.exit(main())
