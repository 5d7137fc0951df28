"""``TrainConfig``: every training setting with its default and help, torch-free (the CLI's
``densert train`` flags are built from it; ``train_config.json`` is its JSON form)."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from densert.errors import OptionError
from densert.image import BLOCK
from densert.model.config import DTYPES, MODEL_SIZES
from densert.options import check_choices, check_range, comma_list, hw_size, opt
from densert.tasks import ALIGNMENTS, DENSE_TASKS
from densert.tasks.depth_bins import PRESETS

# Vision losses (training.losses): NTP-M and the paper's ablation baselines.
LOSSES = ("ntpm", "indep", "bce", "balanced", "focal", "ohem", "softmax")
PRECISIONS = ("fp32", "bf16")
# Kinds of rendered scene (training.scenes); "any": indoor or outdoor, by the seed.
SCENE_KINDS = ("any", "indoor", "outdoor")
# Parts --freeze can keep as they are (training.finetune.part_of names them).
FREEZABLE = ("vision", "merger", "llm")


@dataclass
class TrainConfig:
    out: str = opt("runs/densert-tiny", "checkpoint directory (released layout + trainer state)",
                   cli=False)
    init: str | None = opt(None, "start from this checkpoint directory (the released layout; its "
                                 "tokenizer is kept) (default: a fresh --model-size model)",
                           metavar="MODEL_DIR")
    model_size: str = opt("tiny", "architecture widths of a fresh model (not used with --init)",
                          choices=MODEL_SIZES)
    text_layers: int | None = opt(None, "LLM layer count (default: the model size's)", type=int)
    vision_layers: int | None = opt(None, "ViT layer count (default: the model size's)", type=int)
    steps: int = opt(1000, "optimizer steps")
    batch: int = opt(8, "samples per step (per rank)")
    image_size: tuple[int, int] = opt((256, 256), "HxW of the rendered training scenes, multiples "
                                                  f"of {BLOCK}; --data images keep their aspect "
                                                  "and get at most as many 16x16 patches",
                                      type=hw_size, metavar="HxW")
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
    depth_preset: str = opt("cityscapes", "depth preset of the rendered scenes' depth samples "
                                          "(--data folders name theirs in meta.json)",
                            choices=tuple(PRESETS))
    text_weight: float = opt(1.0, "weight of the text next-token loss")
    vision_weight: float = opt(1.0, "weight of the vision-token loss")
    eval_every: int = opt(0, "steps between evaluations (0: only at the end); with --data the "
                             "validation splits are scored and the best checkpoint kept in OUT/best")
    eval_n: int = opt(16, "held-out rendered scenes per evaluation (runs without --data)")
    save_every: int = opt(0, "steps between checkpoints (0: only at the end)")
    max_minutes: float = opt(0.0, "wall-clock limit in minutes (0: none)")
    save_dtype: str = opt("float32", "dtype of the saved weights", choices=DTYPES)
    fsdp: bool = opt(False, "FSDP (each decoder and ViT layer sharded) instead of DDP under "
                            "torchrun: full fine-tuning across GPUs")
    # Datasets on disk (training.userdata): `--data DIR` may be given several times (training.cli).
    data: tuple[str, ...] = opt((), "dataset folder (layout: training/README.md); repeat the "
                                    "flag for more (default: rendered scenes only)", cli=False)
    scene_ratio: float = opt(0.0, "with --data: share of samples drawn from rendered scenes "
                                  "instead (0: none)")
    val_fraction: float = opt(0.2, "with --data: share of a folder's images held out for "
                                   "validation when its meta.json names no split file")
    lora_rank: int = opt(0, "LoRA rank on the LLM's attention and MLP projections, with the LLM's "
                            "own weights frozen (0: no LoRA, full fine-tuning)")
    lora_alpha: float = opt(16.0, "LoRA scale: the update is B A * alpha / rank")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch input")
    freeze: tuple[str, ...] = opt((), "comma list of parts kept as they are: "
                                      f"{', '.join(FREEZABLE)} (default: none)", type=comma_list,
                                  metavar="PARTS")
    grad_checkpoint: bool = opt(False, "recompute each ViT and decoder layer in the backward "
                                       "(activation memory of one layer, one more forward)")
    threads: int = opt(0, "torch CPU threads (0: torch's default)")
    progress: bool = opt(True, "progress bar")

    def __post_init__(self):
        self.image_size = tuple(int(v) for v in self.image_size)
        self.tasks, self.data, self.freeze = tuple(self.tasks), tuple(self.data), tuple(self.freeze)
        bad = [t for t in self.tasks if t not in DENSE_TASKS]
        if bad or not self.tasks:
            raise OptionError(f"tasks {list(self.tasks)}: expected a non-empty subset of {DENSE_TASKS}")
        check_choices(self)
        self._check_numbers()
        h, w = self.image_size
        if h % BLOCK or w % BLOCK or h <= 0 or w <= 0:
            raise OptionError(f"image size {h}x{w} must be positive multiples of {BLOCK}")
        bad = [p for p in self.freeze if p not in FREEZABLE]
        if bad:
            raise OptionError(f"freeze: unknown part(s) {bad}; expected a subset of {FREEZABLE}")
        if set(self.freeze) >= set(FREEZABLE):
            raise OptionError(f"freeze: {','.join(self.freeze)} leaves nothing to train")
        if self.init and (self.text_layers or self.vision_layers):
            raise OptionError("--text-layers / --vision-layers shape a fresh model; --init keeps "
                             "its checkpoint's layers")
        if self.lora_rank and "llm" in self.freeze:
            raise OptionError("LoRA trains adapters on the LLM: do not also freeze llm")
        if self.lora_rank and self.fsdp:
            raise OptionError("LoRA is the one-GPU option (DDP under torchrun works too); FSDP is for "
                             "full fine-tuning")
        if self.data and self.scene_ratio == 1:
            raise OptionError("scene ratio 1 draws every sample from rendered scenes: drop --data")

    # Every number's range, checked where the field is declared: a value with no meaning (a
    # negative step count, a zero batch) is refused before any work, in the CLI and the API alike.
    _INTS = {"steps": 1, "batch": 1, "k": 1, "warmup": 0, "scenes": 1, "eval_every": 0,
             "eval_n": 0, "save_every": 0, "lora_rank": 0, "threads": 0, "seed": 0}

    def _check_numbers(self) -> None:
        name = type(self).__name__
        for f, lo in self._INTS.items():
            check_range(name, f, getattr(self, f), lo, integer=True)
        for f in ("text_layers", "vision_layers"):
            if getattr(self, f) is not None:
                check_range(name, f, getattr(self, f), 1, integer=True)
        check_range(name, "lr", self.lr, 0, lo_open=True)
        check_range(name, "min_lr_ratio", self.min_lr_ratio, 0, 1)
        check_range(name, "weight_decay", self.weight_decay, 0)
        check_range(name, "grad_clip", self.grad_clip, 0, lo_open=True)
        check_range(name, "text_weight", self.text_weight, 0)
        check_range(name, "vision_weight", self.vision_weight, 0)
        if self.text_weight == 0 and self.vision_weight == 0:
            raise OptionError(f"{name}: text_weight and vision_weight are both 0: nothing to train")
        check_range(name, "max_minutes", self.max_minutes, 0)
        check_range(name, "scene_ratio", self.scene_ratio, 0, 1)
        check_range(name, "val_fraction", self.val_fraction, 0, 1, hi_open=True)
        check_range(name, "lora_alpha", self.lora_alpha, 0, lo_open=True)
        check_range(name, "lora_dropout", self.lora_dropout, 0, 1, hi_open=True)

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("image_size", "tasks", "data", "freeze"):
            d[k] = list(getattr(self, k))
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
            raise OptionError(f"losses: unknown {bad}; expected a subset of {LOSSES}")
        check_range("AblationConfig", "eval_n", self.eval_n, 1, integer=True)
        self.train_config(".")  # the per-loss TrainConfig validates sizes and tasks

    def train_config(self, out: str, loss: str = "ntpm") -> TrainConfig:
        return TrainConfig(out=out, steps=self.steps, batch=self.batch, image_size=self.image_size,
                           tasks=self.tasks, loss=loss, k=self.k, lr=self.lr,
                           warmup=max(1, self.steps // 10), seed=self.seed, scenes=self.scenes,
                           eval_n=0, progress=False, threads=self.threads)
