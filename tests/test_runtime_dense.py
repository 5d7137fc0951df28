"""Dense decoding: subset head == full-vocabulary head, memory independent of |V|, the
<OTHERS> rule, alignment, CRF and depth decoding."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from densert.kernels.dense_head import naive_full_vocab_head, subset_weight
from densert.runtime.dense import align_hidden, depth_map, segment_labels
from densert.runtime.options import DenseOptions
from densert.tasks import depth_bins


def _random_head(V, d=48, L=6 * 8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(L, d, generator=g), torch.randn(V, d, generator=g) * 0.5


GROUPS = [[5], [17, 3], [40, 41, 42], [99]]
ARGMAX = DenseOptions(crf=False)   # the bilinear argmax alone (the CRF is on by default)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_subset_head_equals_full_vocabulary(seed):
    hidden, W = _random_head(V=500, seed=seed)
    opts = ARGMAX
    ours = segment_labels(hidden, subset_weight(W, GROUPS), (6, 8), (50, 70), opts)
    naive = naive_full_vocab_head(hidden, W, GROUPS, (6, 8), (50, 70)).numpy()
    assert np.array_equal(ours, naive)
    # scores: mean of full-vocabulary logits per group == GEMM with the averaged rows
    full = hidden @ W.t()
    ref = torch.stack([full[:, g].mean(1) for g in GROUPS], 1)
    got = hidden @ subset_weight(W, GROUPS).t()
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


class _LargestAlloc(TorchDispatchMode):
    """Records every tensor an op produces: the largest size, and whether any has a |V| axis."""

    def __init__(self, V):
        super().__init__()
        self.V, self.largest, self.vocab_sized = V, 0, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel() * t.element_size())
                if self.V in t.shape:
                    self.vocab_sized.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.parametrize("background", [False, True])
def test_peak_intermediate_does_not_grow_with_vocabulary(background):
    largest = {}
    for V in (1_000, 200_003):
        hidden, W = _random_head(V=V)
        with _LargestAlloc(V) as mode:
            segment_labels(hidden, subset_weight(W, GROUPS), (6, 8), (40, 56), ARGMAX,
                           background=background)
        assert mode.vocab_sized == [], mode.vocab_sized   # no [L, V] (or any |V|-wide) tensor
        largest[V] = mode.largest
    assert largest[1_000] == largest[200_003]
    # and the naive path does grow, so the probe can see a |V|-sized tensor when there is one
    hidden, W = _random_head(V=200_003)
    with _LargestAlloc(200_003) as mode:
        naive_full_vocab_head(hidden, W, GROUPS, (6, 8), (40, 56))
    assert mode.vocab_sized and mode.largest >= 48 * 200_003 * 4


def test_background_rule_is_sigmoid_quarter_logits_threshold_half():
    hidden, W = _random_head(V=300, seed=3)
    w = subset_weight(W, GROUPS)
    opts = ARGMAX
    got = segment_labels(hidden, w, (6, 8), (30, 40), opts, background=True)
    up = F.interpolate((hidden @ w.t()).t().reshape(1, 4, 6, 8), size=(30, 40), mode="bilinear",
                       align_corners=False)[0]
    p = torch.sigmoid(up / 4)
    want = torch.where(p.max(0).values > 0.5, p.argmax(0), torch.tensor(4)).numpy()
    assert np.array_equal(got, want)
    assert 0 < (got == 4).mean() < 1   # both outcomes occur on this random head
    # background written second in the class list: classes keep their order around it
    mid = segment_labels(hidden, w, (6, 8), (30, 40), opts, background=True, background_index=1)
    assert np.array_equal(mid, np.array([0, 2, 3, 4, 1])[got])
    # a higher threshold only adds background
    hi = segment_labels(hidden, w, (6, 8), (30, 40), DenseOptions(crf=False, background_threshold=0.7),
                        background=True)
    assert ((hi == 4) >= (got == 4)).all()


def test_alignment_k_minus_one_shifts_by_one_token():
    v = torch.arange(12.0).reshape(4, 3)
    pre = torch.full((3,), -1.0)
    assert torch.equal(align_hidden(v, pre, "k"), v)
    assert align_hidden(v, pre, "k-1").tolist() == [[-1, -1, -1], [0, 1, 2], [3, 4, 5], [6, 7, 8]]
    with pytest.raises(ValueError, match="k-1"):
        align_hidden(v, None, "k-1")


def test_crf_keeps_a_clean_map_and_needs_the_image():
    # Two classes, left/right halves; CRF over a matching image must not change the answer.
    d = 8
    hidden = torch.zeros(4 * 4, d)
    hidden.view(4, 4, d)[:, :2, 0] = 3.0
    hidden.view(4, 4, d)[:, 2:, 1] = 3.0
    w = torch.eye(2, d)
    img = np.zeros((64, 64, 3), np.uint8)
    img[:, 32:] = 255
    opts = DenseOptions(crf=True)
    lab = segment_labels(hidden, w, (4, 4), (64, 64), opts, image=img)
    assert (lab[:, :28] == 0).all() and (lab[:, 36:] == 1).all()
    with pytest.raises(ValueError, match="RGB image"):
        segment_labels(hidden, w, (4, 4), (64, 64), opts)


def test_crf_runs_at_its_pixel_cap_and_maps_back(monkeypatch):
    """Over crf_max_pixels the CRF runs on a smaller map whose labels are upsampled (nearest):
    its K x pixels probabilities stay bounded whatever the image size."""
    from densert.runtime import dense
    d = 8
    hidden = torch.zeros(4 * 4, d)
    hidden.view(4, 4, d)[:, :2, 0] = 3.0
    hidden.view(4, 4, d)[:, 2:, 1] = 3.0
    w = torch.eye(2, d)
    img = np.zeros((300, 400, 3), np.uint8)
    img[:, 200:] = 255
    seen = []
    real = dense.crf_refine
    monkeypatch.setattr(dense, "crf_refine", lambda probs, image, o: seen.append(probs.shape) or real(probs, image, o))
    lab = segment_labels(hidden, w, (4, 4), (300, 400), DenseOptions(crf=True, crf_max_pixels=12_000),
                         image=img)
    assert seen == [(2, 95, 126)] and lab.shape == (300, 400) and lab.dtype == np.uint16
    assert (lab[:, :180] == 0).all() and (lab[:, 220:] == 1).all()
    with pytest.raises(ValueError, match=r"--crf needs 3000 x 95 x 126 float32 scores .* use fewer"):
        monkeypatch.setattr(dense, "DENSE_BYTES_LIMIT", 100 << 20)
        segment_labels(hidden, torch.randn(3000, d), (4, 4), (300, 400),
                       DenseOptions(crf=True, crf_max_pixels=12_000), image=img)


def test_depth_expectation_at_full_resolution_is_bounded(monkeypatch):
    from densert.runtime import dense
    monkeypatch.setattr(dense, "DENSE_BYTES_LIMIT", 1 << 20)
    with pytest.raises(ValueError, match="use --depth-upsample patch"):
        depth_map(torch.randn(6, 16), torch.randn(1000, 16), (2, 3), (64, 96),
                  DenseOptions(depth_mode="expectation", depth_upsample="full"), "nyuv2")


def test_depth_argmax_patch_grid_then_resize_and_dequantise(monkeypatch):
    # bin scores peak at a known bin per merged cell
    gh, gw, K, d = 2, 3, 1000, 16
    g = torch.Generator().manual_seed(0)
    wbins = torch.randn(K, d, generator=g)
    hidden = torch.randn(gh * gw, d, generator=g)
    dm = depth_map(hidden, wbins, (gh, gw), (64, 96), DenseOptions(), "nyuv2")
    scores = (hidden @ wbins.t()).t().reshape(1, K, gh, gw)
    up = F.interpolate(scores, size=(4, 6), mode="bilinear", align_corners=False)[0]
    codes = (up.argmax(0) + 1).numpy()
    assert np.array_equal(dm.codes_grid, codes)
    assert dm.bins.shape == (64, 96) and dm.depth.dtype == np.float32
    np.testing.assert_array_equal(dm.depth, depth_bins.dequantize(dm.bins, "nyuv2"))
    # rounding and dequantisation in bands of ~5 rows equal the whole-map computation
    from densert.runtime import writers
    from densert.tasks.rle import resize_codes
    monkeypatch.setattr(writers, "BAND_PIXELS", 5 * 96)
    banded = depth_map(hidden, wbins, (gh, gw), (64, 96), DenseOptions(), "nyuv2")
    whole = np.clip(np.rint(resize_codes(codes.astype(np.float32), (64, 96))), 1, K)
    assert np.array_equal(banded.bins, whole) and np.array_equal(banded.depth, dm.depth)
    full = depth_map(hidden, wbins, (gh, gw), (64, 96), DenseOptions(depth_upsample="full"), "nyuv2")
    assert full.bins.shape == (64, 96)
    exp = depth_map(hidden, wbins, (gh, gw), (64, 96), DenseOptions(depth_mode="expectation"),
                    "open-world", fx=1000.0)
    assert np.isfinite(exp.depth).all() and (exp.depth > 0).all()


def test_depth_argmax_grid_is_twice_the_token_grid_whatever_the_upscale():
    """480x640 at --upscale 3: tokens 45x60, argmax on 90x120 (paper D.3: upsample by two,
    argmax, resize), not on the original image's 30x40; the released text's grid stays 30x40,
    the codes resized to it; the map is the codes resized to 480x640 (OpenCV bilinear)."""
    import cv2
    gh, gw, K, d = 45, 60, 1000, 16
    g = torch.Generator().manual_seed(1)
    wbins, hidden = torch.randn(K, d, generator=g), torch.randn(gh * gw, d, generator=g)
    dm = depth_map(hidden, wbins, (gh, gw), (480, 640), DenseOptions(), "nyuv2")
    assert dm.argmax_hw == (90, 120) and dm.codes_grid.shape == (30, 40)
    up = F.interpolate((hidden @ wbins.t()).t().reshape(1, K, gh, gw), size=(90, 120),
                       mode="bilinear", align_corners=False)[0]
    codes = (up.argmax(0) + 1).numpy().astype(np.uint16)
    assert np.array_equal(dm.bins, cv2.resize(codes, (640, 480), interpolation=cv2.INTER_LINEAR))
    assert np.array_equal(dm.codes_grid, cv2.resize(codes, (40, 30), interpolation=cv2.INTER_LINEAR))


def test_options_validate():
    with pytest.raises(ValueError, match="alignment"):
        DenseOptions(alignment="k+1")
    with pytest.raises(ValueError, match="temperature"):
        DenseOptions(temperature=0)
