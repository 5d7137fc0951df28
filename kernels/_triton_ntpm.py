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

Operands: tiles are rounded to ``operand_dtype`` (bf16/fp16 under autocast or for a 16-bit
weight: tensor-core ``tl.dot`` with fp32 accumulation; fp32: ``input_precision="ieee"``, no TF32).
Launch configurations per compute capability live in ``FWD_CONFIGS`` / ``BWD_CONFIG`` and are
checked for register spills by ``python -m densert.kernels.aot``.

Backward kernels are deterministic: dH row i sums g_ij W[id_ij] in a fixed order; dW sorts the
non-zeros by id (stable) and each program sums SEGS ids' segments in order (no atomics), writing
straight into a zero tensor of the weight's dtype.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from . import arch_key
from .ntpm import NTPMSparse, check_args, compute_dtype, loss_from_selection, operand_dtype, select_tokens

_INT64_MIN = -(2 ** 63)
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def _next_pow2(x: int) -> int:
    return 1 << max(0, int(x) - 1).bit_length()


@triton.jit
def _as_operand(x, OPERAND: tl.constexpr, EMULATE: tl.constexpr):
    """x in the GEMM operand precision: fp32 (OPERAND 0), bf16 (1) or fp16 (2).

    EMULATE (the interpreter, which has no bf16 arithmetic and truncates fp32 -> bf16): fp32
    values rounded to nearest-even bf16/fp16, for an ieee fp32 tl.dot. Products of two bf16 or
    fp16 values are exact in fp32, so this equals the GPU's tensor-core operands and products;
    only the order of the fp32 accumulation differs.
    """
    if OPERAND == 0:
        return x.to(tl.float32)
    elif EMULATE:
        if OPERAND == 1:
            b = x.to(tl.float32).to(tl.uint32, bitcast=True)
            b = (b + 0x7FFF + ((b >> 16) & 1)) & 0xFFFF0000
            return b.to(tl.float32, bitcast=True)
        else:
            return x.to(tl.float16).to(tl.float32)
    elif OPERAND == 1:
        return x.to(tl.bfloat16)
    else:
        return x.to(tl.float16)


