"""Offsets past 2^31 in every Triton kernel, in the interpreter, without gigabytes of memory.

A product of sizes passes 2^31 (probs: channel x H x W; NTP-M: row x d) only for tensors of
many GB. Here the shapes stay tiny and the *strides* are made huge instead, which puts the same
products past 2^31: the tensors live in a sparse memory that the interpreter's loads and stores
are routed to (``SparseMemory``), so the kernels run unchanged on addresses that no real buffer
covers. An offset computed in int32 wraps, lands on an address that was never written, and the
check fails (reads come back NaN and are recorded; stores land on the wrong cells).
"""
import contextlib
import os
import sys

# The interpreter flag is read when triton is imported: set it before anything imports triton.
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import numpy as np  # noqa: E402 - after TRITON_INTERPRET
import pytest  # noqa: E402 - after TRITON_INTERPRET
import torch  # noqa: E402 - after TRITON_INTERPRET

pytestmark = pytest.mark.skipif(_TRITON_PREIMPORTED,
                                reason="triton was imported before TRITON_INTERPRET=1 was set")

BIG = 2 ** 31


class SparseMemory:
    """Address -> value cells behind 1-element anchor tensors, for the interpreter's memory ops.

    ``region(dtype)`` returns an anchor tensor to pass as a kernel's pointer argument: every
    access through it (anchor address + any offset) goes to the cells instead of real memory.
    Addresses inside the real tensors a kernel also gets go to real memory as usual; any other
    address (a wrapped offset) is recorded as a stray access and reads NaN / -1.
    """

    def __init__(self):
        self.cells: dict[int, object] = {}
        self.anchors: list[torch.Tensor] = []
        self.real: list[tuple[int, int]] = []
        self.stray: list[int] = []

    def region(self, dtype):
        t = torch.zeros(1, dtype=dtype)
        self.anchors.append(t)
        return t

    def base(self, anchor) -> int:
        return anchor.data_ptr()

    def put(self, anchor, offsets, values):
        esz = anchor.element_size()
        for o, v in zip(np.asarray(offsets).ravel().tolist(), np.asarray(values).ravel().tolist()):
            self.cells[anchor.data_ptr() + esz * int(o)] = v

    def get(self, anchor, offsets):
        esz = anchor.element_size()
        return np.array([self.cells.get(anchor.data_ptr() + esz * int(o), np.nan)
                         for o in np.asarray(offsets).ravel()])

    def allow(self, *tensors):
        for t in tensors:
            self.real.append((t.data_ptr(), t.data_ptr() + t.untyped_storage().nbytes()))

    def _is_real(self, addr):
        ok = np.zeros(addr.shape, dtype=bool)
        for lo, hi in self.real:
            ok |= (addr >= lo) & (addr < hi)
        return ok

    @contextlib.contextmanager
    def active(self):
        """Route the interpreter's memory ops through this memory while the block runs."""
        from triton.runtime import interpreter
        b = interpreter.interpreter_builder
        load0, store0 = b.create_masked_load, b.create_masked_store

        def load(ptrs, mask, other, *args):
            addr = ptrs.data.astype(np.uint64)
            real = self._is_real(addr)
            ret = load0(ptrs, interpreter.TensorHandle(mask.data & real, mask.dtype), other, *args)
            out = ret.data.copy()
            for i in zip(*np.nonzero(mask.data & ~real)):
                a = int(addr[i])
                if a not in self.cells:
                    self.stray.append(a)
                out[i] = self.cells.get(a, np.nan if out.dtype.kind == "f" else -1)
            return interpreter.TensorHandle(out, ret.dtype)

        def store(ptrs, value, mask, *args):
            addr = ptrs.data.astype(np.uint64)
            real = self._is_real(addr)
            store0(ptrs, value, interpreter.TensorHandle(mask.data & real, mask.dtype), *args)
            vals = np.broadcast_to(value.data, addr.shape)
            for i in zip(*np.nonzero(mask.data & ~real)):
                self.cells[int(addr[i])] = vals[i].item()

        b.create_masked_load, b.create_masked_store = load, store
        try:
            yield self
        finally:
            del b.create_masked_load, b.create_masked_store  # back to the class methods


@pytest.fixture
def mem():
    return SparseMemory()


