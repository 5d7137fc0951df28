"""NTP-M: chunked torch path and Triton (interpreter) path vs the dense float64 reference."""
import contextlib
import os
import sys

# The interpreter flag is read when triton is imported: set it before anything imports triton.
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402 - after TRITON_INTERPRET
import torch  # noqa: E402 - after TRITON_INTERPRET
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402 - after TRITON_INTERPRET

from densert.kernels.ntpm import ntpm_loss, ntpm_loss_reference, ntpm_select_torch  # noqa: E402 - after TRITON_INTERPRET

needs_interp = pytest.mark.skipif(_TRITON_PREIMPORTED,
                                  reason="triton was imported before TRITON_INTERPRET=1 was set")


def _problem(L, V, d, P, dtype, seed=0, masks=True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, d, generator=g, dtype=dtype).requires_grad_(True)
    w = torch.randn(V, d, generator=g, dtype=dtype).requires_grad_(True)
    pos = torch.randint(0, V, (L, P), generator=g)
    pos[torch.rand(L, P, generator=g) < 0.3] = -1
    pos[2] = -1  # a token without positives
    if L > 4:
        pos[4, :2] = pos[4, 2]  # duplicate positives
    tm = vm = None
    if masks:
        tm = torch.rand(L, generator=g) > 0.2
        vm = torch.rand(V, generator=g) > 0.1
    return h, w, pos, tm, vm


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp(min=1e-300))


def _check(fn, h, w, pos, k, tm, vm, reduction, tol):
    a = fn(h, w, pos, k, tm, vm, reduction)
    ga = torch.autograd.grad(a, (h, w))
    b = ntpm_loss_reference(h, w, pos, k, tm, vm, reduction=reduction)
    gb = torch.autograd.grad(b, (h, w))
    assert abs(float(a) - float(b)) <= tol * abs(float(b))
    assert _rel(ga[0], gb[0]) <= tol and _rel(ga[1], gb[1]) <= tol
    return a, ga


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("masks", [True, False])
def test_torch_path_matches_reference(dtype, reduction, masks):
    h, w, pos, tm, vm = _problem(37, 1000, 24, 4, dtype, masks=masks)

    def fn(h, w, p, k, t, v, r):
        return ntpm_loss(h, w, p, k, t, v, chunk_size=128, reduction=r)

    _check(fn, h, w, pos, 8, tm, vm, reduction, 1e-6 if dtype == torch.float32 else 1e-12)


def test_masks_respected_and_sparse_gradient():
    h, w, pos, tm, vm = _problem(20, 300, 16, 3, torch.float64)
    loss = ntpm_loss(h, w, pos, 5, tm, vm, chunk_size=64)
    gh, gw = torch.autograd.grad(loss, (h, w))
    assert torch.all(gh[~tm] == 0)  # ignored tokens get nothing
    assert torch.all(gw[~vm] == 0)  # invalid ids are neither positives nor negatives
    # At most |P_i| + k rows of W per valid token receive gradient.
    assert int((gw.abs().sum(1) > 0).sum()) <= int(tm.sum()) * (3 + 5)
    # Changing an ignored token or an invalid id's row leaves the loss unchanged.
    h2, w2 = h.detach().clone(), w.detach().clone()
    h2[~tm] += 100.0
    w2[~vm] += 100.0
    assert float(ntpm_loss(h2, w2, pos, 5, tm, vm, chunk_size=64)) == pytest.approx(float(loss), rel=1e-12)


def test_token_without_positives_keeps_negative_term():
    h, w, pos, _, _ = _problem(3, 50, 8, 2, torch.float64, masks=False)
    pos[:] = -1
    loss = ntpm_loss(h, w, pos, 4, chunk_size=16)
    z = h.detach() @ w.detach().t()
    top = torch.topk(z, 4, dim=1).values
    expect = torch.nn.functional.softplus(top).sum() / 4
    assert float(loss) == pytest.approx(float(expect), rel=1e-12)


def _tied_problem():
    # Integer data: logits are exact small integers in fp32 and fp64, so ties are everywhere.
    g = torch.Generator().manual_seed(5)
    h = torch.randint(-2, 3, (12, 6), generator=g).double().requires_grad_(True)
    w = torch.randint(-2, 3, (200, 6), generator=g).double().requires_grad_(True)
    pos = torch.randint(0, 200, (12, 3), generator=g)
    return h, w, pos


@pytest.mark.parametrize("chunk", [7, 64, 200])
def test_topk_ties_lower_id_first(chunk):
    h, w, pos = _tied_problem()
    from densert.kernels.ntpm import prepare_positives
    with torch.no_grad():
        p = prepare_positives(pos, None)
        _, vals, ids = ntpm_select_torch(h.detach(), w.detach(), p, 16, None, chunk)
        z = h.detach() @ w.detach().t()
        z.scatter_(1, pos, float("-inf"))
        expect = torch.sort(z, dim=1, descending=True, stable=True).indices[:, :16]
    assert torch.equal(ids, expect)

    def fn(h, w, p, k, t, v, r):
        return ntpm_loss(h, w, p, k, t, v, chunk_size=chunk, reduction=r)

    _check(fn, h, w, pos, 16, None, None, "sum", 1e-12)


