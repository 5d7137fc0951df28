"""Randomly initialised checkpoints in the released layout (tests, benchmarks, training from
scratch): HF-style init, deterministic per (seed, tensor name), generated one tensor at a time."""
from __future__ import annotations

import zlib
from pathlib import Path

import torch

from densert.errors import CheckpointError
from densert.model.config import MODEL_SIZES, YoutuVLConfig, sized_config
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.text import tokens as T
from densert.text.tokenizer import apply_token_ids, build_tokenizer_json

from .model_dir import prepare_out_dir, saved_names, write_side_files, write_weights
from .safetensors import dtype_name, resolve_dtype

_INIT_CHUNK = 2**24   # values generated per step: bounds the fp32 scratch to 64 MB


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
    apply_token_ids(cfg, T.Vocab.from_str(tok))
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
    write_weights(outp, specs, lambda n: init_tensor(n, kinds[n], tuple(sd[n].shape), dt, seed,
                                                      cfg.initializer_range),
                   max_shard_bytes, progress)
    return outp
