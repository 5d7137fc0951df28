"""NTP-M loss (DenseMLLM eq. 5) without ever holding the L x |V| logits.

Per valid token i with positives P_i and relevant negatives N_i (the k highest-logit ids that are
valid and not positive; ties broken towards the lower id):

    l_i = (1/|P_i|) sum_{v in P_i} softplus(-z_iv) + (1/k) sum_{v in N_i} softplus(z_iv)

which is -(1/|P_i|) sum log sigmoid(z) - (1/k) sum log(1 - sigmoid(z)) in a form that does not
overflow. Choices this module fixes (the paper leaves them open):

* A token with no (valid) positive keeps only its negative term: its hard negatives are still
  pushed down, and 0/0 never appears.
* Positive ids are de-duplicated per token; positives whose vocab_mask is False are dropped.
* If fewer than k valid candidates exist, N_i holds all of them and the divisor stays k.
* ``reduction="mean"`` divides by the number of valid tokens (at least 1).

Top-k over sigmoid probabilities equals top-k over logits (sigmoid is monotone), so selection
runs on raw logits. The backward is exactly sparse: only |P_i| + k logits per token carry a
gradient ((sigmoid(z) - 1)/|P_i| for positives, sigmoid(z)/k for negatives), so
dH = G W and dW = G^T H are gathers/scatters over those entries, never dense GEMMs.

The torch path streams the vocabulary in chunks (peak extra memory O(L x chunk_size)) with a
running top-k. CUDA tensors go to the Triton kernels in ``_triton_ntpm``.
"""
from __future__ import annotations

import torch

from . import use_triton

