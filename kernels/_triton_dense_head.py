"""Triton tail of the dense head: fused bilinear upsample + argmax / softmax / depth LUT.

Imported lazily (only for CUDA tensors, or by tests that set TRITON_INTERPRET=1 first), because
the interpreter flag is read when triton is imported.

One program owns BLOCK_P output pixels, one per thread, and walks the K channels one at a time
(UNROLL of them per loop trip), interpolating the four corner scores on the fly. ``argmax``/
``depth`` keep a running (max, index) per pixel, so the K x H x W upsampled scores never exist;
``probs`` does an online-softmax pass (max, sum) and a second pass that writes the normalised
probabilities, which are the output, as coalesced rows of pixels per channel. Neighbouring
pixels share corner tokens, so a warp's loads hit few cache lines.

Offsets: a scores row (token * row stride) is computed in int64 and a probs channel plane is
reached by advancing a 64-bit pointer, since K x H x W passes 2^31 at realistic sizes (1000 depth
bins at 2.1 MP). Pixel and token indices stay int32; ``dense_tail`` refuses maps with H x W near
2^31.

Rounding: compiled with ``enable_fp_fusion=False``, so each interpolated value is the same
sequence of IEEE-rounded multiplies and adds as ATen's CPU kernel (no FMA contraction). Labels then
agree with the torch path wherever the top-2 margin exceeds the fp32 rounding of the inputs;
probabilities agree to exp()'s accuracy (rtol 1e-5), not bit for bit.
"""
from __future__ import annotations

import numpy as np
import torch
import triton
import triton.language as tl

from . import arch_key
from .dense_head import check_args, dense_scores

_MODE_ID = {"argmax": 0, "probs": 1, "depth": 2}
# Pixel indices are int32: p = pid * BLOCK_P + lane must not wrap.
MAX_PIXELS = 2 ** 31 - 4096

# Launch configuration per compute capability, the same table `python -m densert.kernels.aot`
# compiles and checks for register spills. One pixel per thread keeps the per-pixel state in ~40
# registers on both (no spills, full occupancy); an earlier [128 pixels x 32 channels] tile held
# four corner pointers per element and spilled ~1 KB per thread at 255 registers.
# sm_87 (Jetson AGX Orin, 16 SMs): 128-pixel blocks, so a patch-grid depth map (a few thousand
# pixels) still spreads over every SM. sm_90 (H100/H200, 132 SMs, HBM latency): 256-pixel blocks
# of 8 warps and 8 channels per loop trip for more loads in flight.
CONFIGS = {
    87: dict(BLOCK_P=128, UNROLL=4, num_warps=4),
    90: dict(BLOCK_P=256, UNROLL=8, num_warps=8),
}


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
def _interp(p00, p01, p10, p11, lh0, lh1, lw0, lw1):
    # ATen CPU order: height-weighted sum of the two width-interpolated rows.
    top = tl.load(p00) * lw0 + tl.load(p01) * lw1
    bot = tl.load(p10) * lw0 + tl.load(p11) * lw1
    return top * lh0 + bot * lh1


@triton.jit
def _dense_tail_kernel(s_ptr, out_ptr, lut_ptr, K, gh, gw, H, W, stride_s, stride_o,
                       scale_h, scale_w, temp, MODE: tl.constexpr, BLOCK_P: tl.constexpr,
                       UNROLL: tl.constexpr):
    pid = tl.program_id(0)
    p = pid * BLOCK_P + tl.arange(0, BLOCK_P)
    pmask = p < H * W
    oh = p // W
    ow = p % W
    h0, h1, lh0, lh1 = _src_coords(oh, scale_h, gh)
    w0, w1, lw0, lw1 = _src_coords(ow, scale_w, gw)
    # The four corner token rows; token * stride_s in int64 (it may pass 2^31). Pixels past the
    # end (pmask False) clamp to valid rows, so the loads need no mask.
    p00 = s_ptr + (h0 * gw + w0).to(tl.int64) * stride_s
    p01 = s_ptr + (h0 * gw + w1).to(tl.int64) * stride_s
    p10 = s_ptr + (h1 * gw + w0).to(tl.int64) * stride_s
    p11 = s_ptr + (h1 * gw + w1).to(tl.int64) * stride_s
    best = tl.full([BLOCK_P], float("-inf"), tl.float32)
    arg = tl.zeros([BLOCK_P], tl.int32)
    ssum = tl.zeros([BLOCK_P], tl.float32)
    K_main = K - K % UNROLL
    for k0 in range(0, K_main, UNROLL):
        for u in tl.static_range(UNROLL):
            k = k0 + u
            v = _interp(p00 + k, p01 + k, p10 + k, p11 + k, lh0, lh1, lw0, lw1)
            best, arg, ssum = _update(v, k, best, arg, ssum, temp, MODE)
    for k in range(K_main, K):
        v = _interp(p00 + k, p01 + k, p10 + k, p11 + k, lh0, lh1, lw0, lw1)
        best, arg, ssum = _update(v, k, best, arg, ssum, temp, MODE)
    if MODE == 0:
        tl.store(out_ptr + p, arg.to(tl.int64), mask=pmask)
    elif MODE == 2:
        dv = tl.load(lut_ptr + arg, mask=pmask, other=0.0)
        tl.store(out_ptr + p, dv, mask=pmask)
    else:
        inv_s = 1.0 / ssum
        # The channel plane advances the 64-bit pointer by stride_o per channel: no k * stride_o
        # product, which would wrap in int32 once K x H x W passes 2^31 (1000 bins at 2.1 MP).
        po = out_ptr + p
        for k in range(0, K):
            v = _interp(p00 + k, p01 + k, p10 + k, p11 + k, lh0, lh1, lw0, lw1) / temp
            tl.store(po, tl.exp(v - best) * inv_s, mask=pmask)
            po += stride_o


