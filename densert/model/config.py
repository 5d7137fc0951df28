"""Configuration of a Youtu-VL (DenseMLLM) checkpoint, parsed from its HF ``config.json``.

The released layout is flat: text (LLM) fields at the root, vision fields under ``vision_config``
(spec ``youtu-vl-checkpoint.md`` sec. 1). Field names are the checkpoint's own so a released
config round-trips unchanged; unknown keys are kept in ``extra`` and written back.
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from densert.errors import ConfigError

MODEL_TYPE = "youtu_vl"
VISION_MODEL_TYPE = "siglip2_vision_model"
ARCHITECTURE = "YoutuVLForConditionalGeneration"
# Model sizes of make-test-checkpoint / train: the released widths and a small one.
MODEL_SIZES = ("tiny", "youtu-vl-4b")
# Weight dtypes a model is loaded in or written as (torch names; the loader maps them to torch).
DTYPES = ("float32", "bfloat16", "float16")
# KV cache layouts of the decoder (densert.model.llm): the MLA latent, or per-head keys/values.
CACHE_LAYOUTS = ("latent", "full")


@dataclass
class VisionConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_hidden_layers: int = 27
    num_attention_heads: int = 16
    num_channels: int = 3
    patch_size: int = 16
    spatial_merge_size: int = 2
    # Window edge in *pixels*: 256 px = 8x8 merged cells = 16x16 patches (spec sec. 1.2).
    window_size: int = 256
    fullatt_block_indexes: list[int] = field(default_factory=lambda: [7, 15, 23, 26])
    out_hidden_size: int = 2560
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6
    attention_dropout: float = 0.0
    # Not in the released config: the 2-D RoPE base of the vision tower (spec sec. 4.2).
    rope_theta: float = 10000.0
    model_type: str = VISION_MODEL_TYPE
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def patch_dim(self) -> int:
        """Values per flattened patch row: (py, px, channel), channel fastest."""
        return self.patch_size * self.patch_size * self.num_channels

    @property
    def merge_unit(self) -> int:
        """Patches per merged token (2x2)."""
        return self.spatial_merge_size**2

    @property
    def merged_patch_px(self) -> int:
        """Input pixels covered by one merged token along each side (32)."""
        return self.patch_size * self.spatial_merge_size

    @property
    def window_cells(self) -> int:
        """Merged cells along each side of one attention window (8)."""
        return self.window_size // self.merged_patch_px

    def validate(self) -> None:
        _check_fields(self, "vision_config.")
        _check(self.hidden_size % self.num_attention_heads == 0,
               f"vision_config.hidden_size {self.hidden_size} is not divisible by "
               f"num_attention_heads {self.num_attention_heads}")
        _check(self.head_dim % 4 == 0,
               f"vision head_dim {self.head_dim} must be divisible by 4 for 2-D RoPE")
        _check(self.window_size % self.merged_patch_px == 0,
               f"vision_config.window_size {self.window_size} must be a multiple of "
               f"patch_size*spatial_merge_size = {self.merged_patch_px}")
        bad = [i for i in self.fullatt_block_indexes if not 0 <= i < self.num_hidden_layers]
        _check(not bad, f"vision_config.fullatt_block_indexes {bad} out of range for "
                        f"{self.num_hidden_layers} layers")
        _check(self.hidden_act in _ACTS, f"vision_config.hidden_act {self.hidden_act!r} "
                                          f"not supported (expected one of {sorted(_ACTS)})")


@dataclass
class YoutuVLConfig:
    """Root config: the LLM fields (flat, as released) plus ``vision_config``."""

    vocab_size: int = 283386
    hidden_size: int = 2560
    intermediate_size: int = 9728
    num_hidden_layers: int = 40
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    q_lora_rank: int | None = 1536
    kv_lora_rank: int = 512
    qk_rope_head_dim: int = 64
    qk_nope_head_dim: int = 128
    v_head_dim: int = 128
    hidden_act: str = "silu"
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    rope_theta: float = 500000.0
    rope_interleave: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02
    bos_token_id: int = 128000
    eos_token_id: int = 128001
    pad_token_id: int = 128001
    image_token_id: int = 128264
    video_token_id: int = 128265
    vision_start_token_id: int = 128262
    vision_end_token_id: int = 128263
    torch_dtype: str = "bfloat16"
    model_type: str = MODEL_TYPE
    architectures: list[str] = field(default_factory=lambda: [ARCHITECTURE])
    vision_config: VisionConfig = field(default_factory=VisionConfig)
    extra: dict[str, Any] = field(default_factory=dict, repr=False)

    # ---- derived shape rules (one place) ----
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_cache_dim(self) -> int:
        """Values cached per token per layer in the MLA latent layout (512 + 64)."""
        return self.kv_lora_rank + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        return self.qk_head_dim**-0.5

    def validate(self) -> None:
        _check_fields(self, "")
        _check(self.model_type == MODEL_TYPE,
               f"model_type is {self.model_type!r}, expected {MODEL_TYPE!r} (a Youtu-VL checkpoint)")
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                     "num_attention_heads", "kv_lora_rank", "qk_rope_head_dim",
                     "qk_nope_head_dim", "v_head_dim"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"{name} must be a positive integer, got {v!r}")
        _check(self.qk_rope_head_dim % 2 == 0,
               f"qk_rope_head_dim {self.qk_rope_head_dim} must be even")
        _check(self.hidden_act in _ACTS,
               f"hidden_act {self.hidden_act!r} not supported (expected one of {sorted(_ACTS)})")
        ids = {k: getattr(self, k) for k in ("bos_token_id", "eos_token_id", "image_token_id",
                                             "vision_start_token_id", "vision_end_token_id")}
        bad = {k: v for k, v in ids.items() if not (isinstance(v, int) and 0 <= v < self.vocab_size)}
        _check(not bad, f"token ids outside the vocabulary (vocab_size {self.vocab_size}): {bad}")
        _check(self.vision_config.out_hidden_size == self.hidden_size,
               f"vision_config.out_hidden_size {self.vision_config.out_hidden_size} must equal "
               f"hidden_size {self.hidden_size} (merger output feeds the LLM)")
        self.vision_config.validate()

    # ---- (de)serialisation ----
    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "YoutuVLConfig":
        if not isinstance(d, dict):
            raise ConfigError(f"config must be a JSON object, got {type(d).__name__}")
        d = dict(d)
        if "model_type" not in d:
            raise ConfigError(f"config has no model_type; expected {MODEL_TYPE!r}")
        if d["model_type"] != MODEL_TYPE:
            raise ConfigError(f"model_type is {d['model_type']!r}, expected {MODEL_TYPE!r} "
                              "(a Youtu-VL checkpoint)")
        vd = d.pop("vision_config", None)
        if not isinstance(vd, dict):
            raise ConfigError("config has no vision_config object")
        # HF 5.x may write rope_theta inside rope_parameters; accept both spellings.
        rp = d.get("rope_parameters")
        if isinstance(rp, dict) and "rope_theta" in rp and "rope_theta" not in d:
            d["rope_theta"] = rp["rope_theta"]
        if d.get("rope_scaling"):
            raise ConfigError(f"rope_scaling {d['rope_scaling']!r} is not supported: the released "
                              "Youtu-VL uses plain RoPE")
        cfg = cls(**_split_known(cls, d), vision_config=VisionConfig(**_split_known(VisionConfig, vd)))
        try:
            cfg.validate()
        except (TypeError, ValueError) as e:
            raise ConfigError(str(e)) from None
        return cfg

    @classmethod
    def from_json_file(cls, path: str | Path) -> "YoutuVLConfig":
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"{path}: no such file (a checkpoint directory needs config.json)")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ConfigError(f"{path}: not valid JSON ({e})") from None
        try:
            return cls.from_dict(d)
        except ConfigError as e:
            raise ConfigError(f"{path}: {e}") from None

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in _fields(self).items() if k not in ("vision_config", "extra")}
        out.update(self.extra)
        vd = {k: v for k, v in _fields(self.vision_config).items() if k != "extra"}
        vd.update(self.vision_config.extra)
        out["vision_config"] = vd
        return out

    def to_json_file(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")


_ACTS = {"silu", "gelu", "gelu_pytorch_tanh", "gelu_new"}

# Plausible ranges of the numeric fields: a value outside is a damaged or foreign config, and
# must fail here with its name rather than as a ZeroDivisionError, a hang building 1e9 layers,
# or an allocation of terabytes. (lo, hi) inclusive; floats checked finite too.
_RANGES: dict[str, tuple[float, float]] = {
    "vocab_size": (1, 10_000_000), "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 20),
    "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024), "q_lora_rank": (1, 65536), "kv_lora_rank": (1, 65536),
    "qk_rope_head_dim": (1, 4096), "qk_nope_head_dim": (1, 4096), "v_head_dim": (1, 4096),
    "max_position_embeddings": (1, 1 << 26), "rms_norm_eps": (1e-12, 1.0),
    "layer_norm_eps": (1e-12, 1.0), "rope_theta": (1e-6, 1e12), "initializer_range": (0.0, 10.0),
    "attention_dropout": (0.0, 1.0), "num_channels": (1, 4), "patch_size": (1, 64),
    "spatial_merge_size": (1, 16), "window_size": (1, 1 << 16), "out_hidden_size": (1, 65536),
}


def _check_fields(obj, prefix: str) -> None:
    """Every field holds the type of its default (a string where a number belongs is a clear
    error, not a TypeError later) and, where ``_RANGES`` has one, a value in range."""
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        default = f.default
        if default is dataclasses.MISSING or f.name == "extra":
            continue
        name = prefix + f.name
        if isinstance(default, bool):
            _check(isinstance(v, bool), f"{name} must be true or false, got {v!r}")
        elif isinstance(default, (int, float)) or (default is None and f.name in _RANGES):
            if v is None and "None" in str(f.type):  # an optional field, e.g. q_lora_rank
                continue
            want_int = isinstance(default, int) or default is None
            ok = isinstance(v, int) if want_int else isinstance(v, (int, float))
            _check(ok and not isinstance(v, bool),
                   f"{name} must be {'an integer' if want_int else 'a number'}, got {v!r}")
            _check(math.isfinite(v), f"{name} must be finite, got {v!r}")
            lo, hi = _RANGES.get(f.name, (-math.inf, math.inf))
            _check(lo <= v <= hi, f"{name} {v!r} is outside the plausible range {lo:g}..{hi:g}")
        elif isinstance(default, str):
            _check(isinstance(v, str), f"{name} must be a string, got {v!r}")


def _check(ok: bool, msg: str) -> None:
    if not ok:
        raise ConfigError(msg)


def _fields(obj) -> dict[str, Any]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}


def _split_known(cls, d: dict[str, Any]) -> dict[str, Any]:
    names = {f.name for f in dataclasses.fields(cls)} - {"vision_config", "extra"}
    known = {k: v for k, v in d.items() if k in names}
    known["extra"] = {k: v for k, v in d.items() if k not in names and k != "vision_config"}
    return known


# ---- model sizes for make-test-checkpoint and train ----
def sized_config(size: str, text_layers: int | None = None, vision_layers: int | None = None
                 ) -> YoutuVLConfig:
    """``youtu-vl-4b``: the released widths; ``tiny``: the same architecture at small width.

    Layer counts can be overridden so full-width shapes can be checked with few layers.
    Token ids and vocab_size of ``tiny`` are set by the tokenizer that ships with it
    (see ``densert.text.tokenizer``); the values here are placeholders overwritten there.
    """
    if size == "youtu-vl-4b":
        cfg = YoutuVLConfig()
    elif size == "tiny":
        cfg = YoutuVLConfig(
            hidden_size=256, intermediate_size=768, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, q_lora_rank=96, kv_lora_rank=64, qk_rope_head_dim=16,
            qk_nope_head_dim=32, v_head_dim=32, max_position_embeddings=16384,
            vision_config=VisionConfig(hidden_size=192, intermediate_size=576, num_hidden_layers=4,
                                       num_attention_heads=4, fullatt_block_indexes=[1, 3],
                                       out_hidden_size=256))
    else:
        raise ConfigError(f"unknown model size {size!r}; expected one of {MODEL_SIZES}")
    if text_layers is not None:
        cfg.num_hidden_layers = text_layers
    if vision_layers is not None:
        vc = cfg.vision_config
        vc.num_hidden_layers = vision_layers
        # Keep the released rule "(i+1) % 8 == 0 or last" so a few-layer tower still has a full layer.
        vc.fullatt_block_indexes = sorted({i for i in range(vision_layers)
                                           if (i + 1) % 8 == 0 or i == vision_layers - 1})
    return cfg
