"""Triton NTP-M: fused logit tiles + positive gather + streaming top-k, and the sparse backward.

Imported lazily (CUDA tensors, or tests with TRITON_INTERPRET=1 set before the import).

Forward kernel, grid (row blocks, vocab splits). A program computes BM x BN logit tiles of its
split (``tl.dot`` over d), picks up the logits of the token's positives as it passes them, turns
every logit into a unique int64 key ``(ordered fp32 bits << 32) | (2^32 - 1 - id)`` (so larger
key = larger logit, then lower id: the tie rule is inside the key and top-k over keys is
deterministic), masks positives / invalid ids to INT64_MIN and keeps a running top-KK by merging
each tile's ``tl.topk`` with the running set. Splits are merged exactly on the host with
``torch.topk`` over S x KK unique keys. Logits are never written; the value of a selected
negative is decoded from its key. Sigmoid is monotone, so selection needs no sigmoid; the loss and
its per-entry derivatives are computed on the L x (P + k) selected logits.

Backward kernels are deterministic: dH row i sums g_ij W[id_ij] in a fixed order; dW sorts the
non-zeros by id (stable) and one program per (id, d-block) sums its segment in order, no atomics.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from .ntpm import NTPMSparse, check_args, compute_dtype, loss_from_selection, select_tokens

_INT64_MIN = -(2 ** 63)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@triton.jit
def _logit_tile(h_ptr, w_ptr, pos, rows, cols, L, V, D, vm_ptr,
                HAS_VMASK: tl.constexpr, UPCAST: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr):
    acc = tl.zeros([BM, BN], tl.float32)
    for d0 in range(0, D, BK):
        dk = d0 + tl.arange(0, BK)
        a = tl.load(h_ptr + rows[:, None] * D + dk[None, :],
                    mask=(rows[:, None] < L) & (dk[None, :] < D), other=0.0)
        b = tl.load(w_ptr + cols[:, None] * D + dk[None, :],
                    mask=(cols[:, None] < V) & (dk[None, :] < D), other=0.0)
        if UPCAST:
            acc += tl.dot(a.to(tl.float32), tl.trans(b.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))
    z = acc + 0.0  # -0.0 -> +0.0 so equal logits get equal keys
    eq = pos[:, None, :] == cols[None, :, None]  # [BM, BN, PP]
    zpos = tl.sum(tl.where(eq, z[:, :, None], 0.0), axis=1)
    is_pos = tl.sum(eq.to(tl.int32), axis=2) > 0
    valid = (cols[None, :] < V) & (~is_pos)
    if HAS_VMASK:
        vm = tl.load(vm_ptr + cols, mask=cols < V, other=0)
        valid = valid & (vm[None, :] != 0)
    bits = z.to(tl.int32, bitcast=True)
    ordk = bits ^ ((bits >> 31) & 0x7FFFFFFF)
    low = 4294967295 - cols.to(tl.int64)
    key = (ordk.to(tl.int64) << 32) | low[None, :]
    key = tl.where(valid, key, tl.full([BM, BN], -9223372036854775808, tl.int64))
    return key, zpos


@triton.jit
def _ntpm_fwd_kernel(h_ptr, w_ptr, pos_ptr, vm_ptr, keys_ptr, zpos_ptr, L, V, D, P,
                     tiles_per_split, HAS_VMASK: tl.constexpr, UPCAST: tl.constexpr,
                     BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, KK: tl.constexpr,
                     PP: tl.constexpr):
    pid_m = tl.program_id(0)
    sid = tl.program_id(1)
    nsplit = tl.num_programs(1)
    rows = pid_m * BM + tl.arange(0, BM)
    pj = tl.arange(0, PP)
    pos = tl.load(pos_ptr + rows[:, None] * P + pj[None, :],
                  mask=(rows[:, None] < L) & (pj[None, :] < P), other=-1)
    t0 = sid * tiles_per_split
    cols = t0 * BN + tl.arange(0, BN)
    key, zpos = _logit_tile(h_ptr, w_ptr, pos, rows, cols, L, V, D, vm_ptr, HAS_VMASK, UPCAST,
                            BM, BN, BK)
    run = tl.topk(key, KK, dim=1)
    n_tiles = tl.cdiv(V, BN)
    t_end = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0 + 1, t_end):
        cols = t * BN + tl.arange(0, BN)
        key, zp = _logit_tile(h_ptr, w_ptr, pos, rows, cols, L, V, D, vm_ptr, HAS_VMASK, UPCAST,
                              BM, BN, BK)
        zpos += zp
        top = tl.topk(key, KK, dim=1)
        both = tl.reshape(tl.join(run, top), [BM, 2 * KK])
        run = tl.topk(both, KK, dim=1)
    kj = tl.arange(0, KK)
    rmask = rows[:, None] < L
    tl.store(keys_ptr + (sid * L + rows[:, None]) * KK + kj[None, :], run, mask=rmask)
    tl.store(zpos_ptr + (sid * L + rows[:, None]) * PP + pj[None, :], zpos, mask=rmask)


@triton.jit
def _dh_kernel(w_ptr, ids_ptr, g_ptr, dh_ptr, J, D, BJ: tl.constexpr, BD: tl.constexpr):
    i = tl.program_id(0)
    dblk = tl.program_id(1)
    dd = dblk * BD + tl.arange(0, BD)
    acc = tl.zeros([BD], tl.float32)
    for j0 in range(0, J, BJ):
        jj = j0 + tl.arange(0, BJ)
        jm = jj < J
        ids = tl.load(ids_ptr + i * J + jj, mask=jm, other=-1)
        g = tl.load(g_ptr + i * J + jj, mask=jm, other=0.0)
        ok = ids >= 0
        w = tl.load(w_ptr + tl.where(ok, ids, 0)[:, None] * D + dd[None, :],
                    mask=ok[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(tl.where(ok, g, 0.0)[:, None] * w, axis=0)
    tl.store(dh_ptr + i * D + dd, acc, mask=dd < D)


@triton.jit
def _dw_kernel(h_ptr, seg_start_ptr, seg_id_ptr, rows_ptr, g_ptr, dw_ptr, D, BD: tl.constexpr):
    s = tl.program_id(0)
    dblk = tl.program_id(1)
    dd = dblk * BD + tl.arange(0, BD)
    dm = dd < D
    a = tl.load(seg_start_ptr + s)
    b = tl.load(seg_start_ptr + s + 1)
    vid = tl.load(seg_id_ptr + s)
    acc = tl.zeros([BD], tl.float32)
    for e in range(a, b):
        r = tl.load(rows_ptr + e)
        g = tl.load(g_ptr + e)
        acc += g * tl.load(h_ptr + r * D + dd, mask=dm, other=0.0).to(tl.float32)
    tl.store(dw_ptr + vid * D + dd, acc, mask=dm)


def decode_keys(keys: torch.Tensor):
    """int64 keys -> (fp32 logits, ids); INT64_MIN (no candidate) -> (-inf, -1)."""
    none = keys == _INT64_MIN
    ids = 4294967295 - (keys & 4294967295)
    ordk = (keys >> 32).to(torch.int32)
    bits = ordk ^ ((ordk >> 31) & 0x7FFFFFFF)
    vals = bits.view(torch.float32)
    vals = torch.where(none, torch.full_like(vals, float("-inf")), vals)
    return vals, torch.where(none, torch.full_like(ids, -1), ids)


def ntpm_select_triton(h: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, k: int,
                       vocab_mask, block_m: int = 64, block_n: int = 128, block_k: int = 32,
                       n_splits: int | None = None):
    """Triton counterpart of ``ntpm_select_torch``: (zpos [L,P], neg values [L,k], ids [L,k])."""
    L, D = h.shape
    V = weight.shape[0]
    P = pos.shape[1]
    PP = max(1, _next_pow2(max(P, 1)))
    KK = _next_pow2(k)
    block_n = max(block_n, KK)
    if V >= 2 ** 31:
        raise ValueError("vocabulary too large for 32-bit id packing")
    n_tiles = triton.cdiv(V, block_n)
    if n_splits is None:
        # Enough programs to fill the GPU while each split streams several tiles.
        n_splits = max(1, min(n_tiles, 8 if L >= 1024 else 32))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    dev = h.device
    keys = torch.empty(n_splits, L, KK, dtype=torch.int64, device=dev)
    zpos = torch.empty(n_splits, L, PP, dtype=torch.float32, device=dev)
    pos_c = (pos if P > 0 else torch.full((L, 1), -1, dtype=torch.long, device=dev)).contiguous()
    vm = vocab_mask.to(device=dev, dtype=torch.int8).contiguous() if vocab_mask is not None else pos_c
    upcast = _INTERPRET or h.dtype == torch.float32 or weight.dtype == torch.float32
    if not upcast and h.dtype != weight.dtype:
        h = h.to(weight.dtype)
    grid = (triton.cdiv(L, block_m), n_splits)
    _ntpm_fwd_kernel[grid](h.contiguous(), weight.contiguous(), pos_c, vm, keys, zpos, L, V, D,
                           pos_c.shape[1], tiles_per_split, HAS_VMASK=vocab_mask is not None,
                           UPCAST=upcast, BM=block_m, BN=block_n, BK=block_k, KK=KK, PP=PP)
    allk = keys.permute(1, 0, 2).reshape(L, n_splits * KK)
    top = torch.topk(allk, min(k, allk.shape[1]), dim=1).values  # unique keys: deterministic
    vals, ids = decode_keys(top)
    return zpos.sum(0)[:, :P], vals, ids


def sparse_backward(h: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, g: torch.Tensor,
                    need_w: bool = True, block_d: int = 128):
    """dH [L', d] = G W and dW [V, d] = G^T H for G given as (ids, g) rows; -1 ids are ignored."""
    Lp, J = ids.shape
    D = h.shape[1]
    dev = h.device
    ids = ids.contiguous()
    g32 = g.to(torch.float32).contiguous()
    dh = torch.empty(Lp, D, dtype=torch.float32, device=dev)
    if Lp and J:
        _dh_kernel[(Lp, triton.cdiv(D, block_d))](weight.contiguous(), ids, g32, dh, J, D,
                                                  BJ=min(64, _next_pow2(J)), BD=block_d)
    else:
        dh.zero_()
    dw = None
    if need_w:
        dw = torch.zeros(weight.shape, dtype=torch.float32, device=dev)
        flat = ids.reshape(-1)
        ok = (flat >= 0).nonzero(as_tuple=True)[0]
        if ok.numel():
            fid = flat[ok]
            order = torch.argsort(fid, stable=True)
            fid, src = fid[order], ok[order]
            rows = (src // J).contiguous()
            gs = g32.reshape(-1)[src].contiguous()
            uniq, counts = torch.unique_consecutive(fid, return_counts=True)
            starts = torch.zeros(uniq.numel() + 1, dtype=torch.long, device=dev)
            starts[1:] = torch.cumsum(counts, 0)
            _dw_kernel[(uniq.numel(), triton.cdiv(D, block_d))](h.contiguous(), starts, uniq,
                                                                rows, gs, dw, D, BD=block_d)
    return dh, dw


def ntpm_loss_triton(hidden, weight, positives, k=32, token_mask=None, vocab_mask=None,
                     reduction="sum", **select_kw):
    """The Triton route of ``ntpm_loss`` regardless of device (tests run it in the interpreter)."""
    check_args(hidden, weight, positives, k, token_mask, vocab_mask, reduction)
    rows, pos, scale = select_tokens(hidden, positives, token_mask, vocab_mask, reduction)
    with torch.no_grad():
        h = hidden.detach()[rows]
        zpos, nval, nid = ntpm_select_triton(h, weight.detach(), pos, k, vocab_mask, **select_kw)
        cdt = compute_dtype(hidden, weight)
        terms, ids, coef = loss_from_selection(zpos.to(cdt), pos, nval.to(cdt), nid, k)
    return NTPMSparse.apply(hidden, weight, h, rows, ids, coef, terms, scale, True)