@triton.jit
def _update(v, k, best, arg, ssum, temp, MODE: tl.constexpr):
    if MODE == 1:
        # Online softmax with one exp per channel: e = exp(-|v - best|) rescales whichever side
        # is smaller (best = -inf at first: e = 0, ssum becomes 1).
        v = v / temp
        grow = v > best
        e = tl.exp(-tl.abs(v - best))
        ssum = tl.where(grow, ssum * e + 1.0, ssum + e)
        best = tl.where(grow, v, best)
    else:
        # Strictly greater: an equal later channel keeps the lower index (torch.argmax).
        better = v > best
        arg = tl.where(better, k, arg)
        best = tl.where(better, v, best)
    return best, arg, ssum


def _fp32_ratio(a: int, b: int) -> float:
    return float(np.float32(a) / np.float32(b))




def dense_tail(scores: torch.Tensor, gh: int, gw: int, H: int, W: int, mode: str,
               temperature: float, depth_values, out: torch.Tensor | None = None, **config):
    """scores [gh*gw, K] (any row stride, unit column stride) -> labels [H, W] int64 |
    probs [K, H, W] fp32 | depth [H, W] fp32. ``out``: a preallocated result (probs: any channel
    stride, contiguous H x W planes). ``config`` overrides the CONFIGS entry (tests)."""
    if scores.stride(1) != 1:
        scores = scores.contiguous()
    K = scores.shape[1]
    if K == 0:
        raise ValueError("dense_tail: scores have no channels (K = 0)")
    if H * W > MAX_PIXELS:
        raise ValueError(f"dense_tail: output {H}x{W} has more than {MAX_PIXELS} pixels")
    dev = scores.device
    shape, dtype = ((K, H, W), torch.float32) if mode == "probs" else (
        (H, W), torch.int64 if mode == "argmax" else torch.float32)
    if out is None:
        out = torch.empty(shape, dtype=dtype, device=dev)
    elif tuple(out.shape) != shape or out.dtype != dtype or out.stride()[-2:] != (W, 1):
        raise ValueError(f"dense_tail: out must be {dtype} {shape} with contiguous rows, got "
                         f"{out.dtype} {tuple(out.shape)} strides {out.stride()}")
    if H * W == 0:
        return out
    lut = (depth_values.to(device=dev, dtype=torch.float32).contiguous() if mode == "depth"
           else scores)  # unused pointer otherwise
    cfg = dict(CONFIGS[arch_key(dev, CONFIGS)], **config)
    grid = (triton.cdiv(H * W, cfg["BLOCK_P"]),)
    stride_o = out.stride(0) if mode == "probs" else 0
    _dense_tail_kernel[grid](scores, out, lut, K, gh, gw, H, W, scores.stride(0), stride_o,
                             _fp32_ratio(gh, H), _fp32_ratio(gw, W), temperature,
                             MODE=_MODE_ID[mode], enable_fp_fusion=False, **cfg)
    return out


def dense_head_triton(hidden, weight, grid_hw, out_hw, mode="argmax", temperature=0.2,
                      depth_values=None, **kw):
    """The Triton route of ``dense_head`` regardless of device (tests run it in the interpreter)."""
    gh, gw, H, W = check_args(hidden, weight, grid_hw, out_hw, mode, temperature, depth_values)
    return dense_tail(dense_scores(hidden, weight), gh, gw, H, W, mode, float(temperature),
                      depth_values, **kw)


# ---- ahead-of-time compile variants (python -m densert.kernels.aot) ----

def aot_variants(arch: int):
    """(label, kernel, signature, constexprs, options) of every launch ``dense_tail`` makes on
    ``arch`` (python -m densert.kernels.aot)."""
    cfg = dict(CONFIGS[arch])
    nw = cfg.pop("num_warps")
    sig = {"s_ptr": "*fp32", "out_ptr": "*i64", "lut_ptr": "*fp32", "K": "i32", "gh": "i32",
           "gw": "i32", "H": "i32", "W": "i32", "stride_s": "i32", "stride_o": "i32",
           "scale_h": "fp32", "scale_w": "fp32", "temp": "fp32", "MODE": "constexpr",
           "BLOCK_P": "constexpr", "UNROLL": "constexpr"}
    for mode, mid in _MODE_ID.items():
        yield (f"dense_tail {mode}", _dense_tail_kernel,
               dict(sig, out_ptr="*i64" if mode == "argmax" else "*fp32"),
               dict(MODE=mid, **cfg), dict(num_warps=nw, enable_fp_fusion=False))