class _MaxTensor(TorchDispatchMode):
    """Largest tensor produced by any op, ignoring weight-shaped ones (dW is weight-sized)."""

    def __init__(self, wshape):
        super().__init__()
        self.wshape, self.max_bytes = tuple(wshape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and tuple(t.shape) != self.wshape:
                self.max_bytes = max(self.max_bytes, t.numel() * t.element_size())
        return out


@pytest.mark.parametrize("chunked", [True, False])
def test_peak_intermediate_independent_of_vocab(chunked):
    L, d, P, k, chunk = 64, 16, 4, 8, 256
    sizes = []
    for V in (2048, 8192):
        h, w, pos, _, _ = _problem(L, V, d, P, torch.float32, masks=False)
        mode = _MaxTensor(w.shape)
        with mode:
            if chunked:
                loss = ntpm_loss(h, w, pos, k, chunk_size=chunk)
            else:
                loss = ntpm_loss_reference(h, w, pos, k)
            loss.backward()
        sizes.append(mode.max_bytes)
    if chunked:
        assert sizes[0] == sizes[1]  # no tensor grows with |V| except weight-shaped ones
        assert sizes[1] <= 2 * L * chunk * 8  # an L x chunk logit tile (int64 sort indices at most)
    else:  # the measuring hook does see L x |V| tensors when they exist
        assert sizes[1] >= L * 8192 * 8 and sizes[1] > sizes[0]


@needs_interp
def test_triton_path_interpreter():
    from densert.kernels._triton_ntpm import ntpm_loss_triton
    h, w, pos, tm, vm = _problem(37, 300, 24, 3, torch.float32)

    def fn(h, w, p, k, t, v, r):
        return ntpm_loss_triton(h, w, p, k, t, v, reduction=r, BM=32, BN=32, BK=16, n_splits=3)

    a, ga = _check(fn, h, w, pos, 8, tm, vm, "mean", 1e-6)
    a2 = fn(h, w, pos, 8, tm, vm, "mean")  # deterministic: bitwise identical on a rerun
    assert float(a2) == float(a)


@needs_interp
def test_triton_ties_deterministic_interpreter():
    from densert.kernels._triton_ntpm import ntpm_select_triton
    from densert.kernels.ntpm import prepare_positives
    h, w, pos = _tied_problem()
    p = prepare_positives(pos, None)
    h32, w32 = h.detach().float(), w.detach().float()
    zp, vals, ids = ntpm_select_triton(h32, w32, p, 16, None, BM=16, BN=128, BK=16)
    zp_t, vals_t, ids_t = ntpm_select_torch(h32, w32, p, 16, None, 64)
    assert torch.equal(ids, ids_t) and torch.equal(vals, vals_t)
    torch.testing.assert_close(zp, zp_t, rtol=0, atol=0)


@pytest.mark.parametrize("block_entries", [1, 3, 7, 10_000])
def test_sparse_weight_grad_blocks_equal_dense(block_entries):
    """Blocks of whole rows (a row's entries never split across blocks) sum to dense G^T H."""
    from densert.kernels.ntpm import _sparse_weight_grad
    g = torch.Generator().manual_seed(5)
    L, V, d, width = 9, 40, 6, 5
    h = torch.randn(L, d, dtype=torch.float64, generator=g)
    ids = torch.randint(0, 12, (L, width), generator=g)  # many repeats of few ids
    ids[torch.rand(L, width, generator=g) < 0.2] = -1
    coef = torch.randn(L, width, dtype=torch.float64, generator=g)
    weight = torch.zeros(V, d, dtype=torch.float64)
    dense = torch.zeros(L, V, dtype=torch.float64)
    for i in range(L):
        for j in range(width):
            if ids[i, j] >= 0:
                dense[i, ids[i, j]] += coef[i, j]
    got = _sparse_weight_grad(h, ids, coef, weight, block_bytes=block_entries * d * 8)
    torch.testing.assert_close(got, dense.t() @ h, rtol=1e-12, atol=1e-12)


# Mixed precision: (hidden dtype, weight dtype, autocast dtype or None) -> operands in bf16/fp16.
MIXED = {"bf16": (torch.bfloat16, torch.bfloat16, None),
         "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16),
         "fp16": (torch.float16, torch.float16, None),
         "autocast-fp16": (torch.bfloat16, torch.float32, torch.float16)}
# Small tiles and k keep the interpreter's bitonic top-k (its slowest part) to seconds.
MIXED_K = 4
TILES = dict(BM=16, BN=16, BK=16, n_splits=2)


def _mixed_problem(case):
    hdt, wdt, ac = MIXED[case]
    h, w, pos, tm, vm = _problem(20, 96, 32, 3, torch.float32)
    h = h.detach().to(hdt).requires_grad_(True)
    w = w.detach().to(wdt).requires_grad_(True)
    return h, w, pos, tm, vm, ac or wdt, ac


def _autocast(ac):
    return torch.autocast("cpu", dtype=ac) if ac else contextlib.nullcontext()


@pytest.mark.parametrize("route,case", [("torch", c) for c in MIXED] + [
    pytest.param("triton", c, marks=needs_interp) for c in MIXED])
def test_mixed_precision_operands(route, case):
    """bf16/fp16 operands with fp32 accumulation (the tensor-core path; in the interpreter the
    kernel rounds tiles to nearest-even bf16/fp16 and runs an fp32 ieee dot: the same operands
    and exact products as the GPU's MMA, summed in another order). The loss and gradients equal
    the float64 reference on the rounded operands to fp32 accuracy, and differ from the
    unrounded reference (autocast over wider storage) by the operand rounding, which proves
    the rounding happened."""
    from densert.kernels.ntpm import operand_dtype
    h, w, pos, tm, vm, op, ac = _mixed_problem(case)
    k = MIXED_K
    if route == "triton":
        from densert.kernels._triton_ntpm import ntpm_loss_triton

        def fn(h, w):
            return ntpm_loss_triton(h, w, pos, k, tm, vm, **TILES)
    else:
        def fn(h, w):
            return ntpm_loss(h, w, pos, k, tm, vm, chunk_size=32)
    with _autocast(ac):
        assert operand_dtype(h, w) == op
        loss = fn(h, w)
    gh, gw = torch.autograd.grad(loss, (h, w))  # outside autocast, as in a training step
    assert gh.dtype == h.dtype and gw.dtype == w.dtype
    hr = h.detach().to(op).double().requires_grad_(True)
    wr = w.detach().to(op).double().requires_grad_(True)
    ref = ntpm_loss_reference(hr, wr, pos, k, tm, vm)
    rh, rw = torch.autograd.grad(ref, (hr, wr))
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    # Gradients come back in the inputs' dtype: 16-bit ones carry its rounding (2^-8 for bf16).
    gtol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}
    assert _rel(gh, rh) <= gtol.get(h.dtype, 1e-5)
    assert _rel(gw, rw) <= gtol.get(w.dtype, 1e-5)
    if op not in (h.dtype, w.dtype):  # autocast over wider storage: the rounding shows
        exact = ntpm_loss_reference(h.detach().double(), w.detach().double(), pos, k, tm, vm)
        assert abs(float(loss) - float(exact)) > 10 * abs(float(loss) - float(ref))


