"""Datasets on disk (training.userdata): the documented formats read back exactly, the example
folder in every format, and one-line errors naming the file for every kind of broken dataset."""
import json
import shutil

import numpy as np
import pytest
from PIL import Image

from densert.errors import DatasetError
from densert.image.preprocess import target_size
from densert.tasks import depth_bins as db
from densert.tasks.grounding import parse_box
from densert.training.example_data import EXAMPLE_CLASSES, row_polygon, write_example
from densert.training.userdata import (
    UserData,
    decode_segmentation,
    load_class_names,
    load_depth,
    mask_box,
)

pytest.importorskip("pycocotools")


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("data") / "example"
    write_example(root, n=6, size=(96, 128), seed=3)
    return root


def _copy(example, tmp_path):
    return shutil.copytree(example, tmp_path / "ds")


# ---------------- single files -----------------

def test_load_depth_png_and_npy(tmp_path):
    mm = np.array([[0, 1000], [2500, 65535]], np.uint16)
    Image.fromarray(mm).save(tmp_path / "d.png")
    np.testing.assert_allclose(load_depth(tmp_path / "d.png", scale=1000.0), [[0, 1.0], [2.5, 65.535]],
                               rtol=1e-6)
    with pytest.raises(DatasetError, match="needs `scale`"):
        load_depth(tmp_path / "d.png")
    Image.fromarray(np.zeros((2, 2), np.uint8)).save(tmp_path / "d8.png")
    with pytest.raises(DatasetError, match="16-bit"):
        load_depth(tmp_path / "d8.png", scale=1.0)
    np.save(tmp_path / "d.npy", np.array([[1.5, np.nan], [-1, 3]], np.float32))
    np.testing.assert_array_equal(load_depth(tmp_path / "d.npy"), [[1.5, 0], [0, 3]])
    with pytest.raises(DatasetError, match="missing file"):
        load_depth(tmp_path / "nope.npy")


def test_class_names(tmp_path):
    (tmp_path / "c.txt").write_text("floor\nwall\ncat\n")
    (tmp_path / "c.json").write_text(json.dumps({"0": "floor", "1": "wall", "2": "cat"}))
    assert load_class_names(tmp_path / "c.txt") == load_class_names(tmp_path / "c.json") == ["floor", "wall", "cat"]
    (tmp_path / "gap.json").write_text(json.dumps({"0": "a", "2": "b"}))
    with pytest.raises(DatasetError, match="without gaps"):
        load_class_names(tmp_path / "gap.json")
    with pytest.raises(DatasetError, match="duplicates"):
        load_class_names(["a", "a"])
    with pytest.raises(DatasetError, match="comma"):
        load_class_names(["a, b"])


def test_coco_segmentations_decode_to_the_same_mask():
    from pycocotools import mask as mask_utils
    m = np.zeros((40, 50), bool)
    m[5:20, 10:30] = True
    m[20:30, 15:22] = True
    rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
    as_str = {"size": rle["size"], "counts": rle["counts"].decode()}
    np.testing.assert_array_equal(decode_segmentation(as_str, (40, 50)), m)
    # uncompressed RLE: column-major run lengths starting with background
    flat = m.T.reshape(-1)
    change = np.flatnonzero(np.diff(flat.astype(int))) + 1
    runs = np.diff(np.concatenate([[0], change, [flat.size]])).tolist()
    np.testing.assert_array_equal(decode_segmentation({"size": [40, 50], "counts": runs}, (40, 50)), m)
    poly = decode_segmentation([row_polygon(m)], (40, 50))
    assert (poly & m).sum() / (poly | m).sum() > 0.9
    assert mask_box(m) == (10, 5, 30, 30)
    with pytest.raises(ValueError, match="RLE size"):
        decode_segmentation(as_str, (41, 50))
    with pytest.raises(ValueError, match="polygons"):
        decode_segmentation([[1, 2, 3]], (40, 50))


# ---------------- the example folder -----------------