@triton.jit
def _logit_tile(h_ptr, w_ptr, pos_ptr, rows, cols, L, V, D, P, stride_h, stride_w, vm_ptr,
                HAS_VMASK: tl.constexpr, OPERAND: tl.constexpr, EMULATE: tl.constexpr,
                BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, PP: tl.constexpr):
    """Keys [BM, BN] of one logit tile and the logits [BM, PP] of positives found in it."""
    dk = tl.arange(0, BK)
    # Row offsets in int64: row * stride passes 2^31 for long inputs (L x d) or vocabularies.
    a_ptr = h_ptr + rows.to(tl.int64)[:, None] * stride_h + dk[None, :]
    b_ptr = w_ptr + cols.to(tl.int64)[:, None] * stride_w + dk[None, :]
    rmask = rows[:, None] < L
    cmask = cols[:, None] < V
    acc = tl.zeros([BM, BN], tl.float32)
    for d0 in range(0, D, BK):
        dm = (d0 + dk)[None, :] < D
        a = _as_operand(tl.load(a_ptr, mask=rmask & dm, other=0.0), OPERAND, EMULATE)
        b = _as_operand(tl.load(b_ptr, mask=cmask & dm, other=0.0), OPERAND, EMULATE)
        if OPERAND == 0 or EMULATE:
            acc += tl.dot(a, tl.trans(b), input_precision="ieee")
        else:
            acc += tl.dot(a, tl.trans(b))  # tensor cores, fp32 accumulation
        a_ptr += BK
        b_ptr += BK
    z = acc + 0.0  # -0.0 -> +0.0 so equal logits get equal keys
    # Positives one at a time: [BM, BN] compares, never a [BM, BN, PP] tensor.
    pj = tl.arange(0, PP)
    zpos = tl.zeros([BM, PP], tl.float32)
    is_pos = tl.zeros([BM, BN], tl.int1)
    prow = pos_ptr + rows.to(tl.int64) * P
    for j in range(0, P):
        pos_j = tl.load(prow + j, mask=rows < L, other=-1)
        eq = pos_j[:, None] == cols[None, :]
        is_pos = is_pos | eq
        zpos += tl.where(pj[None, :] == j, tl.sum(tl.where(eq, z, 0.0), axis=1)[:, None], 0.0)
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
def _ntpm_fwd_kernel(h_ptr, w_ptr, pos_ptr, vm_ptr, keys_ptr, zpos_ptr, L, V, D, P, stride_h,
                     stride_w, tiles_per_split, HAS_VMASK: tl.constexpr, OPERAND: tl.constexpr,
                     EMULATE: tl.constexpr, BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr,
                     KK: tl.constexpr, PP: tl.constexpr):
    pid_m = tl.program_id(0)
    sid = tl.program_id(1)
    rows = pid_m * BM + tl.arange(0, BM)
    t0 = sid * tiles_per_split
    cols = t0 * BN + tl.arange(0, BN)
    key, zpos = _logit_tile(h_ptr, w_ptr, pos_ptr, rows, cols, L, V, D, P, stride_h, stride_w,
                            vm_ptr, HAS_VMASK, OPERAND, EMULATE, BM, BN, BK, PP)
    run = tl.topk(key, KK, dim=1)
    n_tiles = tl.cdiv(V, BN)
    t_end = tl.minimum(t0 + tiles_per_split, n_tiles)
    for t in range(t0 + 1, t_end):
        cols = t * BN + tl.arange(0, BN)
        key, zp = _logit_tile(h_ptr, w_ptr, pos_ptr, rows, cols, L, V, D, P, stride_h, stride_w,
                              vm_ptr, HAS_VMASK, OPERAND, EMULATE, BM, BN, BK, PP)
        zpos += zp
        top = tl.topk(key, KK, dim=1)
        both = tl.reshape(tl.join(run, top), [BM, 2 * KK])
        run = tl.topk(both, KK, dim=1)
    kj = tl.arange(0, KK)
    pj = tl.arange(0, PP)
    orow = sid.to(tl.int64) * L + rows  # (split, row) of the [S, L, *] outputs
    rmask = rows[:, None] < L
    tl.store(keys_ptr + orow[:, None] * KK + kj[None, :], run, mask=rmask)
    tl.store(zpos_ptr + orow[:, None] * PP + pj[None, :], zpos, mask=rmask)


@triton.jit
def _dh_kernel(w_ptr, ids_ptr, g_ptr, dh_ptr, J, D, stride_w, OPERAND: tl.constexpr,
               BJ: tl.constexpr, BD: tl.constexpr):
    i = tl.program_id(0)
    dblk = tl.program_id(1)
    dd = dblk * BD + tl.arange(0, BD)
    acc = tl.zeros([BD], tl.float32)
    erow = i.to(tl.int64) * J
    for j0 in range(0, J, BJ):
        jj = j0 + tl.arange(0, BJ)
        jm = jj < J
        ids = tl.load(ids_ptr + erow + jj, mask=jm, other=-1)
        g = tl.load(g_ptr + erow + jj, mask=jm, other=0.0)
        ok = ids >= 0
        w = tl.load(w_ptr + tl.where(ok, ids, 0)[:, None] * stride_w + dd[None, :],
                    mask=ok[:, None] & (dd[None, :] < D), other=0.0)
        # The operands the forward multiplied (rounded W rows), fp32 products and sums.
        acc += tl.sum(tl.where(ok, g, 0.0)[:, None] * _as_operand(w, OPERAND, True), axis=0)
    tl.store(dh_ptr + i.to(tl.int64) * D + dd, acc, mask=dd < D)


