"""Reading the model's text answers (``<ref>`` lists, boxes, polygons) and the referring crop
(one implementation for the runtime and the trainer).

Parsing is forgiving on purpose: a random or weak model emits anything, and a missing tag is an
answer ("no class named", "no box"), never an exception. Coordinates ``<x_N><y_N>`` are in
pixels of the *resized* image the vision tower saw; ``to_original`` maps them back with separate
x and y scales (spec sec. 7), as floats (the released ``generate`` rounds and clamps to 0..2047
because it re-emits tokens; we keep sub-pixel precision and clamp to the image instead).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from densert.text import tokens as T

_REF = re.compile(re.escape(T.REF) + r"(.*?)" + re.escape(T.REF_END), re.DOTALL)
_BOX = re.compile(r"<box>\s*<x_(\d+)>\s*<y_(\d+)>\s*<x_(\d+)>\s*<y_(\d+)>")
_INS = re.compile(r"<ins>(.*?)(?:</ins>|\Z)", re.DOTALL)
_POLY = re.compile(r"<poly>(.*?)(?:</poly>|\Z)", re.DOTALL)
_POINT = re.compile(r"<x_(\d+)>\s*<y_(\d+)>")


def parse_refs(text: str) -> list[str]:
    """``<ref>`` names in order of first appearance, stripped, without duplicates or empties."""
    out: list[str] = []
    for name in _REF.findall(text.split(T.MASK)[0]):
        n = name.strip()
        if n and n not in out:
            out.append(n)
    return out


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """First ``<box><x_a><y_b><x_c><y_d></box>`` as (x0, y0, x1, y1), sorted so x0<=x1, y0<=y1."""
    m = _BOX.search(text)
    if not m:
        return None
    x0, y0, x1, y1 = (float(v) for v in m.groups())
    return min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)


def parse_polygons(text: str) -> list[list[tuple[float, float]]]:
    """Polygons of the first ``<ins>``: each ``<poly>`` separately, or the bare point list."""
    m = _INS.search(text)
    if not m:
        return []
    body = m.group(1)
    polys = _POLY.findall(body) or [body]
    out = []
    for p in polys:
        pts = [(float(x), float(y)) for x, y in _POINT.findall(p)]
        if pts:
            out.append(pts)
    return out


def to_original(points, resized_hw, original_hw) -> list[tuple[float, float]]:
    sy = original_hw[0] / resized_hw[0]
    sx = original_hw[1] / resized_hw[1]
    return [(x * sx, y * sy) for x, y in points]


def box_of(points) -> tuple[float, float, float, float]:
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    return min(xs), min(ys), max(xs), max(ys)


def rasterize_polygons(polygons, hw: tuple[int, int]) -> np.ndarray:
    """Filled polygons (original-image pixel coordinates) -> bool mask [H, W]; polygons with
    fewer than 3 points are skipped."""
    img = Image.new("L", (hw[1], hw[0]), 0)
    draw = ImageDraw.Draw(img)
    for poly in polygons:
        if len(poly) >= 3:
            draw.polygon([(float(x), float(y)) for x, y in poly], fill=1, outline=1)
    return np.asarray(img, dtype=bool)


# The referring crop of paper D.2 and the demo: 1.2x padding around the box, short side 1280.
REFER_PADDING = 1.2
REFER_SHORT_SIDE = 1280


@dataclass
class Crop:
    """A referring crop: the padded window of the source image, box drawn, resized."""

    image: np.ndarray                 # uint8 [h, w, 3]: the window with the box drawn, resized
    box: tuple[int, int, int, int]    # (x0, y0, x1, y1) of the window in the source image
    color: tuple[int, int, int]       # colour of the drawn box

    def take(self, mask: np.ndarray) -> np.ndarray:
        """A source-resolution mask cut to the window and resized to the crop (nearest): the
        training target that belongs to ``image``."""
        a0, b0, a1, b1 = self.box
        win = Image.fromarray(np.ascontiguousarray(mask[b0:b1, a0:a1]).astype(np.uint8))
        out = win.resize((self.image.shape[1], self.image.shape[0]), Image.NEAREST)
        return np.array(out).astype(mask.dtype)

    def paste(self, crop_mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Crop-resolution bool mask -> full-image bool mask (nearest resize into the window)."""
        a0, b0, a1, b1 = self.box
        small = Image.fromarray(crop_mask.astype(np.uint8)).resize((a1 - a0, b1 - b0), Image.NEAREST)
        full = np.zeros(hw, dtype=bool)
        full[b0:b1, a0:a1] = np.asarray(small, dtype=bool)
        return full


def crop_window(box, padding: float, hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """The box grown ``padding`` times around its centre, clamped to the image, int()-truncated
    (the demo's rounding); a degenerate box (a point or a line) gives the whole image."""
    H, W = hw
    x0, y0, x1, y1 = (float(v) for v in box)
    cw, ch = (x1 - x0) * padding, (y1 - y0) * padding
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a0, b0 = max(int(cx - cw / 2), 0), max(int(cy - ch / 2), 0)
    a1, b1 = min(int(cx + cw / 2), W), min(int(cy + ch / 2), H)
    if a1 - a0 < 1 or b1 - b0 < 1:
        return 0, 0, W, H
    return a0, b0, a1, b1


def short_side_size(hw: tuple[int, int], short_side: int, multiple: int = 1) -> tuple[int, int]:
    """(h, w) with the short side scaled to ``short_side``: int() truncation as the demo, or with
    ``multiple`` > 1 each side rounded to the nearest multiple (token-aligned training crops)."""
    s = short_side / min(hw)
    if multiple == 1:
        return max(1, int(hw[0] * s)), max(1, int(hw[1] * s))
    return tuple(max(multiple, round(v * s / multiple) * multiple) for v in hw)


def referring_crop(image: np.ndarray, box, rng: np.random.Generator, padding: float = REFER_PADDING,
                   short_side: int = REFER_SHORT_SIDE, size: tuple[int, int] | None = None,
                   multiple: int = 1) -> Crop:
    """The second pass of referring segmentation (the demo's crop-and-resize), shared by the
    runtime and the trainer: window = ``crop_window(box, padding)``, the box drawn as a 1-px
    rectangle in a random colour at its place in the window, the window resized (Lanczos) to
    ``short_side_size(window, short_side, multiple)``, or to exactly ``size`` = (h, w)."""
    a0, b0, a1, b1 = crop_window(box, padding, image.shape[:2])
    x0, y0, x1, y1 = (float(v) for v in box)
    crop = Image.fromarray(np.ascontiguousarray(image[b0:b1, a0:a1]))
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    ImageDraw.Draw(crop).rectangle([int(x0 - a0), int(y0 - b0), int(x1 - a0), int(y1 - b0)],
                                   outline=color, width=1)
    h, w = size if size is not None else short_side_size((crop.height, crop.width), short_side,
                                                         multiple)
    crop = crop.resize((w, h), Image.LANCZOS)
    return Crop(image=np.array(crop), box=(a0, b0, a1, b1), color=color)