def test_sparse_memory_catches_a_wrapped_int32_offset(mem):
    """The harness itself: the same store with the offset in int32 (wraps) and in int64."""
    import triton
    import triton.language as tl

    @triton.jit
    def put(out_ptr, stride, WIDE: tl.constexpr):
        i = tl.arange(0, 4)
        off = i.to(tl.int64) * stride if WIDE else i * stride
        tl.store(out_ptr + off, i.to(tl.float32) + 1.0)

    stride = BIG // 2 + 1  # i = 2, 3 pass 2^31
    for wide in (False, True):
        mem.cells.clear()
        out = mem.region(torch.float32)
        with mem.active():
            put[(1,)](out, stride, WIDE=wide)
        got = mem.get(out, [i * stride for i in range(4)])
        if wide:
            assert got.tolist() == [1.0, 2.0, 3.0, 4.0]
        else:
            assert np.isnan(got[2:]).all()  # the wrapped stores went elsewhere


def test_dense_tail_offsets_past_2_31(mem):
    """Scores rows at token * stride_s and probs planes at channel * stride_o past 2^31."""
    from densert.kernels import _triton_dense_head as tdh
    from densert.kernels.dense_head import dense_head
    g = torch.Generator().manual_seed(0)
    gh, gw, H, W, K = 3, 4, 5, 7, 6
    hidden, weight = torch.randn(gh * gw, 8, generator=g), torch.randn(K, 8, generator=g)
    scores = hidden @ weight.t()
    stride_s = BIG // 8 + 3      # tokens 8..11 start past 2^31 elements
    stride_o = BIG // 4 + 5      # channels 4, 5 start past 2^31 elements
    s_anchor = mem.region(torch.float32)
    tok = torch.arange(gh * gw)[:, None] * stride_s + torch.arange(K)[None, :]
    mem.put(s_anchor, tok.numpy(), scores.numpy())
    lut = torch.linspace(1.0, 2.0, K)
    ref = {m: dense_head(hidden, weight, (gh, gw), (H, W), m, depth_values=lut)
           for m in ("argmax", "depth", "probs")}
    cfg = dict(tdh.CONFIGS[max(tdh.CONFIGS)], BLOCK_P=16)
    nw = cfg.pop("num_warps")
    args = (K, gh, gw, H, W, stride_s)
    scale = (tdh._fp32_ratio(gh, H), tdh._fp32_ratio(gw, W), 0.2)
    grid = (triton_cdiv(H * W, cfg["BLOCK_P"]),)
    for mode, out in (("argmax", torch.empty(H, W, dtype=torch.int64)),
                      ("depth", torch.empty(H, W))):
        mem.allow(out, lut)
        with mem.active():
            tdh._dense_tail_kernel[grid](s_anchor, out, lut, *args, 0, *scale,
                                         MODE=tdh._MODE_ID[mode], num_warps=nw, **cfg)
        assert torch.equal(out, ref[mode]), mode
    o_anchor = mem.region(torch.float32)
    with mem.active():
        tdh._dense_tail_kernel[grid](s_anchor, o_anchor, s_anchor, *args, stride_o, *scale,
                                     MODE=tdh._MODE_ID["probs"], num_warps=nw, **cfg)
    pix = torch.arange(H * W)
    got = mem.get(o_anchor, (torch.arange(K)[:, None] * stride_o + pix[None, :]).numpy())
    torch.testing.assert_close(torch.from_numpy(got).float().reshape(K, H, W), ref["probs"],
                               rtol=1e-5, atol=1e-6)
    assert not mem.stray


