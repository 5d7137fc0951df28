"""What ``densert export`` writes (``ExportOptions``), torch-free: one place for each default,
which the CLI turns into flags."""
from __future__ import annotations

import math
from dataclasses import dataclass

from densert.errors import OptionError
from densert.image import BLOCK, DEFAULT_MAX_PATCHES, MERGE, MIN_MAX_PATCHES, PATCH
from densert.model.config import CACHE_LAYOUTS
from densert.options import check_choices, check_range, comma_list, hw_size, opt
from densert.tasks import TASKS

PRECISIONS = ("fp32", "fp16", "int8", "int4")
# int4 weights per scale along K. 128: the size of a full model's int4 directory fits 2.8 GiB only
# from block 64 up, and on the bundled trained model blocks 32 / 64 / 128 keep the same dense-map
# agreement within noise (benchmarks/results/fullscale.md, "int4 block size").
INT4_BLOCK = 128
INT4_BLOCKS = (16, 32, 64, 128)
# A 1k-token frame: 1024 merged tokens = 4096 patches (e.g. 1024x1024 px, or 768x1344).
DEFAULT_MAX_IMAGE_TOKENS = 1024


# Which runtime the graphs are written for. onnxruntime: int4 weights as ONNX Runtime's own
# com.microsoft MatMulNBits (its weight layout on disk: loaded once, prepacked once, no
# DequantizeLinear fusion copying every weight at load); tensorrt: standard ONNX ops only
# (weight-only DequantizeLinear -> MatMul), checked against TensorRT 10.3's parser.
TARGETS = ("onnxruntime", "tensorrt")
# How the onnxruntime target's quantized Linears run (export/README.md, "The onnxruntime target's
# GEMMs"): int8 GEMMs (CPU) or MatMulNBits (weight-only; ONNX Runtime's CUDA kernels).
ORT_MATMULS = ("int8-gemm", "nbits")


