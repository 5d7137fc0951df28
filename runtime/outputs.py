"""Files a person or a tool wants from a result, written in bands and as all-or-nothing sets.

Every picture is streamed in bands of rows (``BAND_PIXELS`` at a time) through the PNG encoder
of ``png.py``, so writing a 24 MP result adds tens of MB, not gigabytes; the raw arrays are
written from the result's own buffers. The files of one image form a set that appears whole or
not at all (``write_set``): each file goes to a temporary name in the destination folder, and only
when all are complete are they renamed into place, with SIGINT/SIGTERM held off for the renames.

Colours: depth uses turbo (near = red) over the preset's own bins by default, so maps of
different frames and images compare; ``range=(lo, hi)`` in metres fixes a linear range instead.
Segmentation colours are keyed by class name (stable across runs and class lists), background
black.
"""
from __future__ import annotations

import contextlib
import errno
import json
import os
import signal
import tempfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Callable, Iterator, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from densert.errors import DensertError
from densert.tasks import depth_bins
from densert.text import tokens as T

from .png import PngWriter

BAND_PIXELS = 1 << 20           # pixels per band of every banded writer (~1 MP)
BACKGROUND_NAMES = (T.OTHERS, T.BG)
BACKGROUND_COLOUR = (0, 0, 0)
MM_PER_M = 1000.0
MM_PNG_MAX_M = 65535 / MM_PER_M


class OutputError(DensertError, OSError):
    """A result set that could not be written (disk full, permission, ...); nothing of it is
    left behind."""


def bands(height: int, width: int) -> Iterator[tuple[int, int]]:
    """Row ranges of about ``BAND_PIXELS`` pixels each (read at call time, so tests can shrink it)."""
    rows = max(1, BAND_PIXELS // max(1, width))
    for r in range(0, height, rows):
        yield r, min(height, r + rows)


# ---------------------------------------------------------------- colours
# Turbo (Google, 2019), polynomial approximation by its author (public domain): r, g, b as
# degree-5 polynomials in t.
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def turbo(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    t = np.clip(np.asarray(t, dtype=np.float32), 0.0, 1.0)
    rgb = np.full(t.shape + (3,), _TURBO[:, 5], dtype=np.float32)
    for c in range(4, -1, -1):  # Horner: no [..., 6] table of powers
        rgb = rgb * t[..., None] + _TURBO[:, c].astype(np.float32)
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def _hsv_to_rgb(h: float, s: float, v: float) -> tuple[int, int, int]:
    i = int(h * 6) % 6
    f = h * 6 - int(h * 6)
    p, q, t = v * (1 - s), v * (1 - f * s), v * (1 - (1 - f) * s)
    r, g, b = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)][i]
    return int(round(r * 255)), int(round(g * 255)), int(round(b * 255))


def class_colour(name: str) -> tuple[int, int, int]:
    """The colour of a class, from its name alone: the same class looks the same in every run,
    image and class list. Background classes are black."""
    if name in BACKGROUND_NAMES:
        return BACKGROUND_COLOUR
    h = zlib.crc32(name.strip().lower().encode())
    return _hsv_to_rgb((h % 3600) / 3600, 0.55 + 0.4 * ((h >> 12) % 8) / 7,
                       0.7 + 0.3 * ((h >> 16) % 4) / 3)


def class_colours(class_names: Sequence[str]) -> np.ndarray:
    """[K, 3] uint8, ``class_colour`` per name."""
    return np.array([class_colour(n) for n in class_names] or [BACKGROUND_COLOUR], dtype=np.uint8)


# ---------------------------------------------------------------- legends
def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend_scale(height: int, width: int) -> int:
    """Text height in px for a picture of this size: readable on 1080p and on 24 MP alike."""
    return int(max(11, min(height, width) / 45))


