"""The released processor: size search, uint8 antialiased resize, patch order, real-world files."""
from __future__ import annotations

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from densert.errors import ImageError
from densert.image import decode as image_io
from densert.image.decode import load_rgb
from densert.image.preprocess import patchify, preprocess, resize_uint8, target_size, unpatchify


@pytest.mark.parametrize("hw, want, patches", [
    ((480, 640), (480, 640), 1200),
    ((375, 500), (384, 512), 768),
    ((1080, 1920), (1088, 1920), 8160),
    ((3000, 4000), (2656, 3520), 36520),   # spec: scale 0.88 (reached as 0.8799999999999999)
    ((1, 1), (32, 32), 4),                 # tiny: one merged token
    ((20, 5000), (32, 5024), 628),
])
def test_worked_examples(hw, want, patches):
    th, tw = target_size(*hw)
    assert (th, tw) == want
    assert (th // 16) * (tw // 16) == patches


def test_scale_reached_by_repeated_subtraction():
    s = 1.0
    for _ in range(6):
        s -= 0.02
    assert s != 0.88 and abs(s - 0.88) < 1e-12  # the float the search really uses
    assert target_size(3000, 4000) == (max(32, int(np.ceil(3000 * s / 32)) * 32),
                                       max(32, int(np.ceil(4000 * s / 32)) * 32))


def test_upscale_applies_before_search():
    assert target_size(150, 200, scale_factor=4) == (608, 800)
    assert target_size(3000, 4000, scale_factor=2) == target_size(6000, 8000)


def test_impossible_sizes():
    with pytest.raises(ImageError, match="max_patches 3"):
        target_size(100, 100, max_patches=3)
    with pytest.raises(ImageError, match="impossible image size 0x10"):
        target_size(0, 10)


def test_resize_is_torch_uint8_antialias_and_close_to_pil():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    # smooth the noise a little so it looks more like a photo
    img = np.asarray(Image.fromarray(img).resize((250, 187)).resize((500, 375)))
    for size in [(384, 512), (224, 320), (37, 50), (1000, 1344)]:
        ours = resize_uint8(img, size)
        t = torch.from_numpy(img.copy()).permute(2, 0, 1)[None]
        ref = F.interpolate(t, size=size, mode="bilinear", antialias=True)[0].permute(1, 2, 0).numpy()
        assert np.array_equal(ours, ref)
        # The float path rounded afterwards and PIL BILINEAR: within one grey level.
        fl = F.interpolate(t.float(), size=size, mode="bilinear", antialias=True)
        fl = fl.round().clamp(0, 255)[0].permute(1, 2, 0).numpy()
        assert np.abs(ours.astype(int) - fl).max() <= 1
        pil = np.asarray(Image.fromarray(img).resize(size[::-1], Image.BILINEAR))
        d = np.abs(ours.astype(int) - pil)
        assert d.max() <= 1 and (d == 0).mean() > 0.7, (size, d.max(), (d == 0).mean())


def test_patch_order_and_round_trip():
    x = torch.randn(64, 96, 3)
    p = patchify(x)
    assert p.shape == (2 * 3 * 4, 768)
    # rows 0..3 are the first 2x2 block: TL, TR, BL, BR; each (py, px, c), c fastest
    assert torch.equal(p[0], x[:16, :16].reshape(-1))
    assert torch.equal(p[1], x[:16, 16:32].reshape(-1))
    assert torch.equal(p[2], x[16:32, :16].reshape(-1))
    assert torch.equal(p[4], x[:16, 32:48].reshape(-1))  # next block to the right
    assert torch.equal(unpatchify(p, (4, 6)), x)


def test_preprocess_normalises_to_minus_one_one():
    img = np.zeros((32, 64, 3), np.uint8)
    img[:, 32:] = 255
    pre = preprocess(img)
    assert pre.grid == (2, 4) and pre.num_image_tokens == 2 and pre.pixel_values.shape == (8, 768)
    assert pre.pixel_values[:4].eq(-1).all() and pre.pixel_values[4:].eq(1).all()


# ---------------------------------------------------------------- real-world files
def _decode_kinds(d) -> dict:
    """One file of every kind the release's decoding treats specially."""
    rng = np.random.default_rng(0)
    files = {}
    rgba = rng.integers(0, 256, (6, 7, 4), np.uint8)
    rgba[0, 0] = (200, 0, 0, 0)                      # transparent red: the pixel
    rgba[0, 1] = (10, 200, 30, 128)
    Image.fromarray(rgba, "RGBA").save(files.setdefault("rgba", d / "rgba.png"))
    Image.fromarray(rgba[..., [0, 3]], "LA").save(files.setdefault("la", d / "la.png"))
    p = Image.fromarray(rng.integers(0, 4, (5, 6), np.uint8), "P")
    p.putpalette([200, 0, 0, 10, 20, 30, 40, 50, 60, 70, 80, 90] + [0] * 756)
    p.save(files.setdefault("palette_trns", d / "palette_trns.png"), transparency=0)
    p.save(files.setdefault("palette_alpha", d / "palette_alpha.png"),
           transparency=bytes([0, 128, 255, 64]))
    g = Image.fromarray(rng.integers(0, 256, (5, 6), np.uint8), "L")
    g.save(files.setdefault("gray_trns", d / "gray_trns.png"), transparency=7)
    a16 = np.array([[0, 10000, 65535], [100, 255, 256]], np.uint16)
    Image.fromarray(a16).save(files.setdefault("gray16", d / "gray16.png"))
    Image.fromarray(np.array([[-5, 70000], [255, 300]], np.int32), "I").save(
        files.setdefault("int32", d / "int32.tif"))
    Image.fromarray(np.array([[-5.5, 0.4], [254.6, 300.0]], np.float32), "F").save(
        files.setdefault("float", d / "float.tif"))
    cmyk = Image.fromarray(rng.integers(0, 256, (16, 24, 3), np.uint8)).convert("CMYK")
    cmyk.save(files.setdefault("cmyk_jpeg", d / "cmyk.jpg"), quality=90)
    cmyk.save(files.setdefault("cmyk_tiff", d / "cmyk.tif"))
    Image.fromarray(rng.integers(0, 2, (5, 9), np.uint8) * 255).convert("1").save(
        files.setdefault("bilevel", d / "bilevel.png"))
    base = Image.fromarray(rng.integers(0, 256, (10, 30, 3), np.uint8))
    for orient in range(2, 9):
        exif = Image.Exif()
        exif[0x0112] = orient
        base.save(files.setdefault(f"exif{orient}", d / f"exif{orient}.jpg"), exif=exif.tobytes())
    rot = Image.fromarray(rgba, "RGBA")
    exif = Image.Exif()
    exif[0x0112] = 6
    rot.save(files.setdefault("exif_rgba_png", d / "exif_rgba.png"), exif=exif.tobytes())
    return files


def test_decoding_equals_transformers_load_image(tmp_path):
    """Every file kind decodes to transformers' load_image pixels (EXIF transpose, then
    convert("RGB")), read from a path, from bytes and from an opened PIL image."""
    from transformers.image_utils import load_image
    files = _decode_kinds(tmp_path)
    for kind, path in files.items():
        ref = np.asarray(load_image(str(path)))
        got = load_rgb(path)
        assert got.dtype == np.uint8 and np.array_equal(got, ref), kind
        assert np.array_equal(load_rgb(path.read_bytes()), ref), kind
        with Image.open(path) as im:
            assert np.array_equal(load_rgb(im), ref), kind
    # the two pixels: alpha is dropped (not composited on white), 16-bit is clipped
    assert load_rgb(files["rgba"])[0, 0].tolist() == [200, 0, 0]
    assert load_rgb(files["gray16"])[0, :, 0].tolist() == [0, 255, 255]
    assert load_rgb(files["exif6"]).shape == (30, 10, 3)


def test_arrays_follow_the_documented_rules():
    a = np.zeros((2, 3, 4), np.uint8)
    a[..., 0], a[..., 3] = 200, 0
    assert load_rgb(a)[0, 0].tolist() == [200, 0, 0]          # alpha dropped, as convert("RGB")
    assert load_rgb(np.array([[0, 65535, 257 * 100]], np.uint16))[0, :, 0].tolist() == [0, 255, 100]
    assert load_rgb(np.array([[0.0, 1.0]], np.float32))[0, :, 0].tolist() == [0, 255]


def test_exif_orientation_applied():
    img = Image.fromarray(np.zeros((10, 30, 3), np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 CW to display
    b = io.BytesIO()
    img.save(b, format="JPEG", exif=exif.tobytes())
    assert load_rgb(b.getvalue()).shape == (30, 10, 3)


def test_huge_jpeg_is_drafted_not_below_target(tmp_path, monkeypatch):
    path = tmp_path / "big.jpg"
    Image.fromarray(np.full((1024, 1536, 3), 128, np.uint8)).save(path)
    monkeypatch.setattr(image_io, "DRAFT_ABOVE_PIXELS", 100_000)
    pre = preprocess(path, max_patches=256)   # target 192x288 -> draft may reduce to 1/4
    assert pre.original_hw == (1024, 1536) and pre.resized_hw == target_size(1024, 1536, 256)
    assert pre.image.shape[0] < 1024 and pre.image.shape[0] >= pre.resized_hw[0]


@pytest.mark.parametrize("content, match", [
    (b"", "empty file"),
    (b"hello, I am text", "not a recognised image"),
    (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "not a recognised image|cannot decode"),
])
def test_bad_files_name_the_file(tmp_path, content, match):
    path = tmp_path / "bad.png"
    path.write_bytes(content)
    with pytest.raises(ImageError, match=match) as e:
        preprocess(path)
    assert str(path) in str(e.value)


def test_truncated_jpeg_and_missing_and_directory(tmp_path):
    b = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(b, "JPEG")
    path = tmp_path / "trunc.jpg"
    path.write_bytes(b.getvalue()[: len(b.getvalue()) // 2])
    with pytest.raises(ImageError, match="trunc.jpg"):
        preprocess(path)
    with pytest.raises(ImageError, match="no such file"):
        preprocess(tmp_path / "nope.png")
    with pytest.raises(ImageError, match="is a directory"):
        preprocess(tmp_path)