@triton.jit
def _dw_kernel(h_ptr, seg_start_ptr, seg_id_ptr, rows_ptr, g_ptr, dw_ptr, n_seg, D, stride_h,
               stride_dw, OPERAND: tl.constexpr, EMULATE: tl.constexpr, SEGS: tl.constexpr,
               BD: tl.constexpr):
    # SEGS consecutive vocabulary ids (segments of the id-sorted non-zeros) per program, each
    # summed in order: deterministic, no atomics. rows/ids are int64 tensors, so row * stride
    # is an int64 product.
    dd = tl.program_id(1) * BD + tl.arange(0, BD)
    dm = dd < D
    s_end = tl.minimum(tl.program_id(0) * SEGS + SEGS, n_seg)
    for s in range(tl.program_id(0) * SEGS, s_end):
        a = tl.load(seg_start_ptr + s)
        b = tl.load(seg_start_ptr + s + 1)
        vid = tl.load(seg_id_ptr + s)
        acc = tl.zeros([BD], tl.float32)
        for e in range(a, b):
            r = tl.load(rows_ptr + e)
            g = tl.load(g_ptr + e)
            h = tl.load(h_ptr + r * stride_h + dd, mask=dm, other=0.0)
            acc += g * _as_operand(h, OPERAND, True)
        # Stored in the weight's dtype: no fp32 |V| x d buffer. The interpreter truncates
        # fp32 -> bf16, so it rounds to nearest-even first, as the GPU's conversion does.
        out = dw_ptr + vid * stride_dw + dd
        if EMULATE and out.dtype.element_ty == tl.bfloat16:
            acc = _as_operand(acc, 1, True)
        tl.store(out, acc.to(out.dtype.element_ty), mask=dm)


def decode_keys(keys: torch.Tensor):
    """int64 keys -> (fp32 logits, ids); INT64_MIN (no candidate) -> (-inf, -1)."""
    none = keys == _INT64_MIN
    ids = 4294967295 - (keys & 4294967295)
    ordk = (keys >> 32).to(torch.int32)
    bits = ordk ^ ((ordk >> 31) & 0x7FFFFFFF)
    vals = bits.view(torch.float32)
    vals = torch.where(none, torch.full_like(vals, float("-inf")), vals)
    return vals, torch.where(none, torch.full_like(ids, -1), ids)


# Forward launch configuration per compute capability and operand kind, the same table
# `python -m densert.kernels.aot` compiles and checks for spills. A program holds a [BM, BN] fp32
# logit tile, its int64 keys and the running [BM, KK] top-k, so the tile is bounded by registers,
# not by the GEMM: 64 x 64 with 4 warps spilled 0.1-0.2 KB per thread on both, 128 x 64 fp32
# ~1.5 KB. 8 warps halve the per-thread share. 16-bit operands (tensor cores: mma.sync on sm_87,
# wgmma on sm_90) take the largest tile that compiles without spills: 64 x 64 (3 stages) on
# sm_87, 128 x 64 on sm_90; fp32 (ieee, no tensor cores) 32 x 64 with BK = 64 on both.
FWD_CONFIGS = {
    87: {"fp32": dict(BM=32, BN=64, BK=64, num_warps=8, num_stages=2),
         "16bit": dict(BM=64, BN=64, BK=32, num_warps=8, num_stages=3)},
    90: {"fp32": dict(BM=32, BN=64, BK=64, num_warps=8, num_stages=2),
         "16bit": dict(BM=128, BN=64, BK=32, num_warps=8, num_stages=2)},
}
BWD_CONFIG = dict(BD=128, SEGS=16, num_warps=4)
_OPERAND_ID = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def _fwd_config(device, operand: torch.dtype, **override) -> dict:
    cfg = FWD_CONFIGS[arch_key(device, FWD_CONFIGS)]
    return dict(cfg["fp32" if operand in (torch.float32, torch.float64) else "16bit"], **override)


