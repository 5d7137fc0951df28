"""Compiled Triton kernels on a CUDA GPU against their torch references (benchmarks/gpu_check.sh).

Skipped without a CUDA device. Run it alone (``python -m pytest tests/test_kernels_gpu.py``):
the interpreter tests set TRITON_INTERPRET=1 when imported, and triton reads it once.

``DENSERT_GPU_TEST_DEVICE=cpu`` runs the same tests on the CPU under the Triton interpreter at
reduced sizes (the ones that need GPU memory skip): a check of the test code itself on a
machine without a GPU, not a GPU result.
"""
import os

DEVICE = os.environ.get("DENSERT_GPU_TEST_DEVICE", "cuda")
if DEVICE == "cpu":
    os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402 - after TRITON_INTERPRET
import torch  # noqa: E402 - after TRITON_INTERPRET
import torch.nn.functional as F  # noqa: E402 - after TRITON_INTERPRET

from densert.kernels.dense_head import dense_head, dense_scores, upsample_unfused  # noqa: E402 - after TRITON_INTERPRET
from densert.kernels.ntpm import ntpm_loss_reference, prepare_positives  # noqa: E402 - after TRITON_INTERPRET

ON_GPU = DEVICE != "cpu"
pytestmark = [
    pytest.mark.skipif(ON_GPU and not torch.cuda.is_available(), reason="no CUDA device"),
    pytest.mark.skipif(ON_GPU and os.environ.get("TRITON_INTERPRET") == "1",
                       reason="TRITON_INTERPRET=1: run this file alone on the GPU machine"),
]
gpu_only = pytest.mark.skipif(not ON_GPU, reason="needs GPU memory")


def _near_tie_scores(L, K, g):
    base = torch.randn(L, 1, generator=g)
    return base * (1 + torch.randint(-2, 3, (L, K), generator=g).float() * 2.0 ** -23)


@pytest.mark.parametrize("gh,gw,H,W,K", [(32, 32, 512, 512, 150), (15, 20, 480, 640, 1000),
                                         (3, 5, 7, 11, 2), (7, 9, 50, 33, 100)])
@pytest.mark.parametrize("near_tie", [False, True])
def test_dense_tail_bit_exact(gh, gw, H, W, K, near_tie):
    """Labels and depth equal the unfused-rounding reference on every pixel (the kernel is
    compiled with enable_fp_fusion=False); probs within rtol 1e-5 of softmax(F.interpolate)."""
    from densert.kernels._triton_dense_head import dense_tail
    if not ON_GPU and H * W * K > 2_000_000:
        pytest.skip("too big for the interpreter")
    g = torch.Generator().manual_seed(gh * 1000 + K)
    s = _near_tie_scores(gh * gw, K, g) if near_tie else torch.randn(gh * gw, K, generator=g)
    ref = upsample_unfused(s, gh, gw, H, W)
    lut = torch.linspace(0.5, 9.0, K)
    sd = s.to(DEVICE)
    lab = dense_tail(sd, gh, gw, H, W, "argmax", 0.2, None)
    assert torch.equal(lab.cpu(), ref.argmax(0))
    dep = dense_tail(sd, gh, gw, H, W, "depth", 0.2, lut.to(DEVICE))
    assert torch.equal(dep.cpu(), lut[ref.argmax(0)])
    pr = dense_tail(sd, gh, gw, H, W, "probs", 0.2, None)
    up = F.interpolate(s.t().reshape(1, K, gh, gw), size=(H, W), mode="bilinear",
                       align_corners=False)[0]
    torch.testing.assert_close(pr.cpu(), torch.softmax(up / 0.2, dim=0), rtol=1e-5, atol=1e-6)


def test_dense_head_routes_agree():
    """dense_head on device (Triton) and on the CPU (torch) agree off near-ties."""
    g = torch.Generator().manual_seed(3)
    h, w = torch.randn(24 * 32, 64, generator=g), torch.randn(150, 64, generator=g)
    cpu = dense_head(h, w, (24, 32), (384, 512), "argmax")
    from densert.kernels._triton_dense_head import dense_head_triton
    dev = dense_head_triton(h.to(DEVICE), w.to(DEVICE), (24, 32), (384, 512), "argmax").cpu()
    up = upsample_unfused(dense_scores(h, w), 24, 32, 384, 512)
    t2 = torch.topk(up, 2, dim=0).values
    ok = (t2[0] - t2[1]) > 1e-5 * up.abs().amax(0)
    assert int((cpu != dev)[ok].sum()) == 0


@gpu_only
def test_probs_past_2_31_elements():
    """1000 channels x 2.2 MP = 2.2e9 probabilities (8.8 GB): the planes past 2^31 elements are
    written where they belong (int32 offsets would wrap onto the first planes)."""
    from densert.kernels._triton_dense_head import dense_tail
    gh, gw, H, W, K = 30, 40, 1200, 1840, 1000
    assert K * H * W > 2 ** 31
    g = torch.Generator().manual_seed(0)
    s = torch.randn(gh * gw, K, generator=g)
    pr = dense_tail(s.to("cuda"), gh, gw, H, W, "probs", 0.2, None)
    ks = [0, 1, 973, 998, 999]  # planes 973+ start past 2^31 elements
    up = F.interpolate(s.t().reshape(1, K, gh, gw), size=(H, W), mode="bilinear",
                       align_corners=False)[0]
    ref = torch.softmax(up / 0.2, dim=0)[ks]
    del up
    torch.testing.assert_close(pr[ks].cpu(), ref, rtol=1e-5, atol=1e-6)


