"""The released image processor (spec ``youtu-vl-checkpoint.md`` sec. 3), bit for bit on uint8.

decode -> target-size search -> antialiased bilinear resize on uint8 -> x/255 -> (x-0.5)/0.5 ->
16x16 patches in 2x2 merge-block order, each row (py, px, c) with c fastest.

The resize is torch's native uint8 ``interpolate(mode="bilinear", antialias=True)``: that is the
path torchvision's tensor ``resize(BILINEAR, antialias=True)`` takes for uint8 on CPU, i.e. what
the released fast image processor runs. It rounds inside its fixed-point arithmetic; doing the
resize in float and rounding afterwards differs by at most 1 grey level (tested), and PIL's
BILINEAR by a little more (measured in ``tests/test_preprocess.py``).

``upscale`` multiplies the image size *before* the search (the paper's x2-x4 evaluation
upscaling). We resample once, from the original straight to the searched size, instead of
resizing twice; the released evaluation probably resized twice, which can differ by rounding.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from densert.errors import ImageError

from . import BLOCK, DEFAULT_MAX_PATCHES, MERGE, MIN_MAX_PATCHES, PATCH
from .decode import load_rgb, probe


@dataclass
class Preprocessed:
    pixel_values: torch.Tensor          # [N, 768] float32 in [-1, 1], merge-block order
    grid: tuple[int, int]               # (gh, gw) in patches
    original_hw: tuple[int, int]        # decoded image (after EXIF orientation)
    resized_hw: tuple[int, int]         # what the vision tower saw
    # The decoded uint8 RGB image. Equal to original_hw except for huge JPEGs decoded at reduced
    # scale (decode.DRAFT_ABOVE_PIXELS); dense outputs are always at original_hw.
    image: np.ndarray

    @property
    def merged_grid(self) -> tuple[int, int]:
        return self.grid[0] // MERGE, self.grid[1] // MERGE

    @property
    def num_image_tokens(self) -> int:
        return self.grid[0] * self.grid[1] // (MERGE * MERGE)


def target_size(height: int, width: int, max_patches: int = DEFAULT_MAX_PATCHES,
                scale_factor: float = 1.0) -> tuple[int, int]:
    """The processor's size search: the largest scale (1.0 down in 0.02 steps) whose 32-aligned
    sides fit in ``max_patches`` 16x16 patches. ``scale_factor`` (upscale, focal rescale) is
    applied to the sides before the search."""
    if height <= 0 or width <= 0:
        raise ImageError(f"impossible image size {height}x{width}")
    if max_patches < MIN_MAX_PATCHES:
        raise ImageError(f"max_patches {max_patches} is below {MIN_MAX_PATCHES}: even a 32x32 "
                         "image (one merged token) needs 4 patches")
    if not scale_factor > 0:
        raise ImageError(f"scale factor {scale_factor} must be positive")
    h, w = height * scale_factor, width * scale_factor
    scale = 1.0
    while True:
        th = max(BLOCK, math.ceil(h * scale / BLOCK) * BLOCK)
        tw = max(BLOCK, math.ceil(w * scale / BLOCK) * BLOCK)
        if (th / PATCH) * (tw / PATCH) <= max_patches:
            return th, tw
        # Same float recurrence as the Python processor (0.88 is reached as 0.8799999999999999).
        scale -= 0.02
        if scale <= 0:
            raise ImageError(f"image {height}x{width} (x{scale_factor}) cannot fit in "
                             f"{max_patches} patches at any scale")


def resize_uint8(img: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """[H, W, 3] uint8 -> [h, w, 3] uint8, antialiased bilinear (torchvision semantics)."""
    if img.shape[:2] == tuple(size):
        return img
    t = torch.from_numpy(np.require(img, np.uint8, ["C", "W"])).permute(2, 0, 1)[None]
    out = F.interpolate(t, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    return out[0].permute(1, 2, 0).contiguous().numpy()


def normalize(img: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> float32 [H, W, 3] in [-1, 1]: x/255 then (x-0.5)/0.5."""
    return (torch.from_numpy(np.require(img, np.uint8, ["C", "W"])).float() / 255.0 - 0.5) / 0.5


def patchify(x: torch.Tensor) -> torch.Tensor:
    """[H, W, C] -> [N, 16*16*C]: 2x2 blocks in raster order, TL TR BL BR inside a block,
    each patch flattened (py, px, c)."""
    H, W, C = x.shape
    if H % BLOCK or W % BLOCK:
        raise ValueError(f"patchify needs sides that are multiples of {BLOCK}, got {H}x{W}")
    bh, bw = H // BLOCK, W // BLOCK
    x = x.reshape(bh, MERGE, PATCH, bw, MERGE, PATCH, C)
    # -> bh, bw, mh, mw, py, px, c
    return x.permute(0, 3, 1, 4, 2, 5, 6).reshape(bh * bw * MERGE * MERGE, PATCH * PATCH * C)


def unpatchify(p: torch.Tensor, grid: tuple[int, int], channels: int = 3) -> torch.Tensor:
    """Inverse of ``patchify``: [N, 16*16*C] with patch grid (gh, gw) -> [H, W, C]."""
    gh, gw = grid
    bh, bw = gh // MERGE, gw // MERGE
    x = p.reshape(bh, bw, MERGE, MERGE, PATCH, PATCH, channels)
    return x.permute(0, 2, 4, 1, 3, 5, 6).reshape(gh * PATCH, gw * PATCH, channels)


def preprocess(image, max_patches: int = DEFAULT_MAX_PATCHES, upscale: float = 1.0) -> Preprocessed:
    """Decode (path / bytes / PIL / array) and run the processor. ``upscale``: integer x1-x4 for
    evaluation-style upscaling, or any positive float (focal-length rescale)."""
    if isinstance(upscale, int) and not 1 <= upscale <= 4:
        raise ImageError(f"upscale x{upscale} outside the supported x1..x4")
    if _is_file(image):
        # Header first, so a huge JPEG can be decoded at reduced scale but never below target.
        orig = probe(image)
        th, tw = target_size(orig[0], orig[1], max_patches, upscale)
        img = load_rgb(image, min_side=min(th, tw))
    else:
        img = load_rgb(image)
        orig = img.shape[:2]
        th, tw = target_size(orig[0], orig[1], max_patches, upscale)
    resized = resize_uint8(img, (th, tw))
    return Preprocessed(pixel_values=patchify(normalize(resized)), grid=(th // PATCH, tw // PATCH),
                        original_hw=(int(orig[0]), int(orig[1])), resized_hw=(th, tw), image=img)


def _is_file(image) -> bool:
    return isinstance(image, (str, os.PathLike))
