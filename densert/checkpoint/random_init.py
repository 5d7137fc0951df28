"""Randomly initialised checkpoints in the released layout (tests, benchmarks, training from
scratch): HF-style init, deterministic per (seed, tensor name), generated one tensor at a time.

Every checkpoint ``make_test_checkpoint`` writes is marked as random: ``random_weights.json``
beside the weights (``RANDOM_MARK_FILE``) records how it was made and the sha256 of each weight
file. ``densert verify`` reads it (``read_random_mark``) and, when the engine was exported from
exactly those weight files (the hashes its manifest recorded), reports the checkpoint as random
weights instead of judging it by the metric gate, whose thresholds are set on a trained model.
The mark is a side file, not a field of config.json or the safetensors metadata, so nothing that
writes weights (training, conversion) carries it on by accident; it counts only for weight files
with the recorded hashes, so weights written over a marked directory are not taken for random.
Checkpoints made before the mark existed have none and are judged like any trained checkpoint;
running ``make-test-checkpoint`` again with the same arguments (and ``--force``) writes the same
bytes (the init is deterministic) plus the mark, so engines exported from them stay valid.
"""
from __future__ import annotations

import hashlib
import json
import zlib
from dataclasses import dataclass
from pathlib import Path

import torch

from densert.errors import CheckpointError
from densert.model.config import MODEL_SIZES, YoutuVLConfig, sized_config
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.text import tokens
from densert.text.tokenizer import apply_token_ids, build_tokenizer_json

from .model_dir import prepare_out_dir, saved_names, weight_files, write_side_files, write_weights
from .safetensors import dtype_name, resolve_dtype

_INIT_CHUNK = 2**24   # values generated per step: bounds the fp32 scratch to 64 MB
RANDOM_MARK_FILE = "random_weights.json"


def init_kind(model, name: str) -> str:
    """HF-style init of one parameter: "normal" (Linear/Embedding weights), "ones" (norm
    weights) or "zeros" (biases)."""
    mod_name, _, leaf = name.rpartition(".")
    mod = model.get_submodule(mod_name)
    if leaf == "bias":
        return "zeros"
    if isinstance(mod, (torch.nn.Linear, torch.nn.Embedding)):
        return "normal"
    return "ones"   # RMSNorm / LayerNorm weights


def init_tensor(name: str, kind: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int,
                std: float) -> torch.Tensor:
    """A deterministic tensor that depends only on (seed, name, shape), generated in chunks."""
    if kind == "zeros":
        return torch.zeros(shape, dtype=dtype)
    if kind == "ones":
        return torch.ones(shape, dtype=dtype)
    g = torch.Generator().manual_seed((seed * 0x9E3779B1 + zlib.crc32(name.encode())) % 2**63)
    out = torch.empty(shape, dtype=dtype)
    flat = out.view(-1)
    for s in range(0, flat.numel(), _INIT_CHUNK):
        n = min(_INIT_CHUNK, flat.numel() - s)
        flat[s:s + n] = torch.randn(n, generator=g).mul_(std)
    return out


def sized_config_and_tokenizer(size: str, text_layers: int | None = None,
                               vision_layers: int | None = None) -> tuple[YoutuVLConfig, str]:
    """The config of a model size with token ids set from its tokenizer, and that tokenizer's JSON."""
    if size not in MODEL_SIZES:
        raise CheckpointError(f"unknown model size {size!r}; expected one of {MODEL_SIZES}")
    cfg = sized_config(size, text_layers, vision_layers)
    tok = build_tokenizer_json(size)
    apply_token_ids(cfg, tokens.Vocab.from_str(tok))
    cfg.validate()
    return cfg, tok


def make_test_checkpoint(out: str | Path, size: str = "tiny", text_layers: int | None = None,
                         vision_layers: int | None = None, seed: int = 0,
                         dtype: str | torch.dtype = "bfloat16", max_shard_bytes: int | None = None,
                         overwrite: bool = False, progress: bool = False) -> Path:
    """A randomly initialised checkpoint (HF-style init, deterministic per seed).

    The module is only built on the ``meta`` device to list names and shapes; every tensor is
    generated straight in the target dtype and written before the next one is made, so peak
    memory is about one tensor (the full-width embedding: 283386 x 2560).
    """
    dt = resolve_dtype(dtype)
    cfg, tok = sized_config_and_tokenizer(size, text_layers, vision_layers)
    cfg.torch_dtype = dtype_name(dt)
    with torch.device("meta"):
        meta = YoutuVLForConditionalGeneration(cfg)
    sd = meta.state_dict()
    names = saved_names(meta)
    kinds = {n: init_kind(meta, n) for n in names}
    specs = [(n, dt, tuple(sd[n].shape)) for n in names]
    outp = prepare_out_dir(out, overwrite)
    write_side_files(outp, cfg, tok)
    (outp / RANDOM_MARK_FILE).unlink(missing_ok=True)   # no mark while the weights are half written
    write_weights(outp, specs, lambda n: init_tensor(n, kinds[n], tuple(sd[n].shape), dt, seed,
                                                      cfg.initializer_range),
                   max_shard_bytes, progress)
    write_random_mark(outp, {"model_size": size, "text_layers": cfg.num_hidden_layers,
                             "vision_layers": cfg.vision_config.num_hidden_layers, "seed": seed,
                             "dtype": dtype_name(dt)})
    return outp


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def write_random_mark(path: str | Path, made_with: dict) -> Path:
    """Mark the checkpoint in ``path`` as random weights (``RANDOM_MARK_FILE``)."""
    path = Path(path)
    mark = {"random_weights": True, "made_by": "densert make-test-checkpoint",
            "init": "HF-style: normal(0, initializer_range) Linear / Embedding weights, ones for "
                    "norms, zeros for biases; deterministic per (seed, tensor name)",
            **made_with, "weights_sha256": {f.name: _sha256(f) for f in weight_files(path)}}
    out = path / RANDOM_MARK_FILE
    out.write_text(json.dumps(mark, indent=2) + "\n")
    return out


@dataclass(frozen=True)
class RandomMark:
    """A checkpoint's random-weights mark: how it was made and the sha256 of each weight file."""

    path: Path
    made_with: dict
    weights_sha256: dict

    def describes(self, weights_sha256: dict) -> bool:
        """True when the given weight files ({name: sha256}, e.g. those an engine's manifest
        recorded at export) are exactly the marked ones."""
        return weights_sha256 == self.weights_sha256


def read_random_mark(path: str | Path) -> RandomMark | None:
    """The random-weights mark of a checkpoint directory, or None without one. Whether it still
    describes the weights is ``RandomMark.describes`` (or ``is_current``)."""
    f = Path(path) / RANDOM_MARK_FILE
    if not f.is_file():
        return None
    try:
        mark = json.loads(f.read_text())
        recorded = mark["weights_sha256"]
        if mark.get("random_weights") is not True or not isinstance(recorded, dict):
            raise ValueError("random_weights is not true or weights_sha256 is not an object")
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{f}: not a random-weights mark ({e}); delete it, or re-run "
                              "`densert make-test-checkpoint` to write it again") from None
    made_with = {k: v for k, v in mark.items() if k not in ("random_weights", "weights_sha256")}
    return RandomMark(f, made_with, recorded)


def is_current(mark: RandomMark) -> bool:
    """The mark describes the weight files in its directory now (hashes every weight file)."""
    return mark.describes({f.name: _sha256(f) for f in weight_files(mark.path.parent)})
