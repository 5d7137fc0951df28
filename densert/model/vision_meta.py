"""Host-side metadata of the vision tower, computed once per image size, in one place.

Everything here depends only on the patch grid(s) and the vision config, never on pixels:
2-D RoPE cos/sin, the window permutation and its inverse, the padded window layout (which patch
sits in which slot of which window) and the image segments. The torch model consumes it
directly; the ONNX graphs take the same tensors as inputs, so one exported graph serves every
image size (spec ``youtu-vl-checkpoint.md`` sec. 4).

Window attention runs on W windows of ``window_slot_count`` slots each (8x8 merged cells = 256
patches at the released geometry): ``window_slots`` gathers the window-ordered patches into that
padded [W, S] layout (slot value N = an empty slot), ``window_inverse`` gathers them back. So the
attention of a windowed layer costs N x S, never N x N.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import VisionConfig


@dataclass
class VisionMeta:
    """Per-batch metadata; N = total patches, M = N / 4 merged cells."""

    grids: list[tuple[int, int]]      # (gh, gw) in patches, per image
    cos: torch.Tensor                 # [N, head_dim] float32, rows in *window* order
    sin: torch.Tensor                 # [N, head_dim]
    window_index: torch.Tensor        # [M] int64: merged cell taken at each window-order slot
    reverse_index: torch.Tensor       # [M] int64: argsort(window_index)
    window_seqlens: list[int]         # patches per attention window (zeros dropped), window order
    image_seqlens: list[int]          # patches per image (full-attention segments)
    window_slots: torch.Tensor        # [W*S] int64: window-order patch in each slot, N = empty
    window_inverse: torch.Tensor      # [N] int64: slot of each window-order patch
    image_segment_ids: torch.Tensor   # [N] int64: image id of each patch (window order)

    def to(self, device) -> "VisionMeta":
        def t(x):
            return x.to(device)

        return VisionMeta(self.grids, t(self.cos), t(self.sin), t(self.window_index),
                          t(self.reverse_index), self.window_seqlens, self.image_seqlens,
                          t(self.window_slots), t(self.window_inverse), t(self.image_segment_ids))


def merge_block_positions(gh: int, gw: int, merge: int) -> torch.Tensor:
    """(row, col) of every patch in merge-block order: 2x2 blocks in raster order, TL TR BL BR."""
    hpos = torch.arange(gh).view(gh // merge, merge, 1, 1).expand(-1, -1, gw // merge, merge)
    wpos = torch.arange(gw).view(1, 1, gw // merge, merge).expand(gh // merge, merge, -1, -1)
    # [bh, mh, bw, mw] -> [bh, bw, mh, mw]
    hpos = hpos.permute(0, 2, 1, 3).reshape(-1)
    wpos = wpos.permute(0, 2, 1, 3).reshape(-1)
    return torch.stack([hpos, wpos], dim=-1)


def rope_inv_freq(cfg: VisionConfig) -> torch.Tensor:
    """head_dim/4 frequencies theta^(-2j/(head_dim/2)); rows and columns each get all of them."""
    dim = cfg.head_dim // 2
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))


def rope_angles(gh: int, gw: int, cfg: VisionConfig) -> torch.Tensor:
    """[gh*gw, head_dim/2] angles in merge-block order: row angles then column angles."""
    pos = merge_block_positions(gh, gw, cfg.spatial_merge_size).to(torch.float64)
    inv = rope_inv_freq(cfg)
    return torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], dim=-1)


def window_index(gh: int, gw: int, cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Merged-cell permutation into 8x8-cell windows and the patch count of each window.

    Windows are taken in raster order over the merged grid padded up to a whole number of
    windows; cells inside a window in raster order; padding skipped. Same algorithm as
    Qwen2.5-VL's ``get_window_index`` (tested against it).
    """
    m, ws = cfg.spatial_merge_size, cfg.window_cells
    lh, lw = gh // m, gw // m
    nh, nw = -(-lh // ws), -(-lw // ws)
    idx = torch.full((nh * ws, nw * ws), -1, dtype=torch.int64)
    idx[:lh, :lw] = torch.arange(lh * lw).view(lh, lw)
    idx = idx.view(nh, ws, nw, ws).permute(0, 2, 1, 3).reshape(nh * nw, ws * ws)
    valid = idx >= 0
    counts = valid.sum(-1)
    return idx[valid], [int(c) * cfg.merge_unit for c in counts if c > 0]


def window_slot_count(cfg: VisionConfig) -> int:
    """Slots of one padded window: window_cells^2 merged cells of merge_unit patches (256)."""
    return cfg.window_cells ** 2 * cfg.merge_unit


def window_layout(window_seqlens: list[int], cfg: VisionConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """(window_slots [W*S], window_inverse [N]) of windows that are contiguous runs of the
    window-ordered patches, of the given lengths."""
    S = window_slot_count(cfg)
    lens = torch.tensor(window_seqlens, dtype=torch.int64)
    n, w = int(lens.sum()), len(window_seqlens)
    starts = torch.cumsum(lens, 0) - lens
    j = torch.arange(S)
    slots = torch.where(j[None, :] < lens[:, None], starts[:, None] + j[None, :], n).reshape(-1)
    win = torch.repeat_interleave(torch.arange(w), lens)
    inverse = win * S + (torch.arange(n) - starts[win])
    return slots, inverse


def window_count(gh: int, gw: int, cfg: VisionConfig) -> int:
    m, ws = cfg.spatial_merge_size, cfg.window_cells
    return -(-(gh // m) // ws) * -(-(gw // m) // ws)


def max_window_slots(max_patches: int, cfg: VisionConfig,
                     grids: list[tuple[int, int]] | None = None) -> int:
    """Most window slots any one image of at most ``max_patches`` patches needs (the worst
    aspect ratio: a 1-cell-high image needs 8x its patches), or the most of ``grids``."""
    if grids:
        return max(window_count(gh, gw, cfg) for gh, gw in grids) * window_slot_count(cfg)
    return most_windows(max_patches // cfg.merge_unit, cfg.window_cells) * window_slot_count(cfg)


def most_windows(cells: int, window_cells: int) -> int:
    """Most windows of window_cells x window_cells an image of at most ``cells`` merged cells
    covers, over every aspect ratio."""
    ws = window_cells
    return max((-(-lh // ws) * -(-(cells // lh) // ws) for lh in range(1, cells + 1)), default=1)


def check_grid(gh: int, gw: int, cfg: VisionConfig) -> None:
    m = cfg.spatial_merge_size
    if gh <= 0 or gw <= 0 or gh % m or gw % m:
        raise ValueError(f"patch grid {gh}x{gw} must be positive multiples of the merge size {m}")


def build_vision_meta(grids: list[tuple[int, int]], cfg: VisionConfig) -> VisionMeta:
    """Metadata for a batch of images packed along the patch axis (one image is the usual case)."""
    angles, widx, wlens, ilens = [], [], [], []
    cell_offset = 0
    for gh, gw in grids:
        check_grid(gh, gw, cfg)
        a = rope_angles(gh, gw, cfg)
        wi, wl = window_index(gh, gw, cfg)
        # RoPE rows are permuted exactly like the hidden states: in groups of merge_unit patches.
        a = a.view(-1, cfg.merge_unit, a.shape[-1])[wi].reshape(-1, a.shape[-1])
        angles.append(a)
        widx.append(wi + cell_offset)
        wlens += wl
        ilens.append(gh * gw)
        cell_offset += gh * gw // cfg.merge_unit
    ang = torch.cat(angles)
    emb = torch.cat([ang, ang], dim=-1)
    wi = torch.cat(widx)
    slots, inverse = window_layout(wlens, cfg)
    img_seg = torch.repeat_interleave(torch.arange(len(ilens)), torch.tensor(ilens))
    return VisionMeta(grids=list(grids), cos=emb.cos().float(), sin=emb.sin().float(),
                      window_index=wi, reverse_index=torch.argsort(wi), window_seqlens=wlens,
                      image_seqlens=ilens, window_slots=slots, window_inverse=inverse,
                      image_segment_ids=img_seg)


def num_image_tokens(gh: int, gw: int, cfg: VisionConfig) -> int:
    return gh * gw // cfg.merge_unit
