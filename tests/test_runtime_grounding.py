"""Parsing grounding answers, coordinate mapping, the referring crop, and the refer flow."""
from __future__ import annotations

import numpy as np

from densert.tasks import grounding


def test_parse_refs_box_polygons():
    text = "<ref>tree</ref><ref> sky </ref><ref>tree</ref><ref><OTHERS></ref><mask>(0,1)</mask><ref>x</ref>"
    assert grounding.parse_refs(text) == ["tree", "sky", "<OTHERS>"]
    assert grounding.parse_refs("garbage \x1f") == []
    assert grounding.parse_box("<box><x_40><y_30><x_10><y_5></box>") == (10, 5, 40, 30)
    assert grounding.parse_box("<box><x_40>") is None
    polys = grounding.parse_polygons(
        "is <ins><poly><x_1><y_2><x_3><y_4><x_5><y_0></poly><poly><x_9><y_9></poly></ins>.")
    assert polys == [[(1, 2), (3, 4), (5, 0)], [(9, 9)]]
    assert grounding.parse_polygons("<ins><x_1><y_2><x_3><y_4>") == [[(1, 2), (3, 4)]]  # unterminated


def test_coordinates_map_as_the_release_rewrites_them():
    """Separate x and y scales, rounded half to even (Python round, the release's nearbyint),
    clamped to the coordinate tokens' 0..2047 unless the side is longer."""
    assert grounding.to_original([(64, 32)], resized_hw=(64, 128), original_hw=(100, 300)) == [(150, 50)]
    # 5 * 3 / 2 = 7.5 -> 8, 3 * 3 / 2 = 4.5 -> 4 (half to even)
    assert grounding.to_original([(5, 3)], (64, 64), (96, 96)) == [(8, 4)]
    assert grounding.to_original([(2047, 2047)], (64, 64), (96, 96)) == [(2047, 2047)]
    assert grounding.to_original([(2047, 10)], (64, 64), (3000, 3000)) == [(3000, 469)]


def test_detections_and_poses_parse_the_release_formats():
    text = ("<box><x_1><y_2><x_3><y_4></box><ref> cat </ref><box><x_50><y_60><x_10><y_20></box>"
            "<box><x_0><y_0><x_5><y_5></box><ref>dog</ref><box><x_7>garbage<ref></ref>"
            "<box><x_1><y_1><x_2><y_2></box>")
    dets = grounding.parse_detections(text)
    assert [(d.label, d.box) for d in dets] == [
        (None, (1, 2, 3, 4)), ("cat", (10, 20, 50, 60)), ("cat", (0, 0, 5, 5)), (None, (1, 1, 2, 2))]
    assert [d.box for d in grounding.largest_first(dets, 2)] == [(10, 20, 50, 60), (0, 0, 5, 5)]
    assert grounding.parse_detections("no boxes") == []
    kpt = "".join(f"<kpt><x_{i}><y_{i + 1}><v_{i % 2}></kpt>" for i in range(16))
    poses = grounding.parse_poses(f"<person><box><x_9><y_8><x_1><y_2></box>{kpt}</person>"
                          "<person><kpt><x_3><y_4></kpt><kpt></kpt><kpt><x_5><y_6><v_1><x_7><y_8><v_0>"
                          "<person>")
    assert len(poses) == 3
    assert poses[0].box == (1, 2, 9, 8) and len(poses[0].keypoints) == 16
    assert poses[0].keypoints[3] == (3, 4, 1)
    assert poses[1].box is None
    assert poses[1].keypoints == [(3, 4, None), (None, None, None), (5, 6, 1), (7, 8, 0)]
    assert poses[2] == grounding.PersonPose(None, [])


