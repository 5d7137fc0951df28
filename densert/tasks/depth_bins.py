"""Depth quantisation to the 1..1000 bin ids of DenseMLLM, and back (method spec sec. 2, App. D.3).

This is the single definition shared by the trainer (targets) and the runtime (dequantiser), and
the one place the preset names are spelled ("open-world", "nyuv2", "cityscapes", "ddad").

Conventions (chosen here; the paper fixes only the ranges and linear/log spacing):

* ``NUM_BINS = 1000`` bins numbered 1..1000; bin 0 means invalid / ignored (``<custom_0>``).
* A preset maps depth ``d`` to a unit coordinate ``u`` in [0, 1]:
  linear ``u = (d - dmin) / (dmax - dmin)``; log ``u = (ln d - ln dmin) / (ln dmax - ln dmin)``.
* Bin ``b`` covers ``u`` in ``[(b-1)/1000, b/1000)``; ``u == 1`` (``d == dmax``) falls in bin 1000:
  ``b = clip(floor(1000 * u) + 1, 1, 1000)``.
* Dequantisation returns the bin centre ``u = (b - 0.5) / 1000`` (for log bins the geometric centre),
  so a round trip is within half a bin: ``|dq(q(d)) - d| <= (dmax - dmin) / 2000`` (linear), or
  ``|ln dq(q(d)) - ln d| <= ln(dmax / dmin) / 2000`` (log).
* Depth that is non-finite, ``<= 0`` or outside ``[dmin, dmax]`` gets bin 0 (the paper says so for
  the open-world preset; we do the same for the linear presets rather than pile far depth into bin
  1000). ``clip=True`` clamps into the range instead.
* Open world: the paper rescales the *image* to a 2000 px focal length, leaving metric depth as is.
  Equivalently (same apparent object sizes), keep the image and use the *canonical depth*
  ``d * 2000 / fx``. ``quantize(..., fx=f)`` and ``dequantize(..., fx=f)`` do that conversion;
  ``fx=None`` means the image already has a 2000 px focal length. Linear presets ignore ``fx``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from densert.errors import OptionError

NUM_BINS = 1000
INVALID_BIN = 0
CANONICAL_FOCAL = 2000.0


@dataclass(frozen=True)
class DepthPreset:
    name: str
    spacing: str  # "linear" | "log"
    dmin: float
    dmax: float
    # Focal length (px) the quantisation assumes; None = metric depth independent of the camera.
    focal: float | None = None
    # Dataset name as the prompt spells it (densert.tasks.prompts.depth); None = open world.
    dataset: str | None = None


OPEN_WORLD = "open-world"
PRESETS: dict[str, DepthPreset] = {
    OPEN_WORLD: DepthPreset(OPEN_WORLD, "log", 0.5, 100.0, focal=CANONICAL_FOCAL),
    "nyuv2": DepthPreset("nyuv2", "linear", 0.0, 10.0, dataset="NYUv2"),
    "cityscapes": DepthPreset("cityscapes", "linear", 0.0, 80.0, dataset="Cityscapes"),
    "ddad": DepthPreset("ddad", "linear", 0.05, 120.0, dataset="DDAD"),
}


def default_preset(task_defaults: dict) -> str:
    """The preset a model directory declares (its task_defaults.json, ``{"depth": {"preset": P}}``),
    else open world: the rule the CLI applies before the model loads and the predictor after."""
    return (task_defaults.get("depth") or {}).get("preset") or OPEN_WORLD


def get_preset(preset: str | DepthPreset) -> DepthPreset:
    if isinstance(preset, DepthPreset):
        return preset
    if not isinstance(preset, str) or preset not in PRESETS:
        raise OptionError(f"preset: unknown depth preset {preset!r}; expected one of "
                          f"{tuple(PRESETS)}")
    return PRESETS[preset]


def _focal_factor(p: DepthPreset, fx: float | None) -> float:
    """Multiplier from metric depth to the depth the preset quantises."""
    if p.focal is None or fx is None:
        return 1.0
    if not fx > 0:
        raise ValueError(f"focal length fx must be > 0 for preset {p.name!r}, got {fx}")
    return p.focal / float(fx)


def _to_unit(d: np.ndarray, p: DepthPreset) -> np.ndarray:
    if p.spacing == "linear":
        return (d - p.dmin) / (p.dmax - p.dmin)
    return (np.log(d) - np.log(p.dmin)) / (np.log(p.dmax) - np.log(p.dmin))


def _from_unit(u: np.ndarray, p: DepthPreset) -> np.ndarray:
    if p.spacing == "linear":
        return p.dmin + u * (p.dmax - p.dmin)
    return np.exp(np.log(p.dmin) + u * (np.log(p.dmax) - np.log(p.dmin)))


def quantize(depth, preset: str | DepthPreset = OPEN_WORLD, fx: float | None = None, clip: bool = False) -> np.ndarray:
    """Metric depth (any shape, metres) -> int64 bins 1..1000, 0 where invalid/out of range."""
    p = get_preset(preset)
    d = np.asarray(depth, dtype=np.float64) * _focal_factor(p, fx)
    with np.errstate(invalid="ignore", divide="ignore"):
        valid = np.isfinite(d) & (d > 0)
        if clip:
            d = np.clip(d, max(p.dmin, 1e-12), p.dmax)
        else:
            valid &= (d >= p.dmin) & (d <= p.dmax)
        u = _to_unit(np.where(valid, d, max(p.dmin, 1e-6)), p)
    bins = np.clip(np.floor(u * NUM_BINS).astype(np.int64) + 1, 1, NUM_BINS)
    return np.where(valid, bins, INVALID_BIN)


def dequantize(bins, preset: str | DepthPreset = OPEN_WORLD, fx: float | None = None) -> np.ndarray:
    """Bins (any shape, 0..1000) -> float32 metric depth at bin centres, 0 for bin 0."""
    p = get_preset(preset)
    b = np.asarray(bins)
    if b.size and (b.min() < 0 or b.max() > NUM_BINS):
        raise ValueError(f"depth bins must lie in 0..{NUM_BINS}, got range {b.min()}..{b.max()}")
    d = _from_unit((b.astype(np.float64) - 0.5) / NUM_BINS, p) / _focal_factor(p, fx)
    return np.where(b > 0, d, 0.0).astype(np.float32)


def bin_centers(preset: str | DepthPreset = OPEN_WORLD, fx: float | None = None) -> np.ndarray:
    """float32 [1000]: metric depth of bins 1..1000 (entry i is bin i+1); a lookup table for runtimes."""
    return dequantize(np.arange(1, NUM_BINS + 1), preset, fx)


def bin_edges(preset: str | DepthPreset = OPEN_WORLD, fx: float | None = None) -> np.ndarray:
    """float64 [1001]: metric depth of the bin boundaries; bin b spans edges[b-1]..edges[b]."""
    p = get_preset(preset)
    return _from_unit(np.arange(NUM_BINS + 1) / NUM_BINS, p) / _focal_factor(p, fx)


def open_world_resize_factor(fx: float) -> float:
    """Image scale that brings a focal length ``fx`` to the open-world 2000 px (the paper's route)."""
    if not fx > 0:
        raise ValueError(f"focal length fx must be > 0, got {fx}")
    return CANONICAL_FOCAL / float(fx)
