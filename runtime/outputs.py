"""Files a person wants from a result: raw ``.npy``, PNG visualisations, RLE text, JSON sidecar.

Every write is atomic: the bytes go to a temporary file in the destination directory, which is
renamed over the final name only when complete, so a crash or a bad input never leaves a partial
output file. Colour maps are computed in numpy (no matplotlib needed at run time).
"""
from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

import densert

# Turbo (Google, 2019), polynomial approximation by its author (public domain): r, g, b as
# degree-5 polynomials in t.
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def turbo(t: np.ndarray) -> np.ndarray:
    """t in [0, 1] (any shape) -> uint8 RGB (shape + (3,))."""
    t = np.clip(np.asarray(t, dtype=np.float64), 0.0, 1.0)
    powers = np.stack([t ** k for k in range(6)], axis=-1)
    rgb = powers @ _TURBO.T
    return np.clip(np.rint(rgb * 255), 0, 255).astype(np.uint8)


def palette(n: int) -> np.ndarray:
    """n distinct colours [n, 3] uint8: golden-angle hues (the demo's scheme), index 0 first."""
    i = np.arange(n)
    h = (i * 137.508) % 360 / 60.0
    s = 0.7 + (i % 3) * 0.1
    v = 0.9 - (i % 4) * 0.1
    c = v * s
    x = c * (1 - np.abs(h % 2 - 1))
    z = np.zeros(n)
    sector = np.floor(h).astype(int) % 6
    r = np.choose(sector, [c, x, z, z, x, c])
    g = np.choose(sector, [x, c, c, x, z, z])
    b = np.choose(sector, [z, z, x, c, c, x])
    m = v - c
    return np.clip(np.rint(np.stack([r + m, g + m, b + m], -1) * 255), 0, 255).astype(np.uint8)


BACKGROUND_COLOUR = (0, 0, 0)


def class_colours(class_names: list[str]) -> np.ndarray:
    cols = palette(max(1, len(class_names)))
    for k, n in enumerate(class_names):
        if n in ("<OTHERS>", "<BG>"):
            cols[k] = BACKGROUND_COLOUR
    return cols


# ---------------------------------------------------------------- atomic writes
_UMASK = os.umask(0o022)
os.umask(_UMASK)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask).
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def save_npy(path, array: np.ndarray) -> Path:
    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    return atomic_write_bytes(path, buf.getvalue())


def save_png(path, rgb: np.ndarray) -> Path:
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return atomic_write_bytes(path, buf.getvalue())


def save_text(path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def save_json(path, obj) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, default=_jsonable) + "\n").encode())


def _jsonable(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, (tuple, set)):
        return list(o)
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON serialisable")


# ---------------------------------------------------------------- pictures
def _font():
    return ImageFont.load_default()


def depth_png(depth: np.ndarray, legend: bool = True) -> np.ndarray:
    """Turbo-coloured depth (near = red, far = blue; invalid = black) with a metre legend bar."""
    valid = depth > 0
    lo = float(depth[valid].min()) if valid.any() else 0.0
    hi = float(depth[valid].max()) if valid.any() else 1.0
    span = hi - lo if hi > lo else 1.0
    rgb = turbo(1.0 - (depth - lo) / span)
    rgb[~valid] = 0
    if not legend:
        return rgb
    H, W = depth.shape
    bar_w = 64
    bar = np.full((H, bar_w, 3), 255, np.uint8)
    ramp = turbo(np.linspace(1.0, 0.0, H))  # top = near (lo)
    bar[:, 8:24] = ramp[:, None, :]
    img = Image.fromarray(bar)
    d = ImageDraw.Draw(img)
    f = _font()
    d.text((26, 1), f"{lo:.2f}", fill=(0, 0, 0), font=f)
    d.text((26, max(1, H - 12)), f"{hi:.2f}", fill=(0, 0, 0), font=f)
    if H > 40:
        d.text((26, H // 2 - 6), "m", fill=(0, 0, 0), font=f)
    return np.concatenate([rgb, np.asarray(img)], axis=1)


def labels_png(labels: np.ndarray, class_names: list[str]) -> np.ndarray:
    cols = class_colours(class_names)
    return cols[np.clip(labels, 0, len(cols) - 1)]


def overlay_png(image: np.ndarray, labels: np.ndarray, class_names: list[str],
                alpha: float = 0.5) -> np.ndarray:
    """Labels blended on the image (background left clear) plus a legend of the classes present."""
    if image.shape[:2] != labels.shape:
        image = np.asarray(Image.fromarray(image).resize(labels.shape[::-1], Image.BILINEAR))
    cols = class_colours(class_names)
    out = image.astype(np.float32)
    colour = cols[np.clip(labels, 0, len(cols) - 1)].astype(np.float32)
    fg = np.isin(labels, [k for k, n in enumerate(class_names) if n not in ("<OTHERS>", "<BG>")])
    out[fg] = (1 - alpha) * out[fg] + alpha * colour[fg]
    img = Image.fromarray(np.clip(np.rint(out), 0, 255).astype(np.uint8))
    present = [k for k in np.unique(labels).tolist() if k < len(class_names)]
    if present:
        d = ImageDraw.Draw(img)
        f = _font()
        y = 2
        for k in present:
            d.rectangle([2, y, 12, y + 10], fill=tuple(int(c) for c in cols[k]), outline=(255, 255, 255))
            d.text((16, y - 1), class_names[k], fill=(255, 255, 255), font=f,
                   stroke_width=1, stroke_fill=(0, 0, 0))
            y += 14
            if y > img.height - 12:
                break
    return np.asarray(img)


def sidecar(task: str, model_dir, backend: str, source, result, extra: dict | None = None) -> dict:
    """The JSON sidecar: provenance, sizes, classes and per-stage timings of one result."""
    out = {
        "densert_version": densert.__version__,
        "task": task,
        "model": str(model_dir) if model_dir is not None else None,
        "backend": backend,
        "image": str(source),
        "original_hw": list(getattr(result, "original_hw", ()) or ()),
        "timings_s": {k: round(float(v), 6) for k, v in result.timings.items()},
    }
    if hasattr(result, "resized_hw"):
        out["resized_hw"] = list(result.resized_hw)
    out.update(extra or {})
    return out
