"""Weight-only quantization of the exported graphs: what is quantized, how, and the numpy code
that does it (export), reads it back (the runtime's tied-table rows) and checks it (tests).

Formats (symmetric, no zero point: TensorRT's IDequantizeLayer takes only zero zero-points):

``int8``  per output channel: ``W[K, N] ~= q[K, N] * s[N]``, q in [-127, 127]. Graph:
          ``DequantizeLinear(q, s, axis=1) -> MatMul``. ONNX Runtime (CPU / CUDA) fuses that pair
          into ``MatMulNBits`` (8-bit); TensorRT 10 takes per-channel INT8 weight Q/DQ.
``int4``  blocks of ``block`` rows along K: ``W ~= q * s[K / block, N]``, q in [-8, 7] (absmax
          maps to +-7), packed two per byte, low nibble first (ONNX INT4). Graph:
          ``DequantizeLinear(q, s, axis=0, block_size=block) -> MatMul`` (opset 21); ONNX
          Runtime fuses it into 4-bit ``MatMulNBits``, TensorRT 10 runs it as INT4 block
          weight-only quantization (2-D weights, blocks along K).

The onnxruntime target (``--ort-matmul int8-gemm``, its default) writes its 2-D weights but
the tied table as int8 GEMM operands (``graph_writer._layout`` "qgemm"):
``DynamicQuantizeMatMul(x, q, s)``, activations quantized per tensor at run time; int4 ones
per output column (``quantize_int4_columns``: q in [-7, 7], one clip-searched fp32 scale per
column), stored ONNX INT4 and widened to int8 by a ``Cast`` folded at load. Its int4 table
stays ``MatMulNBits`` blocks (``matmulnbits_weight``); ``--ort-matmul nbits`` writes every int4
weight so (and int8 ones as ``DequantizeLinear -> MatMul``).

Policy (``POLICY``), per precision:

=================  ==========  ===========================================================
tensor             int8        int4
=================  ==========  ===========================================================
decoder Linear     int8        int4 (block; onnxruntime target: per column)
tied lm_head/emb   int8        int4 (block); the rows the dense heads read (1000 depth bins,
                               FG/BG/OTHERS) stay exact fp32 beside it (``head_rows``):
                               int4 depth-bin rows flip the depth argmax
vision + merger    int8        int4 (as the decoder): a full model's int4 directory fits
                               2.8 GiB only so (``bench_fullscale``)
MLA kv_b halves    int8        int8 (3-D, batched: one scale per output column; onnxruntime
                               target: kv_b as two 2-D int4 GEMMs)
norms, biases,     fp32        fp32 (small; statistics and RoPE stay exact)
RoPE, task rows
=================  ==========  ===========================================================

int8 scales are fp32; int4 block scales are stored fp16 (a Cast widens them in the graph).
"""
from __future__ import annotations

import numpy as np

from .options import INT4_BLOCK, INT4_BLOCKS

QUANTIZED_PRECISIONS = ("int8", "int4")
# MatMulNBits compute of the quantized graphs: 4 = int8 activations x quantized weights (what
# the verify thresholds are measured with). 1 (fp32 math) has no fast 8-bit CPU kernel in ONNX
# Runtime 1.31 (int8 / int4 decode about two orders of magnitude slower at level 1 here).
NBITS_ACCURACY_LEVEL = 4
INT8_MAX, INT4_MAX = 127, 7
_CHUNK = 1 << 14           # output channels quantized per step (bounds the fp32 scratch)


# part -> weight format, per precision (see the table above; parts: 'llm' = decoder Linears,
# 'table' = the tied lm_head / embedding table, 'vision' = vision tower + merger).
POLICY = {
    "int8": {"llm": "int8", "table": "int8", "vision": "int8"},
    "int4": {"llm": "int4", "table": "int4", "vision": "int4"},
}


def weight_format(precision: str, part: str, policy: dict[str, str] | None = None) -> str | None:
    """'int8', 'int4' or None (keep float) for a 2-D weight of ``part`` under ``precision``;
    ``policy`` overrides ``POLICY[precision]`` part by part, None keeping a part float
    (benchmarks measure the choices)."""
    if precision not in QUANTIZED_PRECISIONS:
        return None
    return {**POLICY[precision], **(policy or {})}[part]


