"""Dense-prediction head: subset lm_head GEMM -> bilinear upsample -> argmax / probs / depth.

DenseMLLM decodes a dense map from the vision-token logits of a handful of vocabulary ids
(category names, depth bins). Averaging the logits of a category's sub-word ids equals one dot
product with the averaged weight rows, so the head is an L x d by d x K GEMM on a pre-averaged
K x d weight (``subset_weight``), never the full |V| logits (``naive_full_vocab_head`` keeps that
path only as the baseline for tests and benchmarks).

The upsample has the semantics of ``F.interpolate(mode="bilinear", align_corners=False,
size=(H, W))``: scale = in/out in fp32, src = scale * (dst + 0.5) - 0.5 clamped at 0,
i0 = floor(src), i1 = min(i0 + 1, in - 1), value = lh0 * (lw0 * x00 + lw1 * x01) +
lh1 * (lw0 * x10 + lw1 * x11) (the order of ATen's CPU kernel), each multiply and add rounded
separately (``upsample_unfused``, the rounding contract every tail shares; ATen's own kernel
differs in the last bit). In ``argmax``/``depth`` mode the K x H x W upsampled scores are never
materialised: the torch path interpolates a band of output rows at a time, and on large CPU maps
only the pixels whose four corner tokens disagree on the label; the CUDA path runs a fused Triton
kernel that keeps a running (max, argmax) per pixel.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F

from . import use_triton

__all__ = [
    "subset_weight",
    "dense_scores",
    "dense_head",
    "naive_full_vocab_head",
    "bilinear_source_coords",
]

_MODES = ("argmax", "probs", "depth")
# Maps whose K x H x W upsampled scores fit in this are interpolated whole (band by band); the
# per-quad pruning is only tried above it.
_SMALL_TAIL_BYTES = 8 << 20
# Output rows per band of the torch tail: two band buffers stay in the CPU's L2/L3.
_BAND_BYTES = 2 << 20
_ROUNDING_SLACK = 1e-5
# Deciding a quad from its corners costs about as much as interpolating 4 pixels, so the
# pruning only pays for large upsampling factors (segmentation at 32 px per token, not depth
# at 2x).
_MIN_QUAD_PIXELS = 16


def subset_weight(lm_head_weight: torch.Tensor, id_groups: Sequence[Sequence[int]]) -> torch.Tensor:
    """Per group, the fp32 mean of the lm_head rows: the K x d weight of the dense head."""
    if lm_head_weight.dim() != 2:
        raise ValueError(f"lm_head_weight must be [V, d], got shape {tuple(lm_head_weight.shape)}")
    V, d = lm_head_weight.shape
    if len(id_groups) == 0:
        raise ValueError("id_groups is empty: need at least one group")
    flat: list[int] = []
    seg: list[int] = []
    for g, ids in enumerate(id_groups):
        ids = [int(i) for i in ids]
        if len(ids) == 0:
            raise ValueError(f"id group {g} is empty")
        bad = [i for i in ids if i < 0 or i >= V]
        if bad:
            raise ValueError(f"id group {g} has ids out of range [0, {V}): {bad[:8]}")
        flat.extend(ids)
        seg.extend([g] * len(ids))
    dev = lm_head_weight.device
    idx = torch.tensor(flat, dtype=torch.long, device=dev)
    seg_t = torch.tensor(seg, dtype=torch.long, device=dev)
    # Gather only the needed rows, upcast those: the full weight is never copied to fp32.
    rows = lm_head_weight.index_select(0, idx).to(torch.float32)
    out = torch.zeros(len(id_groups), d, dtype=torch.float32, device=dev)
    out.index_add_(0, seg_t, rows)
    counts = torch.tensor([len(g) for g in id_groups], dtype=torch.float32, device=dev)
    return out / counts[:, None]


def dense_scores(hidden: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """[L, d] x [K, d] -> [L, K] fp32 scores."""
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    return hidden.to(torch.float32) @ weight.to(torch.float32).t()


def bilinear_source_coords(in_size: int, out_size: int, device=None):
    """(i0, i1, l0, l1) per output index, as ATen computes them for align_corners=False + size."""
    scale = torch.tensor(in_size, dtype=torch.float32) / torch.tensor(out_size, dtype=torch.float32)
    dst = torch.arange(out_size, dtype=torch.float32)
    src = scale * (dst + 0.5) - 0.5
    src = torch.clamp(src, min=0.0)
    i0 = torch.clamp(torch.floor(src).to(torch.long), max=in_size - 1)
    i1 = torch.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = torch.clamp(src - i0.to(torch.float32), 0.0, 1.0)
    l0 = 1.0 - l1
    return (i0.to(device), i1.to(device), l0.to(device), l1.to(device))


def upsample_unfused(scores: torch.Tensor, gh: int, gw: int, H: int, W: int) -> torch.Tensor:
    """[gh*gw, K] fp32 scores -> [K, H, W], every multiply and add separately rounded in fp32.

    The rounding contract of the fused tails: the Triton kernel (compiled with
    enable_fp_fusion=False), the CUDA tail (__fmul_rn/__fadd_rn) and the C++ tail
    (-ffp-contract=off) all compute exactly these values, so their labels equal this reference's
    argmax on every pixel, ties included. ATen's F.interpolate rounds differently in the last
    bit (measured on torch 2.13 CPU: most values differ by an ulp), so agreement with torch is
    tested where the top-2 margin exceeds 1e-5 relative. Reference for tests and fixtures: it
    materialises the K x H x W values.
    """
    K = scores.shape[1]
    h0, h1, lh0, lh1 = bilinear_source_coords(gh, H)
    w0, w1, lw0, lw1 = bilinear_source_coords(gw, W)
    g = scores.detach().to(torch.float32).cpu().t().reshape(K, gh, gw)
    r0, r1 = g[:, h0], g[:, h1]                           # [K, H, gw]
    top = r0[:, :, w0] * lw0 + r0[:, :, w1] * lw1         # ATen's order: width first
    bot = r1[:, :, w0] * lw0 + r1[:, :, w1] * lw1
    return top * lh0[:, None] + bot * lh1[:, None]


def check_args(hidden, weight, grid_hw, out_hw, mode, temperature, depth_values):
    if mode not in _MODES:
        raise ValueError(f"mode must be one of {_MODES}, got {mode!r}")
    gh, gw = (int(x) for x in grid_hw)
    H, W = (int(x) for x in out_hw)
    if gh <= 0 or gw <= 0 or H <= 0 or W <= 0:
        raise ValueError(f"grid_hw and out_hw must be positive, got {grid_hw}, {out_hw}")
    if hidden.dim() != 2 or hidden.shape[0] != gh * gw:
        raise ValueError(f"hidden must be [gh*gw={gh * gw}, d], got {tuple(hidden.shape)}")
    K = weight.shape[0]
    if weight.dim() != 2 or K == 0:
        raise ValueError(f"weight must be [K >= 1, d], got {tuple(weight.shape)}")
    if mode == "depth":
        if depth_values is None or depth_values.dim() != 1 or depth_values.shape[0] != K:
            raise ValueError(f"mode='depth' needs depth_values of shape [{K}]")
    if mode == "probs" and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    return gh, gw, H, W


def _tail_torch(scores: torch.Tensor, gh: int, gw: int, H: int, W: int, mode: str,
                temperature: float, depth_values, host: bool = True):
    """The torch tail. Labels are the argmax of ``upsample_unfused``'s values, computed a band
    of output rows at a time (``_labels_rows``). ``host`` (CPU) adds the per-quad pruning of
    large maps (Python loops, host syncs); the device route (CUDA without triton) runs only
    whole-tensor ops and reads nothing back."""
    K = scores.shape[1]
    if mode == "probs":
        grid = scores.t().reshape(K, gh, gw)
        up = F.interpolate(grid[None], size=(H, W), mode="bilinear", align_corners=False)[0]
        return torch.softmax(up / temperature, dim=0)
    if host and K * H * W * 4 > _SMALL_TAIL_BYTES and H * W >= _MIN_QUAD_PIXELS * gh * gw:
        labels = _labels_quads(scores, gh, gw, H, W)
    else:
        labels = _labels_rows(scores, gh, gw, H, W)
    if mode == "argmax":
        return labels
    return depth_values.to(device=scores.device, dtype=torch.float32)[labels]


def _labels_rows(scores: torch.Tensor, gh: int, gw: int, H: int, W: int) -> torch.Tensor:
    """argmax over K of the bilinear upsample, bit-identical to ``upsample_unfused`` (the same
    separately rounded ops), in the scores' own [token, K] layout: the width pass makes
    [gh, W, K] once, the height pass a band of output rows at a time into two reused buffers
    (cache-sized, in-place ops: fresh 10+ MB temporaries per op cost 5x in page faults and
    memory traffic on the 2-core CPU), each band reduced over the contiguous K axis. No
    transpose of the scores, no K x H x W tensor."""
    K = scores.shape[1]
    dev = scores.device
    h0, h1, lh0, lh1 = bilinear_source_coords(gh, H, dev)
    w0, w1, lw0, lw1 = bilinear_source_coords(gw, W, dev)
    s = scores.reshape(gh, gw, K)
    t = torch.index_select(s, 1, w0).mul_(lw0[:, None])    # [gh, W, K]: width first, as ATen
    t.add_(torch.index_select(s, 1, w1).mul_(lw1[:, None]))
    labels = torch.empty(H, W, dtype=torch.long, device=dev)
    band = max(1, _BAND_BYTES // max(1, W * K * 4))
    top, bot = (torch.empty(min(band, H), W, K, device=dev) for _ in range(2))
    for a in range(0, H, band):
        b = min(H, a + band)
        v, u = top[:b - a], bot[:b - a]
        torch.index_select(t, 0, h0[a:b], out=v).mul_(lh0[a:b, None, None])
        torch.index_select(t, 0, h1[a:b], out=u).mul_(lh1[a:b, None, None])
        labels[a:b] = v.add_(u).argmax(dim=-1)  # first maximum: ties to the lower index
    return labels


def _labels_quads(scores: torch.Tensor, gh: int, gw: int, H: int, W: int) -> torch.Tensor:
    K = scores.shape[1]
    grid = scores.t().reshape(K, gh, gw)
    dev = scores.device
    h0, _, lh0, lh1 = bilinear_source_coords(gh, H, dev)
    w0, _, lw0, lw1 = bilinear_source_coords(gw, W, dev)
    # Pixels with the same top-left source token share all four corners: a "quad", a rectangle
    # of output pixels. Every bilinear value there is a convex combination of the corner scores,
    # so class c can only win if its max over the corners reaches the best min over the corners,
    # and where all four corners share an argmax, that argmax wins everywhere (fp rounding is
    # monotone; only a tie that rounding creates could go to a lower index). Only the quads
    # left undecided are interpolated, over their candidates only.
    qh1 = torch.clamp(torch.arange(1, gh + 1, device=dev), max=gh - 1)
    qw1 = torch.clamp(torch.arange(1, gw + 1, device=dev), max=gw - 1)
    c01, c10 = grid[:, :, qw1], grid[:, qh1]
    c11 = c10[:, :, qw1]
    lo = torch.minimum(torch.minimum(grid, c01), torch.minimum(c10, c11))
    hi = torch.maximum(torch.maximum(grid, c01), torch.maximum(c10, c11))
    # The slack covers the few roundings of one interpolated value.
    cand = hi >= lo.amax(dim=0) - _ROUNDING_SLACK * grid.abs().amax()
    ncand = cand.sum(dim=0)
    t00, t01, t10, t11 = (x.argmax(dim=0) for x in (grid, c01, c10, c11))
    agree = (t00 == t01) & (t00 == t10) & (t00 == t11)
    quad_label = torch.where(agree, t00, torch.where(ncand == 1, cand.to(torch.uint8).argmax(0), -1))
    q = torch.arange(max(gh, gw), device=dev)
    r0, r1 = torch.searchsorted(h0, q[:gh]), torch.searchsorted(h0, q[:gh], right=True)
    s0, s1 = torch.searchsorted(w0, q[:gw]), torch.searchsorted(w0, q[:gw], right=True)
    undecided = quad_label < 0
    work = int((ncand * (r1 - r0)[:, None] * (s1 - s0)[None, :])[undecided].sum())
    if work * 3 > K * H * W:
        # Near-random maps: per-quad work approaches the whole upsample; stream it instead.
        return _labels_rows(scores, gh, gw, H, W)
    labels = quad_label[h0][:, w0]
    for i, j in undecided.nonzero().tolist():
        ra, rb, ca, cb = int(r0[i]), int(r1[i]), int(s0[j]), int(s1[j])
        if ra == rb or ca == cb:
            continue
        cls = cand[:, i, j].nonzero(as_tuple=True)[0]          # ascending: ties to the lower id
        x00, x01, x10, x11 = grid[cls, i, j], c01[cls, i, j], c10[cls, i, j], c11[cls, i, j]
        a0, a1 = lw0[ca:cb], lw1[ca:cb]
        top = x00[:, None] * a0 + x01[:, None] * a1            # [n, cols]: ATen's order
        bot = x10[:, None] * a0 + x11[:, None] * a1
        v = top[:, None] * lh0[ra:rb, None] + bot[:, None] * lh1[ra:rb, None]
        labels[ra:rb, ca:cb] = cls[v.argmax(dim=0)]
    return labels


def dense_head(hidden: torch.Tensor, weight: torch.Tensor, grid_hw, out_hw, mode: str = "argmax",
               temperature: float = 0.2, depth_values: torch.Tensor | None = None) -> torch.Tensor:
    """Dense map from vision-token hidden states.

    Returns int64 [H, W] labels (``argmax``, ties to the lower index), float32 [K, H, W]
    softmax(upsampled / temperature) (``probs``), or float32 [H, W] depth_values[argmax]
    (``depth``), on the device of ``hidden``. CUDA tensors run the fused Triton tail when
    triton is installed, else the torch device route; CPU tensors the torch host route.
    """
    gh, gw, H, W = check_args(hidden, weight, grid_hw, out_hw, mode, temperature, depth_values)
    scores = dense_scores(hidden, weight)
    if use_triton(scores):
        from . import _triton_dense_head as tdh
        return tdh.dense_tail(scores, gh, gw, H, W, mode, float(temperature), depth_values)
    return _tail_torch(scores, gh, gw, H, W, mode, float(temperature), depth_values,
                       host=not scores.is_cuda)


def naive_full_vocab_head(hidden: torch.Tensor, lm_head_weight: torch.Tensor,
                          id_groups: Sequence[Sequence[int]], grid_hw, out_hw,
                          mode: str = "argmax", depth_values: torch.Tensor | None = None,
                          gemm_dtype: torch.dtype | None = None, chunk_rows: int = 16384):
    """Baseline: full-vocabulary logits, gather + average per group, full K x H x W upsample.

    ``gemm_dtype`` None: logits in the weight's dtype (as a model forward would), then upcast.
    torch.float32: fp32 logits from fp32 GEMMs over ``chunk_rows``-row slices of the upcast
    weight (the fastest full-vocabulary head on a CPU without bf16 arithmetic; the [L, |V|]
    logits still exist whole, the fp32 weight never does).
    """
    gh, gw = (int(x) for x in grid_hw)
    H, W = (int(x) for x in out_hw)
    if gemm_dtype is None or gemm_dtype == lm_head_weight.dtype:
        logits = hidden.to(lm_head_weight.dtype) @ lm_head_weight.t()  # [L, V]
    else:
        V = lm_head_weight.shape[0]
        h = hidden.to(gemm_dtype)
        logits = torch.empty(h.shape[0], V, dtype=gemm_dtype, device=h.device)
        for a in range(0, V, chunk_rows):
            torch.mm(h, lm_head_weight[a:a + chunk_rows].to(gemm_dtype).t(),
                     out=logits[:, a:a + chunk_rows])
    cat = torch.stack([logits[:, list(g)].to(torch.float32).mean(dim=1) for g in id_groups], dim=1)
    del logits
    up = F.interpolate(cat.t().reshape(1, len(id_groups), gh, gw), size=(H, W), mode="bilinear",
                       align_corners=False)[0]
    labels = torch.argmax(up, dim=0)
    if mode == "depth":
        return depth_values.to(torch.float32)[labels]
    return labels
