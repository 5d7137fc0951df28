"""Reading the model's text answers (``<ref>`` lists, boxes, polygons, detections, poses) and the
referring crop (one implementation for the runtime and the trainer).

Parsing is forgiving on purpose: a random or weak model emits anything, and a missing tag is an
answer ("no class named", "no box"), never an exception. Coordinates ``<x_N><y_N>`` are in
pixels of the *resized* image the vision tower saw; ``to_original`` maps them back to original
pixels the way the release's ``generate`` rewrites them (spec sec. 7): separate x and y scales,
rounded half to even.

The referring crop follows the official demo with OpenCV where the demo uses it: the box drawn
with ``cv2.rectangle`` (1 px), the window resized with ``INTER_LANCZOS4``, the crop's mask pasted
back with ``INTER_NEAREST``.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from densert.text import tokens

_REF = re.compile(re.escape(tokens.REF) + r"(.*?)" + re.escape(tokens.REF_END), re.DOTALL)
_BOX = re.compile(r"<box>\s*<x_(\d+)>\s*<y_(\d+)>\s*<x_(\d+)>\s*<y_(\d+)>")
_INS = re.compile(r"<ins>(.*?)(?:</ins>|\Z)", re.DOTALL)
_POLY = re.compile(r"<poly>(.*?)(?:</poly>|\Z)", re.DOTALL)
_POINT = re.compile(r"<x_(\d+)>\s*<y_(\d+)>")
_PERSON = re.compile(r"<person>(.*?)(?:</person>|(?=<person>)|\Z)", re.DOTALL)
_KPT = re.compile(r"<kpt>(.*?)(?:</kpt>|(?=<kpt>)|(?=</person>)|\Z)", re.DOTALL)
_KPOINT = re.compile(r"<x_(\d+)>\s*<y_(\d+)>(?:\s*<v_(\d+)>)?")


def parse_refs(text: str) -> list[str]:
    """``<ref>`` names before ``<mask>`` in order of first appearance, stripped, without
    duplicates or empties."""
    out: list[str] = []
    for name in _REF.findall(text.split(tokens.MASK)[0]):
        n = name.strip()
        if n and n not in out:
            out.append(n)
    return out


def parse_box(text: str) -> tuple[float, float, float, float] | None:
    """First ``<box><x_a><y_b><x_c><y_d></box>`` as (x0, y0, x1, y1), sorted so x0<=x1, y0<=y1."""
    m = _BOX.search(text)
    return None if m is None else _sorted_box(m.groups())


def _sorted_box(groups) -> tuple[float, float, float, float]:
    x0, y0, x1, y1 = (float(v) for v in groups)
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


@dataclass
class Detection:
    """One box of a detection or grounding answer: the ``<ref>`` label that precedes it (None
    when no label does) and (x0, y0, x1, y1) with x0 <= x1, y0 <= y1."""

    label: str | None
    box: tuple[float, float, float, float]

    @property
    def area(self) -> float:
        return (self.box[2] - self.box[0]) * (self.box[3] - self.box[1])


def parse_detections(text: str) -> list[Detection]:
    """Every ``<box>`` of ``<ref>cls</ref><box>...</box><box>...</box><ref>...`` in the order
    written, each labelled by the last ``<ref>`` before it (the release's detection and grounding
    answers; unlabelled boxes are kept with ``label`` None)."""
    refs = [(m.end(), m.group(1).strip()) for m in _REF.finditer(text)]
    out = []
    for m in _BOX.finditer(text):
        label = None
        for end, name in refs:
            if end <= m.start():
                label = name or None
        out.append(Detection(label, _sorted_box(m.groups())))
    return out


def largest_first(dets: list[Detection], limit: int | None = None) -> list[Detection]:
    """Detections by box area, largest first (ties keep their order), at most ``limit``: the
    order the demo segments the open set's boxes in (later, smaller boxes overwrite)."""
    return sorted(dets, key=lambda d: -d.area)[:limit]


@dataclass
class PersonPose:
    """One ``<person>``: its box (None without one) and its keypoints in the order written, each
    (x, y, v) with None for a missing coordinate or visibility."""

    box: tuple[float, float, float, float] | None
    keypoints: list[tuple[float | None, float | None, int | None]]