def quantize_int8(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (q int8 [K, N], s float32 [N]), one scale per column (output channel)."""
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    s = np.empty(n, np.float32)
    for a in range(0, n, _CHUNK):
        blk = np.asarray(w[:, a:a + _CHUNK], dtype=np.float32)
        sc = np.abs(blk).max(axis=0) / INT8_MAX
        sc[sc == 0] = 1.0
        q[:, a:a + _CHUNK] = np.clip(np.rint(blk / sc), -INT8_MAX, INT8_MAX)
        s[a:a + _CHUNK] = sc
    return q, s


# Scales tried per column by ``quantize_int4_columns``, as fractions of the column's absmax.
INT4_COLUMN_CLIPS = np.linspace(0.5, 1.0, 16)
_COLUMN_CHUNK = 1024       # columns per step of the clip search (bounds its fp32 scratch)


def quantize_int4_columns(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (q int8 values in [-7, 7] [K, N], s float32 [N]): int4 with one scale per
    output column (no blocks along K), so widening q to int8 is exact and an int8 GEMM with
    per-column scales computes the same product (the onnxruntime target's ``qgemm`` layout).

    Each column's scale is the one of ``INT4_COLUMN_CLIPS`` x absmax / 7 with the least squared
    error (a clip search, as llama.cpp's and AWQ's quantizers do): one scale over all of K
    clips the column's few largest values instead of spending the 15 levels on them. On the
    bundled model's Linears this gives a lower weight error than absmax blocks of 128 (mean
    relative error 0.107 vs 0.109; absmax per column: 0.123)."""
    k, n = w.shape
    q = np.empty((k, n), np.int8)
    s = np.empty(n, np.float32)
    for a in range(0, n, _COLUMN_CHUNK):
        blk = np.asarray(w[:, a:a + _COLUMN_CHUNK], dtype=np.float32)
        amax = np.abs(blk).max(axis=0)
        amax[amax == 0] = INT4_MAX
        best_err = np.full(blk.shape[1], np.inf, np.float32)
        best = np.empty(blk.shape[1], np.float32)
        for clip in INT4_COLUMN_CLIPS:
            sc = (amax * np.float32(clip / INT4_MAX)).astype(np.float32)
            err = np.clip(np.rint(blk / sc), -INT4_MAX, INT4_MAX)
            err *= sc
            err -= blk
            err = np.einsum("kn,kn->n", err, err)
            better = err < best_err
            best_err[better], best[better] = err[better], sc[better]
        q[:, a:a + _COLUMN_CHUNK] = np.clip(np.rint(blk / best), -INT4_MAX, INT4_MAX)
        s[a:a + _COLUMN_CHUNK] = best
    return q, s


def int4_block_for(k: int, block: int) -> int | None:
    """The block an int4 weight with input size ``k`` takes: ``block``, or the largest smaller
    one that tiles ``k`` (the ViT's 4304-wide MLP input takes 16 at any setting); None when
    none does (the weight goes int8)."""
    for b in sorted((b for b in INT4_BLOCKS if b <= block), reverse=True):
        if k % b == 0:
            return b
    return None


def fp16_scale(sc: np.ndarray) -> np.ndarray:
    """Block scales as the engine stores them (fp16), in float32: the values are quantized
    against the stored scale, so dequantizing the file gives the best q for it. A zero block
    keeps scale 1; a scale below fp16's range becomes its smallest normal value (those weights
    are ~0 and clip)."""
    out = np.asarray(sc, dtype=np.float32).astype(np.float16).astype(np.float32)
    out[sc == 0] = 1.0
    tiny = (out == 0) | ~np.isfinite(out)
    out[tiny & (sc < 1)] = float(np.finfo(np.float16).tiny)
    out[tiny & (sc >= 1)] = float(np.finfo(np.float16).max)
    return out


def quantize_int4(w: np.ndarray, block: int = INT4_BLOCK) -> tuple[np.ndarray, np.ndarray]:
    """[K, N] float -> (q int8 values in [-8, 7] [K, N], s [K // block, N]: fp16 values held
    in float32)."""
    k, n = w.shape
    if k % block:
        raise ValueError(f"int4 blocks of {block} do not tile K = {k}")
    q = np.empty((k, n), np.int8)
    s = np.empty((k // block, n), np.float32)
    for a in range(0, n, _CHUNK):
        blk = np.asarray(w[:, a:a + _CHUNK], dtype=np.float32).reshape(k // block, block, -1)
        sc = fp16_scale(np.abs(blk).max(axis=1) / INT4_MAX)
        q[:, a:a + _CHUNK] = np.clip(np.rint(blk / sc[:, None]), -8, INT4_MAX).reshape(k, -1)
        s[:, a:a + _CHUNK] = sc
    return q, s


def dequantize(q: np.ndarray, s: np.ndarray, fmt: str) -> np.ndarray:
    """Inverse of the quantizers on [K, n] columns: float32 [K, n]."""
    if fmt == "int8":
        return q.astype(np.float32) * s[None, :]
    k = q.shape[0]
    block = k // s.shape[0]
    return (q.astype(np.float32).reshape(s.shape[0], block, -1) * s[:, None, :]).reshape(k, -1)


def quantize(w: np.ndarray, fmt: str, block: int = INT4_BLOCK):
    return quantize_int8(w) if fmt == "int8" else quantize_int4(w, block)


def pack_int4(q: np.ndarray) -> np.ndarray:
    """int8 values in [-8, 7] -> uint8 bytes, two per byte, element 2i in the low nibble."""
    flat = q.reshape(-1).astype(np.uint8) & 0x0F
    if flat.size % 2:
        flat = np.append(flat, np.uint8(0))
    return (flat[0::2] | (flat[1::2] << 4)).astype(np.uint8)


def matmulnbits_weight(q: np.ndarray, block: int) -> np.ndarray:
    """int4 values [K, N] in [-8, 7] -> MatMulNBits' B: uint8 [N, K / block, block / 2], each
    output column's K values as unsigned nibbles (q + 8: its default zero point), low first."""
    k, n = q.shape
    u = (q.T + np.int8(8)).view(np.uint8).reshape(n, k // block, block)   # q + 8 fits int8
    return (u[..., 0::2] | (u[..., 1::2] << 4)).astype(np.uint8)


def unpack_int4(b: np.ndarray, count: int) -> np.ndarray:
    """uint8 bytes -> ``count`` int8 values (sign-extended nibbles)."""
    b = np.asarray(b, dtype=np.uint8)
    out = np.empty(b.size * 2, np.int8)
    out[0::2] = (b & 0x0F).astype(np.int8)
    out[1::2] = (b >> 4).astype(np.int8)
    out[out > 7] -= 16
    return out[:count]


def fake_quantize(w: np.ndarray, fmt: str | None, block: int = INT4_BLOCK) -> np.ndarray:
    """What a [K, N] weight becomes in an engine of this format (float32)."""
    if fmt is None:
        return np.asarray(w, dtype=np.float32)
    return dequantize(*quantize(w, fmt, block), fmt)