def triton_cdiv(a, b):
    return -(-a // b)


def _ntpm_problem():
    g = torch.Generator().manual_seed(1)
    L, V, D, P, k = 5, 70, 16, 3, 4
    h, w = torch.randn(L, D, generator=g), torch.randn(V, D, generator=g)
    pos = torch.randint(0, V, (L, P), generator=g)
    pos[1, 2] = -1
    return h, w, pos, k


def test_ntpm_forward_offsets_past_2_31(mem):
    """Hidden rows at row * stride_h and weight rows at id * stride_w past 2^31 elements."""
    from densert.kernels import _triton_ntpm as tn
    from densert.kernels.ntpm import prepare_positives
    h, w, pos, k = _ntpm_problem()
    L, D = h.shape
    V, P = w.shape[0], pos.shape[1]
    pos = prepare_positives(pos, None)
    cfg = dict(BM=16, BN=32, BK=16)
    ref = tn.ntpm_select_triton(h, w, pos, k, None, torch.float32, n_splits=1, **cfg)
    stride_h, stride_w = BIG // 4 + 16, BIG // 64 + 16  # rows 4+ and ids 64+ pass 2^31
    ha, wa = mem.region(torch.float32), mem.region(torch.float32)
    mem.put(ha, (torch.arange(L)[:, None] * stride_h + torch.arange(D)).numpy(), h.numpy())
    mem.put(wa, (torch.arange(V)[:, None] * stride_w + torch.arange(D)).numpy(), w.numpy())
    KK, PP = tn._next_pow2(k), tn._next_pow2(P)
    keys = torch.empty(1, L, KK, dtype=torch.int64)
    zpos = torch.empty(1, L, PP)
    pos_c = pos.contiguous()
    mem.allow(keys, zpos, pos_c)
    tiles = triton_cdiv(V, cfg["BN"])
    with mem.active():
        tn._ntpm_fwd_kernel[(triton_cdiv(L, cfg["BM"]), 1)](
            ha, wa, pos_c, pos_c, keys, zpos, L, V, D, P, stride_h, stride_w, tiles,
            HAS_VMASK=False, OPERAND=0, EMULATE=True, KK=KK, PP=PP, **cfg)
    top = torch.topk(keys[0], k, dim=1).values
    vals, ids = tn.decode_keys(top)
    assert not mem.stray
    assert torch.equal(ids, ref[2]) and torch.equal(vals, ref[1])
    assert torch.equal(zpos[0, :, :P], ref[0])


def test_ntpm_backward_offsets_past_2_31(mem):
    """dH gathers W rows at id * stride_w; dW reads H rows at row * stride_h and writes dW rows
    at id * stride_dw, all past 2^31 elements."""
    from densert.kernels import _triton_ntpm as tn
    h, w, pos, k = _ntpm_problem()
    L, D = h.shape
    V = w.shape[0]
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(0, V, (L, 6), generator=g)
    ids[0, 1] = ids[3, 2] = -1
    coef = torch.randn(L, 6, generator=g)
    dh_ref, dw_ref = tn.sparse_backward(h, w, ids, coef, torch.float32)
    stride_w, stride_h, stride_dw = BIG // 64 + 16, BIG // 4 + 16, BIG // 64 + 32
    wa, ha, dwa = (mem.region(torch.float32) for _ in range(3))
    mem.put(wa, (torch.arange(V)[:, None] * stride_w + torch.arange(D)).numpy(), w.numpy())
    mem.put(ha, (torch.arange(L)[:, None] * stride_h + torch.arange(D)).numpy(), h.numpy())
    dh = torch.empty(L, D)
    ids_c, g32 = ids.contiguous(), coef.contiguous()
    mem.allow(dh, ids_c, g32)
    with mem.active():
        tn._dh_kernel[(L, 1)](wa, ids_c, g32, dh, ids.shape[1], D, stride_w, OPERAND=0, BJ=8,
                              BD=16)
    assert torch.equal(dh, dh_ref)
    # dW: the segment layout sparse_backward builds (entries sorted by id).
    flat = ids.reshape(-1)
    ok = (flat >= 0).nonzero(as_tuple=True)[0]
    order = torch.argsort(flat[ok], stable=True)
    fid, src = flat[ok][order], ok[order]
    uniq, counts = torch.unique_consecutive(fid, return_counts=True)
    starts = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(counts, 0)])
    rows, gs = (src // ids.shape[1]).contiguous(), coef.reshape(-1)[src].contiguous()
    mem.allow(starts, uniq, rows, gs)
    with mem.active():
        tn._dw_kernel[(triton_cdiv(uniq.numel(), 4), 1)](
            ha, starts, uniq, rows, gs, dwa, uniq.numel(), D, stride_h, stride_dw, OPERAND=0,
            EMULATE=True, SEGS=4, BD=16)
    got = mem.get(dwa, (uniq[:, None] * stride_dw + torch.arange(D)).numpy())
    assert torch.equal(torch.from_numpy(got).float().reshape(-1, D), dw_ref[uniq])
    assert not mem.stray
