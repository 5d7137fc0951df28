"""Decoding real-world image files into the uint8 RGB array the processor expects.

The release's processor decodes with transformers' ``load_image``: ``PIL.Image.open``, EXIF
transpose, then ``convert("RGB")``. densert does exactly that (tested equal to ``load_image`` on
RGBA, palette-with-transparency, 16-bit, CMYK and EXIF-rotated files), so the model sees the
release's pixels. That conversion has consequences a user may not expect, kept on purpose:

- Alpha is dropped, not composited: a transparent pixel shows the colour stored under it.
- 16-bit and 32-bit greyscale (PNG ``I;16``, TIFF ``I``) and float (``F``) images are clipped to
  0..255, not rescaled (a 16-bit value 10000 becomes 255).
- CMYK is converted with PIL's simple formula (no ICC profile).

Beyond ``load_image``:

- Very large JPEGs are decoded with ``Image.draft`` at the smallest DCT scale that still covers
  ``min_side`` pixels, so a 200 MP photo never allocates its full-resolution buffer. Only files
  above ``DRAFT_ABOVE_PIXELS`` take this path: below it decoding is the release's, exactly.
- Anything PIL cannot decode (corrupt, empty, truncated, not an image) raises ``ImageError``
  naming the file, and so does an image over ``MAX_IMAGE_PIXELS``, from its header alone: a
  decompression bomb never reaches the decoder.
- Arrays (no file, so no processor path to match), HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA, the
  alpha dropped as ``convert("RGB")`` drops it): uint8 is taken as is; uint16 is scaled by 1/257;
  floats must be finite and in [0, 1] (scaled by 255; one convention, never guessed from the
  values: a float array beyond it, NaN or inf is refused, not rescaled); other integer types
  only when every value is in 0..255. bool, complex, object and string arrays are refused.
"""
from __future__ import annotations

import contextlib
import io
import os
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from densert.errors import ImageError

from . import MAX_IMAGE_PIXELS

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                    ".pgm", ".pbm")

# Files with more pixels than this are decoded at reduced scale where the codec allows (JPEG).
DRAFT_ABOVE_PIXELS = 64_000_000


@contextlib.contextmanager
def _open(fp, name: str):
    """PIL open with densert's size gate instead of PIL's bomb guard: the header is read, the
    pixel count checked against ``MAX_IMAGE_PIXELS`` (a clear error naming the file and the
    limit), and only then may the caller decode."""
    saved = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        try:
            img = Image.open(fp)
        except UnidentifiedImageError:
            raise ImageError(f"{name}: not a recognised image format (corrupt or not an image "
                             "file)") from None
        except (OSError, SyntaxError, ValueError) as e:
            raise ImageError(f"{name}: cannot read the image header ({e}); the file is corrupt") from None
        w, h = img.size
        if w <= 0 or h <= 0:
            raise ImageError(f"{name}: image has an impossible size {w}x{h}")
        if w * h > MAX_IMAGE_PIXELS:
            raise ImageError(f"{name}: {w}x{h} = {w * h / 1e6:,.0f} MP is over densert's limit of "
                             f"{MAX_IMAGE_PIXELS / 1e6:,.0f} MP (densert.image.MAX_IMAGE_PIXELS); "
                             "downscale the image first")
        with img:
            yield img
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _file(source) -> Path:
    p = Path(source)
    if not p.exists():
        raise ImageError(f"{p}: no such file")
    if p.is_dir():
        raise ImageError(f"{p}: is a directory, not an image file")
    if p.stat().st_size == 0:
        raise ImageError(f"{p}: empty file (0 bytes), not an image")
    return p


def probe(path) -> tuple[int, int]:
    """(H, W) after EXIF orientation, from the header alone (no pixel data is decoded): checks a
    file is an image densert accepts before any model is loaded."""
    p = _file(path)
    with open(p, "rb") as fp, _open(fp, str(p)) as im:
        w, h = im.size
        try:
            orient = im.getexif().get(0x0112, 1)
        except Exception:
            orient = 1
    return (w, h) if orient in (5, 6, 7, 8) else (h, w)


