"""The runtime's options, torch-free: how dense maps are decoded (``DenseOptions``) and how the
predictor runs (``PredictorOptions``). Each field's default and help live here only; the CLI
builds its flags from them (``densert.cli.add_dataclass_arguments``)."""
from __future__ import annotations

from dataclasses import asdict, dataclass

from densert.image import DEFAULT_MAX_PATCHES, MIN_MAX_PATCHES
from densert.model.config import DTYPES
from densert.options import check_choices, opt
from densert.tasks import ALIGNMENTS
from densert.tasks.classes import NAME_LEADING_SPACE
from densert.tasks.grounding import REFER_PADDING, REFER_SHORT_SIDE

DEPTH_MODES = ("argmax", "expectation")
DEPTH_UPSAMPLES = ("patch", "full")
BACKENDS = ("torch", "onnxruntime", "tensorrt")
UPSCALES = (1, 2, 3, 4)


def device_name(s: str) -> str:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""
    if s in ("auto", "cpu", "cuda") or (s.startswith("cuda:") and s[5:].isdigit()):
        return s
    raise ValueError(f"device {s!r}: expected auto, cpu, cuda or cuda:N")


@dataclass
class DenseOptions:
    """Dense decoding options. The released values are unknown unless a comment says otherwise."""

    # Softmax never changes an argmax, so it only matters for the CRF unary and expectation depth.
    temperature: float = opt(0.2, "softmax temperature over class scores (paper D.1); used by the "
                                  "CRF unary and --depth-mode expectation")
    # Parameters are OUR defaults (the common DeepLab settings); the released ones are unknown.
    crf: bool = opt(False, "DenseCRF refinement of segmentation maps (needs densert[crf])")
    crf_gaussian_sxy: float = opt(3.0, cli=False)
    crf_gaussian_compat: float = opt(3.0, cli=False)
    crf_bilateral_sxy: float = opt(50.0, cli=False)
    crf_bilateral_srgb: float = opt(13.0, cli=False)
    crf_bilateral_compat: float = opt(10.0, cli=False)
    crf_iterations: int = opt(5, cli=False)
    # The <OTHERS> rule (paper D.1 / open world: logits/4 -> sigmoid, background at 0.5).
    background_logit_scale: float = opt(0.25, cli=False)
    background_threshold: float = opt(0.5, cli=False)
    alignment: str = opt("k", "hidden state that scores merged cell k: the k-th image pad, or the "
                              "one before it (k-1)", choices=ALIGNMENTS)
    name_leading_space: bool = opt(NAME_LEADING_SPACE, cli=False)
    depth_mode: str = opt("argmax", "depth from the argmax bin (paper) or the softmax-weighted "
                                    "expectation", choices=DEPTH_MODES)
    # "patch" (paper D.3 and the demo): bin scores upsampled to the (H//16, W//16) grid, argmax
    # there, codes bilinearly resized to H x W and rounded. "full": argmax per output pixel.
    depth_upsample: str = opt("patch", "argmax on the 16-px patch grid then resize the codes "
                                       "(the demo's order), or per output pixel",
                              choices=DEPTH_UPSAMPLES)
    refer_padding: float = opt(REFER_PADDING, cli=False)
    refer_short_side: int = opt(REFER_SHORT_SIDE, "short side of the referring refinement crop "
                                                  "(paper D.2 / demo)")
    # Seed of the random box colour drawn on the referring crop (reproducible runs).
    seed: int = opt(0, cli=False)

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        def need(ok, msg):
            if not ok:
                raise ValueError(f"DenseOptions: {msg}")
        check_choices(self)
        need(self.temperature > 0, f"temperature must be > 0, got {self.temperature}")
        need(0 < self.background_threshold < 1,
             f"background_threshold must be in (0, 1), got {self.background_threshold}")
        need(self.background_logit_scale > 0, "background_logit_scale must be > 0")
        need(self.crf_iterations >= 1, "crf_iterations must be >= 1")
        need(self.refer_padding >= 1.0, f"refer_padding must be >= 1, got {self.refer_padding}")
        need(self.refer_short_side >= 32, f"refer_short_side must be >= 32, got {self.refer_short_side}")

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
    dtype: str = opt("float32", "torch weight dtype", choices=DTYPES)
    device: str = opt("auto", "torch device (auto: cuda when available)", type=device_name,
                      metavar="{auto,cpu,cuda,cuda:N}")
    max_patches: int = opt(DEFAULT_MAX_PATCHES, "the processor's cap on 16x16 patches per image "
                                                "(an engine's own budget caps it further)")
    upscale: int = opt(1, "upscale factor before the size search (paper: x2-x4 for small images)",
                       choices=UPSCALES)
    max_new_tokens: int = opt(256, "longest generated answer (open-set names, grounding, chat)")

    def __post_init__(self):
        check_choices(self)
        device_name(self.device)
        if self.max_patches < MIN_MAX_PATCHES:
            raise ValueError(f"max_patches {self.max_patches} is below {MIN_MAX_PATCHES} "
                             "(one merged token)")
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
