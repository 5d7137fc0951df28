"""Triton tail of the dense head: fused bilinear upsample + argmax / softmax / depth LUT.

Imported lazily (only for CUDA tensors, or by tests that set TRITON_INTERPRET=1 first), because
the interpreter flag is read when triton is imported.

One program owns BLOCK_P output pixels and walks the K channels in BLOCK_K chunks, interpolating
the four corner score vectors on the fly. ``argmax``/``depth`` keep a running (max, index) per
pixel, so the K x H x W upsampled scores never exist; ``probs`` does an online-softmax pass
(max, sum) and a second pass that writes the normalised probabilities, which are the output.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

_MODE_ID = {"argmax": 0, "probs": 1, "depth": 2}


@triton.jit
def _src_coords(dst, scale, in_size):
    # ATen area_pixel_compute_source_index (align_corners=False, linear: clamp at 0).
    src = scale * (dst.to(tl.float32) + 0.5) - 0.5
    src = tl.maximum(src, 0.0)
    i0 = tl.minimum(src.to(tl.int32), in_size - 1)  # src >= 0, so truncation == floor
    i1 = tl.where(i0 < in_size - 1, i0 + 1, i0)
    l1 = tl.minimum(tl.maximum(src - i0.to(tl.float32), 0.0), 1.0)
    return i0, i1, 1.0 - l1, l1


@triton.jit
def _interp_chunk(s_ptr, K, kk, kmask, i00, i01, i10, i11, lh0, lh1, lw0, lw1):
    m2 = kmask[None, :]
    x00 = tl.load(s_ptr + i00[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    x01 = tl.load(s_ptr + i01[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    x10 = tl.load(s_ptr + i10[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    x11 = tl.load(s_ptr + i11[:, None] * K + kk[None, :], mask=m2, other=0.0).to(tl.float32)
    top = x00 * lw0[:, None] + x01 * lw1[:, None]
    bot = x10 * lw0[:, None] + x11 * lw1[:, None]
    return top * lh0[:, None] + bot * lh1[:, None]


@triton.jit
def _dense_tail_kernel(s_ptr, out_ptr, lut_ptr, K, gh, gw, H, W, scale_h, scale_w, temp,
                       MODE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    oh = p // W
    ow = p % W
    h0, h1, lh0, lh1 = _src_coords(oh, scale_h, gh)
    w0, w1, lw0, lw1 = _src_coords(ow, scale_w, gw)
    i00 = h0 * gw + w0
    i01 = h0 * gw + w1
    i10 = h1 * gw + w0
    i11 = h1 * gw + w1
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_P], tl.int32)
    ssum = tl.zeros([BLOCK_P], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        kmask = kk < K
        v = _interp_chunk(s_ptr, K, kk, kmask, i00, i01, i10, i11, lh0, lh1, lw0, lw1)
        if MODE == 1:
            v = v / temp
        # Padded channels: load 0 then where(), never multiply an -inf (0 * -inf = NaN).
        v = tl.where(kmask[None, :], v, float("-inf"))
        cmax, carg = tl.max(v, axis=1, return_indices=True, return_indices_tie_break_left=True)
        if MODE == 1:
            new_max = tl.maximum(best, cmax)
            ssum = ssum * tl.exp(best - new_max) + tl.sum(tl.exp(v - new_max[:, None]), axis=1)
            best = new_max
        else:
            # Strictly greater: an equal value in a later chunk has a higher index.
            better = cmax > best
            arg = tl.where(better, carg + k0, arg)
            best = tl.where(better, cmax, best)
    if MODE == 0:
        tl.store(out_ptr + p, arg.to(tl.int64), mask=pmask)
    elif MODE == 2:
        dv = tl.load(lut_ptr + arg, mask=pmask, other=0.0)
        tl.store(out_ptr + p, dv, mask=pmask)
    else:
        inv_s = 1.0 / ssum
        HW = H * W
        for k0 in range(0, K, BLOCK_K):
            kk = k0 + tl.arange(0, BLOCK_K)
            kmask = kk < K
            v = _interp_chunk(s_ptr, K, kk, kmask, i00, i01, i10, i11, lh0, lh1, lw0, lw1) / temp
            pr = tl.exp(v - best[:, None]) * inv_s[:, None]
            tl.store(out_ptr + kk[None, :] * HW + p[:, None], pr,
                     mask=pmask[:, None] & kmask[None, :])


def _fp32_ratio(a: int, b: int) -> float:
    return float(np.float32(a) / np.float32(b))


def dense_tail(scores: torch.Tensor, gh: int, gw: int, H: int, W: int, mode: str,
               temperature: float, depth_values, block_p: int = 128, block_k: int = 32):
    """scores [gh*gw, K] -> labels [H, W] int64 | probs [K, H, W] fp32 | depth [H, W] fp32."""
    scores = scores.contiguous()
    K = scores.shape[1]
    dev = scores.device
    if mode == "probs":
        out = torch.empty(K, H, W, dtype=torch.float32, device=dev)
    elif mode == "argmax":
        out = torch.empty(H, W, dtype=torch.int64, device=dev)
    else:
        out = torch.empty(H, W, dtype=torch.float32, device=dev)
    lut = (depth_values.to(device=dev, dtype=torch.float32).contiguous() if mode == "depth"
           else scores)  # unused pointer otherwise
    grid = (triton.cdiv(H * W, block_p),)
    _dense_tail_kernel[grid](scores, out, lut, K, gh, gw, H, W, _fp32_ratio(gh, H),
                             _fp32_ratio(gw, W), temperature, MODE=_MODE_ID[mode],
                             BLOCK_P=block_p, BLOCK_K=block_k)
    return out


def dense_head_triton(hidden, weight, grid_hw, out_hw, mode="argmax", temperature=0.2,
                      depth_values=None, **kw):
    """The Triton route of ``dense_head`` regardless of device (tests run it in the interpreter)."""
    from .dense_head import check_args, dense_scores
    gh, gw, H, W = check_args(hidden, weight, grid_hw, out_hw, mode, temperature, depth_values)
    return dense_tail(dense_scores(hidden, weight), gh, gw, H, W, mode, float(temperature),
                      depth_values, **kw)
