"""What ``densert export`` writes (``ExportOptions``), torch-free: one place for each default,
which the CLI turns into flags."""
from __future__ import annotations

from dataclasses import dataclass

from densert.image import DEFAULT_MAX_PATCHES, MIN_MAX_PATCHES
from densert.model.config import CACHE_LAYOUTS
from densert.options import check_choices, comma_list, opt
from densert.tasks import TASKS

PRECISIONS = ("fp32", "fp16")


@dataclass
class ExportOptions:
    precision: str = opt("fp32", "weights and activations of the graphs (fp16 keeps norms, "
                                 "attention softmax and RoPE in fp32)", choices=PRECISIONS)
    max_patches: int = opt(DEFAULT_MAX_PATCHES, "largest image (16x16 patches) the engines "
                                                "accept; recorded in the manifest and used as the "
                                                "TensorRT profile maximum")
    tasks: tuple[str, ...] = opt(TASKS, "comma list of tasks to serve: their vocab subsets are "
                                        "baked into the prefill graph; a task that generates text "
                                        "adds llm_decode.onnx", type=comma_list, metavar="TASKS")
    cache_layout: str = opt("latent", "KV cache: the MLA latent (576 values per token per layer) "
                                      "or per-head keys and values", choices=CACHE_LAYOUTS)

    def __post_init__(self):
        self.tasks = tuple(dict.fromkeys(self.tasks))
        check_choices(self)
        bad = [t for t in self.tasks if t not in TASKS]
        if bad or not self.tasks:
            raise ValueError(f"unknown tasks {list(bad or self.tasks)}; expected a subset of {TASKS}")
        if self.max_patches < MIN_MAX_PATCHES:
            raise ValueError(f"max_patches {self.max_patches} is below {MIN_MAX_PATCHES} "
                             "(one merged token)")


@dataclass
class BuildRequest:
    """What ``densert build-engine`` asks TensorRT for; ``tensorrt.BuildOptions.from_manifest``
    resolves it against the engine directory's manifest."""

    fp16: bool = opt(False, "allow fp16 tactics for an fp32 export (an fp16 export is built "
                            "strongly typed)")
    min_patches: int = opt(MIN_MAX_PATCHES, "smallest image (16x16 patches) of the optimization "
                                            "profile")
    opt_patches: int = opt(1024, "image size TensorRT tunes its tactics for")
    max_patches: int | None = opt(None, "largest image of the profile (default: the manifest's "
                                        "max_patches)", type=int)
    max_seq: int | None = opt(None, "longest prompt + generated tokens (default: max image "
                                    "tokens + 512)", type=int)
    opt_seq: int | None = opt(None, "sequence length TensorRT tunes for (default: opt image "
                                    "tokens + 64)", type=int)
    workspace_gb: float = opt(4.0, "TensorRT workspace memory pool, GB")
    timing_cache: str | None = opt(None, "timing cache file (default: ENGINE_DIR/timing.cache)")


# `densert verify`: synthetic images (patch grids: square, wide with padded windows, tall) and
# greedy decode steps compared when no images are given.
VERIFY_GRIDS = ((8, 8), (12, 20), (34, 18))
VERIFY_DECODE_STEPS = 6
