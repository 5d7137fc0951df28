"""Dense head: subset weight, torch tail vs F.interpolate, Triton tail in the interpreter."""
import os
import sys

# The interpreter flag is read when triton is imported: set it before anything imports triton.
_TRITON_PREIMPORTED = "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1"
os.environ["TRITON_INTERPRET"] = "1"

import pytest  # noqa: E402 - after TRITON_INTERPRET
import torch  # noqa: E402 - after TRITON_INTERPRET
import torch.nn.functional as F  # noqa: E402 - after TRITON_INTERPRET

from densert.kernels.dense_head import dense_head, dense_scores, naive_full_vocab_head, subset_weight  # noqa: E402 - after TRITON_INTERPRET

needs_interp = pytest.mark.skipif(_TRITON_PREIMPORTED,
                                  reason="triton was imported before TRITON_INTERPRET=1 was set")


def _ref_up(scores, gh, gw, H, W):
    K = scores.shape[1]
    return F.interpolate(scores.t().reshape(1, K, gh, gw), size=(H, W), mode="bilinear",
                         align_corners=False)[0]


def _margin_ok(up, rel=1e-5):
    """Pixels whose top-2 margin exceeds rel (relative to the scale of the scores)."""
    if up.shape[0] < 2:
        return torch.ones(up.shape[1:], dtype=torch.bool)
    t2 = torch.topk(up, 2, dim=0).values
    scale = up.abs().amax(dim=0).clamp(min=1e-30)
    return (t2[0] - t2[1]) > rel * scale


# (gh, gw, H, W, K): non-integer ratios, 1x1 grids, down-sampling, K from 2 to 1000.
CASES = [(3, 5, 7, 11, 2), (1, 1, 4, 6, 3), (7, 9, 50, 33, 100), (6, 5, 3, 2, 7),
         (4, 3, 9, 10, 1000), (5, 7, 37, 61, 150), (1, 4, 5, 17, 19), (2, 2, 2, 2, 5)]


def _inputs(gh, gw, K, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(gh * gw, d, generator=g), torch.randn(K, d, generator=g)


@pytest.mark.parametrize("gh,gw,H,W,K", CASES)
def test_torch_tail_matches_interpolate(gh, gw, H, W, K):
    h, w = _inputs(gh, gw, K)
    up = _ref_up(dense_scores(h, w), gh, gw, H, W)
    ref = up.argmax(0)
    got = dense_head(h, w, (gh, gw), (H, W), "argmax")
    assert got.dtype == torch.int64 and got.shape == (H, W)
    ok = _margin_ok(up)
    assert int((got != ref)[ok].sum()) == 0
    dv = torch.rand(K)
    dep = dense_head(h, w, (gh, gw), (H, W), "depth", depth_values=dv)
    assert torch.equal(dep[ok], dv[ref][ok])
    pr = dense_head(h, w, (gh, gw), (H, W), "probs", temperature=0.2)
    torch.testing.assert_close(pr, torch.softmax(up / 0.2, dim=0), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("structured", [False, True])
@pytest.mark.parametrize("gh,gw,H,W,K", [(12, 12, 40, 52, 150), (12, 14, 61, 37, 100), (8, 12, 9, 45, 1000)])
def test_large_output_paths_match_interpolate(monkeypatch, structured, gh, gw, H, W, K):
    """Outputs too big to upsample whole: random maps (dense boundaries: bands of output rows)
    and two-region maps (few boundary quads, interpolated over candidates only)."""
    import densert.kernels.dense_head as dh
    monkeypatch.setattr(dh, "_SMALL_TAIL_BYTES", 4 * H * W)  # force the large-output routes
    monkeypatch.setattr(dh, "_MIN_QUAD_PIXELS", 1)
    routes = []
    fn = dh._labels_rows
    monkeypatch.setattr(dh, "_labels_rows", lambda *a: (routes.append("rows"), fn(*a))[1])
    h, w = _inputs(gh, gw, K)
    if structured:
        region = (torch.arange(gw)[None, :] * 2 // gw).expand(gh, gw)
        h = 4 * torch.randn(2, h.shape[1])[region.reshape(-1)] + 0.05 * h
    up = _ref_up(dense_scores(h, w), gh, gw, H, W)
    got = dense_head(h, w, (gh, gw), (H, W), "argmax")
    assert int((got != up.argmax(0))[_margin_ok(up)].sum()) == 0
    assert routes == ([] if structured else ["rows"])


def test_class_that_wins_only_between_tokens(monkeypatch):
    """Class 2 is never the argmax at a token but wins midway between two tokens: the quad
    pruning must keep it as a candidate."""
    import densert.kernels.dense_head as dh
    monkeypatch.setattr(dh, "_SMALL_TAIL_BYTES", 0)
    hidden = torch.eye(3)[:2]                                   # tokens A, B side by side
    weight = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.7, 0.7, 0.0]])  # A: 1,0,.7  B: 0,1,.7
    up = _ref_up(dense_scores(hidden, weight), 1, 2, 4, 40)
    got = dense_head(hidden, weight, (1, 2), (4, 40), "argmax")
    assert (up.argmax(0) == 2).any()
    assert torch.equal(got, up.argmax(0))