@dataclass
class ExportOptions:
    target: str = opt("onnxruntime", "runtime the graphs are written for: onnxruntime (its fused "
                                     "int4 MatMulNBits) or tensorrt (standard ONNX ops that "
                                     "TensorRT 10.3 parses; `densert build-engine` needs it)",
                      choices=TARGETS)
    ort_matmul: str = opt("int8-gemm", "onnxruntime target, int8 / int4 engines: how the quantized "
                                       "Linears run. int8-gemm: int8 GEMMs (VNNI / AMX; the fastest "
                                       "images and prompts on CPU; int4 weights one scale per output "
                                       "column, int8-sized in memory); nbits: MatMulNBits (weight-only, "
                                       "int4 in blocks: half the weight memory, faster decode, and ONNX "
                                       "Runtime's CUDA kernels: use it for --device cuda)",
                          choices=ORT_MATMULS)
    precision: str = opt("fp32", "fp32; fp16 (norms, attention softmax and RoPE stay fp32); int8 "
                                 "/ int4: weight-only quantized decoder (int8 per channel / int4 "
                                 "in blocks), lm_head table and vision tower int8, fp32 "
                                 "activations",
                         choices=PRECISIONS)
    max_image_tokens: int = opt(DEFAULT_MAX_IMAGE_TOKENS,
                                "largest image the engines take, in vision tokens (one per 32x32 "
                                "px): the TensorRT profile maximum and the runtime's image cap")
    image_size: tuple[str, ...] = opt((), "comma list of the image sizes you deploy, HxW px (e.g. "
                                          "480x640): size the engines for exactly these instead "
                                          "of --max-image-tokens", type=comma_list,
                                      metavar="HxW[,HxW...]")
    tasks: tuple[str, ...] = opt(TASKS, "comma list of tasks to serve: their vocab subsets are "
                                        "baked into the LLM graph", type=comma_list, metavar="TASKS")
    cache_layout: str = opt("latent", "KV cache: the MLA latent (576 values per token per layer) "
                                      "or per-head keys and values", choices=CACHE_LAYOUTS)
    int4_block: int = opt(INT4_BLOCK, "int4: weights per quantization block along the input "
                                      "dimension (a weight whose input size it does not divide takes "
                                      "the largest smaller block that does, down to 16)",
                          choices=INT4_BLOCKS)
    attention_chunk_mib: int = opt(64, "fp32 attention scores held per chunk of queries (MiB): "
                                       "bounds attention memory at any image size")
    force: bool = opt(False, "write into a non-empty --out folder (its files may be replaced; "
                             "default: refuse it)")

    def __post_init__(self):
        if isinstance(self.tasks, str) or isinstance(self.image_size, str):
            raise OptionError("ExportOptions: tasks and image_size are lists (e.g. "
                              "tasks=('depth',), image_size=('480x640',)), not one string")
        self.tasks = tuple(dict.fromkeys(self.tasks))
        self.image_size = tuple(self.image_size)
        check_choices(self)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise OptionError(f"unknown tasks {list(bad or self.tasks)}; expected a subset of {TASKS}")
        check_range("ExportOptions", "max_image_tokens", self.max_image_tokens, 1,
                    DEFAULT_MAX_PATCHES // (MERGE * MERGE), integer=True)
        for s in self.image_size:
            check_image_size(s)
        check_range("ExportOptions", "attention_chunk_mib", self.attention_chunk_mib, 1,
                    integer=True)

    @property
    def image_sizes(self) -> list[tuple[int, int]]:
        return [hw_size(s) for s in self.image_size]

    @property
    def max_patches(self) -> int:
        """--max-image-tokens in 16x16 patches (--image-size is resolved at export, where the
        processor's size search runs)."""
        return self.max_image_tokens * MERGE * MERGE


def check_image_size(s: str) -> tuple[int, int]:
    """An ``--image-size`` the engines can take exactly: one the processor does not scale down
    (its 32-aligned sides fit its cap of ``DEFAULT_MAX_PATCHES`` patches); a larger one would
    quietly build for a smaller size than asked."""
    h, w = hw_size(s)
    th, tw = math.ceil(h / BLOCK) * BLOCK, math.ceil(w / BLOCK) * BLOCK
    if (th // PATCH) * (tw // PATCH) > DEFAULT_MAX_PATCHES:
        side = int(math.sqrt(DEFAULT_MAX_PATCHES)) * PATCH
        raise OptionError(f"--image-size {s}: {th}x{tw} px is {(th // PATCH) * (tw // PATCH)} "
                          f"patches, over the processor's cap of {DEFAULT_MAX_PATCHES} (e.g. "
                          f"{side}x{side}), which would scale such images down; give the size "
                          "the images have after your own resize")
    return h, w


@dataclass
class BuildRequest:
    """What ``densert build-engine`` asks TensorRT for; ``tensorrt.BuildOptions.from_manifest``
    resolves it against the engine directory's manifest."""

    min_patches: int = opt(MIN_MAX_PATCHES, "smallest image (16x16 patches) of the optimization "
                                            "profile")
    opt_patches: int = opt(1024, "image size TensorRT tunes its tactics for")
    max_patches: int | None = opt(None, "largest image of the profile (default: the export's, "
                                        "from --max-image-tokens / --image-size)", type=int)
    max_seq: int | None = opt(None, "longest prompt + generated tokens (default: max image "
                                    "tokens + 512)", type=int)
    opt_seq: int | None = opt(None, "sequence length TensorRT tunes for (default: opt image "
                                    "tokens + 64)", type=int)
    workspace_gb: float = opt(4.0, "TensorRT workspace memory pool, GB")
    timing_cache: str | None = opt(None, "timing cache file (default: ENGINE_DIR/timing.cache)")
    tf32: bool = opt(False, "allow TF32 math in fp32 layers (faster on Ampere and later; the fp32 "
                            "parity gate is measured without it)")


# `densert verify`: synthetic images (patch grids: square, wide with padded windows, tall) and
# greedy decode steps compared when no images are given.
VERIFY_GRIDS = ((8, 8), (12, 20), (34, 18))
VERIFY_DECODE_STEPS = 6