def ntpm_select_triton(h: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, k: int,
                       vocab_mask, operand: torch.dtype | None = None,
                       n_splits: int | None = None, **config):
    """Triton counterpart of ``ntpm_select_torch``: (zpos [L,P], neg values [L,k], ids [L,k]).

    ``h``/``weight`` as stored (any float dtype, unit column stride); the kernel rounds tiles to
    ``operand`` (default ``operand_dtype``; fp64 runs as fp32) and accumulates in fp32.
    ``config`` overrides the FWD_CONFIGS entry (BM, BN, BK, num_warps, num_stages).
    """
    L, D = h.shape
    V = weight.shape[0]
    P = pos.shape[1]
    PP = max(1, _next_pow2(max(P, 1)))
    KK = _next_pow2(k)
    if V >= 2 ** 31:
        raise ValueError("vocabulary too large for 32-bit id packing")
    operand = operand or operand_dtype(h, weight)
    cfg = _fwd_config(h.device, operand, **config)
    block_n = cfg["BN"] = max(cfg["BN"], KK)
    n_tiles = triton.cdiv(V, block_n)
    if n_splits is None:
        # Enough programs to fill the GPU while each split streams several tiles.
        n_splits = max(1, min(n_tiles, 8 if L >= 1024 else 32))
    tiles_per_split = triton.cdiv(n_tiles, n_splits)
    n_splits = triton.cdiv(n_tiles, tiles_per_split)
    dev = h.device
    keys = torch.empty(n_splits, L, KK, dtype=torch.int64, device=dev)
    zpos = torch.empty(n_splits, L, PP, dtype=torch.float32, device=dev)
    pos_c = pos.to(torch.int64).contiguous()
    vm = vocab_mask.to(device=dev, dtype=torch.int8).contiguous() if vocab_mask is not None else pos_c
    h, weight = _unit_columns(h), _unit_columns(weight)
    grid = (triton.cdiv(L, cfg["BM"]), n_splits)
    _ntpm_fwd_kernel[grid](h, weight, pos_c, vm, keys, zpos, L, V, D, P, h.stride(0),
                           weight.stride(0), tiles_per_split, HAS_VMASK=vocab_mask is not None,
                           OPERAND=_OPERAND_ID.get(operand, 0), EMULATE=_INTERPRET, KK=KK, PP=PP,
                           **cfg)
    allk = keys.permute(1, 0, 2).reshape(L, n_splits * KK)
    top = torch.topk(allk, min(k, allk.shape[1]), dim=1).values  # unique keys: deterministic
    vals, ids = decode_keys(top)
    return zpos.sum(0)[:, :P], vals, ids


