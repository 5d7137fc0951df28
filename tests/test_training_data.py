import numpy as np
import pytest
import torch

from densert.tasks import depth_bins as db
from densert.training.classes import BG, CLASS_IDS, FG, IGNORE_LABEL, NUM_CLASSES
from densert.training.data import (
    EVAL_SEED_BASE,
    SceneDataset,
    collate_scenes,
    depth_targets,
    fgbg_targets,
    fit_to_multiple,
    padded_indices,
    referring_crop,
    segmentation_targets,
    split_seeds,
    token_grid,
)


def rows(t):
    return [[v for v in r if v >= 0] for r in t.tolist()]


# ---------------- targets -----------------

def test_padded_indices():
    present = np.array([[0, 1, 1, 0], [0, 0, 0, 0], [1, 1, 1, 1]], bool)
    out = padded_indices(present)
    assert out.dtype == torch.int64 and out.shape == (3, 4)
    assert out.tolist() == [[1, 2, -1, -1], [-1, -1, -1, -1], [0, 1, 2, 3]]
    assert padded_indices(np.zeros((2, 5), bool)).shape == (2, 1)


def test_token_grid():
    assert token_grid(64, 96) == (2, 3)
    with pytest.raises(ValueError, match="multiple of the 32-px"):
        token_grid(64, 100)


@pytest.fixture
def hand_mask():
    # 2 x 3 tokens of 32 px, raster order 0..5
    lab = np.zeros((64, 96), np.int64)
    lab[:32, :32] = 3                       # token 0: {3}
    lab[:32, 32:48], lab[:32, 48:64] = 1, 2  # token 1: {1, 2}
    lab[:32, 64:] = 0
    lab[5, 70] = 5                          # token 2: {0, 5}, class 5 is one pixel
    lab[32:, :32] = IGNORE_LABEL            # token 3: nothing valid
    lab[32:, 32:64] = 4
    lab[40, 40] = IGNORE_LABEL              # token 4: {4} with an ignored pixel
    lab[32:, 64:] = 7                       # token 5: {7}
    return lab


def test_segmentation_multi_hot(hand_mask):
    t = segmentation_targets(hand_mask)
    assert t.grid == (2, 3)
    assert rows(t.indices) == [[3], [1, 2], [0, 5], [], [4], [7]]
    assert t.valid.tolist() == [True, True, True, False, True, True]
    mh = t.multi_hot(NUM_CLASSES)
    assert mh.shape == (6, NUM_CLASSES) and mh[1, 1] and mh[1, 2] and mh.sum() == 7
    # min_fraction drops the single pixel but a valid cell keeps its majority class
    t2 = segmentation_targets(hand_mask, min_fraction=0.01)
    assert rows(t2.indices)[2] == [0]
    t3 = segmentation_targets(hand_mask, min_fraction=0.9)
    assert rows(t3.indices)[1] == [1, 2]  # tie: both halves kept


def test_segmentation_rejects_bad_labels(hand_mask):
    hand_mask[0, 0] = NUM_CLASSES + 3
    with pytest.raises(ValueError, match="outside"):
        segmentation_targets(hand_mask)


@pytest.mark.parametrize("name", ["nyuv2", "cityscapes", "ddad", "open-world"])
def test_quantize_round_trip_within_half_bin(name):
    p = db.get_preset(name)
    rng = np.random.default_rng(0)
    d = rng.uniform(max(p.dmin, 1e-3), p.dmax, 20000)
    b = db.quantize(d, name)
    assert b.min() >= 1 and b.max() <= 1000
    back = db.dequantize(b, name).astype(np.float64)
    if p.spacing == "linear":
        assert np.abs(back - d).max() <= (p.dmax - p.dmin) / 2000 + 1e-5  # + float32 output rounding
    else:
        assert np.abs(np.log(back) - np.log(d)).max() <= np.log(p.dmax / p.dmin) / 2000 + 1e-6
    # dequantised centres quantise back to the same bin
    np.testing.assert_array_equal(db.quantize(db.bin_centers(name), name), np.arange(1, 1001))


@pytest.mark.parametrize("name,lo,hi", [("nyuv2", 0.0, 10.0), ("cityscapes", 0.0, 80.0), ("ddad", 0.05, 120.0),
                                        ("open-world", 0.5, 100.0)])