def test_example_folder_holds_every_format(example):
    ds = UserData(example)
    assert ds.tasks == ("depth", "segment", "refer")
    assert {p.suffix for p in ds.images.values()} == {".png", ".jpg"}
    assert {p.suffix for p in ds.depth.values()} == {".png", ".npy"}
    assert ds.class_names == list(EXAMPLE_CLASSES) and ds.ignore_index == 255
    assert ds.val == frozenset((example / "val.txt").read_text().split())
    stems = sorted(ds.images)
    assert ds.depth_setting(stems[0]) == ("nyuv2", None)
    preset, focal = ds.depth_setting(stems[-1])           # the per-image override
    assert preset == "open-world" and focal > 0
    # 16-bit mm PNG and float32 npy read back as metres at the image's size
    png = next(s for s, p in ds.depth.items() if p.suffix == ".png")
    raw = np.asarray(Image.open(ds.depth[png])).astype(np.float64) / 1000
    np.testing.assert_allclose(ds.depth_map(png), raw, rtol=1e-6)
    assert ds.depth_map(png).shape == ds.image(png).shape[:2]
    lab = ds.label_map(stems[0])
    assert set(np.unique(lab)) <= set(range(len(EXAMPLE_CLASSES))) | {255}
    for i, e in enumerate(ds.expressions):
        m = ds.expression_mask(i)
        assert m.any() and m.shape == ds.sizes[e.stem]
    train, val = ds.items("train"), ds.items("val")
    assert {it.stem for it in train}.isdisjoint({it.stem for it in val})
    assert len(ds.items("all")) == len(train) + len(val)
    assert {it.task for it in val} == {"depth", "segment", "refer"}


def test_val_fraction_split_is_by_image_and_fixed(example, tmp_path):
    root = _copy(example, tmp_path)
    meta = json.loads((root / "meta.json").read_text())
    del meta["split"]
    (root / "meta.json").write_text(json.dumps(meta))
    a, b = UserData(root, val_fraction=0.34), UserData(root, val_fraction=0.34)
    assert a.val == b.val and len(a.val) == 2
    assert len(UserData(root, val_fraction=0.0).val) == 0
    with pytest.raises(DatasetError, match="val fraction"):
        UserData(root, val_fraction=1.0)


# ---------------- broken folders: one line naming the file -----------------

def _error(root) -> str:
    with pytest.raises(DatasetError) as e:
        UserData(root)
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_size_mismatch_names_both_files(example, tmp_path):
    root = _copy(example, tmp_path)
    p = sorted((root / "depth").glob("*.npy"))[0]
    np.save(p, np.ones((90, 128), np.float32))
    msg = _error(root)
    assert "size mismatch" in msg and str(p) in msg and "90x128" in msg and "96x128" in msg


def test_missing_depth_for_an_image(example, tmp_path):
    root = _copy(example, tmp_path)
    p = sorted((root / "depth").glob("*.png"))[0]
    p.unlink()
    msg = _error(root)
    assert "missing depth" in msg and p.stem in msg and str(root / "images") in msg


def test_label_outside_classes_txt(example, tmp_path):
    root = _copy(example, tmp_path)
    p = sorted((root / "labels").glob("*.png"))[1]
    lab = np.asarray(Image.open(p)).copy()
    lab[0, 0] = 7
    Image.fromarray(lab).save(p)
    msg = _error(root)
    assert str(p) in msg and "[7]" in msg and "classes.txt" in msg


def test_empty_mask_unknown_image_and_ref(example, tmp_path):
    root = _copy(example, tmp_path)
    ref = json.loads((root / "refer.json").read_text())
    ref["annotations"][0]["segmentation"] = {"size": [96, 128], "counts": [96 * 128]}
    (root / "refer.json").write_text(json.dumps(ref))
    assert "empty mask" in _error(root) and "refer.json" in _error(root)
    ref = json.loads((example / "refer.json").read_text())
    ref["images"][0]["file_name"] = "nope.png"
    (root / "refer.json").write_text(json.dumps(ref))
    assert "'nope.png' is not in" in _error(root)
    ref = json.loads((example / "refer.json").read_text())
    ref["refs"][0]["ann_id"] = 999
    (root / "refer.json").write_text(json.dumps(ref))
    assert "unknown ann_id 999" in _error(root)


