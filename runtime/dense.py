"""Dense maps from vision-token hidden states: the DenseMLLM decoding rules and their options.

Only the lm_head rows of the candidate ids are used (``densert.kernels.dense_head``): a
[L, d] x [d, K] GEMM, bilinear upsample, argmax. Full-vocabulary logits are never formed at
vision positions. The released decoder lives in unpublished remote code (spec sec. 9.2), so
every choice it hides is a documented field of ``DenseOptions``; the defaults are ours.

Background / open set (``<OTHERS>``), precisely: with class scores s_k (mean sub-word logits,
bilinearly upsampled), p_k = sigmoid(s_k * logit_scale) (logit_scale 1/4); a pixel is background
iff max_k p_k <= background_threshold (0.5), i.e. no class *strictly* beats it; otherwise it
takes argmax_k s_k. Implemented exactly as a constant extra channel c = logit(threshold) /
logit_scale (= 0 for 0.5) in the same GEMM, so it costs no extra pass.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import numpy as np
import torch

from densert.kernels.dense_head import dense_head
from densert.training import depth_bins

from .rle import depth_grid_shape, resize_codes

ALIGNMENTS = ("k", "k-1")
DEPTH_MODES = ("argmax", "expectation")
DEPTH_UPSAMPLES = ("patch", "full")


@dataclass
class DenseOptions:
    """Dense decoding options. The released values are unknown unless a comment says otherwise."""

    # Softmax temperature over class scores (paper D.1: 0.2). Softmax never changes an argmax,
    # so it only matters for the CRF unary and for ``depth_mode="expectation"``.
    temperature: float = 0.2
    # DenseCRF refinement (paper D.1 uses it for benchmark numbers; the demo defaults to it).
    # Parameters are OUR defaults (the common DeepLab settings); the released ones are unknown.
    crf: bool = False
    crf_gaussian_sxy: float = 3.0
    crf_gaussian_compat: float = 3.0
    crf_bilateral_sxy: float = 50.0
    crf_bilateral_srgb: float = 13.0
    crf_bilateral_compat: float = 10.0
    crf_iterations: int = 5
    # The <OTHERS> rule (paper D.1/"open world": logits/4 -> sigmoid, background at 0.5).
    background_logit_scale: float = 0.25
    background_threshold: float = 0.5
    # Which hidden state scores merged cell k: "k" = the k-th image-pad position itself (our
    # default: the paper reads each vision token's own output), "k-1" = next-token shift, cell 0
    # read from <|vision_start|> (spec sec. 9.2, unknown 1).
    alignment: str = "k"
    # Class names are tokenised bare ("tree"), the way the model spells them after <ref> in its
    # own answers, not " tree" as inside a sentence (spec sec. 9.2, unknown 2).
    name_leading_space: bool = False
    # Depth: "argmax" bin (paper) or "expectation" (softmax(scores/temperature)-weighted bin).
    depth_mode: str = "argmax"
    # Depth upsampling order. "patch" (default; paper D.3 and the demo): bin scores upsampled to
    # the (H//16, W//16) grid (x2 of the merged grid when the image was not resized), argmax
    # there, then the codes bilinearly resized to H x W and rounded. "full": scores upsampled to
    # H x W and argmax per pixel (exact bilinear-of-logits, more work per pixel).
    depth_upsample: str = "patch"
    # Referring segmentation crop: padding factor and short side (paper D.2 / demo: 1.2, 1280).
    refer_padding: float = 1.2
    refer_short_side: int = 1280
    # Seed of the random box colour drawn on the referring crop (reproducible runs).
    seed: int = 0

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(f"DenseOptions: {msg}")
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(self.alignment in ALIGNMENTS, f"alignment {self.alignment!r} not in {ALIGNMENTS}")
        need(self.depth_mode in DEPTH_MODES, f"depth_mode {self.depth_mode!r} not in {DEPTH_MODES}")
        need(self.depth_upsample in DEPTH_UPSAMPLES,
             f"depth_upsample {self.depth_upsample!r} not in {DEPTH_UPSAMPLES}")
        need(0 < self.background_threshold < 1,
             f"background_threshold must be in (0, 1), got {self.background_threshold}")
        need(self.background_logit_scale > 0, "background_logit_scale must be > 0")
        need(self.crf_iterations >= 1, "crf_iterations must be >= 1")
        need(self.refer_padding >= 1.0, f"refer_padding must be >= 1, got {self.refer_padding}")
        need(self.refer_short_side >= 32, f"refer_short_side must be >= 32, got {self.refer_short_side}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def field_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]


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


def segment_labels(hidden: torch.Tensor, weight: torch.Tensor, grid_hw, out_hw,
                   opts: DenseOptions, background: bool = False,
                   image: np.ndarray | None = None) -> np.ndarray:
    """Labels int64 [H, W]: 0..K-1 for the K weight rows, K for background (when enabled)."""
    K = weight.shape[0]
    if background:
        hidden, weight = with_background(hidden, weight, opts)
    if opts.crf:
        if image is None:
            raise ValueError("DenseCRF needs the RGB image at the output size")
        probs = dense_head(hidden, weight, grid_hw, out_hw, mode="probs", temperature=opts.temperature)
        labels = crf_refine(probs.cpu().numpy(), image, opts)
    else:
        labels = dense_head(hidden, weight, grid_hw, out_hw, mode="argmax").cpu().numpy()
    if background:
        # Channel 0 was background: move it after the classes so labels index the class list.
        labels = np.where(labels == 0, K, labels - 1)
    return labels.astype(np.int64)


def crf_refine(probs: np.ndarray, image: np.ndarray, opts: DenseOptions) -> np.ndarray:
    """Fully connected CRF (Kraehenbuehl & Koltun 2011) over probs [K, H, W] and the RGB image."""
    import pydensecrf.densecrf as dcrf

    K, H, W = probs.shape
    if image.shape[:2] != (H, W):
        raise ValueError(f"CRF image is {image.shape[:2]}, the map is {(H, W)}")
    d = dcrf.DenseCRF2D(W, H, K)
    unary = -np.log(np.clip(probs, 1e-8, 1.0)).reshape(K, -1).astype(np.float32)
    d.setUnaryEnergy(np.ascontiguousarray(unary))
    d.addPairwiseGaussian(sxy=opts.crf_gaussian_sxy, compat=opts.crf_gaussian_compat)
    d.addPairwiseBilateral(sxy=opts.crf_bilateral_sxy, srgb=opts.crf_bilateral_srgb,
                           rgbim=np.ascontiguousarray(image, dtype=np.uint8),
                           compat=opts.crf_bilateral_compat)
    q = np.array(d.inference(opts.crf_iterations), dtype=np.float32).reshape(K, H, W)
    return q.argmax(axis=0)


@dataclass
class DepthMap:
    depth: np.ndarray          # float32 [H, W] metres (0 where invalid)
    bins: np.ndarray           # uint16 [H, W] bin codes 1..1000 (0 invalid)
    codes_grid: np.ndarray     # uint16 codes on the (H//16, W//16) grid (the released RLE form)


def depth_map(hidden: torch.Tensor, bin_weight: torch.Tensor, grid_hw, out_hw,
              opts: DenseOptions, preset: str, fx: float | None = None) -> DepthMap:
    """Depth from the 1000 bin scores (bin_weight rows = <custom_1..1000>), dequantised with the
    preset; ``fx`` = focal length in px of the image *as the network saw it* (open world only:
    None means it is taken to be the canonical 2000 px, i.e. no correction)."""
    n = bin_weight.shape[0]
    codes = torch.arange(1, n + 1, dtype=torch.float32)
    H, W = (int(v) for v in out_hw)
    pgrid = depth_grid_shape((H, W))

    def codes_at(size):
        if opts.depth_mode == "argmax":
            idx = dense_head(hidden, bin_weight, grid_hw, size, mode="argmax")
            return (idx.cpu() + 1).to(torch.float32).numpy()
        p = dense_head(hidden, bin_weight, grid_hw, size, mode="probs", temperature=opts.temperature)
        return torch.einsum("k,khw->hw", codes.to(p.device), p).cpu().numpy()

    if opts.depth_upsample == "patch":
        grid_codes = codes_at(pgrid)
        full = resize_codes(grid_codes, (H, W))
    else:
        full = codes_at((H, W))
        grid_codes = resize_codes(full, pgrid)
    bins = np.clip(np.rint(full), 1, n).astype(np.uint16)
    key = _preset_key(preset)
    # argmax: dequantise the rounded codes, as the demo rounds; expectation: keep it continuous.
    depth = depth_bins.dequantize(bins if opts.depth_mode == "argmax" else np.clip(full, 0.5, n),
                                  key, fx)
    return DepthMap(depth=np.asarray(depth, dtype=np.float32), bins=bins,
                    codes_grid=np.clip(np.rint(grid_codes), 1, n).astype(np.uint16))


def _preset_key(preset: str) -> str:
    return preset.replace("-", "_")


def class_id_groups(vocab, names: list[str], leading_space: bool) -> list[list[int]]:
    """Token ids per class: a special token (``<FG>``, ``<OTHERS>``) is its own single id,
    anything else the sub-word ids of its name."""
    groups = []
    for n in names:
        tid = vocab.tok.token_to_id(n) if n.startswith("<") and n.endswith(">") else None
        groups.append([tid] if tid is not None else vocab.name_ids(n, leading_space=leading_space))
    return groups