__all__ = ["ntpm_loss", "ntpm_loss_reference", "prepare_positives", "ntpm_select_torch",
           "operand_dtype"]


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + exp(x)) without overflow and without F.softplus's x > 20 cut-off.

    logaddexp(x, 0) also has the exact autograd slope sigmoid(x) everywhere, including x == 0
    (clamp + abs formulations give slope 1 there).
    """
    return torch.logaddexp(x, torch.zeros_like(x))


LOW_PRECISION = (torch.bfloat16, torch.float16)


def compute_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    return torch.float64 if torch.float64 in (hidden.dtype, weight.dtype) else torch.float32


def operand_dtype(hidden: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    """Precision of the logit GEMM's operands; products and sums are always fp32 (fp64 inputs:
    fp64 throughout).

    Under autocast with a 16-bit dtype (mixed-precision training, fp32 master weights), that
    dtype: the tensor-core path. Else a 16-bit weight's own dtype (hidden states are rounded to
    it, as the model's lm_head would). Else fp32. Every path (chunked torch, Triton forward and
    backward) multiplies the operands rounded to this dtype and accumulates the exact products
    in fp32, so the logits are the same up to summation order, and the gradient is that of the
    rounded operands.
    """
    if torch.float64 in (hidden.dtype, weight.dtype):
        return torch.float64
    dev = hidden.device.type
    if torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev) in LOW_PRECISION:
        return torch.get_autocast_dtype(dev)
    return weight.dtype if weight.dtype in LOW_PRECISION else torch.float32


def rounded(x: torch.Tensor, operand: torch.dtype, cdt: torch.dtype) -> torch.Tensor:
    """x rounded to the operand precision, held in the compute dtype."""
    return x.to(operand).to(cdt) if operand in LOW_PRECISION else x.to(cdt)


def check_args(hidden, weight, positives, k, token_mask, vocab_mask, reduction):
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"shape mismatch: hidden {tuple(hidden.shape)}, weight {tuple(weight.shape)}")
    L, V = hidden.shape[0], weight.shape[0]
    if positives.dim() != 2 or positives.shape[0] != L:
        raise ValueError(f"positives must be [L={L}, P], got {tuple(positives.shape)}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if token_mask is not None and (token_mask.shape != (L,) or token_mask.dtype != torch.bool):
        raise ValueError("token_mask must be a bool tensor of shape [L]")
    if vocab_mask is not None and (vocab_mask.shape != (V,) or vocab_mask.dtype != torch.bool):
        raise ValueError("vocab_mask must be a bool tensor of shape [V]")
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    if positives.numel() and (positives.min() < -1 or positives.max() >= V):
        raise ValueError(f"positives must be -1 (padding) or ids in [0, {V})")


def prepare_positives(positives: torch.Tensor, vocab_mask: torch.Tensor | None) -> torch.Tensor:
    """Sorted, de-duplicated positives with invalid ids set to -1 (padding)."""
    pos = positives.to(torch.long)
    if vocab_mask is not None and pos.numel():
        ok = vocab_mask.to(pos.device)[pos.clamp(min=0)]
        pos = torch.where(ok, pos, torch.full_like(pos, -1))
    if pos.shape[1] == 0:
        return pos
    pos, _ = torch.sort(pos, dim=1)
    dup = torch.zeros_like(pos, dtype=torch.bool)
    dup[:, 1:] = (pos[:, 1:] == pos[:, :-1]) & (pos[:, 1:] >= 0)
    return torch.where(dup, torch.full_like(pos, -1), pos)


def _merge_topk(vals: torch.Tensor, ids: torch.Tensor, k: int):
    """Exact top-k of candidate (value, id) pairs ordered by value desc, then id asc."""
    order = torch.argsort(ids, dim=1, stable=True)
    vals, ids = vals.gather(1, order), ids.gather(1, order)
    order = torch.sort(vals, dim=1, descending=True, stable=True).indices[:, :k]
    return vals.gather(1, order), ids.gather(1, order)


def _chunk_topk(z: torch.Tensor, k: int):
    """Top-k of one chunk as a set that is exact under lower-id-first tie-breaking."""
    kk = min(k, z.shape[1])
    tv, ti = torch.topk(z, kk, dim=1)
    # torch.topk picks arbitrarily among ties at the k-th value; only then pay for a stable sort.
    if bool(((z >= tv[:, -1:]).sum(dim=1) != kk).any()):
        srt = torch.sort(z, dim=1, descending=True, stable=True)
        tv, ti = srt.values[:, :kk], srt.indices[:, :kk]
    return tv, ti


def _chunk_logits(h: torch.Tensor, w: torch.Tensor, operand: torch.dtype,
                  rows: int = 2048) -> torch.Tensor:
    """h @ rounded(w).T in h's dtype; a weight that needs rounding or upcasting is converted
    ``rows`` rows at a time, so the extra memory is one [rows, d] block, not a [chunk, d] copy."""
    cdt = h.dtype
    if w.dtype == cdt and operand in (cdt, torch.float64):
        return h @ w.t()
    z = torch.empty(h.shape[0], w.shape[0], dtype=cdt, device=h.device)
    for a in range(0, w.shape[0], rows):
        z[:, a:a + rows] = h @ rounded(w[a:a + rows], operand, cdt).t()
    return z


def ntpm_select_torch(h: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, k: int,
                      vocab_mask: torch.Tensor | None, chunk_size: int,
                      operand: torch.dtype | None = None):
    """Stream the vocabulary: positive logits [L, P] and top-k negatives (values, ids) [L, k].

    ``h`` is in the compute dtype and already rounded to ``operand`` (``rounded``); weight chunks
    are rounded as they stream (default operand: the compute dtype). Negatives that do not
    exist (fewer than k candidates) come back with value -inf.
    """
    L, V = h.shape[0], weight.shape[0]
    cdt = h.dtype
    dev = h.device
    operand = operand or cdt
    zpos = torch.zeros(pos.shape, dtype=cdt, device=dev)
    run_v = torch.full((L, 0), float("-inf"), dtype=cdt, device=dev)
    run_i = torch.zeros((L, 0), dtype=torch.long, device=dev)
    for s in range(0, V, chunk_size):
        e = min(V, s + chunk_size)
        z = _chunk_logits(h, weight[s:e], operand)  # [L, C]
        inc = (pos >= s) & (pos < e)
        if bool(inc.any()):
            r, c = inc.nonzero(as_tuple=True)
            cols = pos[r, c] - s
            zpos[r, c] = z[r, cols]
            z[r, cols] = float("-inf")
        if vocab_mask is not None:
            bad = ~vocab_mask[s:e].to(dev)
            if bool(bad.any()):
                z[:, bad] = float("-inf")
        tv, ti = _chunk_topk(z, k)
        del z
        run_v, run_i = _merge_topk(torch.cat([run_v, tv], 1), torch.cat([run_i, ti + s], 1), k)
    return zpos, run_v, run_i


class NTPMSparse(torch.autograd.Function):
    """Loss from selected logits; backward scatters the sparse G into dH and dW."""

    @staticmethod
    def forward(ctx, hidden, weight, h, rows, ids, coef_z, loss_terms, scale, operand,
                triton_kernels=False):
        # ids [L', P+k] (-1 = no gradient), coef_z = d loss_i / d z_ij (before the output grad).
        # h: the selected rows of hidden (torch path: rounded to the operand dtype, in the
        # compute dtype; Triton path: as stored, the kernels round).
        ctx.save_for_backward(hidden, weight, h, rows, ids, coef_z)
        ctx.scale = scale
        ctx.operand = operand
        ctx.triton_kernels = triton_kernels
        return loss_terms.sum() * scale

    @staticmethod
    def backward(ctx, gout):
        hidden, weight, h, rows, ids, coef_z = ctx.saved_tensors
        g = coef_z * (gout.to(coef_z.dtype) * ctx.scale)
        nones = (None,) * 8
        if ctx.triton_kernels:
            from ._triton_ntpm import sparse_backward
            dh, dW = sparse_backward(h, weight, ids, g, ctx.operand,
                                     need_w=ctx.needs_input_grad[1])
            dhidden = None
            if ctx.needs_input_grad[0]:
                dhidden = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device)
                dhidden.index_copy_(0, rows, dh.to(hidden.dtype))
            return (dhidden, dW, *nones)
        cdt = h.dtype
        d = h.shape[1]
        ok = ids >= 0
        safe = torch.where(ok, ids, torch.zeros_like(ids))
        g = torch.where(ok, g, torch.zeros_like(g))
        dh = torch.zeros_like(h)
        # Token blocks keep the gathered [B, P+k, d] rows near 64 MB.
        blk = max(1, (64 << 20) // max(1, ids.shape[1] * d * h.element_size()))
        for a in range(0, h.shape[0], blk):
            b = min(h.shape[0], a + blk)
            w_rows = rounded(weight[safe[a:b]], ctx.operand, cdt)
            dh[a:b] = torch.einsum("bj,bjd->bd", g[a:b], w_rows)
        dhidden = None
        if ctx.needs_input_grad[0]:
            dhidden = torch.zeros(hidden.shape, dtype=cdt, device=hidden.device)
            dhidden.index_copy_(0, rows, dh)
            dhidden = dhidden.to(hidden.dtype)
        dW = _sparse_weight_grad(h, ids, g, weight) if ctx.needs_input_grad[1] else None
        return (dhidden, dW, *nones)


def _sparse_weight_grad(h: torch.Tensor, ids: torch.Tensor, g: torch.Tensor, weight: torch.Tensor,
                        block_bytes: int = 32 << 20) -> torch.Tensor:
    """dW = G^T H over the non-zeros of G, in the weight's dtype.

    Entries are sorted by vocabulary id and summed in blocks of whole rows (ordered, so the result
    is deterministic), each block in the compute dtype: the extra memory is one ~32 MB block, not
    the touched rows' fp32 sums at once. Rows never selected stay zero pages of the dense output.
    """
    d = h.shape[1]
    keep = (ids >= 0).reshape(-1).nonzero(as_tuple=True)[0]
    vid = ids.reshape(-1)[keep]
    tok = keep // ids.shape[1]
    val = g.reshape(-1)[keep]
    order = torch.argsort(vid, stable=True)
    vid, tok, val = vid[order], tok[order], val[order]
    touched, counts = torch.unique_consecutive(vid, return_counts=True)
    run_end = torch.cumsum(counts, 0)
    dW = torch.zeros(weight.shape, dtype=weight.dtype, device=weight.device)
    per_block = max(1, block_bytes // (d * h.element_size()))
    e0, r0 = 0, 0
    while r0 < touched.numel():
        # Extend the block to the end of the row run containing entry e0 + per_block.
        r1 = int(torch.searchsorted(run_end, min(e0 + per_block, vid.numel()))) + 1
        r1 = min(r1, touched.numel())
        e1 = int(run_end[r1 - 1])
        local = torch.repeat_interleave(torch.arange(r1 - r0, device=h.device), counts[r0:r1])
        acc = torch.zeros(r1 - r0, d, dtype=h.dtype, device=h.device)
        acc.index_add_(0, local, val[e0:e1, None] * h[tok[e0:e1]])
        dW[touched[r0:r1]] = acc.to(weight.dtype)
        e0, r0 = e1, r1
    return dW


def loss_from_selection(zpos, pos, nval, nid, k):
    """Per-token loss terms and d loss / d z for positives and negatives."""
    pvalid = pos >= 0
    nvalid = torch.isfinite(nval)
    npos = pvalid.sum(dim=1, keepdim=True).to(zpos.dtype)
    inv_p = torch.where(npos > 0, 1.0 / npos.clamp(min=1), torch.zeros_like(npos))
    zp = torch.where(pvalid, zpos, torch.zeros_like(zpos))
    zn = torch.where(nvalid, nval, torch.zeros_like(nval))
    pos_term = (softplus(-zp) * pvalid).sum(dim=1) * inv_p[:, 0]
    neg_term = (softplus(zn) * nvalid).sum(dim=1) / k
    cpos = torch.where(pvalid, (torch.sigmoid(zp) - 1.0) * inv_p, torch.zeros_like(zp))
    cneg = torch.where(nvalid, torch.sigmoid(zn) / k, torch.zeros_like(zn))
    ids = torch.cat([torch.where(pvalid, pos, -1), torch.where(nvalid, nid, -1)], dim=1)
    return pos_term + neg_term, ids, torch.cat([cpos, cneg], dim=1)


def select_tokens(hidden, positives, token_mask, vocab_mask, reduction):
    """The valid token rows, their cleaned positives, and the loss scale for ``reduction``."""
    rows = (torch.arange(hidden.shape[0], device=hidden.device) if token_mask is None
            else token_mask.to(hidden.device).nonzero(as_tuple=True)[0])
    scale = 1.0 / max(int(rows.numel()), 1) if reduction == "mean" else 1.0
    return rows, prepare_positives(positives.to(hidden.device)[rows], vocab_mask), scale


def ntpm_loss(hidden: torch.Tensor, weight: torch.Tensor, positives: torch.Tensor, k: int = 32,
              token_mask: torch.Tensor | None = None, vocab_mask: torch.Tensor | None = None,
              chunk_size: int = 8192, reduction: str = "sum") -> torch.Tensor:
    """NTP-M loss with a sparse exact backward to ``hidden`` and ``weight`` (see module doc)."""
    check_args(hidden, weight, positives, k, token_mask, vocab_mask, reduction)
    if use_triton(hidden):
        from . import _triton_ntpm
        return _triton_ntpm.ntpm_loss_triton(hidden, weight, positives, k, token_mask, vocab_mask,
                                             reduction=reduction)
    cdt = compute_dtype(hidden, weight)
    op = operand_dtype(hidden, weight)
    rows, pos, scale = select_tokens(hidden, positives, token_mask, vocab_mask, reduction)
    # Every cast is explicit (operand_dtype): autocast must not re-cast the fp32 GEMMs.
    with torch.no_grad(), torch.autocast(hidden.device.type, enabled=False):
        h = rounded(hidden.detach()[rows], op, cdt)
        zpos, nval, nid = ntpm_select_torch(h, weight.detach(), pos, k, vocab_mask, chunk_size, op)
        terms, ids, coef = loss_from_selection(zpos, pos, nval, nid, k)
    return NTPMSparse.apply(hidden, weight, h, rows, ids, coef, terms, scale, op)


def ntpm_loss_reference(hidden: torch.Tensor, weight: torch.Tensor, positives: torch.Tensor,
                        k: int = 32, token_mask: torch.Tensor | None = None,
                        vocab_mask: torch.Tensor | None = None, reduction: str = "sum") -> torch.Tensor:
    """Dense float64 autograd reference (materialises L x |V|; tests only)."""
    check_args(hidden, weight, positives, k, token_mask, vocab_mask, reduction)
    L, V = hidden.shape[0], weight.shape[0]
    z = hidden.to(torch.float64) @ weight.to(torch.float64).t()
    pos = prepare_positives(positives.to(hidden.device), vocab_mask)
    posmask = torch.zeros(L, V, dtype=torch.bool, device=z.device)
    r, c = (pos >= 0).nonzero(as_tuple=True)
    posmask[r, pos[r, c]] = True
    cand = ~posmask
    if vocab_mask is not None:
        cand &= vocab_mask.to(z.device)[None, :]
    zc = torch.where(cand, z.detach(), torch.full_like(z, float("-inf")))
    # Stable descending sort = value desc, then lower id first.
    sel = torch.sort(zc, dim=1, descending=True, stable=True).indices[:, :k]
    selmask = torch.zeros_like(cand)
    selmask.scatter_(1, sel, True)
    selmask &= cand
    npos = posmask.sum(1).to(torch.float64)
    pos_term = (softplus(-z) * posmask).sum(1) / npos.clamp(min=1)
    neg_term = (softplus(z) * selmask).sum(1) / k
    per_tok = pos_term + neg_term
    tm = torch.ones(L, dtype=torch.bool, device=z.device) if token_mask is None else token_mask
    loss = (per_tok * tm).sum()
    if reduction == "mean":
        loss = loss / max(int(tm.sum()), 1)
    return loss
