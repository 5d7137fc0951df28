"""Dense maps from vision-token hidden states: the DenseMLLM decoding rules and their options.

Only the lm_head rows of the candidate ids are used (``densert.kernels.dense_head``): a
[L, d] x [d, K] GEMM, bilinear upsample, argmax. Full-vocabulary logits are never formed at
vision positions. Everything runs where the hidden states are: a GPU backend's output buffers
stay on the GPU (the Triton tail, or torch's CUDA ops without triton) and only the finished map
(labels, depth, expected codes) is copied to the host, never the scores or probabilities (the
DenseCRF refinement, a CPU library, is the one exception: it reads the probabilities). The
released decoder lives in unpublished remote code (spec sec. 9.2), so every choice it hides is a
documented field of ``DenseOptions`` (``options.py``); the defaults are ours.

Background / open set (``<OTHERS>``), precisely: with class scores s_k (mean sub-word logits,
bilinearly upsampled), p_k = sigmoid(s_k * logit_scale) (logit_scale 1/4); a pixel is background
iff max_k p_k <= background_threshold (0.5), i.e. no class *strictly* beats it; otherwise it
takes argmax_k s_k. Implemented exactly as a constant extra channel c = logit(threshold) /
logit_scale (= 0 for 0.5) in the same GEMM, so it costs no extra pass.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.weak import WeakTensorKeyDictionary

from densert.extras import require
from densert.image.preprocess import resize_uint8
from densert.kernels.dense_head import dense_head
from densert.tasks import depth_bins
from densert.tasks.rle import depth_grid_shape, resize_codes

from .options import CRF_MODULE, CRF_PURPOSE, DenseOptions
from .writers import bands

# The most memory one dense map's per-class scores may take (probabilities for the CRF, or the
# per-pixel depth expectation): beyond it densert refuses the request with what to change.
DENSE_BYTES_LIMIT = 2 << 30


def align_hidden(vision_hidden: torch.Tensor, pre_vision_hidden: torch.Tensor | None,
                 alignment: str) -> torch.Tensor:
    """[M, d] states that score cells 0..M-1 under the chosen alignment."""
    if alignment == "k":
        return vision_hidden
    if pre_vision_hidden is None:
        raise ValueError("alignment 'k-1' needs the hidden state before the first image pad")
    return torch.cat([pre_vision_hidden.reshape(1, -1).to(vision_hidden.dtype), vision_hidden[:-1]])


def background_score(opts: DenseOptions) -> float:
    """The constant score of the background channel: sigmoid(c * scale) == threshold."""
    t = opts.background_threshold
    return math.log(t / (1 - t)) / opts.background_logit_scale


def with_background(hidden: torch.Tensor, weight: torch.Tensor, opts: DenseOptions):
    """Append a constant background channel (index 0) to the GEMM: hidden gets a ones column,
    the weight a row (0, ..., 0, c). Bilinear upsampling of a constant is the constant, so the
    rule in the module docstring is applied exactly, and ties go to background (index 0)."""
    L, d = hidden.shape
    h = torch.cat([hidden.to(torch.float32), hidden.new_ones(L, 1, dtype=torch.float32)], dim=1)
    w = torch.zeros(weight.shape[0] + 1, d + 1, dtype=torch.float32, device=weight.device)
    w[1:, :d] = weight.to(torch.float32)
    w[0, d] = background_score(opts)
    return h, w


# weight -> {device: (weight._version, copy)}; entries go with the caller's weight.
_ON_DEVICE = WeakTensorKeyDictionary()


def on_device_of(weight: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """The subset weight where the hidden states are (a backend's GPU buffers: the GEMM and the
    tail run there and only the map comes back). Copied once per (weight, device) while the
    caller keeps the weight, and again if it is modified in place."""
    dev = hidden.device
    if weight.device == dev:
        return weight
    per_dev = _ON_DEVICE.setdefault(weight, {})
    version, moved = per_dev.get(dev, (None, None))
    if version != weight._version:
        moved = weight.to(dev)
        per_dev[dev] = (weight._version, moved)
    return moved


def segment_labels(hidden: torch.Tensor, weight: torch.Tensor, grid_hw, out_hw,
                   opts: DenseOptions, background: bool = False,
                   image: np.ndarray | None = None, background_index: int | None = None
                   ) -> np.ndarray:
    """Labels uint16 [H, W] over the K weight rows and, when ``background`` is on, a background
    label at ``background_index`` (default K, after the classes; the rows keep their order
    around it, so a class list written ``a, <OTHERS>, b`` is indexed as written)."""
    K = weight.shape[0]
    bg_at = K if background_index is None else int(background_index)
    if background and not 0 <= bg_at <= K:
        raise ValueError(f"background_index {bg_at} outside 0..{K}")
    if K + background > np.iinfo(np.uint16).max:
        raise ValueError(f"{K} classes: a label map holds at most {np.iinfo(np.uint16).max}")
    weight = on_device_of(weight, hidden)
    if background:
        hidden, weight = with_background(hidden, weight, opts)
    H, W = (int(v) for v in out_hw)
    if opts.crf:
        if image is None:
            raise ValueError("DenseCRF needs the RGB image at the output size")
        labels = _crf_labels(hidden, weight, grid_hw, (H, W), image, opts)
    else:
        labels = dense_head(hidden, weight, grid_hw, (H, W), mode="argmax").cpu().numpy()
    out = np.empty((H, W), np.uint16)
    for r0, r1 in bands(H, W):
        band = labels[r0:r1]
        # Channel 0 was background: move it to its place so labels index the class list.
        out[r0:r1] = np.where(band == 0, bg_at, band - 1 + (band > bg_at)) if background else band
    return out


def _check_dense_bytes(k: int, h: int, w: int, what: str, instead: str) -> None:
    need = 4 * k * h * w
    if need > DENSE_BYTES_LIMIT:
        raise ValueError(f"{what} needs {k} x {h} x {w} float32 scores ({need / 2**30:.1f} GiB, over "
                         f"the {DENSE_BYTES_LIMIT / 2**30:.0f} GiB densert allows); {instead}")


def _crf_labels(hidden, weight, grid_hw, out_hw, image: np.ndarray, opts: DenseOptions) -> np.ndarray:
    """DenseCRF at no more than ``opts.crf_max_pixels`` (the map is then upsampled nearest): the
    CRF needs every class's probability at every pixel, so its memory is K x pixels."""
    H, W = out_hw
    s = min(1.0, math.sqrt(opts.crf_max_pixels / (H * W)))
    h, w = max(1, round(H * s)), max(1, round(W * s))
    _check_dense_bytes(weight.shape[0], h, w, "--crf", "use fewer classes or no --crf")
    probs = dense_head(hidden, weight, grid_hw, (h, w), mode="probs", temperature=opts.temperature)
    small = crf_refine(probs.cpu().numpy(), resize_uint8(image, (h, w)), opts)
    del probs
    if (h, w) == (H, W):
        return small
    rows = np.minimum((np.arange(H) * h) // H, h - 1)  # nearest, pixel-centre aligned enough
    cols = np.minimum((np.arange(W) * w) // W, w - 1)
    out = np.empty((H, W), small.dtype)
    for r0, r1 in bands(H, W):
        out[r0:r1] = small[rows[r0:r1]][:, cols]
    return out


def crf_refine(probs: np.ndarray, image: np.ndarray, opts: DenseOptions) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl & Koltun 2011) over probs [K, H, W] and the RGB image."""
    dcrf = require(CRF_MODULE, CRF_PURPOSE)

    K, H, W = probs.shape
    if image.shape[:2] != (H, W):
        raise ValueError(f"CRF image is {image.shape[:2]}, the map is {(H, W)}")
    d = dcrf.DenseCRF2D(W, H, K)
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(K, -1).astype(np.float32)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=opts.crf_gaussian_sxy, compat=opts.crf_gaussian_compat)
    d.addPairwiseBilateral(sxy=opts.crf_bilateral_sxy, srgb=opts.crf_bilateral_srgb,
                           rgbim=np.require(image, np.uint8, ["C", "W"]),  # pydensecrf writes to it
                           compat=opts.crf_bilateral_compat)
    q = np.array(d.inference(opts.crf_iterations), dtype=np.float32).reshape(K, H, W)
    return q.argmax(axis=0)


# Paper D.3: "we first upsample by a factor of two, followed by argmax, and then resize to the
# original image size": the argmax grid is twice the token grid (the 16-px patch grid of the image
# the network saw), whatever --upscale or --focal did to that image.
DEPTH_ARGMAX_UPSAMPLE = 2


@dataclass
class DepthMap:
    depth: np.ndarray          # float32 [H, W] metres (0 where invalid)
    bins: np.ndarray           # uint16 [H, W] bin codes 1..1000 (0 invalid)
    codes_grid: np.ndarray     # uint16 codes on the (H//16, W//16) grid (the released RLE form)
    argmax_hw: tuple[int, int]  # the grid the argmax was taken on


def depth_map(hidden: torch.Tensor, bin_weight: torch.Tensor, grid_hw, out_hw,
              opts: DenseOptions, preset: str, fx: float | None = None) -> DepthMap:
    """Depth from the 1000 bin scores (bin_weight rows = <custom_1..1000>), dequantised with the
    preset; ``grid_hw`` = the token grid; ``fx`` = focal length in px of the image *as the network
    saw it* (open world only: None means it is taken to be the canonical 2000 px, i.e. no
    correction).

    ``depth_upsample="patch"``: scores upsampled to 2x the token grid, argmax there, the codes
    resized to H x W with OpenCV's bilinear resize (the demo's expansion) and rounded; the
    released text's (H//16, W//16) grid is the same resize of those codes. ``"full"``: argmax (or
    expectation) per output pixel."""
    n = bin_weight.shape[0]
    bin_weight = on_device_of(bin_weight, hidden)
    codes = torch.arange(1, n + 1, dtype=torch.float32)
    H, W = (int(v) for v in out_hw)
    pgrid = depth_grid_shape((H, W))

    def codes_at(size):
        if opts.depth_mode == "argmax":
            idx = dense_head(hidden, bin_weight, grid_hw, size, mode="argmax")
            return (idx.cpu() + 1).numpy().astype(np.uint16)
        p = dense_head(hidden, bin_weight, grid_hw, size, mode="probs", temperature=opts.temperature)
        return torch.einsum("k,khw->hw", codes.to(p.device), p).cpu().numpy()

    if opts.depth_upsample == "patch":
        agrid = tuple(DEPTH_ARGMAX_UPSAMPLE * int(g) for g in grid_hw)
        argmax_codes = codes_at(agrid)
        full = resize_codes(argmax_codes, (H, W))
        grid_codes = argmax_codes if agrid == pgrid else resize_codes(argmax_codes, pgrid)
    else:
        agrid = (H, W)
        if opts.depth_mode == "expectation":
            _check_dense_bytes(n, H, W, "--depth-mode expectation with --depth-upsample full",
                               "use --depth-upsample patch")
        full = codes_at((H, W))
        grid_codes = resize_codes(full, pgrid)
    # Rounding and dequantisation in bands: the float64 arithmetic of dequantize never spans the
    # whole map (at 24 MP it would be several 190 MB temporaries).
    bins = np.empty((H, W), np.uint16)
    depth = np.empty((H, W), np.float32)
    for r0, r1 in bands(H, W):
        f = full[r0:r1]
        bins[r0:r1] = np.clip(np.rint(f), 1, n)
        # argmax: dequantise the rounded codes, as the demo rounds; expectation: keep it continuous.
        depth[r0:r1] = depth_bins.dequantize(
            bins[r0:r1] if opts.depth_mode == "argmax" else np.clip(f, 0.5, n), preset, fx)
    del full
    return DepthMap(depth=depth, bins=bins, argmax_hw=agrid,
                    codes_grid=np.clip(np.rint(grid_codes), 1, n).astype(np.uint16))
