"""The bytes of every result file: pictures streamed in bands, COCO JSON, arrays and text.

Every picture is streamed in bands of rows (``BAND_PIXELS`` at a time) through the PNG encoder
of ``png.py``, so writing a 24 MP result adds tens of MB, not gigabytes; the raw arrays are
written from the result's own buffers. Each writer here is a ``Writer``: a function of the open
file, which ``filesets.write_set`` calls to fill one file of a set. How things look (colour maps,
palettes, legends) is ``colours.py``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw

from .colours import (
    BACKGROUND_NAMES,
    DepthColouring,
    class_colours,
    class_legend,
    depth_colour_t,
    legend_font,
    legend_scale,
    turbo,
)
from .png import PngWriter

BAND_PIXELS = 1 << 20           # pixels per band of every banded writer (~1 MP)
MM_PER_M = 1000.0
MM_PNG_MAX_M = 65535 / MM_PER_M

Writer = Callable[[BinaryIO], object]


def bands(height: int, width: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``BAND_PIXELS`` pixels each (read at call time, so tests can shrink it)."""
    rows = max(1, BAND_PIXELS // max(1, width))
    for r in range(0, height, rows):
        yield r, min(height, r + rows)


# ---------------------------------------------------------------- arrays and text
def npy(array: np.ndarray) -> Writer:
    return lambda f: np.save(f, array, allow_pickle=False)


def tiff(array: np.ndarray) -> Writer:
    """A float32 [H, W] array as a one-channel float TIFF."""
    return lambda f: Image.fromarray(array, mode="F").save(f, format="TIFF")


def text(s: str) -> Writer:
    return lambda f: f.write(s.encode("utf-8"))


def json_file(obj) -> Writer:
    return lambda f: f.write((json.dumps(obj, indent=2, default=jsonable) + "\n").encode())


def jsonable(o):
    """``json.dumps``' ``default``: numpy scalars, tuples, sets and paths as plain JSON."""
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- depth pictures
def _paste_rows(rows: np.ndarray, r0: int, overlay: Image.Image | None) -> None:
    """Alpha-blend the part of ``overlay`` (anchored at the top-left corner) that falls into
    rows [r0, r0 + len(rows)) of the picture."""
    if overlay is None or r0 >= overlay.height:
        return
    o = np.asarray(overlay, dtype=np.float32)[r0:r0 + rows.shape[0], : rows.shape[1]]
    n, w = o.shape[:2]
    a = o[..., 3:4] / 255.0
    rows[:n, :w] = np.rint(rows[:n, :w] * (1 - a) + o[..., :3] * a).astype(np.uint8)



def write_depth_png(f: BinaryIO, depth: np.ndarray, bins: np.ndarray, c: DepthColouring,
                    legend: Image.Image | None = None) -> None:
    H, W = depth.shape
    png = PngWriter(f, W, H, "rgb8")
    for r0, r1 in bands(H, W):
        t = depth_colour_t(depth[r0:r1], bins[r0:r1], c)
        rows = turbo(np.nan_to_num(t, nan=0.0))
        rows[np.isnan(t)] = 0
        _paste_rows(rows, r0, legend)
        png.write_rows(rows)
    png.close()


def write_depth_mm_png(f: BinaryIO, depth: np.ndarray) -> None:
    """uint16 millimetres, 0 invalid (what NYUv2/KITTI tools and ROS ``16UC1`` read). Depth
    beyond ``MM_PNG_MAX_M`` (65.535 m) is clipped to 65535."""
    H, W = depth.shape
    png = PngWriter(f, W, H, "gray16")
    for r0, r1 in bands(H, W):
        mm = np.rint(np.nan_to_num(depth[r0:r1], nan=0.0).astype(np.float64) * MM_PER_M)
        png.write_rows(np.clip(mm, 0, 65535).astype(np.uint16))
    png.close()


# ---------------------------------------------------------------- label pictures
def write_label_png(f: BinaryIO, labels: np.ndarray, class_names: Sequence[str]) -> str:
    """An indexed PNG whose palette holds the class colours (viewers show colours, tools read
    ids); beyond 256 classes a 16-bit greyscale PNG of the ids. Returns the PNG kind."""
    H, W = labels.shape
    small = len(class_names) <= 256
    png = PngWriter(f, W, H, "palette8" if small else "gray16",
                    class_colours(class_names) if small else None)
    for r0, r1 in bands(H, W):
        png.write_rows(labels[r0:r1].astype(np.uint8 if small else np.uint16))
    png.close()
    return png.kind


def present_classes(labels: np.ndarray, num_classes: int) -> list[int]:
    counts = np.zeros(max(num_classes, 1), dtype=np.int64)
    for r0, r1 in bands(*labels.shape):
        counts += np.bincount(labels[r0:r1].ravel(), minlength=len(counts))[: len(counts)]
    return [int(k) for k in np.flatnonzero(counts)]


def write_overlay_png(f: BinaryIO, image: np.ndarray, labels: np.ndarray,
                      class_names: Sequence[str], alpha: float = 0.5) -> None:
    """Labels blended on the image (background left clear), with a legend of the classes
    present, scaled to the picture."""
    H, W = labels.shape
    if image.shape[:2] != (H, W):
        raise ValueError(f"overlay: image is {image.shape[:2]}, labels are {(H, W)}")
    cols = class_colours(class_names).astype(np.float32)
    fg = np.array([n not in BACKGROUND_NAMES for n in class_names] or [False])
    present = present_classes(labels, len(class_names))
    legend = class_legend(class_names, present, legend_scale(H, W)) if present else None
    png = PngWriter(f, W, H, "rgb8")
    for r0, r1 in bands(H, W):
        lab = np.minimum(labels[r0:r1], len(cols) - 1)
        rows = image[r0:r1].astype(np.float32)
        m = fg[lab]
        rows[m] = (1 - alpha) * rows[m] + alpha * cols[lab[m]]
        rows = np.clip(np.rint(rows), 0, 255).astype(np.uint8)
        _paste_rows(rows, r0, legend)
        png.write_rows(rows)
    png.close()


# ---------------------------------------------------------------- COCO RLE
def coco_rle(mask: np.ndarray) -> dict:
    """COCO's compressed RLE of a bool mask ({"size": [h, w], "counts": str}): column-major
    runs starting with a run of zeros, each run LEB128-like in 5-bit groups with the delta to the
    run two back from the third run on (pycocotools' ``rleToString``; checked against it)."""
    h, w = mask.shape
    flat = np.asarray(mask, dtype=bool).ravel(order="F")
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    edges = np.concatenate([[0], change, [flat.size]])
    runs = np.diff(edges).tolist()
    if flat.size and flat[0]:
        runs = [0] + runs
    out = []
    for i, x in enumerate(runs):
        if i > 2:
            x -= runs[i - 2]
        more = True
        while more:
            c = x & 0x1F
            x >>= 5
            more = (x != -1) if (c & 0x10) else (x != 0)
            if more:
                c |= 0x20
            out.append(chr(c + 48))
    return {"size": [int(h), int(w)], "counts": "".join(out)}


def coco_segments(labels: np.ndarray, class_names: Sequence[str]) -> list[dict]:
    """One COCO-style segment per non-background class present."""
    return [{"category_id": k, "name": class_names[k], "segmentation": coco_rle(labels == k),
             "area": int((labels == k).sum())}
            for k in present_classes(labels, len(class_names))
            if class_names[k] not in BACKGROUND_NAMES]


# ---------------------------------------------------------------- boxes and poses
# Limbs drawn between MPII joints (by name: densert.tasks.prompts.MPII_JOINTS holds the order),
# coloured by side.
MPII_LIMBS = {
    "left": (("left_ankle", "left_knee"), ("left_knee", "left_hip"), ("left_hip", "pelvis"),
             ("left_wrist", "left_elbow"), ("left_elbow", "left_shoulder"),
             ("left_shoulder", "thorax")),
    "right": (("right_ankle", "right_knee"), ("right_knee", "right_hip"), ("right_hip", "pelvis"),
              ("right_wrist", "right_elbow"), ("right_elbow", "right_shoulder"),
              ("right_shoulder", "thorax")),
    "centre": (("pelvis", "thorax"), ("thorax", "upper_neck"), ("upper_neck", "head_top")),
}
LIMB_COLOURS = {"left": (60, 140, 255), "right": (255, 140, 40), "centre": (200, 200, 200)}
VISIBLE_COLOUR, HIDDEN_COLOUR = (255, 255, 255), (120, 120, 120)


def keypoint_visible(v) -> bool:
    """The demo draws a keypoint as visible when v >= 0.5: with integer flags, v >= 1."""
    return v is not None and v >= 1


def _line_width(h: int, w: int) -> int:
    return max(2, min(h, w) // 300)


def _draw_banded(f: BinaryIO, image: np.ndarray, draw_fn) -> None:
    """Stream ``image`` with ``draw_fn(ImageDraw, dy)`` drawn on it, band by band: every band
    draws the same shapes shifted by -r0 (PIL clips), so the picture equals one drawn whole."""
    H, W = image.shape[:2]
    png = PngWriter(f, W, H, "rgb8")
    for r0, r1 in bands(H, W):
        band = Image.fromarray(np.ascontiguousarray(image[r0:r1]))
        draw_fn(ImageDraw.Draw(band), -r0)
        png.write_rows(np.asarray(band))
    png.close()


def write_boxes_png(f: BinaryIO, image: np.ndarray, boxes) -> None:
    """``boxes`` = [((x0, y0, x1, y1), label, colour)] drawn on the image, labels above the boxes,
    sized to the picture."""
    H, W = image.shape[:2]
    lw, size = _line_width(H, W), legend_scale(H, W)
    font = legend_font(size)

    def draw(d: ImageDraw.ImageDraw, dy: int):
        for (x0, y0, x1, y1), label, col in boxes:
            d.rectangle([x0, y0 + dy, x1, y1 + dy], outline=tuple(col), width=lw)
            if label:
                ty = max(0, y0 - size - 2 * lw)
                tw = int(font.getlength(label))
                d.rectangle([x0, ty + dy, x0 + tw + 2 * lw, ty + size + 2 * lw + dy], fill=tuple(col))
                d.text((x0 + lw, ty + lw + dy), label, fill=(0, 0, 0), font=font)
    _draw_banded(f, image, draw)


def write_pose_png(f: BinaryIO, image: np.ndarray, persons) -> None:
    """Each person's box, limbs coloured by side, keypoints filled where visible."""
    from densert.tasks.prompts import MPII_JOINTS
    H, W = image.shape[:2]
    lw = _line_width(H, W)
    r = 2 * lw
    index = {n: i for i, n in enumerate(MPII_JOINTS)}

    def draw(d: ImageDraw.ImageDraw, dy: int):
        for p in persons:
            if p.box is not None:
                x0, y0, x1, y1 = p.box
                d.rectangle([x0, y0 + dy, x1, y1 + dy], outline=(255, 255, 255), width=max(1, lw // 2))
            pts = p.keypoints
            for side, limbs in MPII_LIMBS.items():
                for a, b in limbs:
                    (xa, ya, _), (xb, yb, _) = pts[index[a]], pts[index[b]]
                    if None not in (xa, ya, xb, yb):
                        d.line([(xa, ya + dy), (xb, yb + dy)], fill=LIMB_COLOURS[side], width=lw)
            for x, y, v in pts:
                if x is not None and y is not None:
                    d.ellipse([x - r, y - r + dy, x + r, y + r + dy], outline=(0, 0, 0),
                              fill=VISIBLE_COLOUR if keypoint_visible(v) else HIDDEN_COLOUR)
    _draw_banded(f, image, draw)


def _xywh(box) -> list[int]:
    x0, y0, x1, y1 = (int(v) for v in box)
    return [x0, y0, x1 - x0, y1 - y0]


def coco_detections(hw, detections) -> dict:
    """COCO-style detections: categories in order of first appearance (an unlabelled box is
    "object"), bbox [x, y, w, h] in original pixels."""
    names: list[str] = []
    for label, _ in detections:
        if (label or "object") not in names:
            names.append(label or "object")
    anns = []
    for k, (label, box) in enumerate(detections, 1):
        x, y, w, h = _xywh(box)
        anns.append({"id": k, "category_id": names.index(label or "object") + 1,
                     "name": label or "object", "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    return {"image_size": [int(v) for v in hw],
            "categories": [{"id": i, "name": n} for i, n in enumerate(names, 1)],
            "annotations": anns}


def coco_keypoints(hw, persons) -> dict:
    """COCO-style keypoints over the MPII joints: per person [x, y, v] x 16 with COCO's v (0
    missing, 1 present but not visible, 2 visible), bbox [x, y, w, h] (the keypoints' extent when
    the answer gave no box)."""
    from densert.tasks.prompts import MPII_JOINTS
    index = {n: i + 1 for i, n in enumerate(MPII_JOINTS)}
    skeleton = [[index[a], index[b]] for limbs in MPII_LIMBS.values() for a, b in limbs]
    anns = []
    for k, p in enumerate(persons, 1):
        flat, xs, ys = [], [], []
        for x, y, v in p.keypoints:
            if x is None or y is None:
                flat += [0, 0, 0]
            else:
                flat += [int(x), int(y), 2 if keypoint_visible(v) else 1]
                xs.append(int(x))
                ys.append(int(y))
        box = p.box if p.box is not None else (
            (min(xs), min(ys), max(xs), max(ys)) if xs else (0, 0, 0, 0))
        anns.append({"id": k, "category_id": 1, "bbox": _xywh(box), "keypoints": flat,
                     "num_keypoints": len(xs), "iscrowd": 0})
    return {"image_size": [int(v) for v in hw],
            "categories": [{"id": 1, "name": "person", "keypoints": list(MPII_JOINTS),
                            "skeleton": skeleton}],
            "annotations": anns}