MIXED = {"fp32": (torch.float32, torch.float32, None),
         "bf16": (torch.bfloat16, torch.bfloat16, None),
         "autocast-bf16": (torch.float32, torch.float32, torch.bfloat16),
         "fp16": (torch.float16, torch.float16, None)}


def _ntpm_problem(case, L, V, d, P=4, seed=0):
    hdt, wdt, ac = MIXED[case]
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(L, d, generator=g) / d ** 0.25
    w = torch.randn(V, d, generator=g) / d ** 0.25
    pos = torch.randint(0, V, (L, P), generator=g)
    pos[torch.rand(L, P, generator=g) < 0.3] = -1
    vm = torch.rand(V, generator=g) > 0.05
    h = h.to(DEVICE, hdt).requires_grad_(True)
    w = w.to(DEVICE, wdt).requires_grad_(True)
    return h, w, pos.to(DEVICE), vm.to(DEVICE), ac or wdt, ac


@pytest.mark.parametrize("case", list(MIXED))
def test_ntpm_against_reference(case):
    """Loss and gradients of the Triton forward (tensor cores for 16-bit operands) and sparse
    backward vs the float64 reference on the rounded operands; deterministic on a rerun."""
    import contextlib

    from densert.kernels._triton_ntpm import ntpm_loss_triton
    L, V, d = (512, 20000, 256) if ON_GPU else (24, 200, 32)
    h, w, pos, vm, op, ac = _ntpm_problem(case, L, V, d)
    k = 32 if ON_GPU else 4
    extra = {} if ON_GPU else dict(BM=16, BN=32, BK=16, n_splits=2)

    def run():
        with torch.autocast(DEVICE, dtype=ac) if ac else contextlib.nullcontext():
            loss = ntpm_loss_triton(h, w, pos, k, None, vm, **extra)
        return (loss, *torch.autograd.grad(loss, (h, w)))

    loss, gh, gw = run()
    loss2, gh2, gw2 = run()
    assert float(loss2) == float(loss) and torch.equal(gh2, gh) and torch.equal(gw2, gw)
    hr = h.detach().to(op).double().cpu().requires_grad_(True)
    wr = w.detach().to(op).double().cpu().requires_grad_(True)
    ref = ntpm_loss_reference(hr, wr, pos.cpu(), k, None, vm.cpu())
    rh, rw = torch.autograd.grad(ref, (hr, wr))
    assert abs(float(loss) - float(ref)) <= 1e-5 * abs(float(ref))
    tol = {torch.bfloat16: 8e-3, torch.float16: 1e-3}

    def rel(a, b):
        return float((a.double().cpu() - b).norm() / b.norm())

    assert rel(gh, rh) <= tol.get(h.dtype, 1e-5) and rel(gw, rw) <= tol.get(w.dtype, 1e-5)


@gpu_only
def test_ntpm_vocab_past_2_31_elements():
    """|V| x d > 2^31 (1M x 2304 bf16): forward keys and both backward gathers/scatters reach
    the rows past 2^31 elements."""
    from densert.kernels._triton_ntpm import ntpm_loss_triton, ntpm_select_triton
    L, V, d, k = 64, 1_000_000, 2304, 8
    assert V * d > 2 ** 31
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(L, d, device="cuda", generator=g).bfloat16().requires_grad_(True)
    w = (torch.randn(V, d, device="cuda", generator=g) * 0.05).bfloat16().requires_grad_(True)
    pos = torch.randint(V - 1000, V, (L, 2), device="cuda", generator=g)  # rows past 2^31 / d
    loss = ntpm_loss_triton(h, w, pos, k)
    gh, gw = torch.autograd.grad(loss, (h, w))
    p = prepare_positives(pos, None)
    zp, vals, ids = ntpm_select_triton(h.detach(), w.detach(), p, k, None)
    hr = h.detach().float()
    z_pos = (hr[:, None, :] * w.detach()[pos].float()).sum(-1)
    torch.testing.assert_close(zp, z_pos, rtol=1e-4, atol=1e-4)
    rows = torch.unique(pos)
    assert bool((gw[rows].float().abs().sum(1) > 0).all())  # the far rows got their gradient


@gpu_only
def test_ntpm_backward_memory_bounded():
    """bf16 weight: the step allocates no fp32 |V| x d buffer (the weight's own bf16 gradient
    is the largest new tensor)."""
    from densert.kernels._triton_ntpm import ntpm_loss_triton
    h, w, pos, vm, _, _ = _ntpm_problem("bf16", 1024, 151_936, 2560)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = ntpm_loss_triton(h, w, pos, 32, None, vm)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    dw_bytes = w.numel() * 2
    assert extra < dw_bytes + (256 << 20), (extra / 2 ** 20, dw_bytes / 2 ** 20)