def test_preset_ranges(name, lo, hi):
    p = db.get_preset(name)
    assert (p.dmin, p.dmax) == (lo, hi)
    assert db.quantize(hi, name) == 1000
    assert db.quantize(max(lo, 1e-9), name) == 1
    assert db.quantize(hi * 1.01, name) == 0 and db.quantize(0.0, name) == 0 and db.quantize(np.nan, name) == 0
    assert db.quantize(hi * 1.01, name, clip=True) == 1000
    assert db.dequantize(0, name) == 0
    e = db.bin_edges(name)
    assert e.shape == (1001,) and np.all(np.diff(e) > 0)
    np.testing.assert_allclose([e[0], e[-1]], [lo, hi])
    if p.spacing == "linear":
        assert db.quantize(lo + (hi - lo) * 0.5 + 1e-9, name) == 501


def test_linear_bin_formula():
    # NYUv2: bin b covers [(b-1) cm, b cm), centre (b - 0.5) cm
    assert db.quantize(0.0149, "nyuv2") == 2
    assert db.dequantize(2, "nyuv2") == pytest.approx(0.015)
    assert db.dequantize(1000, "cityscapes") == pytest.approx(79.96)


def test_open_world_focal_normalisation():
    d = np.array([1.0, 3.0, 20.0])
    # a 1000 px camera sees objects as a 2000 px camera would at twice the depth
    np.testing.assert_array_equal(db.quantize(d, "open-world", fx=1000), db.quantize(2 * d, "open-world"))
    b = db.quantize(d, "open-world", fx=1000)
    np.testing.assert_allclose(db.dequantize(b, "open-world", fx=1000), d, rtol=3e-3)
    assert db.open_world_resize_factor(500) == 4.0
    # linear presets ignore the focal length
    np.testing.assert_array_equal(db.quantize(d, "nyuv2", fx=100), db.quantize(d, "nyuv2"))
    with pytest.raises(ValueError, match="unknown depth preset"):
        db.get_preset("kitti-ish")
    with pytest.raises(ValueError, match="0..1000"):
        db.dequantize(np.array([1001]), "nyuv2")


def test_depth_targets_hand_built():
    d = np.zeros((32, 96), np.float32)
    d[:, :32] = 2.0                                   # token 0: one bin
    d[:, 32:48], d[:, 48:64] = 1.0, 5.0               # token 1: two bins, median = lower = 1 m
    d[:, 48:64][:, :1] = 0                            # plus some invalid pixels
    # token 2: all invalid (0 and out of range)
    d[:, 64:80], d[:, 80:] = 0.0, 50.0
    t = depth_targets(d, "nyuv2")
    b1, b2, b5 = (int(db.quantize(x, "nyuv2")) for x in (1.0, 2.0, 5.0))
    assert rows(t.indices) == [[b2], [b1, b5], []]
    assert t.valid.tolist() == [True, True, False]
    assert t.median.tolist() == [b2, b1, 0]
    assert t.multi_hot(db.NUM_BINS + 1)[1, b5]


