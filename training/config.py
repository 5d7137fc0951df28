"""``TrainConfig``: every training setting with its default and help, torch-free (the CLI's
``densert train`` flags are built from it; ``train_config.json`` is its JSON form)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from densert.image import BLOCK
from densert.model.config import DTYPES, MODEL_SIZES
from densert.options import check_choices, comma_list, hw_size, opt
from densert.tasks import ALIGNMENTS, DENSE_TASKS
from densert.tasks.depth_bins import PRESETS

# Vision losses (training.losses): NTP-M and the paper's ablation baselines.
LOSSES = ("ntpm", "indep", "bce", "balanced", "focal", "ohem", "softmax")
PRECISIONS = ("fp32", "bf16")
# Kinds of rendered scene (training.scenes); "any": indoor or outdoor, by the seed.
SCENE_KINDS = ("any", "indoor", "outdoor")


@dataclass
class TrainConfig:
    out: str = opt("runs/densert-tiny", "checkpoint directory (released layout + trainer state)",
                   cli=False)
    model_size: str = opt("tiny", "architecture widths of the model trained from scratch",
                          choices=MODEL_SIZES)
    text_layers: int | None = opt(None, "LLM layer count (default: the model size's)", type=int)
    vision_layers: int | None = opt(None, "ViT layer count (default: the model size's)", type=int)
    steps: int = opt(1000, "optimizer steps")
    batch: int = opt(8, "samples per step (per rank)")
    image_size: tuple[int, int] = opt((256, 256), "HxW of the rendered training scenes, multiples "
                                                  f"of {BLOCK}", type=hw_size, metavar="HxW")
    tasks: tuple[str, ...] = opt(DENSE_TASKS, "comma list of tasks sampled in turn",
                                 type=comma_list, metavar="TASKS")
    loss: str = opt("ntpm", "vision-token loss (the others are the paper's ablation baselines)",
                    choices=LOSSES)
    k: int = opt(32, "NTP-M relevant negatives per token (the paper's best)")
    lr: float = opt(1e-3, "peak learning rate (AdamW)")
    min_lr_ratio: float = opt(0.1, "cosine schedule floor, as a fraction of --lr")
    warmup: int = opt(50, "linear warm-up steps")
    weight_decay: float = opt(0.05, "AdamW weight decay")
    grad_clip: float = opt(1.0, "gradient norm clip")
    precision: str = opt("fp32", "fp32, or bf16 autocast", choices=PRECISIONS)
    seed: int = opt(0, "init, scene and sampling seed")
    scenes: int = opt(1000, "distinct training scenes (rendered once, then reused)")
    alignment: str = opt("k", "hidden state that scores merged cell k (as the runtime's "
                              "--alignment)", choices=ALIGNMENTS)
    # Cityscapes: the scenes reach 80 m and are rendered at ~200 px focal length (trainer doc).
    depth_preset: str = opt("cityscapes", "depth preset of the depth samples", choices=tuple(PRESETS))
    text_weight: float = opt(1.0, "weight of the text next-token loss")
    vision_weight: float = opt(1.0, "weight of the vision-token loss")
    eval_every: int = opt(0, "steps between held-out evaluations (0: only at the end)")
    eval_n: int = opt(16, "held-out scenes per evaluation")
    save_every: int = opt(0, "steps between checkpoints (0: only at the end)")
    max_minutes: float = opt(0.0, "wall-clock limit in minutes (0: none)")
    save_dtype: str = opt("float32", "dtype of the saved weights", choices=DTYPES)
    fsdp: bool = opt(False, "FSDP instead of DDP under torchrun")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")
    progress: bool = opt(True, "progress bar")

    def __post_init__(self):
        self.image_size = tuple(int(v) for v in self.image_size)
        self.tasks = tuple(self.tasks)
        bad = [t for t in self.tasks if t not in DENSE_TASKS]
        if bad or not self.tasks:
            raise ValueError(f"tasks {list(self.tasks)}: expected a non-empty subset of {DENSE_TASKS}")
        check_choices(self)
        h, w = self.image_size
        if h % BLOCK or w % BLOCK or h <= 0 or w <= 0:
            raise ValueError(f"image size {h}x{w} must be positive multiples of {BLOCK}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_size"], d["tasks"] = list(self.image_size), list(self.tasks)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


@dataclass
class AblationConfig:
    """``densert ablation``: the same init, data stream and step budget for every vision loss."""

    losses: tuple[str, ...] = opt(("bce", "indep", "softmax", "ntpm"), "comma list of vision "
                                  "losses to compare", type=comma_list, metavar="LOSSES")
    steps: int = opt(60, "optimizer steps per loss")
    batch: int = opt(8, "samples per step")
    image_size: tuple[int, int] = opt((128, 128), f"HxW of the scenes, multiples of {BLOCK}",
                                      type=hw_size, metavar="HxW")
    tasks: tuple[str, ...] = opt(("segment",), "comma list of trained tasks", type=comma_list,
                                 metavar="TASKS")
    k: int = opt(32, "NTP-M relevant negatives per token")
    lr: float = opt(2e-3, "peak learning rate")
    scenes: int = opt(200, "distinct training scenes")
    seed: int = opt(0, "init and data seed, shared by every loss")
    eval_n: int = opt(32, "held-out scenes scored per loss")
    threads: int = opt(1, "torch threads (one keeps runs comparable on a shared machine)")

    def __post_init__(self):
        bad = [s for s in self.losses if s not in LOSSES]
        if bad or not self.losses:
            raise ValueError(f"losses: unknown {bad}; expected a subset of {LOSSES}")
        self.train_config(".")  # the per-loss TrainConfig validates sizes and tasks

    def train_config(self, out: str, loss: str = "ntpm") -> TrainConfig:
        return TrainConfig(out=out, steps=self.steps, batch=self.batch, image_size=self.image_size,
                           tasks=self.tasks, loss=loss, k=self.k, lr=self.lr,
                           warmup=max(1, self.steps // 10), seed=self.seed, scenes=self.scenes,
                           eval_n=0, progress=False, threads=self.threads)
