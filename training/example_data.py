"""``densert example-data OUT``: a small dataset folder in every documented format
(``training.userdata``), made from rendered indoor scenes, to copy when preparing your own.

It holds depth as 16-bit millimetre PNGs and as float32 metre ``.npy`` files, labels over a class
list of its own (``classes.txt``: coarse warehouse-style names the bundled model was never taught,
with doors and paintings left unlabelled at the ignore index), referring expressions in COCO
format with both RLE and polygon masks, a ``meta.json`` with a dataset depth preset and one
per-image override (open world with the camera's focal length), and a split file.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

from densert.extras import require

from .classes import CLASS_IDS, CLASS_NAMES
from .scenes import render_scene
from .userdata import DEFAULT_IGNORE_INDEX, MM_PER_M

EXAMPLE_CLASSES = ("floor", "wall", "ceiling", "furniture", "clutter")
_GROUPS = {"floor": ("floor",), "wall": ("wall",), "ceiling": ("ceiling",),
           "furniture": ("table", "chair", "sofa", "bed", "cabinet"),
           "clutter": ("lamp", "box", "ball", "plant")}
MIN_OBJECT_PIXELS = 300     # objects smaller than this get no referring expression


def class_lut() -> np.ndarray:
    """Renderer class id -> example class index (ignore index where unlabelled)."""
    lut = np.full(len(CLASS_NAMES), DEFAULT_IGNORE_INDEX, dtype=np.uint8)
    for k, name in enumerate(EXAMPLE_CLASSES):
        for c in _GROUPS[name]:
            lut[CLASS_IDS[c]] = k
    return lut


def row_polygon(mask: np.ndarray) -> list[float]:
    """A polygon around a mask, row by row (exact for masks that are one run per row): down the
    left edges, up the right edges, in pixel-corner coordinates, flattened x0, y0, x1, y1, ..."""
    left, right = [], []
    for y in np.flatnonzero(mask.any(1)):
        xs = np.flatnonzero(mask[y])
        left += [(xs[0], y), (xs[0], y + 1)]
        right += [(xs[-1] + 1, y + 1), (xs[-1] + 1, y)]
    return [float(v) for pt in left + right[::-1] for v in pt]


def _expression(name: str, box, width: int) -> str:
    cx = (box[0] + box[2]) / 2
    side = "left" if cx < width / 3 else "right" if cx > 2 * width / 3 else "middle"
    return f"the {name} on the {side}" if side != "middle" else f"the {name} in the middle"


def write_example(out, n: int = 12, size: tuple[int, int] = (192, 256), seed: int = 0) -> str:
    """Write the example folder; returns a one-paragraph summary of what it holds."""
    mask_utils = require("pycocotools.mask", "writing refer.json")
    root = Path(out)
    for sub in ("images", "depth", "labels"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    lut = class_lut()
    images, annotations, refs, stems = [], [], [], []
    overrides = {}
    for i in range(n):
        sc = render_scene(seed + i, size[0], size[1], "indoor")
        stem = f"{i:04d}"
        stems.append(stem)
        ext = ".jpg" if i % 4 == 3 else ".png"          # both image formats
        Image.fromarray(sc.image).save(root / "images" / f"{stem}{ext}", quality=95)
        if i % 2 == 0:                                   # NYUv2 / KITTI style: uint16 millimetres
            mm = np.clip(np.round(sc.depth * MM_PER_M), 0, 65535).astype(np.uint16)
            Image.fromarray(mm).save(root / "depth" / f"{stem}.png")
        else:                                            # float32 metres
            np.save(root / "depth" / f"{stem}.npy", sc.depth.astype(np.float32))
        Image.fromarray(lut[sc.labels]).save(root / "labels" / f"{stem}.png")
        if i == n - 1:
            overrides[stem] = {"depth_preset": "open-world", "focal": round(sc.intrinsics.fx, 2)}
        images.append({"id": i + 1, "file_name": f"{stem}{ext}", "height": size[0], "width": size[1]})
        ids, counts = np.unique(sc.instances, return_counts=True)
        for inst in [int(k) for k, c in zip(ids, counts) if k > 0 and c >= MIN_OBJECT_PIXELS][:2]:
            m = sc.instances == inst
            aid = len(annotations) + 1
            if aid % 2:
                rle = mask_utils.encode(np.asfortranarray(m.astype(np.uint8)))
                seg = {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode()}
            else:
                seg = [row_polygon(m)]
            ys, xs = np.nonzero(m)
            box = (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)
            annotations.append({"id": aid, "image_id": i + 1, "segmentation": seg,
                                "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
            name = CLASS_NAMES[sc.instance_classes[inst]]
            refs.append({"ann_id": aid, "sentences": [_expression(name, box, size[1])]})
    (root / "classes.txt").write_text("\n".join(EXAMPLE_CLASSES) + "\n")
    (root / "refer.json").write_text(json.dumps({"images": images, "annotations": annotations,
                                                 "refs": refs}) + "\n")
    n_val = max(1, n // 4)
    (root / "val.txt").write_text("\n".join(stems[-n_val:]) + "\n")
    meta = {"depth_preset": "nyuv2", "depth_scale": MM_PER_M, "ignore_index": DEFAULT_IGNORE_INDEX,
            "split": "val.txt", "images": overrides}
    (root / "meta.json").write_text(json.dumps(meta, indent=1) + "\n")
    return (f"{root}: {n} images ({n - n_val} train, {n_val} val in val.txt), depth as 16-bit mm PNG "
            f"and float32 .npy (preset nyuv2, one image open-world), labels over "
            f"{len(EXAMPLE_CLASSES)} classes (classes.txt), {len(refs)} referring expressions "
            "(refer.json, RLE and polygon masks)")
