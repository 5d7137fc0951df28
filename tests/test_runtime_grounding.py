"""Parsing grounding answers, coordinate mapping, the referring crop, and the refer flow."""
from __future__ import annotations

import numpy as np
import pytest

from densert.tasks import grounding as G


def test_parse_refs_box_polygons():
    text = "<ref>tree</ref><ref> sky </ref><ref>tree</ref><ref><OTHERS></ref><mask>(0,1)</mask><ref>x</ref>"
    assert G.parse_refs(text) == ["tree", "sky", "<OTHERS>"]
    assert G.parse_refs("garbage \x1f") == []
    assert G.parse_box("<box><x_40><y_30><x_10><y_5></box>") == (10, 5, 40, 30)
    assert G.parse_box("<box><x_40>") is None
    polys = G.parse_polygons("is <ins><poly><x_1><y_2><x_3><y_4><x_5><y_0></poly><poly><x_9><y_9></poly></ins>.")
    assert polys == [[(1, 2), (3, 4), (5, 0)], [(9, 9)]]
    assert G.parse_polygons("<ins><x_1><y_2><x_3><y_4>") == [[(1, 2), (3, 4)]]  # unterminated


def test_coordinates_map_with_separate_scales():
    assert G.to_original([(64, 32)], resized_hw=(64, 128), original_hw=(100, 300)) == [(150.0, 50.0)]


def test_rasterize_and_crop_and_paste():
    m = G.rasterize_polygons([[(2, 2), (8, 2), (8, 6), (2, 6)], [(0, 0), (1, 1)]], (10, 12))
    assert m.dtype == bool and m[4, 5] and not m[0, 11] and m.sum() == 7 * 5
    img = np.zeros((100, 200, 3), np.uint8)
    crop = G.referring_crop(img, (50, 20, 100, 60), np.random.default_rng(0), 1.2, 64)
    assert crop.box == (45, 16, 105, 64)            # 1.2x around the centre (75, 40), int()
    assert min(crop.image.shape[:2]) == 64
    assert crop.image.sum() > 0                     # the 1-px box was drawn
    full = crop.paste(np.ones(crop.image.shape[:2], bool), (100, 200))
    assert full.sum() == 60 * 48 and full[16:64, 45:105].all()


def test_degenerate_box_takes_whole_image():
    crop = G.referring_crop(np.zeros((40, 50, 3), np.uint8), (10, 10, 10, 10),
                            np.random.default_rng(0), 1.2, 32)
    assert crop.box == (0, 0, 50, 40)


def test_refer_flow_uses_the_box(tiny_checkpoint, monkeypatch):
    """The grounding stage's answer is replaced by a fixed one so the box path (mapping from
    resized to original pixels, crop, paste) is checked on the real model."""
    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    p = DensePredictor(tiny_checkpoint, options=DenseOptions(refer_short_side=64), max_new_tokens=4)
    answer = p.vocab.encode("<box><x_16><y_8><x_48><y_40></box>") + [p.vocab.eos_id]
    monkeypatch.setattr(p, "_generate", lambda pf, tm, stop, n=None: answer)
    img = np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)   # resized to 64x96
    r = p.refer(img, "thing")
    assert r.box == pytest.approx((15.0, 7.5, 45.0, 37.5))
    assert r.mask.shape == (60, 90) and not r.warnings
    x0, y0, x1, y1 = r.crop_box
    assert not r.mask[:, :x0].any() and not r.mask[:, x1:].any() and not r.mask[:y0].any()
    # caches persist across frames
    p.segment(img, classes=["floor", "wall"])
    p.segment(img, classes=["floor", "wall"])
    assert len(p._metas) >= 2 and any(k[0] == ("floor", "wall") for k in p._weights)
