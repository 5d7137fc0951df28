"""Analytic roofline of every stage, from the config and the token counts of one request.

For each stage we count FLOPs (one multiply-add = 2 FLOPs) and the *minimum* bytes that must
cross the memory bus (weights read once, stage inputs read once, stage outputs written once;
intermediate activations assumed to stay on chip), then

    lower bound = max(FLOPs / peak FLOP/s, bytes / peak bandwidth)

on named devices. Shapes: the model config (``densert.model.config``); the
dense head's tail costs about 7 FLOPs per class and output pixel (bilinear weights, the blend, the
running max). Nothing here is measured; the measured numbers sit beside it in the report.

Device peaks (``DEVICES``) are dense FP16/BF16 tensor-core FLOP/s and DRAM bandwidth from the
vendors' published figures, each named in its ``source``: the NVIDIA H100 datasheet; NVIDIA
DS-10662-001 v1.8 (Jetson AGX Orin; FP16 derived as 512 FLOP/clk per tensor core); the Jetson
Orin Nano datasheet as summarised in https://ericxliu.me/posts/benchmarking-llms-on-jetson-orin-nano;
https://huggingface.co/hardware/jetson-t5000 for Thor (dense FP16 = sparse FP4 / 8). The host
CPU has no datasheet entry: ``measure_cpu_peaks`` measures it (a GEMM and a copy microbenchmark),
and the report says so.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from densert.model.config import YoutuVLConfig


@dataclass(frozen=True)
class Device:
    name: str
    flops: float        # dense FP16/BF16 tensor FLOP/s
    bandwidth: float    # DRAM bytes/s
    source: str


DEVICES: dict[str, Device] = {
    "H100-SXM": Device("H100 SXM 80GB", 989e12, 3.35e12, "NVIDIA H100 datasheet"),
    "AGX-Orin-64GB": Device("Jetson AGX Orin 64GB", 42.6e12, 204.8e9,
                            "NVIDIA DS-10662-001 v1.8, FP16 derived"),
    "Orin-Nano-8GB": Device("Jetson Orin Nano 8GB", 10e12, 68e9,
                            "Jetson Orin Nano datasheet (via ericxliu.me); the 'Super' mode is "
                            "17 TFLOP/s, 102 GB/s"),
    "Thor-T5000": Device("Jetson AGX Thor T5000", 259e12, 273e9,
                         "huggingface.co/hardware/jetson-t5000, dense FP16 derived"),
}
DEVICE_BYTES_PER_VALUE = 2  # the device bounds assume FP16/BF16 weights and activations


@dataclass
class Request:
    """Token counts of one dense request (what the roofline needs, nothing else)."""
    grid: tuple[int, int]            # patch grid (gh, gw)
    window_seqlens: list[int]        # patches per vision attention window
    prompt_tokens: int               # T: whole prompt incl. image pads
    num_classes: int                 # K: dense-head subset size (1000 depth bins, classes)
    out_hw: tuple[int, int]          # dense map size
    decode_context: int = 0          # cache length for one decode step (default: T)

    @property
    def patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_tokens(self) -> int:
        return self.patches // 4


def _c(flops: float, bytes_: float, **detail) -> dict:
    return {"flops": float(flops), "bytes": float(bytes_), **({"detail": detail} if detail else {})}


def stage_costs(cfg: YoutuVLConfig, req: Request, b: int = 2) -> dict[str, dict]:
    """FLOPs and minimum bytes per stage; ``b`` = bytes per weight / activation value."""
    vc = cfg.vision_config
    N, M, T, K = req.patches, req.image_tokens, req.prompt_tokens, req.num_classes
    Dv, Iv, Lv = vc.hidden_size, vc.intermediate_size, vc.num_hidden_layers
    d, ffn, L, V = cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers, cfg.vocab_size
    H = cfg.num_attention_heads
    dn, dr, dv = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
    qr = cfg.q_lora_rank or 0
    kvr = cfg.kv_lora_rank
    out: dict[str, dict] = {}

    # ---- vision encoder: patch embed + Lv pre-LN blocks (window / full attention)
    pe_f = 2 * N * vc.patch_dim * Dv
    pe_w = vc.patch_dim * Dv + Dv
    lin_f = 2 * N * (4 * Dv * Dv + 2 * Dv * Iv)
    lin_w = 4 * Dv * Dv + 2 * Dv * Iv + 6 * Dv + Iv
    win_attn = sum(4 * s * s * Dv for s in req.window_seqlens)   # QK^T + PV, per layer
    full_attn = 4 * N * N * Dv
    n_full = len([i for i in vc.fullatt_block_indexes if i < Lv])
    attn_f = n_full * full_attn + (Lv - n_full) * win_attn
    vis_f = pe_f + Lv * lin_f + attn_f
    vis_w = pe_w + Lv * lin_w + 2 * Dv
    # input patches (fp32 from the host) + weights + one N x Dv write/read per layer boundary
    vis_b = N * vc.patch_dim * 4 + vis_w * b + Lv * 2 * N * Dv * b
    # merger: RMSNorm + 4Dv -> 4Dv -> d
    mg_f = 2 * M * (4 * Dv * 4 * Dv + 4 * Dv * d)
    mg_w = 4 * Dv * 4 * Dv + 4 * Dv + 4 * Dv * d + d + Dv
    mg_b = mg_w * b + N * Dv * b + M * d * b
    out["vision_encoder"] = _c(vis_f + mg_f, vis_b + mg_b,
                               patch_embed_flops=pe_f, linear_flops=Lv * lin_f,
                               attention_flops=attn_f, attention_if_all_full_flops=Lv * full_attn,
                               merger_flops=mg_f, weight_bytes=(vis_w + mg_w) * b)

    # ---- LLM prefill: L MLA layers over T tokens (+ last-position logits)
    q_w = (d * qr + qr * H * (dn + dr)) if qr else d * H * (dn + dr)
    kv_w = d * (kvr + dr) + kvr * H * (dn + dv)
    o_w = H * dv * d
    mlp_w = 3 * d * ffn
    layer_w = q_w + kv_w + o_w + mlp_w + 2 * d + qr + kvr
    causal_pairs = T * (T + 1) / 2
    attn_pf = 2 * causal_pairs * H * ((dn + dr) + dv)
    pf_lin = 2 * T * (q_w + kv_w + o_w + mlp_w)
    last_logits_f = 2 * d * V
    pf_f = L * (pf_lin + attn_pf) + last_logits_f
    kv_bytes = L * T * (kvr + dr) * b           # latent cache written once
    pf_b = (L * layer_w + V * d) * b + 2 * T * d * b + kv_bytes + V * 4
    out["llm_prefill"] = _c(pf_f, pf_b, linear_flops=L * pf_lin, attention_flops=L * attn_pf,
                            last_logits_flops=last_logits_f, weight_bytes=(L * layer_w + V * d) * b,
                            kv_cache_bytes=kv_bytes)

    # ---- dense head: [M, d] x [d, K] subset GEMM, then fused bilinear + argmax to out_hw
    Ho, Wo = req.out_hw
    gemm_f = 2 * M * d * K
    tail_f = 7 * K * Ho * Wo          # ~7 flop per class per output pixel (module doc)
    dh_b = M * d * b + K * d * 4 + M * K * 4 + Ho * Wo * 4
    out["dense_head"] = _c(gemm_f + tail_f, dh_b, gemm_flops=gemm_f, tail_flops=tail_f)

    # ---- baseline: full-vocabulary logits, gather, materialised K x H x W upsample, argmax
    nv_f = 2 * M * d * V + 7 * K * Ho * Wo
    nv_b = V * d * b + M * d * b + M * V * 4 + 2 * K * Ho * Wo * 4 + Ho * Wo * 8
    out["naive_full_vocab_head"] = _c(nv_f, nv_b, logits_bytes_fp32=M * V * 4)

    # ---- one decode step at cache length C (absorbed MLA over the latent cache)
    C = req.decode_context or T
    attn_dec = 2 * C * H * (kvr + dr) + 2 * C * H * kvr
    dec_f = L * (2 * (q_w + kv_w + o_w + mlp_w) + attn_dec) + 2 * d * V
    dec_b = (L * layer_w + V * d) * b + L * C * (kvr + dr) * b + V * 4
    out["decode_step"] = _c(dec_f, dec_b, context=C)
    return out


def bound_seconds(cost: dict, flops_per_s: float, bytes_per_s: float) -> dict:
    tc, tm = cost["flops"] / flops_per_s, cost["bytes"] / bytes_per_s
    return {"seconds": max(tc, tm), "bound": "compute" if tc >= tm else "memory"}


def device_bounds(cfg: YoutuVLConfig, req: Request) -> dict[str, dict[str, dict]]:
    """{device: {stage: {seconds, bound}}} at FP16 (2 bytes per value)."""
    costs = stage_costs(cfg, req, DEVICE_BYTES_PER_VALUE)
    return {k: {s: bound_seconds(c, dev.flops, dev.bandwidth) for s, c in costs.items()}
            for k, dev in DEVICES.items()}


# ---------------------------------------------------------------- this machine
def measure_cpu_peaks(dtype: str = "float32", gemm_n: int = 1024, copy_mb: int = 256,
                      repeats: int = 7) -> dict:
    """A measured stand-in for a CPU datasheet: the median FLOP/s of an n^3 torch GEMM and the
    median copy bandwidth (bytes read + written) of a ``copy_mb`` MB tensor. Both are what torch
    reaches on this machine with its current thread count, not a hardware peak."""
    import torch
    dt = getattr(torch, dtype)
    a = torch.randn(gemm_n, gemm_n, dtype=torch.float32).to(dt)
    bm = torch.randn(gemm_n, gemm_n, dtype=torch.float32).to(dt)
    torch.mm(a, bm)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        torch.mm(a, bm)
        ts.append(time.perf_counter() - t0)
    gemm_s = float(np.median(ts))
    n = copy_mb * 2**20 // 4
    src = torch.ones(n, dtype=torch.float32)
    dst = torch.empty_like(src)
    dst.copy_(src)
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        ts.append(time.perf_counter() - t0)
    copy_s = float(np.median(ts))
    return {"flops": 2 * gemm_n**3 / gemm_s, "bandwidth": 2 * n * 4 / copy_s,
            "gemm": f"torch.mm {gemm_n}^3 {dtype}, median of {repeats}",
            "copy": f"tensor.copy_ of {copy_mb} MB float32 (read+write counted), median of {repeats}",
            "threads": torch.get_num_threads()}
