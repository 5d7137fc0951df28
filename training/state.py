"""Trainer state on disk without pickle: tensors in ``trainer_state.safetensors``, everything else
(step, schedule, optimizer hyper-parameters, RNG states, config) in ``trainer_state.json``.

A checkpoint directory may come from anyone; reading it must not run code. ``torch.load`` (even
with an allow-list) and ``pickle`` are never used here. A directory that holds only a legacy
``trainer_state.pt`` is refused with a message, and the file is never opened.

Nested state (an optimizer's ``state_dict()``, RNG states) is encoded as JSON with each tensor
replaced by ``{"tensor": KEY, "shape": [...]}`` (its data in the safetensors file under KEY), tuples as
``{"tuple": [...]}`` and dicts with non-string keys as ``{"items": [[key, value], ...]}``; decoding
builds nothing but dicts, lists, tuples, numbers, strings and tensors.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from densert.checkpoint.loader import read_tensor
from densert.checkpoint.safetensors import TORCH_TO_ST, read_safetensors_header, write_safetensors
from densert.errors import CheckpointError

STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
LEGACY_PICKLE = "trainer_state.pt"
FORMAT = 1


def _encode(obj, key: str, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.dtype not in TORCH_TO_ST:
            raise TypeError(f"{key}: tensor dtype {t.dtype} has no safetensors name")
        tensors[key] = t.reshape(-1).contiguous()   # 0-dim too: stored as one element
        return {"tensor": key, "shape": list(t.shape)}
    if isinstance(obj, np.ndarray):
        return _encode(torch.from_numpy(np.ascontiguousarray(obj)), key, tensors)
    if isinstance(obj, dict):
        if all(isinstance(k, str) for k in obj):
            if set(obj) in ({"tensor", "shape"}, {"tuple"}, {"items"}):
                return {"items": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
            return {k: _encode(v, f"{key}.{k}", tensors) for k, v in obj.items()}
        return {"items": [[k, _encode(v, f"{key}.{k}", tensors)] for k, v in obj.items()]}
    if isinstance(obj, tuple):
        return {"tuple": [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]}
    if isinstance(obj, list):
        return [_encode(v, f"{key}.{i}", tensors) for i, v in enumerate(obj)]
    if isinstance(obj, (np.integer, np.floating)):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"{key}: cannot store a {type(obj).__name__} in the trainer state")


def _decode(obj, tensors: dict[str, torch.Tensor]):
    if isinstance(obj, list):
        return [_decode(v, tensors) for v in obj]
    if isinstance(obj, dict):
        if set(obj) == {"tensor", "shape"}:
            return tensors[obj["tensor"]].reshape(obj["shape"])
        if len(obj) == 1 and "tuple" in obj:
            return tuple(_decode(v, tensors) for v in obj["tuple"])
        if len(obj) == 1 and "items" in obj:
            return {(tuple(k) if isinstance(k, list) else k): _decode(v, tensors)
                    for k, v in obj["items"]}
        return {k: _decode(v, tensors) for k, v in obj.items()}
    return obj


def rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"python": random.getstate(), "torch": torch.get_rng_state(),
            "numpy": (name, keys.astype(np.int64), pos, has_gauss, cached)}


def set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    name, keys, pos, has_gauss, cached = s["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(s["torch"].to(torch.uint8))


def save_state(out: str | Path, state: dict, extra_tensors: dict[str, torch.Tensor] | None = None
               ) -> None:
    """``state`` (nested dicts / lists / tuples / tensors / numbers) -> the two files in ``out``;
    ``extra_tensors`` are stored as they are under their own names (e.g. LoRA adapter weights)."""
    out = Path(out)
    tensors: dict[str, torch.Tensor] = {}
    doc = {"format": FORMAT, "state": _encode(state, "state", tensors),
           "extra": sorted(extra_tensors or {})}
    for name, t in (extra_tensors or {}).items():
        tensors[f"extra.{name}"] = t.detach().cpu().contiguous()
    specs = [(k, t.dtype, tuple(t.shape)) for k, t in tensors.items()]
    write_safetensors(out / STATE_TENSORS, specs, tensors.__getitem__)
    (out / STATE_JSON).write_text(json.dumps(doc, indent=1) + "\n")
    (out / LEGACY_PICKLE).unlink(missing_ok=True)   # a stale pickle beside it would only mislead


def load_state(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """-> (state, extra tensors). Raises CheckpointError for a pickle-only or broken directory."""
    p = Path(path)
    if not (p / STATE_JSON).is_file():
        if (p / LEGACY_PICKLE).is_file():
            raise CheckpointError(
                f"{p / LEGACY_PICKLE}: densert never unpickles trainer state (a pickle can run "
                f"code); resume needs {STATE_JSON} + {STATE_TENSORS}, which this densert writes")
        raise CheckpointError(f"{p}: no {STATE_JSON}; not a training checkpoint to resume from")
    try:
        doc = json.loads((p / STATE_JSON).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{p / STATE_JSON}: not readable JSON ({e})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise CheckpointError(f"{p / STATE_JSON}: not a densert trainer state of format {FORMAT}")
    infos = read_safetensors_header(p / STATE_TENSORS)
    with open(p / STATE_TENSORS, "rb") as f:
        tensors = {k: read_tensor(i, f) for k, i in infos.items()}
    try:
        state = _decode(doc["state"], tensors)
        extra = {n: tensors[f"extra.{n}"] for n in doc["extra"]}
    except (KeyError, TypeError, ValueError) as e:
        raise CheckpointError(f"{p / STATE_JSON}: does not match {STATE_TENSORS} ({e!r})") from None
    return state, extra
