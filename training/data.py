"""Per-vision-token training targets, referring crops and rendered-scene datasets (datasets on
disk: ``userdata``).

Token grid: an image whose sides are multiples of ``CELL`` (32 px) gives gh x gw = H/32 x W/32
merged vision tokens in raster order; token ``i = row * gw + col`` covers pixel rows
``32*row .. 32*row+31`` and columns ``32*col .. 32*col+31`` (method spec sec. 1).

Targets follow NTP-M (method spec sec. 3): a token's positives are *every* class / depth bin /
FG-BG label occurring in its cell. They are returned as ``TokenTargets``: a LongTensor
``[L, Pmax]`` of class indices, bin numbers (1..1000) or FG/BG indices (0 = BG, 1 = FG), sorted
ascending per row and padded with -1, plus a per-token validity mask (False where the cell has no
valid pixel, e.g. sky for depth, ignore label for segmentation). Mapping these indices to
vocabulary ids is the tokenizer side's job.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch
from PIL import Image

from densert.image import BLOCK
from densert.tasks import DENSE_TASKS, grounding
from densert.tasks.depth_bins import NUM_BINS, get_preset, quantize
from densert.tasks.grounding import REFER_PADDING

from .classes import BG, CLASS_NAMES, FG, IGNORE_LABEL, NUM_CLASSES
from .config import SCENE_KINDS
from .scenes import Intrinsics, Scene, render_scene

CELL = BLOCK  # pixels per side of one merged vision token
PAD = -1
TRAIN_SEED_BASE = 0
EVAL_SEED_BASE = 1_000_000  # held-out split: train seeds must stay below this
TASKS = (*DENSE_TASKS, "all")  # "all": segment and depth targets of one scene


# --------------------------------------------------------------------------------------------
# Token targets
# --------------------------------------------------------------------------------------------

@dataclass
class TokenTargets:
    indices: torch.Tensor  # int64 [L, Pmax], ascending per row, PAD = -1
    valid: torch.Tensor  # bool [L]
    grid: tuple[int, int]  # (gh, gw)
    median: torch.Tensor | None = None  # int64 [L], depth only: bin of the cell's median depth, 0 = invalid
    majority: torch.Tensor | None = None  # int64 [L], classes / FG-BG: most frequent index, PAD if none

    def multi_hot(self, num: int) -> torch.Tensor:
        """bool [L, num] dense form (num = class count, NUM_BINS + 1, or 2 for FG/BG)."""
        out = torch.zeros(self.indices.shape[0], num + 1, dtype=torch.bool)
        out.scatter_(1, torch.where(self.indices >= 0, self.indices, num), True)
        return out[:, :num]


def token_grid(height: int, width: int, cell: int = CELL) -> tuple[int, int]:
    if height % cell or width % cell or height <= 0 or width <= 0:
        raise ValueError(f"image size {height}x{width} is not a positive multiple of the {cell}-px token cell; "
                         f"resize first (fit_to_multiple)")
    return height // cell, width // cell


def _cells(a: np.ndarray, cell: int) -> np.ndarray:
    """[H, W] -> [L, cell*cell], tokens in raster order."""
    gh, gw = token_grid(a.shape[0], a.shape[1], cell)
    return a.reshape(gh, cell, gw, cell).transpose(0, 2, 1, 3).reshape(gh * gw, cell * cell)


def padded_indices(present: np.ndarray) -> torch.Tensor:
    """bool [L, K] -> int64 [L, Pmax] column indices of the True entries, ascending, padded with -1."""
    present = np.asarray(present, dtype=bool)
    counts = present.sum(1)
    pmax = max(int(counts.max(initial=0)), 1)
    rows, cols = np.nonzero(present)  # row-major, so cols ascend within each row
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
    slot = np.arange(len(rows)) - starts[rows]
    out = np.full((present.shape[0], pmax), PAD, dtype=np.int64)
    out[rows, slot] = cols
    return torch.from_numpy(out)


def _cell_presence(values: np.ndarray, valid: np.ndarray, num: int, cell: int, min_fraction: float):
    """Per-cell histogram of integer values in [0, num) over valid pixels
    -> (present [L, num], valid [L], most frequent value [L] (PAD where no valid pixel))."""
    v = _cells(values, cell)
    ok = _cells(valid, cell)
    n_cells = v.shape[0]
    flat = (np.arange(n_cells)[:, None] * num + v)[ok]
    counts = np.bincount(flat, minlength=n_cells * num).reshape(n_cells, num)
    n_valid = ok.sum(1)
    present = counts > 0
    if min_fraction > 0:
        present &= counts >= min_fraction * np.maximum(n_valid, 1)[:, None]
        # A valid cell always keeps at least its most frequent value as a positive.
        present |= (counts == counts.max(1, keepdims=True)) & (n_valid > 0)[:, None]
    majority = np.where(n_valid > 0, counts.argmax(1), PAD)
    return present, n_valid > 0, torch.from_numpy(majority.astype(np.int64))


def segmentation_targets(labels: np.ndarray, num_classes: int = NUM_CLASSES, cell: int = CELL,
                         min_fraction: float = 0.0, ignore_index: int = IGNORE_LABEL) -> TokenTargets:
    """Multi-hot class sets per token from a label map [H, W] of class indices.

    ``min_fraction``: a class counts for a token when it covers at least this share of the cell's
    labelled pixels (0 = any pixel, the paper's "occurs in the region").
    """
    lab = np.asarray(labels)
    if lab.ndim != 2:
        raise ValueError(f"labels must be [H, W], got shape {lab.shape}")
    lab = lab.astype(np.int64)
    valid = lab != ignore_index
    bad = valid & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        raise ValueError(f"label values {np.unique(lab[bad])[:10].tolist()} outside 0..{num_classes - 1} "
                         f"(ignore index {ignore_index})")
    present, ok, major = _cell_presence(np.where(valid, lab, 0), valid, num_classes, cell, min_fraction)
    return TokenTargets(padded_indices(present), torch.from_numpy(ok), token_grid(*lab.shape, cell),
                        majority=major)


def depth_targets(depth: np.ndarray, preset: str = "nyuv2", fx: float | None = None, cell: int = CELL,
                  min_fraction: float = 0.0) -> TokenTargets:
    """Multi-hot depth-bin sets per token (bins 1..1000) plus the median bin per token.

    Pixels with depth 0 / non-finite / outside the preset range are ignored (bin 0). The median is
    the lower median of the cell's valid pixel bins (quantisation is monotone, so this is the bin
    of the median depth).
    """
    d = np.asarray(depth)
    if d.ndim != 2:
        raise ValueError(f"depth must be [H, W], got shape {d.shape}")
    bins = quantize(d, preset, fx)
    valid = bins > 0
    present, ok, _ = _cell_presence(bins, valid, NUM_BINS + 1, cell, min_fraction)
    present[:, 0] = False
    cb = np.sort(np.where(_cells(valid, cell), _cells(bins, cell), NUM_BINS + 1), axis=1)
    n = _cells(valid, cell).sum(1)
    median = np.where(n > 0, np.take_along_axis(cb, np.maximum(n - 1, 0)[:, None] // 2, 1)[:, 0], 0)
    return TokenTargets(padded_indices(present), torch.from_numpy(ok), token_grid(*d.shape, cell),
                        torch.from_numpy(median.astype(np.int64)))


def fgbg_targets(fg: np.ndarray, cell: int = CELL, ignore: np.ndarray | None = None) -> TokenTargets:
    """FG/BG sets per token from a foreground mask: index 0 = BG, 1 = FG (both if the cell straddles)."""
    m = np.asarray(fg).astype(bool)
    valid = np.ones_like(m) if ignore is None else ~np.asarray(ignore, dtype=bool)
    present, ok, major = _cell_presence(np.where(m, FG, BG), valid, 2, cell, 0.0)
    return TokenTargets(padded_indices(present), torch.from_numpy(ok), token_grid(*m.shape, cell),
                        majority=major)


# --------------------------------------------------------------------------------------------
# Resizing and augmentation
# --------------------------------------------------------------------------------------------

def resize_array(a: np.ndarray, size_hw: tuple[int, int], nearest: bool) -> np.ndarray:
    """[H, W(, C)] -> size_hw: nearest for labels, masks and depth (no values invented between
    neighbours), bilinear (PIL) otherwise."""
    h, w = size_hw
    if a.shape[:2] == (h, w):
        return a
    resample = Image.NEAREST if nearest else Image.BILINEAR
    if a.ndim == 3:
        return np.array(Image.fromarray(a).resize((w, h), resample))
    if a.dtype == np.bool_:
        return np.array(Image.fromarray(a.astype(np.uint8)).resize((w, h), resample)).astype(bool)
    mode_dtype = np.float32 if a.dtype.kind == "f" else np.int32
    return np.asarray(Image.fromarray(a.astype(mode_dtype)).resize((w, h), resample)).astype(a.dtype)


def fit_to_multiple(height: int, width: int, multiple: int = CELL) -> tuple[int, int]:
    """Nearest size with both sides positive multiples of ``multiple``."""
    return max(multiple, round(height / multiple) * multiple), max(multiple, round(width / multiple) * multiple)


def color_jitter(image: np.ndarray, rng: np.random.Generator, brightness=0.25, contrast=0.25,
                 saturation=0.25) -> np.ndarray:
    x = image.astype(np.float32)
    x *= 1 + rng.uniform(-brightness, brightness)
    mean = x.mean()
    x = mean + (x - mean) * (1 + rng.uniform(-contrast, contrast))
    grey = x.mean(-1, keepdims=True)
    x = grey + (x - grey) * (1 + rng.uniform(-saturation, saturation))
    return np.clip(x + 0.5, 0, 255).astype(np.uint8)


def cutout(image: np.ndarray, depth: np.ndarray | None, rng: np.random.Generator, max_frac: float = 0.3):
    """Grey out a random rectangle; its depth becomes invalid since nothing there is observable."""
    h, w = image.shape[:2]
    ch, cw = int(h * rng.uniform(0.1, max_frac)), int(w * rng.uniform(0.1, max_frac))
    y, x = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
    image = image.copy()
    image[y:y + ch, x:x + cw] = 128
    if depth is not None:
        depth = depth.copy()
        depth[y:y + ch, x:x + cw] = 0
    return image, depth


# --------------------------------------------------------------------------------------------
# Referring crops: the runtime's crop (densert.tasks.grounding.referring_crop) of one instance
# --------------------------------------------------------------------------------------------

@dataclass
class ReferringCrop:
    image: np.ndarray  # uint8 [h, w, 3] crop with the box drawn
    fg: np.ndarray  # bool [h, w]
    box: tuple[float, float, float, float]  # x0, y0, x1, y1 (exclusive) of the object in crop pixels
    instance_id: int
    class_id: int
    color: tuple[int, int, int]


def instance_box(instances: np.ndarray, instance_id: int) -> tuple[int, int, int, int]:
    ys, xs = np.nonzero(instances == instance_id)
    if ys.size == 0:
        raise ValueError(f"instance {instance_id} has no visible pixels")
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def pick_instance(scene: Scene, rng: np.random.Generator, min_pixels: int = 64) -> int | None:
    """A random visible object instance with at least ``min_pixels`` pixels, or None."""
    ids, counts = np.unique(scene.instances, return_counts=True)
    ok = ids[(ids > 0) & (counts >= min_pixels)]
    return None if ok.size == 0 else int(ok[rng.integers(ok.size)])


def referring_crop(image: np.ndarray, instances: np.ndarray, instance_id: int, rng: np.random.Generator,
                   short_side: int = 256, pad: float = REFER_PADDING, multiple: int = CELL,
                   instance_classes: dict[int, int] | None = None) -> ReferringCrop:
    """The runtime's referring crop around one instance's box, resized so the short side is
    ``short_side`` and the long side the nearest multiple of ``multiple``, with its fg mask."""
    if short_side % multiple:
        raise ValueError(f"short_side {short_side} must be a multiple of {multiple}")
    box = instance_box(instances, instance_id)
    crop = grounding.referring_crop(image, box, rng, pad, short_side, multiple=multiple)
    a0, b0, a1, b1 = crop.box
    h, w = crop.image.shape[:2]
    sy, sx = h / (b1 - b0), w / (a1 - a0)
    x0, y0, x1, y1 = box
    out_box = ((x0 - a0) * sx, (y0 - b0) * sy, (x1 - a0) * sx, (y1 - b0) * sy)
    cls = -1 if instance_classes is None else instance_classes[instance_id]
    return ReferringCrop(crop.image, crop.take(instances == instance_id), out_box, instance_id, cls,
                         crop.color)


# --------------------------------------------------------------------------------------------
# Datasets
# --------------------------------------------------------------------------------------------

def split_seeds(split: str, n: int) -> range:
    """Seed convention: train = 0..n-1, eval (held out) = 1_000_000 .. 1_000_000 + n - 1."""
    if split == "train":
        if n > EVAL_SEED_BASE:
            raise ValueError(f"at most {EVAL_SEED_BASE} train seeds, got {n}")
        return range(TRAIN_SEED_BASE, TRAIN_SEED_BASE + n)
    if split == "eval":
        return range(EVAL_SEED_BASE, EVAL_SEED_BASE + n)
    raise ValueError(f"split must be 'train' or 'eval', got {split!r}")


def _auto_preset(kind: str, preset: str) -> str:
    if preset != "auto":
        return get_preset(preset).name
    return "nyuv2" if kind == "indoor" else "cityscapes"


def _depth_fx(preset: str, k: Intrinsics) -> float | None:
    return k.fx if get_preset(preset).focal is not None else None


class SceneDataset(torch.utils.data.Dataset):
    """Rendered on the fly: item ``i`` is ``render_scene(seeds[i], H, W, kind)``, so a dataset is
    fully described by its seeds and settings (no files).

    task: "segment" (class sets), "depth" (bin sets + median bin), "all" (both), "refer" (crop of a
    random object with its box drawn, FG/BG sets). depth_preset: "auto" = NYUv2 indoors, Cityscapes
    outdoors; "open-world" quantises the canonical depth d * 2000 / fx.
    augment: colour jitter always; horizontal flip for "segment" only and cutout for "depth" only
    (the method applies no flip/resize to depth). Augmentation is seeded by (seed, epoch):
    call ``set_epoch`` to vary it between epochs.
    """

    def __init__(self, seeds: int | Sequence[int], size: int | tuple[int, int] = 256, kind: str = "any",
                 task: str = "all", depth_preset: str = "auto", augment: bool = False, cell: int = CELL,
                 min_fraction: float = 0.0, crop_short_side: int | None = None):
        self.seeds = range(seeds) if isinstance(seeds, int) else seeds
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        token_grid(*self.size, cell)
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if kind not in SCENE_KINDS:
            raise ValueError(f"kind must be one of {SCENE_KINDS}, got {kind!r}")
        if depth_preset != "auto":
            get_preset(depth_preset)
        self.kind, self.task, self.depth_preset, self.augment = kind, task, depth_preset, augment
        self.cell, self.min_fraction = cell, min_fraction
        self.crop_short_side = crop_short_side or min(self.size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        seed = int(self.seeds[i])
        scene = render_scene(seed, self.size[0], self.size[1], self.kind)
        rng = np.random.default_rng([seed, 0xA06, self.epoch])
        image = color_jitter(scene.image, rng) if self.augment else scene.image
        item: dict[str, Any] = {"seed": seed, "kind": scene.kind,
                                "intrinsics": torch.from_numpy(scene.intrinsics.as_array())}
        if self.task == "refer":
            return item | self._referring(scene, image, rng)
        depth, labels = scene.depth, scene.labels
        if self.augment and self.task == "segment" and rng.random() < 0.5:
            image, labels = image[:, ::-1].copy(), labels[:, ::-1].copy()
        if self.augment and self.task == "depth" and rng.random() < 0.5:
            image, depth = cutout(image, depth, rng)
        item |= {"image": torch.from_numpy(np.ascontiguousarray(image)), "depth": torch.from_numpy(depth),
                 "labels": torch.from_numpy(labels.astype(np.int64))}
        if self.task in ("segment", "all"):
            t = segmentation_targets(labels, NUM_CLASSES, self.cell, self.min_fraction)
            item |= {"seg_targets": t.indices, "seg_valid": t.valid}
        if self.task in ("depth", "all"):
            preset = _auto_preset(scene.kind, self.depth_preset)
            t = depth_targets(depth, preset, _depth_fx(preset, scene.intrinsics), self.cell, self.min_fraction)
            item |= {"depth_targets": t.indices, "depth_valid": t.valid, "depth_median": t.median,
                     "depth_preset": preset}
        return item

    def _referring(self, scene: Scene, image: np.ndarray, rng) -> dict[str, Any]:
        inst = pick_instance(scene, rng)
        if inst is None:  # nothing visible: the whole image is background, still a valid sample
            fg = np.zeros(scene.labels.shape, bool)
            crop = ReferringCrop(image, fg, (0.0, 0.0, 0.0, 0.0), 0, -1, (0, 0, 0))
        else:
            crop = referring_crop(image, scene.instances, inst, rng, self.crop_short_side,
                                  multiple=self.cell, instance_classes=scene.instance_classes)
        t = fgbg_targets(crop.fg, self.cell)
        return {"image": torch.from_numpy(np.ascontiguousarray(crop.image)), "fg": torch.from_numpy(crop.fg),
                "box": torch.tensor(crop.box, dtype=torch.float32), "class_id": crop.class_id,
                "class_name": CLASS_NAMES[crop.class_id] if crop.class_id >= 0 else None,
                "fgbg_targets": t.indices, "fgbg_valid": t.valid}


def collate_scenes(batch: list[dict[str, Any]]) -> dict[str, Any]:
    """Stack equal-shape tensors; pad [L, P] target tensors to the batch's largest P with -1;
    keep everything else (strings, ints, unequal images) as lists."""
    out: dict[str, Any] = {}
    for key in batch[0]:
        vals = [b[key] for b in batch]
        if not all(isinstance(v, torch.Tensor) for v in vals):
            out[key] = vals
        elif all(v.shape == vals[0].shape for v in vals):
            out[key] = torch.stack(vals)
        elif key.endswith("_targets") and all(v.ndim == 2 and v.shape[0] == vals[0].shape[0] for v in vals):
            p = max(v.shape[1] for v in vals)
            out[key] = torch.stack([torch.nn.functional.pad(v, (0, p - v.shape[1]), value=PAD) for v in vals])
        else:
            out[key] = vals
    return out