def class_legend(class_names: Sequence[str], present: Sequence[int], size: int) -> Image.Image:
    """An RGBA box listing the present classes with their colours."""
    f = _font(size)
    pad, sw = size // 3 + 2, size
    rows = [(class_colour(class_names[k]), class_names[k]) for k in present]
    width = pad * 3 + sw + max(int(f.getlength(n)) for _, n in rows)
    img = Image.new("RGBA", (width, pad + len(rows) * (size + pad)), (0, 0, 0, 150))
    d = ImageDraw.Draw(img)
    for i, (col, name) in enumerate(rows):
        y = pad + i * (size + pad)
        d.rectangle([pad, y, pad + sw, y + size], fill=col, outline=(255, 255, 255))
        d.text((pad * 2 + sw, y - size // 8), name, fill=(255, 255, 255), font=f)
    return img


def _paste_rows(rows: np.ndarray, r0: int, overlay: Image.Image | None) -> None:
    """Alpha-blend the part of ``overlay`` (anchored at the top-left corner) that falls into
    rows [r0, r0 + len(rows)) of the picture."""
    if overlay is None or r0 >= overlay.height:
        return
    o = np.asarray(overlay, dtype=np.float32)[r0:r0 + rows.shape[0], : rows.shape[1]]
    n, w = o.shape[:2]
    a = o[..., 3:4] / 255.0
    rows[:n, :w] = np.rint(rows[:n, :w] * (1 - a) + o[..., :3] * a).astype(np.uint8)


# ---------------------------------------------------------------- depth pictures
@dataclass(frozen=True)
class DepthColouring:
    """How depth becomes colour: over the preset's bins (default: comparable across frames) or
    linearly over ``range`` = (near, far) metres; ``legend`` adds a scale inside the picture."""

    range: tuple[float, float] | None = None
    legend: bool = False


def depth_colour_t(depth: np.ndarray, bins: np.ndarray, c: DepthColouring) -> np.ndarray:
    """Colour coordinate in [0, 1] (1 = near), NaN where invalid."""
    valid = bins > 0
    if c.range is None:
        t = 1.0 - (bins.astype(np.float32) - 1.0) / (depth_bins.NUM_BINS - 1)
    else:
        lo, hi = c.range
        t = 1.0 - (depth.astype(np.float32) - lo) / (hi - lo)
    return np.where(valid, t, np.nan)


def depth_legend(preset: str, units: str, fx: float | None, c: DepthColouring, height: int,
                 width: int) -> Image.Image:
    """A vertical turbo bar with 5 labelled depths, sized to the picture."""
    size = legend_scale(height, width)
    bar_h = max(4 * size, min(height - 2 * size, 12 * size))
    ts = np.linspace(1.0, 0.0, 5)  # top = near
    if c.range is None:
        edges = depth_bins.bin_edges(preset, fx)
        values = [edges[int(round((1 - t) * depth_bins.NUM_BINS))] for t in ts]
    else:
        values = [c.range[0] + (1 - t) * (c.range[1] - c.range[0]) for t in ts]
    f = _font(size)
    labels = [f"{v:.3g}" for v in values]
    text_w = max(int(f.getlength(s)) for s in labels + [units])
    pad = size // 2
    img = Image.new("RGBA", (pad * 3 + size + text_w, bar_h + 2 * size + pad), (255, 255, 255, 200))
    ramp = turbo(np.linspace(1.0, 0.0, bar_h))[:, None, :].repeat(size, 1)
    img.paste(Image.fromarray(ramp), (pad, size))
    d = ImageDraw.Draw(img)
    for t, s in zip(ts, labels):
        y = size + int(round((1 - t) * (bar_h - 1)))
        d.text((pad * 2 + size, y - size // 2), s, fill=(0, 0, 0), font=f)
    d.text((pad, bar_h + size + pad // 2), units, fill=(0, 0, 0), font=f)
    return img


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
    font = _font(size)

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


# ---------------------------------------------------------------- files and sets
Writer = Callable[[BinaryIO], object]


@dataclass
class Artifact:
    """One file of a result set: its name in the output folder and what streams its bytes."""

    name: str
    write: Writer


def npy(array: np.ndarray) -> Writer:
    return lambda f: np.save(f, array, allow_pickle=False)


def text(s: str) -> Writer:
    return lambda f: f.write(s.encode("utf-8"))


def json_file(obj) -> Writer:
    return lambda f: f.write((json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if isinstance(o, np.integer):
        return int(o)
    if isinstance(o, np.floating):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


_UMASK = os.umask(0o022)
os.umask(_UMASK)


def write_set(out_dir: str | Path, artifacts: Sequence[Artifact]) -> list[Path]:
    """Write every artifact, or none: temporary files first, then one rename each with
    SIGINT/SIGTERM held until all are in place. Any failure (disk full, permission, an
    interrupt while writing) removes the temporary files and raises; earlier sets are kept."""
    out_dir = Path(out_dir)
    temps: list[tuple[str, Path]] = []
    try:
        for a in artifacts:
            final = out_dir / a.name  # a name may hold subfolders (inputs that share a stem)
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            temps.append((tmp, final))
            # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask).
            os.fchmod(fd, 0o666 & ~_UMASK)
            with os.fdopen(fd, "wb") as f:
                a.write(f)
                f.flush()
                os.fsync(f.fileno())
        with _signals_held():
            for tmp, final in temps:
                os.replace(tmp, final)
        return [final for _, final in temps]
    except OSError as e:
        raise OutputError(_describe(e, out_dir)) from None
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _describe(e: OSError, out_dir: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing into {out_dir}; nothing of this image was kept"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write into {out_dir}: {e.strerror}"
    return f"cannot write into {out_dir}: {e.strerror or e}"


class _signals_held:
    """SIGINT/SIGTERM are delivered after the block, not inside it (main thread, POSIX)."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self.active = hasattr(signal, "pthread_sigmask")
        if self.active:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def __exit__(self, *exc):
        if self.active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return False


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove a file can be made in it, before any work is done."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".densert-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(_describe(e, out) if e.errno != errno.ENOTDIR and e.errno != errno.EEXIST
                          else f"cannot create output directory {out}: {e.strerror}") from None
    return out


@contextlib.contextmanager
def no_empty_out(out_dir):
    """Around a whole run: an output folder the run created (with its subfolders) is removed
    again if the run leaves nothing in it, so a failed run leaves no empty ``--out`` behind."""
    out = Path(out_dir)
    top = None  # the outermost folder the run may create (``--out a/b``: a, when a is new)
    for p in (out, *out.parents):
        if p.exists():
            break
        top = p
    try:
        yield
    finally:
        if top is not None and top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only an empty folder goes
            with contextlib.suppress(OSError):
                top.rmdir()


def output_stems(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """A unique output stem per input, in input order. Inputs whose stems collide keep their path
    relative to the inputs' common folder (``a/img``, ``b/img``: subfolders of the output), files
    that differ only in their extension keep it (``x_png``, ``x_bmp``), and a file given twice is
    numbered (``x-2``). Returns the stems and one note per renamed input."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved])) if paths else Path(".")
    groups: dict[str, set[Path]] = {}
    for p, r in zip(paths, resolved):
        groups.setdefault(p.stem, set()).add(r)
    stems, notes, seen = [], [], {}
    for p, r in zip(paths, resolved):
        s = p.stem
        if len(groups[s]) > 1:
            same_dir = sum(q.parent == r.parent for q in groups[s]) > 1
            s = r.relative_to(root).with_suffix("").as_posix()
            if same_dir:
                s += f"_{p.suffix.lstrip('.').lower()}"
            notes.append(f"{p} shares the name {p.stem!r} with another input: its results are "
                         f"named {s}.*")
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            s = f"{s}-{seen[s]}"
            notes.append(f"{p} is given more than once: results {s}.*")
        stems.append(s)
    return stems, notes
