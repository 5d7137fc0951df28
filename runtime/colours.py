"""How results look: colour maps, palettes and the legends drawn into pictures.

Depth uses turbo (near = red) over the preset's own bins by default, so maps of different frames
and images compare; ``range=(lo, hi)`` in metres fixes a linear range instead. Segmentation
colours are keyed by class name (stable across runs and class lists), background black. Legends
are sized to the picture (``legend_scale``) so they read on 1080p and on 24 MP alike.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from densert.tasks import depth_bins
from densert.text import tokens

BACKGROUND_NAMES = (tokens.OTHERS, tokens.BG)
BACKGROUND_COLOUR = (0, 0, 0)


# ---------------------------------------------------------------- colour maps
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


# ---------------------------------------------------------------- class palettes
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
def legend_font(size: int):
    """PIL's default font at ``size`` px (legends and box labels)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # a Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def legend_scale(height: int, width: int) -> int:
    """Text height in px for a picture of this size: readable on 1080p and on 24 MP alike."""
    return int(max(11, min(height, width) / 45))


def class_legend(class_names: Sequence[str], present: Sequence[int], size: int) -> Image.Image:
    """An RGBA box listing the present classes with their colours."""
    f = legend_font(size)
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
    f = legend_font(size)
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