def _unit_columns(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(1) == 1 else x.contiguous()


def sparse_backward(h: torch.Tensor, weight: torch.Tensor, ids: torch.Tensor, g: torch.Tensor,
                    operand: torch.dtype, need_w: bool = True):
    """dH [L', d] fp32 = G W and dW [V, d] = G^T H in the weight's dtype, for G given as (ids, g)
    rows (-1 ids are ignored); W and H rows rounded to ``operand`` as the forward used them.

    dW is written straight into a zero tensor of the weight's dtype (rows never selected stay
    zero): no fp32 |V| x d buffer, so the extra memory is the sorted non-zeros, as on the CPU.
    """
    Lp, J = ids.shape
    D = h.shape[1]
    dev = h.device
    op = _OPERAND_ID.get(operand, 0)
    bd, nw = BWD_CONFIG["BD"], BWD_CONFIG["num_warps"]
    ids = ids.contiguous()
    g32 = g.to(torch.float32).contiguous()
    h, weight = _unit_columns(h), _unit_columns(weight)
    dh = torch.empty(Lp, D, dtype=torch.float32, device=dev)
    if Lp and J:
        _dh_kernel[(Lp, triton.cdiv(D, bd))](weight, ids, g32, dh, J, D, weight.stride(0),
                                             OPERAND=op, BJ=min(64, _next_pow2(J)), BD=bd,
                                             num_warps=nw)
    else:
        dh.zero_()
    dw = None
    if need_w:
        dw = torch.zeros(weight.shape, dtype=weight.dtype, device=dev)
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
            segs = BWD_CONFIG["SEGS"]
            grid = (triton.cdiv(uniq.numel(), segs), triton.cdiv(D, bd))
            _dw_kernel[grid](h, starts, uniq, rows, gs, dw, uniq.numel(), D, h.stride(0),
                             dw.stride(0), OPERAND=op, EMULATE=_INTERPRET, SEGS=segs, BD=bd,
                             num_warps=nw)
    return dh, dw


def ntpm_loss_triton(hidden, weight, positives, k=32, token_mask=None, vocab_mask=None,
                     reduction="sum", **select_kw):
    """The Triton route of ``ntpm_loss`` regardless of device (tests run it in the interpreter)."""
    check_args(hidden, weight, positives, k, token_mask, vocab_mask, reduction)
    rows, pos, scale = select_tokens(hidden, positives, token_mask, vocab_mask, reduction)
    op = operand_dtype(hidden, weight)
    with torch.no_grad():
        h = hidden.detach()[rows]
        zpos, nval, nid = ntpm_select_triton(h, weight.detach(), pos, k, vocab_mask, op,
                                             **select_kw)
        cdt = compute_dtype(hidden, weight)
        terms, ids, coef = loss_from_selection(zpos.to(cdt), pos, nval.to(cdt), nid, k)
    return NTPMSparse.apply(hidden, weight, h, rows, ids, coef, terms, scale, op, True)


# ---- ahead-of-time compile variants (python -m densert.kernels.aot) ----

# (label, hidden dtype, weight dtype, operand) of the trainings the kernels serve: fp32, a bf16
# or fp16 model, and autocast over fp32 master weights (bf16 operands from fp32 storage).
_AOT_DTYPES = (("fp32", "fp32", "fp32", torch.float32),
               ("bf16", "bf16", "bf16", torch.bfloat16),
               ("autocast-bf16", "bf16", "fp32", torch.bfloat16),
               ("fp16", "fp16", "fp16", torch.float16))
_AOT_K, _AOT_P = 32, 8  # the trainer's k (TrainConfig.k) and a typical positives width


def aot_variants(arch: int):
    """(label, kernel, signature, constexprs, options, multiple-of-16 ints) of the launches
    ``ntpm_loss_triton`` makes on ``arch``: the forward per operand kind (with and without a vocab mask) and both
    backward kernels. d = 2560 (Youtu-VL) makes D and the row strides multiples of 16, as the
    JIT specialises them."""
    i32 = "i32"
    for name, hdt, wdt, op in _AOT_DTYPES:
        cfg = dict(FWD_CONFIGS[arch]["fp32" if op == torch.float32 else "16bit"])
        opts = {k: cfg.pop(k) for k in ("num_warps", "num_stages")}
        for vmask in (True, False) if name == "autocast-bf16" else (True,):
            sig = {"h_ptr": f"*{hdt}", "w_ptr": f"*{wdt}", "pos_ptr": "*i64", "vm_ptr": "*i8",
                   "keys_ptr": "*i64", "zpos_ptr": "*fp32", "L": i32, "V": i32, "D": i32,
                   "P": i32, "stride_h": i32, "stride_w": i32, "tiles_per_split": i32}
            cx = dict(HAS_VMASK=vmask, OPERAND=_OPERAND_ID[op], EMULATE=False, KK=_AOT_K,
                      PP=_next_pow2(_AOT_P), **cfg)
            sig.update({k: "constexpr" for k in cx})
            yield (f"ntpm_fwd {name}{'' if vmask else ' no-vmask'}", _ntpm_fwd_kernel, sig, cx,
                   opts, ("D", "stride_h", "stride_w"))
        bd, nw = BWD_CONFIG["BD"], BWD_CONFIG["num_warps"]
        cx = dict(OPERAND=_OPERAND_ID[op], BJ=_next_pow2(_AOT_K + _AOT_P), BD=bd)
        sig = {"w_ptr": f"*{wdt}", "ids_ptr": "*i64", "g_ptr": "*fp32", "dh_ptr": "*fp32",
               "J": i32, "D": i32, "stride_w": i32, **{k: "constexpr" for k in cx}}
        yield f"ntpm_dh {name}", _dh_kernel, sig, cx, dict(num_warps=nw), ("D", "stride_w")
        cx = dict(OPERAND=_OPERAND_ID[op], EMULATE=False, SEGS=BWD_CONFIG["SEGS"], BD=bd)
        sig = {"h_ptr": f"*{hdt}", "seg_start_ptr": "*i64", "seg_id_ptr": "*i64",
               "rows_ptr": "*i64", "g_ptr": "*fp32", "dw_ptr": f"*{wdt}", "n_seg": i32, "D": i32,
               "stride_h": i32, "stride_dw": i32, **{k: "constexpr" for k in cx}}
        yield (f"ntpm_dw {name}", _dw_kernel, sig, cx, dict(num_warps=nw),
               ("D", "stride_h", "stride_dw"))