def test_argmax_ties_go_to_lower_index():
    # Two identical channels: every pixel ties between 1 and 3; torch.argmax picks 1.
    h = torch.randn(6, 8)
    w = torch.randn(4, 8)
    w[3] = w[1]
    w[1] *= 1.0
    w[0] = -10 * w[1]
    w[2] = -10 * w[1]
    up = _ref_up(dense_scores(h, w), 2, 3, 9, 13)
    got = dense_head(h, w, (2, 3), (9, 13))
    assert torch.equal(got, up.argmax(0))


def test_subset_weight_means_rows_and_validates():
    W = torch.randn(50, 6, dtype=torch.bfloat16)
    sw = subset_weight(W, [[3], [4, 7], [1, 1, 9]])
    assert sw.dtype == torch.float32 and sw.shape == (3, 6)
    torch.testing.assert_close(sw[1], (W[4].float() + W[7].float()) / 2)
    torch.testing.assert_close(sw[2], (2 * W[1].float() + W[9].float()) / 3)
    with pytest.raises(ValueError, match="empty"):
        subset_weight(W, [[1], []])
    with pytest.raises(ValueError, match="out of range"):
        subset_weight(W, [[1], [50]])
    with pytest.raises(ValueError):
        dense_head(torch.randn(5, 6), sw, (2, 3), (4, 4))


def test_subset_head_equals_naive_full_vocab_head():
    g = torch.Generator().manual_seed(3)
    V, d, gh, gw = 400, 32, 4, 5
    Wv = torch.randn(V, d, generator=g, dtype=torch.float64)
    h = torch.randn(gh * gw, d, generator=g, dtype=torch.float64)
    groups = [[5, 17], [40], [399, 0, 7], [100, 101]]
    naive = naive_full_vocab_head(h, Wv, groups, (gh, gw), (13, 29))
    # Reference scores in float64 through F.interpolate; compare where the margin is clear.
    sc = torch.stack([(h @ Wv[g_].t()).mean(1) for g_ in groups], 1)
    up = _ref_up(sc, gh, gw, 13, 29)
    sub = dense_head(h, subset_weight(Wv, groups), (gh, gw), (13, 29))
    ok = _margin_ok(up.float())
    assert int((naive != sub)[ok].sum()) == 0 and ok.float().mean() > 0.9


@needs_interp
@pytest.mark.parametrize("gh,gw,H,W,K", [(3, 5, 7, 11, 2), (1, 1, 4, 6, 3), (7, 9, 50, 33, 100),
                                         (4, 3, 9, 10, 257), (6, 5, 3, 2, 7)])
def test_triton_tail_interpreter(gh, gw, H, W, K):
    from densert.kernels._triton_dense_head import dense_head_triton
    h, w = _inputs(gh, gw, K, seed=1)
    up = _ref_up(dense_scores(h, w), gh, gw, H, W)
    ok = _margin_ok(up)
    lab = dense_head_triton(h, w, (gh, gw), (H, W), "argmax")
    assert lab.dtype == torch.int64
    assert int((lab != up.argmax(0))[ok].sum()) == 0
    dv = torch.rand(K)
    dep = dense_head_triton(h, w, (gh, gw), (H, W), "depth", depth_values=dv)
    torch_dep = dense_head(h, w, (gh, gw), (H, W), "depth", depth_values=dv)
    assert torch.equal(dep[ok], torch_dep[ok])
    pr = dense_head_triton(h, w, (gh, gw), (H, W), "probs", temperature=0.2)
    torch.testing.assert_close(pr, dense_head(h, w, (gh, gw), (H, W), "probs"), rtol=1e-5, atol=1e-5)


@needs_interp
@pytest.mark.parametrize("near_tie", [False, True])
def test_triton_tail_bit_exact_to_unfused_reference(near_tie):
    """Bit-level policy: the Triton tail (enable_fp_fusion=False on GPU; numpy in the
    interpreter) and the torch tail compute every interpolated value with separately rounded
    multiplies and adds,
    so its labels equal upsample_unfused's argmax on every pixel, ties and one-ulp gaps
    included. (The C++ and CUDA tails are held to the same reference by ctest.)"""
    from densert.kernels._triton_dense_head import dense_tail
    from densert.kernels.dense_head import _labels_rows, upsample_unfused
    g = torch.Generator().manual_seed(7)
    gh, gw, H, W, K = 5, 6, 37, 41, 3
    if near_tie:  # channels one or two ulps apart: any FMA or reordering flips labels
        s = torch.randn(gh * gw, 1, generator=g) * (
            1 + torch.randint(-2, 3, (gh * gw, K), generator=g).float() * 2.0 ** -23)
    else:
        s = torch.randn(gh * gw, K, generator=g)
    ref = upsample_unfused(s, gh, gw, H, W)
    assert not near_tie or int((ref[0] == ref[1]).sum()) > 50  # the case has real ties
    assert torch.equal(dense_tail(s.contiguous(), gh, gw, H, W, "argmax", 0.2, None), ref.argmax(0))
    # The torch tail's band-of-rows route (small CPU maps, dense boundaries, CUDA without
    # triton) is the same arithmetic in the scores' [token, K] layout.
    assert torch.equal(_labels_rows(s.contiguous(), gh, gw, H, W), ref.argmax(0))