def load_rgb(source, min_side: int | None = None) -> np.ndarray:
    """Decode ``source`` (path, bytes, PIL image or HxWx3/HxW array) to uint8 RGB [H, W, 3].

    ``min_side``: the decoder may reduce huge JPEGs but never below this many pixels on the
    shorter side (callers pass the processor's target size so no detail that survives the
    final resize is lost).
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source, "<array>")
    if isinstance(source, Image.Image):
        return _pil_to_rgb(source, "<PIL image>")
    if not isinstance(source, (str, os.PathLike, bytes, bytearray)):
        raise ImageError(f"image: expected a file path, encoded bytes, a PIL image or a numpy "
                         f"array, got {type(source).__name__}"
                         + ("; wrap a nested list with np.asarray(x, dtype=np.uint8)"
                            if isinstance(source, (list, tuple)) else ""))
    name = str(source) if not isinstance(source, (bytes, bytearray)) else "<bytes>"
    if isinstance(source, (str, os.PathLike)):
        fp = open(_file(source), "rb")
    else:
        if not source:
            raise ImageError(f"{name}: empty input (0 bytes), not an image")
        fp = io.BytesIO(bytes(source))
    try:
        with fp, _open(fp, name) as img:
            w, h = img.size
            if w * h > DRAFT_ABOVE_PIXELS and img.format == "JPEG":
                floor = max(1, min_side or 1)
                # draft picks the largest reduction whose result is still >= the requested size.
                short = min(w, h)
                img.draft("RGB", (max(1, w * floor // short), max(1, h * floor // short)))
            try:
                img.load()
            except (OSError, SyntaxError, ValueError) as e:
                raise ImageError(f"{name}: cannot decode image data ({e}); the file is corrupt "
                                 "or truncated") from None
            return _pil_to_rgb(img, name)
    except MemoryError:
        raise ImageError(f"{name}: out of memory while decoding the image") from None


def jpeg_round_trip(rgb: np.ndarray, quality: int = 95) -> np.ndarray:
    """``rgb`` as the model sees it after OpenCV writes it as a JPEG at ``quality``: the demo sends
    each referring crop as ``cv2.imencode(".jpg", crop)`` (quality 95 by default), which the
    processor decodes like any file (``load_rgb``)."""
    import cv2
    ok, buf = cv2.imencode(".jpg", np.ascontiguousarray(rgb[..., ::-1]),
                           [cv2.IMWRITE_JPEG_QUALITY, int(quality)])
    if not ok:
        raise ImageError(f"OpenCV could not encode a {rgb.shape} image as JPEG")
    return load_rgb(buf.tobytes())


def _pil_to_rgb(img: Image.Image, name: str) -> np.ndarray:
    """transformers' ``load_image`` from here on: EXIF transpose, then ``convert("RGB")``."""
    try:
        img = ImageOps.exif_transpose(img)
    except Exception:
        pass
    try:
        with warnings.catch_warnings():
            # PIL's advice to convert palette transparency to RGBA: convert("RGB") is the point.
            warnings.filterwarnings("ignore", "Palette images with Transparency", UserWarning)
            out = np.asarray(img.convert("RGB"), dtype=np.uint8)
    except (OSError, ValueError) as e:
        raise ImageError(f"{name}: cannot convert the {img.mode} image to RGB ({e})") from None
    if out.ndim != 3 or out.shape[2] != 3 or out.shape[0] == 0 or out.shape[1] == 0:
        raise ImageError(f"{name}: decoded to an unusable array of shape {out.shape}")
    return np.ascontiguousarray(out)


def _array_to_rgb(a: np.ndarray, name: str) -> np.ndarray:
    """An array by the module docstring's rules, or an ``ImageError`` naming its dtype, shape or
    value range."""
    if a.ndim == 2:
        a = a[..., None]
    if a.ndim != 3 or a.shape[2] not in (1, 3, 4) or a.shape[0] == 0 or a.shape[1] == 0:
        raise ImageError(f"{name}: expected an HxW, HxWx1, HxWx3 (RGB) or HxWx4 (RGBA) array, got "
                         f"shape {a.shape}")
    kind = a.dtype.kind
    if a.dtype == np.uint8:
        pass
    elif a.dtype == np.uint16:
        a = np.rint(a / 257.0).astype(np.uint8)
    elif kind == "f":
        if not np.isfinite(a).all():
            raise ImageError(f"{name}: {a.dtype} array holds {int((~np.isfinite(a)).sum())} NaN or "
                             "infinite value(s); float images must be finite, in [0, 1]")
        lo, hi = float(a.min()), float(a.max())
        if lo < 0 or hi > 1:
            raise ImageError(f"{name}: {a.dtype} array spans [{lo:g}, {hi:g}]; float images are "
                             "read as [0, 1] (0..255 floats: divide by 255, or pass uint8)")
        a = np.rint(a.astype(np.float64) * 255.0).astype(np.uint8)
    elif kind in "iu":
        lo, hi = int(a.min()), int(a.max())
        if lo < 0 or hi > 255:
            raise ImageError(f"{name}: {a.dtype} array spans [{lo}, {hi}]; integer images other "
                             "than uint16 must hold 0..255 (pass uint8, or uint16 for 16-bit)")
        a = a.astype(np.uint8)
    else:
        raise ImageError(f"{name}: a {a.dtype} array is not an image; pass uint8 (0..255), uint16 "
                         "or float in [0, 1]")
    if a.shape[2] == 4:
        a = a[..., :3]
    if a.shape[2] == 1:
        a = np.repeat(a, 3, axis=2)
    return np.ascontiguousarray(a)


def list_images(paths) -> list[Path]:
    """Expand directories (sorted, image extensions only, not recursive); keep files as given."""
    out: list[Path] = []
    for p in map(Path, paths):
        if p.is_dir():
            out += sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_EXTENSIONS)
        else:
            out.append(p)
    return out