def test_crop_is_the_demos_opencv_crop():
    """The crop equals the demo's steps written out with OpenCV (window 1.2x around the box,
    int()-truncated; 1-px cv2.rectangle; INTER_LANCZOS4 to short side 1280/int()), and the paste
    equals cv2 INTER_NEAREST into the window; neither equals PIL's resamplers here."""
    import cv2
    from PIL import Image
    rng = np.random.default_rng(3)
    img = rng.integers(0, 256, (90, 140, 3), np.uint8)
    box = (31, 17, 77, 58)
    crop = grounding.referring_crop(img, box, np.random.default_rng(5), 1.2, 128)
    cw, ch = (77 - 31) * 1.2, (58 - 17) * 1.2
    a0, b0 = max(int(54 - cw / 2), 0), max(int(37.5 - ch / 2), 0)
    a1, b1 = min(int(54 + cw / 2), 140), min(int(37.5 + ch / 2), 90)
    assert crop.box == (a0, b0, a1, b1)
    win = img[b0:b1, a0:a1].copy()
    cv2.rectangle(win, (31 - a0, 17 - b0), (77 - a0, 58 - b0), crop.color, thickness=1)
    s = 128 / min(win.shape[:2])
    want = cv2.resize(win, (int(win.shape[1] * s), int(win.shape[0] * s)),
                      interpolation=cv2.INTER_LANCZOS4)
    assert np.array_equal(crop.image, want)
    pil = np.asarray(Image.fromarray(win).resize(want.shape[1::-1], Image.LANCZOS))
    assert not np.array_equal(pil, want)
    m = rng.random(crop.image.shape[:2]) > 0.5
    full = crop.paste(m, (90, 140))
    near = cv2.resize(m.astype(np.uint8), (a1 - a0, b1 - b0), interpolation=cv2.INTER_NEAREST)
    assert np.array_equal(full[b0:b1, a0:a1], near.astype(bool)) and full.sum() == near.sum()
    pil = np.asarray(Image.fromarray(m.astype(np.uint8)).resize((a1 - a0, b1 - b0), Image.NEAREST))
    assert not np.array_equal(pil, near)
    # the source image is never drawn on, even when the window is a contiguous view of it
    whole = rng.integers(0, 256, (40, 50, 3), np.uint8)
    before = whole.copy()
    grounding.referring_crop(whole, (0, 0, 50, 40), np.random.default_rng(0), 1.2, 32)
    assert np.array_equal(whole, before)


def test_rasterize_and_crop_and_paste():
    m = grounding.rasterize_polygons([[(2, 2), (8, 2), (8, 6), (2, 6)], [(0, 0), (1, 1)]], (10, 12))
    assert m.dtype == bool and m[4, 5] and not m[0, 11] and m.sum() == 7 * 5
    img = np.zeros((100, 200, 3), np.uint8)
    crop = grounding.referring_crop(img, (50, 20, 100, 60), np.random.default_rng(0), 1.2, 64)
    assert crop.box == (45, 16, 105, 64)            # 1.2x around the centre (75, 40), int()
    assert min(crop.image.shape[:2]) == 64
    assert crop.image.sum() > 0                     # the 1-px box was drawn
    full = crop.paste(np.ones(crop.image.shape[:2], bool), (100, 200))
    assert full.sum() == 60 * 48 and full[16:64, 45:105].all()


def test_degenerate_box_takes_whole_image():
    crop = grounding.referring_crop(np.zeros((40, 50, 3), np.uint8), (10, 10, 10, 10),
                            np.random.default_rng(0), 1.2, 32)
    assert crop.box == (0, 0, 50, 40)


def test_refer_flow_uses_the_box(tiny_checkpoint, monkeypatch):
    """The grounding stage's answer is replaced by a fixed one so the box path (mapping from
    resized to original pixels, crop, paste) is checked on the real model."""
    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    p = DensePredictor(tiny_checkpoint, options=DenseOptions(refer_short_side=64), max_new_tokens=4)
    answer = p.vocab.encode("<box><x_16><y_8><x_48><y_40></box>") + [p.vocab.eos_id]
    monkeypatch.setattr(p, "_generate", lambda pf, ids, tm, stop, n=None: answer)
    img = np.random.default_rng(0).integers(0, 256, (60, 90, 3), np.uint8)   # resized to 64x96
    r = p.refer(img, "thing")
    assert r.box == (15, 8, 45, 38)   # 7.5 and 37.5 round half to even
    assert r.mask.shape == (60, 90) and not r.warnings
    x0, y0, x1, y1 = r.crop_box
    assert not r.mask[:, :x0].any() and not r.mask[:, x1:].any() and not r.mask[:y0].any()
    # caches persist across frames
    p.segment(img, classes=["floor", "wall"])
    p.segment(img, classes=["floor", "wall"])
    assert len(p._metas) >= 2 and any(k[0] == ("floor", "wall") for k in p._weights)
