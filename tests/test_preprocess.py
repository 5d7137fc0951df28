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
def _png_bytes(img: Image.Image, **kw) -> bytes:
    b = io.BytesIO()
    img.save(b, format="PNG", **kw)
    return b.getvalue()


def test_rgba_composited_on_white():
    a = np.zeros((4, 4, 4), np.uint8)
    a[..., 0] = 200
    a[:2, :, 3] = 255   # opaque red-ish top, transparent bottom
    out = load_rgb(_png_bytes(Image.fromarray(a, "RGBA")))
    assert out[0, 0].tolist() == [200, 0, 0] and out[3, 0].tolist() == [255, 255, 255]


def test_grayscale_palette_and_16bit(tmp_path):
    g = load_rgb(_png_bytes(Image.fromarray(np.full((3, 5), 77, np.uint8), "L")))
    assert g.shape == (3, 5, 3) and (g == 77).all()
    p = Image.fromarray(np.array([[0, 1]], np.uint8), "P")
    p.putpalette([10, 20, 30, 40, 50, 60] + [0] * 762)
    assert load_rgb(_png_bytes(p)).tolist() == [[[10, 20, 30], [40, 50, 60]]]
    a16 = np.array([[0, 65535, 257 * 100]], np.uint16)
    path = tmp_path / "d16.png"
    Image.fromarray(a16).save(path)
    assert load_rgb(path)[0, :, 0].tolist() == [0, 255, 100]


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
