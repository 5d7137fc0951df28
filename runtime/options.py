"""The runtime's options, torch-free: how dense maps are decoded (``DenseOptions``) and how the
predictor runs (``PredictorOptions``). Each field's default and help live here only; the CLI
builds its flags from them (``densert.cli.add_dataclass_arguments``)."""
from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass

from densert.errors import OptionError
from densert.image import DEFAULT_MAX_PATCHES, MIN_MAX_PATCHES
from densert.model.config import DTYPES
from densert.options import check_choices, check_range, comma_list, opt
from densert.tasks import ALIGNMENTS
from densert.tasks.classes import NAME_LEADING_SPACE
from densert.tasks.grounding import REFER_PADDING, REFER_SHORT_SIDE

from . import registry

DEPTH_MODES = ("argmax", "expectation")
# What DenseCRF imports and what the message names when it is missing (the CLI checks it before
# the model loads, the dense decoder when it runs).
CRF_MODULE = "pydensecrf.densecrf"
CRF_PURPOSE = "DenseCRF (on by default, as the release; --no-crf skips it)"
DEPTH_UPSAMPLES = ("patch", "full")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
UPSCALES = (1, 2, 3, 4)


def device_name(s: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise OptionError(f"device {s!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class DenseOptions:
    """Dense decoding options. The released values are unknown unless a comment says otherwise."""

    # Softmax never changes an argmax, so it only matters for the CRF unary and expectation depth.
    temperature: float = opt(0.2, "softmax temperature over class scores (paper D.1); used by the "
                                  "CRF unary and --depth-mode expectation")
    # On, as in the release's demo (seg_crf = True, "False can be faster"). Parameters are OUR
    # defaults (the common DeepLab settings); the released ones are unknown.
    crf: bool = opt(True, "DenseCRF refinement of segmentation maps, as the release does (needs "
                          "densert[crf]); --no-crf is faster and keeps the bilinear argmax "
                          "boundaries")
    crf_gaussian_sxy: float = opt(3.0, cli=False)
    crf_gaussian_compat: float = opt(3.0, cli=False)
    crf_bilateral_sxy: float = opt(50.0, cli=False)
    crf_bilateral_srgb: float = opt(13.0, cli=False)
    crf_bilateral_compat: float = opt(10.0, cli=False)
    crf_iterations: int = opt(5, cli=False)
    # The CRF holds every class's probability at every pixel: it runs at no more than this many
    # pixels and its map is upsampled (nearest) to the image, so its memory stays bounded.
    crf_max_pixels: int = opt(4_000_000, cli=False)
    # The <OTHERS> rule (paper D.1 / open world: logits/4 -> sigmoid, background at 0.5).
    background_logit_scale: float = opt(0.25, cli=False)
    background_threshold: float = opt(0.5, cli=False)
    alignment: str = opt("k", "hidden state that scores merged cell k: the k-th image pad, or the "
                              "one before it (k-1)", choices=ALIGNMENTS)
    name_leading_space: bool = opt(NAME_LEADING_SPACE, cli=False)
    depth_mode: str = opt("argmax", "depth from the argmax bin (paper) or the softmax-weighted "
                                    "expectation", choices=DEPTH_MODES)
    # "patch" (paper D.3 and the demo): bin scores upsampled to twice the token grid (the 16-px
    # patch grid of the image the network saw), argmax there, codes resized to H x W (OpenCV
    # bilinear) and rounded. "full": argmax per output pixel.
    depth_upsample: str = opt("patch", "argmax on the 16-px patch grid of the network's input "
                                       "(2x the token grid, paper D.3) then resize the codes "
                                       "(the demo's order), or per output pixel",
                              choices=DEPTH_UPSAMPLES)
    # The release's flows by default; --fast trades them for one pass each.
    fast: bool = opt(False, "one-pass segmentation: a closed set scores every --classes name in "
                            "one prefill (the release first lets the model name the classes "
                            "present and scores only those), the open set reads its map off the "
                            "naming pass (the release detects boxes of the named classes and "
                            "segments each); faster, and differs from the release")
    open_set_max_boxes: int = opt(30, "most detections the open-set flow segments, largest first "
                                      "(the demo's 30)")
    refer_padding: float = opt(REFER_PADDING, cli=False)
    refer_short_side: int = opt(REFER_SHORT_SIDE, "short side of the crops the referring and "
                                                  "open-set flows segment (paper D.2 / demo; "
                                                  "smaller is faster)")
    # The demo sends each referring crop to the model as a JPEG (OpenCV's default quality 95), so
    # the second pass sees compressed pixels; None sends the crop's pixels as they are.
    crop_jpeg_quality: int | None = opt(95, cli=False)
    # Seed of the random box colour drawn on the referring crop (reproducible runs).
    seed: int = opt(0, cli=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def rng(name, lo=None, hi=None, **kw):
            check_range("DenseOptions", name, getattr(self, name), lo, hi, **kw)
        check_choices(self)
        for name in ("crf", "fast", "name_leading_space"):
            if not isinstance(getattr(self, name), bool):
                raise OptionError(f"DenseOptions: {name} must be True or False, got "
                                  f"{getattr(self, name)!r}")
        rng("temperature", 0, lo_open=True)
        rng("background_threshold", 0, 1, lo_open=True, hi_open=True)
        rng("background_logit_scale", 0, lo_open=True)
        for name in ("crf_gaussian_sxy", "crf_gaussian_compat", "crf_bilateral_sxy",
                     "crf_bilateral_srgb", "crf_bilateral_compat"):
            rng(name, 0, lo_open=True)
        rng("crf_iterations", 1, integer=True)
        rng("crf_max_pixels", 1, integer=True)
        rng("refer_padding", 1.0)
        rng("refer_short_side", 32, integer=True)
        rng("open_set_max_boxes", 1, integer=True)
        if self.crop_jpeg_quality is not None:
            rng("crop_jpeg_quality", 1, 100, integer=True)
        rng("seed", 0, integer=True)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class PredictorOptions:
    """How a ``DensePredictor`` runs: backend, precision, device and the image budget."""

    backend: str = opt("torch", "torch (eager reference), onnxruntime or tensorrt (engines of "
                                "`densert export` / `build-engine`)", choices=BACKENDS)
    engine_dir: str | None = opt(None, "engine directory for onnxruntime / tensorrt: it runs alone, "
                                       "no --model needed (default: the per-checkpoint cache, "
                                       "exported on first use)")
    dtype: str = opt("auto", "torch weight dtype (auto: the checkpoint's own where the device "
                             "computes it natively, CUDA or a CPU with AVX512-BF16 / AMX; float32 "
                             "elsewhere)", choices=("auto", *DTYPES))
    device: str = opt("auto", "torch device (auto: cuda when available); onnxruntime: cuda runs "
                              "on its CUDA provider (densert[gpu]), falling back to CPU with a "
                              "line saying why", type=device_name,
                      metavar="{auto,cpu,cuda,cuda:N}")
    max_patches: int = opt(DEFAULT_MAX_PATCHES, "the processor's cap on 16x16 patches per image "
                                                "(an engine's own budget caps it further)")
    upscale: int = opt(1, "upscale factor before the size search (paper: x2-x4 for small images)",
                       choices=UPSCALES)
    # None: the checkpoint's generation_config.json, else the release's values (the demo's call,
    # densert.model.generation.RELEASE_*).
    max_new_tokens: int | None = opt(None, "longest generated answer (default: the checkpoint's "
                                           "generation_config.json, else the release's 4096)",
                                     type=int)
    repetition_penalty: float | None = opt(None, "repetition penalty of every generated answer, "
                                                 "as transformers applies it; 1 = plain greedy "
                                                 "(default: the checkpoint's generation_config."
                                                 "json, else the release's 1.05)", type=float)

    def __post_init__(self):
        check_choices(self)
        if not isinstance(self.device, str):
            raise OptionError(f"PredictorOptions: device must be a string, got {self.device!r}")
        device_name(self.device)
        if self.engine_dir is not None and not isinstance(self.engine_dir, (str, os.PathLike)):
            raise OptionError(f"PredictorOptions: engine_dir must be a path, got {self.engine_dir!r}")
        # max_patches: one merged token at least (a 32x32 image)
        check_range("PredictorOptions", "max_patches", self.max_patches, MIN_MAX_PATCHES,
                    integer=True)
        if self.max_new_tokens is not None:
            check_range("PredictorOptions", "max_new_tokens", self.max_new_tokens, 1, integer=True)
        if self.repetition_penalty is not None:
            check_range("PredictorOptions", "repetition_penalty", self.repetition_penalty, 0,
                        lo_open=True)


# Files each task can write (``OutputOptions.formats``), in the order they are written; the JSON
# sidecar is always written. Both from the task registry: the defaults leave out its opt-in files.
FORMATS = registry.formats()
DEFAULT_FORMATS = {name: registry.REGISTRY[name].default_formats for name in FORMATS}
INVALID_DEPTH = ("zero", "nan")


def formats_help(tasks=registry.REGISTRY) -> str:
    """``--formats``' help: each task's files (tasks with the same files share an entry)."""
    by_files: dict[tuple[str, ...], list[str]] = {}
    for name, files in registry.formats(tasks).items():
        by_files.setdefault(files, []).append(name)
    listed = "; ".join(f"{', '.join(names)}: {','.join(files)}" for files, names in by_files.items())
    return (f"comma list of files to write besides the JSON sidecar ({listed}; default: all but "
            f"{', '.join(registry.OPT_IN_FORMATS)})")


def depth_range(s: str) -> tuple[float, float]:
    """``"0.5:20"`` -> (0.5, 20.0): near and far metres of a fixed colour range."""
    try:
        lo, hi = (float(v) for v in str(s).split(":"))
    except ValueError:
        raise OptionError(f"range {s!r} is not MIN:MAX in metres (e.g. 0.5:20)") from None
    if not (0 <= lo < hi) or not math.isfinite(hi):
        raise OptionError(f"range {s!r} needs 0 <= MIN < MAX < inf (metres)")
    return lo, hi


@dataclass
class OutputOptions:
    """Which files a result set holds and how its pictures look."""

    formats: tuple[str, ...] | None = opt(None, formats_help(), type=comma_list, metavar="FORMATS")
    range: tuple[float, float] | None = opt(
        None, "fixed depth colour range MIN:MAX in metres, linear (default: the preset's own bins, "
              "the same colours for every frame)", type=depth_range, metavar="MIN:MAX")
    legend: bool = opt(False, "draw a depth scale into the depth picture (default off: the "
                              "picture stays pixel-aligned with the input)")
    invalid: str = opt("zero", "value of invalid depth in the .npy/.tiff arrays", choices=INVALID_DEPTH)

    def __post_init__(self):
        check_choices(self)
        if self.range is not None:
            r = self.range
            self.range = depth_range(r if isinstance(r, str) else ":".join(map(str, r))
                                     if isinstance(r, (tuple, list)) and len(r) == 2 else repr(r))
        if isinstance(self.formats, str):
            self.formats = comma_list(self.formats)

    def formats_for(self, task: str) -> tuple[str, ...]:
        if self.formats is None:
            return DEFAULT_FORMATS[task]
        bad = [f for f in self.formats if f not in FORMATS[task]]
        if bad:
            raise OptionError(f"--formats {','.join(bad)} not available for {task}; choose from "
                              f"{','.join(FORMATS[task])}")
        return tuple(f for f in FORMATS[task] if f in self.formats)
