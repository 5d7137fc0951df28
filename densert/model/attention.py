"""Attention that never holds more than one chunk of scores: the one implementation the vision
tower and the decoder use, eager and exported.

Two shapes of work:

``attention``         q [..., Tq, D] against k [..., Tk, D], v [..., Tk, Dv] (leading dims
                      broadcast), optionally causal (query i sees keys <= i + Tk - Tq) or
                      restricted to equal segment ids. Queries are taken in chunks of rows, so
                      the fp32 score tensor of one chunk, [..., rows, Tk], stays under
                      ``budget`` bytes: memory grows with Tq x rows, never Tq x Tk.
``window_attention``  q, k, v [W, H, S, D]: W independent windows of S slots, padded slots
                      masked out as keys (``key_valid`` [W, S]). Windows are taken in chunks
                      so one chunk's scores [w, H, S, S] stay under ``budget``.

Scores and softmax are fp32 whatever the input dtype (fp16 ViTs overflow in QK^T / softmax);
q is pre-scaled so an fp16 matmul sees smaller values.

Under ``torch.onnx.export`` each call becomes one ``densert::ChunkedAttention`` node (a
``torch.autograd.Function`` symbolic), which ``densert.export.attention_onnx`` expands into an
ONNX ``Loop`` over the chunks with the same chunk rule (``chunk_rows``), so ONNX Runtime and
TensorRT run it with the same bounded memory and no fused-attention op either lacks.
"""
from __future__ import annotations

import torch

# fp32 bytes of the scores of one chunk (and, transiently, its softmax): 64 MiB keeps a full-
# attention layer over 36,864 patches (16 heads) at ~28 query rows x 36,864 keys per chunk.
# Export options may change it per engine (``ExportOptions.attention_chunk_mib``).
DEFAULT_SCORE_BUDGET = 64 << 20
_FP32 = 4
ONNX_DOMAIN = "densert"
ONNX_OP = "ChunkedAttention"


def chunk_rows(rows: int, row_elements: int, budget: int = DEFAULT_SCORE_BUDGET) -> int:
    """Rows (queries or windows) per chunk: as many as fit ``budget`` bytes of fp32 scores,
    at least one, at most ``rows``. The exported Loop computes the same rule from shapes."""
    return max(1, min(rows, budget // (_FP32 * max(row_elements, 1))))


def _softmax_attend(q, k, v, mask):
    """q pre-scaled; mask (bool, True = attend) broadcasts against the scores."""
    s = torch.matmul(q, k.transpose(-2, -1)).float()
    if mask is not None:
        s = s.masked_fill(~mask, float("-inf"))
    return torch.matmul(s.softmax(dim=-1).to(v.dtype), v)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *,
              causal: bool = False, q_segments: torch.Tensor | None = None,
              k_segments: torch.Tensor | None = None, post: torch.Tensor | None = None,
              budget: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) v [@ post], query-chunked; see the module docstring.
    ``post`` [..., Dv, Do] projects each chunk's output inside the loop, so only the projected
    rows are kept (MLA: the latent output, 512 lanes per head, becomes the 128-lane value)."""
    if (q_segments is None) != (k_segments is None):
        raise ValueError("q_segments and k_segments go together")
    if torch.onnx.is_in_onnx_export():
        extra = (() if post is None else (post,)) + (() if q_segments is None else (q_segments, k_segments))
        return _ChunkedAttention.apply(q, k, v, float(scale), int(causal), int(budget), 0,
                                       int(post is not None), *extra)
    tq, tk = q.shape[-2], k.shape[-2]
    lead = 1
    for s in torch.broadcast_shapes(q.shape[:-2], k.shape[:-2]):
        lead *= int(s)
    rows = chunk_rows(tq, lead * tk, budget)
    q = q * scale
    outs = []
    for s0 in range(0, tq, rows):
        s1 = min(s0 + rows, tq)
        mask = None
        if causal:
            qpos = torch.arange(s0, s1, device=q.device) + (tk - tq)
            mask = torch.arange(tk, device=q.device)[None, :] <= qpos[:, None]
        if q_segments is not None:
            seg = q_segments[s0:s1, None] == k_segments[None, :]
            mask = seg if mask is None else mask & seg
        o = _softmax_attend(q[..., s0:s1, :], k, v, mask)
        outs.append(o if post is None else torch.matmul(o, post))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key_valid: torch.Tensor,
                     scale: float, budget: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
    """Attention inside each of W windows: q, k, v [W, H, S, D], key_valid [W, S] bool."""
    if torch.onnx.is_in_onnx_export():
        return _ChunkedAttention.apply(q, k, v, float(scale), 0, int(budget), 1, 0, key_valid)
    w, h, s = q.shape[0], q.shape[1], q.shape[2]
    per = chunk_rows(w, h * s * k.shape[2], budget)
    q = q * scale
    outs = [_softmax_attend(q[a:a + per], k[a:a + per], v[a:a + per],
                            key_valid[a:a + per, None, None, :]) for a in range(0, w, per)]
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=0)


class _ChunkedAttention(torch.autograd.Function):
    """Export-only stand-in: computes the unchunked result while tracing (shapes and the example
    outputs), and emits one ``densert::ChunkedAttention`` node for the ONNX pass to expand."""

    @staticmethod
    def forward(ctx, q, k, v, scale, causal, budget, windows, has_post, *extra):
        post, masks = (extra[0], extra[1:]) if has_post else (None, extra)
        if windows:
            return _softmax_attend(q * scale, k, v, masks[0][:, None, None, :])
        mask = None
        tq, tk = q.shape[-2], k.shape[-2]
        if causal:
            mask = torch.arange(tk)[None, :] <= (torch.arange(tq) + (tk - tq))[:, None]
        if masks:
            seg = masks[0][:, None] == masks[1][None, :]
            mask = seg if mask is None else mask & seg
        o = _softmax_attend(q * scale, k, v, mask)
        return o if post is None else torch.matmul(o, post)

    @staticmethod
    def symbolic(g, q, k, v, scale, causal, budget, windows, has_post, *extra):
        rank = q.type().dim()
        if rank is None:
            raise RuntimeError("ChunkedAttention export needs the rank of q")
        out = g.op(f"{ONNX_DOMAIN}::{ONNX_OP}", q, k, v, *extra, scale_f=scale, causal_i=causal,
                   budget_i=budget, windows_i=windows, post_i=has_post, rank_i=rank)
        out.setType(q.type().with_sizes([None] * rank))
        return out