def parse_poses(text: str) -> list[PersonPose]:
    """``<person><box>...</box><kpt><x_><y_><v_></kpt>...</person>``, forgiving: an unclosed
    tag ends at the next one, a ``<kpt>`` without a point is a missing keypoint, several points
    in one ``<kpt>`` are read in order."""
    out = []
    for body in _PERSON.findall(text):
        m = _BOX.search(body.split(tokens.KPT)[0])
        kpts: list[tuple[float | None, float | None, int | None]] = []
        for block in _KPT.findall(body):
            pts = _KPOINT.findall(block)
            kpts += [(float(x), float(y), int(v) if v else None) for x, y, v in pts] or \
                [(None, None, None)]
        out.append(PersonPose(_sorted_box(m.groups()) if m else None, kpts))
    return out


def to_original(points, resized_hw, original_hw) -> list[tuple[int, int]]:
    """Resized-image pixels -> original-image pixels as the release's ``generate`` rewrites
    coordinate tokens: round(N * orig / resized) per axis, half to even, clamped to the tokens'
    0..2047 (a side longer than 2048 px keeps its own range)."""
    sy = original_hw[0] / resized_hw[0]
    sx = original_hw[1] / resized_hw[1]
    hx = max(tokens.N_COORDS - 1, int(original_hw[1]))
    hy = max(tokens.N_COORDS - 1, int(original_hw[0]))
    return [(min(max(round(x * sx), 0), hx), min(max(round(y * sy), 0), hy)) for x, y in points]


_COORD = re.compile(r"<([xy])_(\d+)>")


def rewrite_coordinates(text: str, resized_hw, original_hw) -> str:
    """The answer with every ``<x_N>`` / ``<y_N>`` in original pixels (``to_original``): the text
    the release's ``generate`` returns."""
    def sub(m):
        n = int(m.group(2))
        (x, y), = to_original([(n, n)], resized_hw, original_hw)
        return f"<{m.group(1)}_{x if m.group(1) == 'x' else y}>"
    return _COORD.sub(sub, text)


def box_to_original(box, resized_hw, original_hw) -> tuple[int, int, int, int]:
    (x0, y0), (x1, y1) = to_original([box[:2], box[2:]], resized_hw, original_hw)
    return x0, y0, x1, y1


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


def _resize_nearest(mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
    """OpenCV ``INTER_NEAREST`` (the demo's paste-back) of a 2-D mask to (h, w)."""
    import cv2  # here, not at import: the CLI's --help reads this module's constants
    return cv2.resize(np.ascontiguousarray(mask, dtype=np.uint8), (int(hw[1]), int(hw[0])),
                      interpolation=cv2.INTER_NEAREST)


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
        return _resize_nearest(mask[b0:b1, a0:a1], self.image.shape[:2]).astype(mask.dtype)

    def paste(self, crop_mask: np.ndarray, hw: tuple[int, int]) -> np.ndarray:
        """Crop-resolution bool mask -> full-image bool mask (nearest resize into the window)."""
        a0, b0, a1, b1 = self.box
        full = np.zeros(hw, dtype=bool)
        full[b0:b1, a0:a1] = _resize_nearest(crop_mask, (b1 - b0, a1 - a0)).astype(bool)
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
    rectangle in a random colour at its place in the window (``cv2.rectangle``, corners
    int()-truncated as the demo), the window resized with OpenCV ``INTER_LANCZOS4`` to
    ``short_side_size(window, short_side, multiple)``, or to exactly ``size`` = (h, w)."""
    import cv2
    a0, b0, a1, b1 = crop_window(box, padding, image.shape[:2])
    x0, y0, x1, y1 = (float(v) for v in box)
    crop = np.array(image[b0:b1, a0:a1], dtype=np.uint8, order="C")  # a copy: drawn on below
    color = tuple(int(c) for c in rng.integers(0, 256, size=3))
    cv2.rectangle(crop, (int(x0 - a0), int(y0 - b0)), (int(x1 - a0), int(y1 - b0)), color,
                  thickness=1)
    h, w = size if size is not None else short_side_size(crop.shape[:2], short_side, multiple)
    out = cv2.resize(crop, (int(w), int(h)), interpolation=cv2.INTER_LANCZOS4)
    return Crop(image=out, box=(a0, b0, a1, b1), color=color)