@needs_interp
@pytest.mark.parametrize("case", ["bf16", "autocast-fp16"])
def test_triton_and_torch_routes_agree_in_mixed_precision(case):
    """Same operand rule, same rounding, fp32 sums in different orders: same selection, logits
    to fp32 accuracy."""
    from densert.kernels._triton_ntpm import ntpm_select_triton
    from densert.kernels.ntpm import operand_dtype, prepare_positives, rounded
    h, w, pos, _, vm, op, ac = _mixed_problem(case)
    p = prepare_positives(pos, vm)
    with torch.no_grad(), _autocast(ac):
        assert operand_dtype(h, w) == op
        a = ntpm_select_triton(h, w, p, MIXED_K, vm, op, **TILES)
    with torch.no_grad():
        b = ntpm_select_torch(rounded(h, op, torch.float32), w, p, MIXED_K, vm, 32, op)
    assert torch.equal(a[2], b[2])
    torch.testing.assert_close(a[1], b[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a[0], b[0], rtol=1e-5, atol=1e-5)


class _Fp32WeightSized(TorchDispatchMode):
    """Records any fp32 tensor with at least as many elements as the weight."""

    def __init__(self, numel):
        super().__init__()
        self.numel, self.seen = numel, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float32 and t.numel() >= self.numel:
                self.seen.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("route", ["torch", pytest.param("triton", marks=needs_interp)])
def test_no_fp32_weight_gradient_for_a_bf16_weight(route):
    """A bf16 weight's gradient is written in bf16 (sorted segment sums into a bf16 zero
    tensor): no fp32 |V| x d buffer exists at any point of the step."""
    h, w, pos, tm, vm = _problem(10, 512, 16, 3, torch.float32)
    h, w = (x.detach().bfloat16().requires_grad_(True) for x in (h, w))
    if route == "triton":
        from densert.kernels._triton_ntpm import ntpm_loss_triton

        def fn():
            return ntpm_loss_triton(h, w, pos, MIXED_K, tm, vm, BM=16, BN=128, BK=16, n_splits=1)
    else:
        def fn():
            return ntpm_loss(h, w, pos, MIXED_K, tm, vm, chunk_size=64)
    mode = _Fp32WeightSized(w.numel())
    with mode:
        loss = fn()
        loss.backward()
    assert w.grad.dtype == torch.bfloat16 and not mode.seen, mode.seen
