"""Reading the model's text answers (``<ref>`` lists, boxes, polygons) and the referring crop.

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

from densert import tokens as T

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


@dataclass
class Crop:
    image: np.ndarray                 # the crop, box drawn, resized so its short side is target
    box: tuple[int, int, int, int]    # (x0, y0, x1, y1) of the crop in the original image


def refine_crop(image: np.ndarray, box, padding: float, short_side: int,
                rng: np.random.Generator) -> Crop:
    """The demo's ``crop_and_resize``: pad the box by ``padding`` around its centre, clamp to the
    image, draw the box as a 1-px rectangle in a random colour on the crop, resize the crop so
    its short side is ``short_side`` (Lanczos; int() truncation of the new sides, as the demo)."""
    H, W = image.shape[:2]
    x0, y0, x1, y1 = (float(v) for v in box)
    cw, ch = (x1 - x0) * padding, (y1 - y0) * padding
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
    a0, b0 = max(int(cx - cw / 2), 0), max(int(cy - ch / 2), 0)
    a1, b1 = min(int(cx + cw / 2), W), min(int(cy + ch / 2), H)
    if a1 - a0 < 1 or b1 - b0 < 1:  # degenerate box (a point or a line): take the whole image
        a0, b0, a1, b1 = 0, 0, W, H
    crop = Image.fromarray(np.ascontiguousarray(image[b0:b1, a0:a1]))
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    ImageDraw.Draw(crop).rectangle([int(x0 - a0), int(y0 - b0), int(x1 - a0), int(y1 - b0)],
                                   outline=color, width=1)
    s = short_side / min(crop.width, crop.height)
    size = (max(1, int(crop.width * s)), max(1, int(crop.height * s)))
    crop = crop.resize(size, Image.LANCZOS)
    return Crop(image=np.asarray(crop), box=(a0, b0, a1, b1))


def paste_mask(crop_mask: np.ndarray, crop: Crop, hw: tuple[int, int]) -> np.ndarray:
    """Crop-resolution bool mask -> full-image bool mask (nearest resize into the crop box)."""
    a0, b0, a1, b1 = crop.box
    small = Image.fromarray(crop_mask.astype(np.uint8)).resize((a1 - a0, b1 - b0), Image.NEAREST)
    full = np.zeros(hw, dtype=bool)
    full[b0:b1, a0:a1] = np.asarray(small, dtype=bool)
    return full