def test_depth_median_is_bin_of_median_depth():
    rng = np.random.default_rng(1)
    d = rng.uniform(0.5, 9.5, (64, 64)).astype(np.float32)
    d[rng.random((64, 64)) < 0.3] = 0
    t = depth_targets(d, "nyuv2")
    cell = d[:32, 32:64]
    v = np.sort(cell[cell > 0])
    assert t.median[1] == db.quantize(v[(len(v) - 1) // 2], "nyuv2")


def test_fgbg_targets():
    fg = np.zeros((64, 64), bool)
    fg[:32, :32] = True
    fg[40:50, 40:50] = True
    t = fgbg_targets(fg)
    assert rows(t.indices) == [[FG], [BG], [BG], [BG, FG]]
    ign = np.zeros_like(fg)
    ign[:32, 32:] = True
    assert fgbg_targets(fg, ignore=ign).valid.tolist() == [True, False, True, True]


# ---------------- referring crops -----------------

def test_referring_crop():
    rng = np.random.default_rng(0)
    img = np.full((96, 128, 3), 50, np.uint8)
    inst = np.zeros((96, 128), np.uint16)
    inst[20:40, 30:90] = 4  # 60 x 20 box
    c = referring_crop(img, inst, 4, rng, short_side=64, instance_classes={4: CLASS_IDS["car"]})
    h, w = c.image.shape[:2]
    assert h == 64 and w % 32 == 0 and c.fg.shape == (h, w)
    # 1.2x padding: a 72 x 24 crop -> 64 px short side, long side about 192
    assert w == 192
    assert 0.6 < c.fg.mean() < 0.8
    x0, y0, x1, y1 = c.box
    assert 0 < x0 < x1 < w and 0 < y0 < y1 < h
    assert c.class_id == CLASS_IDS["car"]
    assert np.abs(c.image[int(y0) + 1, w // 2].astype(int) - c.color).sum() < 60  # box edge visible
    with pytest.raises(ValueError, match="no visible pixels"):
        referring_crop(img, inst, 9, rng)


# ---------------- datasets -----------------

def test_split_seeds():
    assert list(split_seeds("train", 3)) == [0, 1, 2]
    assert split_seeds("eval", 2)[0] == EVAL_SEED_BASE
    with pytest.raises(ValueError):
        split_seeds("test", 1)


def test_scene_dataset_all_task():
    ds = SceneDataset([5, 6], (64, 96), kind="any", task="all")
    a, b = ds[0], ds[0]
    assert torch.equal(a["image"], b["image"]) and torch.equal(a["depth_targets"], b["depth_targets"])
    assert a["image"].shape == (64, 96, 3) and a["image"].dtype == torch.uint8
    assert a["seg_targets"].shape[0] == 6 and a["depth_targets"].shape[0] == 6
    assert a["depth_preset"] == ("nyuv2" if a["kind"] == "indoor" else "cityscapes")
    assert a["seg_valid"].all()
    seg = segmentation_targets(a["labels"].numpy())
    assert torch.equal(seg.indices, a["seg_targets"])
    batch = collate_scenes([ds[0], ds[1]])
    assert batch["image"].shape == (2, 64, 96, 3)
    assert batch["depth_targets"].shape[:2] == (2, 6)
    assert batch["kind"] == [a["kind"], ds[1]["kind"]]


def test_scene_dataset_augment_and_open_world():
    ds = SceneDataset([3], (64, 64), kind="outdoor", task="depth", augment=True, depth_preset="open-world")
    plain = SceneDataset([3], (64, 64), kind="outdoor", task="depth", depth_preset="open-world")
    x, y = ds[0], plain[0]
    assert not torch.equal(x["image"], y["image"])
    assert torch.equal(ds[0]["image"], x["image"])  # deterministic within an epoch
    ds.set_epoch(1)
    assert not torch.equal(ds[0]["image"], x["image"])
    fx = float(y["intrinsics"][0])
    expect = depth_targets(y["depth"].numpy(), "open-world", fx)
    assert torch.equal(expect.indices, y["depth_targets"])


def test_scene_dataset_referring():
    ds = SceneDataset(range(4), (64, 64), kind="indoor", task="refer", crop_short_side=64)
    for i in range(4):
        it = ds[i]
        h, w = it["image"].shape[:2]
        assert min(h, w) == 64 and h % 32 == 0 and w % 32 == 0
        assert it["fgbg_targets"].shape[0] == (h // 32) * (w // 32)
        assert it["fg"].any() == (it["class_id"] >= 0)


def test_scene_dataset_bad_args():
    with pytest.raises(ValueError, match="task"):
        SceneDataset(2, 64, task="flow")
    with pytest.raises(ValueError, match="multiple"):
        SceneDataset(2, (64, 70))


# ---------------- resizing -----------------

def test_fit_to_multiple_rounds_to_cells():
    assert fit_to_multiple(10, 100) == (32, 96)


def test_majority_is_the_most_frequent_index_per_cell():
    from densert.training.data import fgbg_targets, segmentation_targets
    a = np.zeros((64, 64), dtype=np.int64)
    a[:32, :32] = 3
    a[:4, :4] = 5                      # a minority class in cell 0
    a[40:, 40:] = 7                    # 7 covers 24x24 of cell 3's 32x32: the majority
    t = segmentation_targets(a, 10)
    assert t.majority.tolist() == [3, 0, 0, 7]
    fg = np.zeros((32, 64), dtype=bool)
    fg[:, 40:] = True
    assert fgbg_targets(fg).majority.tolist() == [0, 1]