def test_meta_and_split_errors(example, tmp_path):
    root = _copy(example, tmp_path)
    (root / "meta.json").write_text(json.dumps({"depth_presets": "nyuv2"}))
    assert "unknown key(s) ['depth_presets']" in _error(root)
    (root / "meta.json").write_text(json.dumps({"depth_preset": "kitti"}))
    assert "unknown depth preset" in _error(root)
    (root / "meta.json").write_text(json.dumps({"split": "val.txt"}))
    (root / "val.txt").write_text("0000\nzzzz\n")
    assert f"{root / 'val.txt'}:2" in _error(root)


def test_orphan_depth_and_missing_images_dir(example, tmp_path):
    root = _copy(example, tmp_path)
    np.save(root / "depth" / "extra.npy", np.ones((96, 128), np.float32))
    assert "no image for this depth file" in _error(root)
    with pytest.raises(DatasetError, match="images: missing"):
        UserData(tmp_path)


def test_train_cli_names_the_bad_file_in_one_line(example, tmp_path, capsys):
    """The must-show cases through `densert train --data`: one line, the file named, exit 2."""
    from densert.cli import main
    root = _copy(example, tmp_path)
    p = sorted((root / "labels").glob("*.png"))[0]
    lab = np.asarray(Image.open(p)).copy()
    lab[3, 3] = 9
    Image.fromarray(lab).save(p)
    code = main(["train", "--out", str(tmp_path / "run"), "--data", str(root), "--steps", "1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("densert train: error:") and str(p) in err
    assert not (tmp_path / "run").exists()


# ---------------- samples at the runtime's geometry -----------------

def test_user_samples_use_the_processor_geometry(example):
    import random

    from densert.resources import bundled_model_dir
    from densert.text import tokens
    from densert.training import samples
    vocab = tokens.Vocab.from_file(bundled_model_dir() / "tokenizer.json")
    ds = UserData(example)
    space = samples.label_space(vocab, ds.class_names)
    cap = (64 // 16) * (96 // 16)
    kinds = set()
    for it in ds.items("all"):
        for seed in range(2):   # refer items alternate between the grounding and the crop pass
            s = samples.user_sample(it, ds, vocab, space, cap, random.Random(seed))
            kinds.add(s.task)
            h, w = s.image.shape[:2]
            assert h % 32 == 0 and w % 32 == 0 and (h // 16) * (w // 16) <= cap
            assert s.positives.shape[0] == s.num_image_tokens == s.ids.count(vocab.image_pad_id)
            if s.task in ("depth", "segment"):
                scale = 1.0
                preset, focal = ds.depth_setting(it.stem)
                if s.task == "depth" and preset == "open-world":
                    scale = db.open_world_resize_factor(focal)
                assert (h, w) == target_size(96, 128, cap, scale)
            if s.task == "ground":
                box = parse_box(vocab.decode(s.ids[s.answer_start:]))
                x0, y0, x1, y1 = mask_box(ds.expression_mask(it.expr))
                assert box == pytest.approx((x0 * w / 128, y0 * h / 96, x1 * w / 128, y1 * h / 96), abs=0.51)
                assert s.positives.shape[1] == 0
    assert kinds == {"depth", "segment", "refer", "ground"}


def test_box_answer_round_trips_through_the_runtime_parser():
    from densert.training.samples import box_answer
    assert parse_box(box_answer((3, 4, 100.4, 57.6))) == (3, 4, 100, 58)
    assert parse_box(box_answer((-5, 0, 5000, 1))) == (0, 0, 2047, 1)
