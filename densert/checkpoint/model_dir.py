"""A model directory in the released HF layout: which files it holds, reading its side files
(config, tokenizer, chat template, generation and task defaults), and writing a checkpoint.

Layout written (spec ``youtu-vl-checkpoint.md`` sec. 0-2, 6): config.json, model.safetensors or
model-0000k-of-0000n.safetensors + model.safetensors.index.json, tokenizer.json,
tokenizer_config.json, special_tokens_map.json, chat_template.json, generation_config.json,
preprocessor_config.json. A tied ``lm_head.weight`` is not written (the released convention).
The weight files themselves are read and written by ``safetensors.py``.
"""
from __future__ import annotations

import hashlib
import json
import math
import struct
from pathlib import Path

import torch

from densert.errors import CheckpointError, ConfigError
from densert.model.config import YoutuVLConfig
from densert.text import tokens
from densert.text.chat import BUILTIN_TEMPLATE, CHAT_TEMPLATE, ChatTemplate

from .safetensors import (
    MAX_HEADER_BYTES,
    TensorInfo,
    dtype_name,
    read_safetensors_header,
    resolve_dtype,
    write_safetensors,
)

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


def fingerprint(path: str | Path) -> str:
    """sha256 over config.json, tokenizer.json and every weight file's name, size and header:
    tells checkpoints apart in milliseconds without reading the weights (``densert export``
    records full file hashes for provenance)."""
    path = check_checkpoint_dir(path)
    h = hashlib.sha256()
    for name in ("config.json", "tokenizer.json"):
        if (path / name).is_file():
            h.update(name.encode() + b"\0" + (path / name).read_bytes())
    for f in weight_files(path):
        with open(f, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else 0
            h.update(f.name.encode() + b"\0" + str(f.stat().st_size).encode() + head
                     + fh.read(min(n, MAX_HEADER_BYTES)))
    return h.hexdigest()


# A model directory may declare the task options it was made for (the bundled model was trained
# with the Cityscapes depth preset); commands use them when the user gives none.
TASK_DEFAULTS_FILE = "task_defaults.json"


def read_task_defaults(path: str | Path) -> dict:
    """``{"depth": {"preset": ...}}`` from ``task_defaults.json``, validated; {} without one."""
    f = Path(path) / TASK_DEFAULTS_FILE
    if not f.is_file():
        return {}
    d = _read_json(f)
    from densert.tasks.depth_bins import PRESETS
    unknown = set(d) - {"depth"} or set(d.get("depth", {})) - {"preset"}
    if unknown:
        raise CheckpointError(f"{f}: unknown keys {sorted(unknown)}; densert reads depth.preset")
    preset = d.get("depth", {}).get("preset")
    if preset is not None and preset not in PRESETS:
        raise CheckpointError(f"{f}: depth.preset {preset!r} is not one of {tuple(PRESETS)}")
    return d


GENERATION_CONFIG_FILE = "generation_config.json"


def read_generation_config(path: str | Path) -> dict:
    """The decoding fields densert honours from ``generation_config.json`` ({} without one):
    ``max_new_tokens``, ``repetition_penalty`` and ``eos_token_id`` (an id or a list of ids),
    type-checked. The sampling fields (``do_sample``, ``temperature``, ``top_p``) are not read:
    densert decodes greedily, which the release's top_p 0.001 amounts to
    (``densert.model.generation``)."""
    f = Path(path) / GENERATION_CONFIG_FILE
    if not f.is_file():
        return {}
    d = _read_json(f)
    out = {}
    n = d.get("max_new_tokens")
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int) or n < 1:
            raise CheckpointError(f"{f}: max_new_tokens must be an integer >= 1, got {n!r}")
        out["max_new_tokens"] = n
    p = d.get("repetition_penalty")
    if p is not None:
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not (math.isfinite(p) and p > 0):
            raise CheckpointError(f"{f}: repetition_penalty must be a number > 0, got {p!r}")
        out["repetition_penalty"] = float(p)
    eos = d.get("eos_token_id")
    if eos is not None:
        ids = eos if isinstance(eos, list) else [eos]
        if not ids or any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in ids):
            raise CheckpointError(f"{f}: eos_token_id must be a token id or a list of ids, got {eos!r}")
        out["eos_token_id"] = ids
    return out


# Where a checkpoint keeps its chat template, in the order transformers' processor looks.
CHAT_TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json", "tokenizer_config.json")


def read_chat_template(path: str | Path) -> ChatTemplate | None:
    """The checkpoint's own chat template (``chat_template.jinja``, else ``chat_template.json``,
    else ``tokenizer_config.json``; a list of named templates gives its "default"), with the
    special-token strings its tokenizer config declares; None when it has none."""
    p = Path(path)
    for name in CHAT_TEMPLATE_FILES:
        f = p / name
        if not f.is_file():
            continue
        if name.endswith(".jinja"):
            try:
                return ChatTemplate(f.read_text(), str(f), _special_token_strings(p))
            except (OSError, UnicodeDecodeError) as e:
                raise CheckpointError(f"{f}: cannot read ({e})") from None
        t = _read_json(f).get("chat_template")
        if isinstance(t, list):
            named = {x.get("name"): x.get("template") for x in t if isinstance(x, dict)}
            t = named.get("default")
        if t is None:
            continue
        if not isinstance(t, str):
            raise CheckpointError(f"{f}: chat_template must be a string or a list of named "
                                  f"templates with a 'default', got {type(t).__name__}")
        return ChatTemplate(t, str(f), _special_token_strings(p))
    return None


def _special_token_strings(path: Path) -> dict:
    """bos/eos/pad/unk token strings of the tokenizer config (what transformers passes to a chat
    template), densert's own where the checkpoint declares none."""
    out = dict(BUILTIN_TEMPLATE.special_tokens)
    for name in ("special_tokens_map.json", "tokenizer_config.json"):
        f = path / name
        if f.is_file():
            for k, v in _read_json(f).items():
                if k in ("bos_token", "eos_token", "pad_token", "unk_token"):
                    v = v.get("content") if isinstance(v, dict) else v
                    if isinstance(v, str):
                        out[k] = v
    return out


def _read_json(path: Path) -> dict:
    try:
        d = json.loads(path.read_text())
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(d).__name__}")
    return d


def check_checkpoint_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint directory")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a directory (give the checkpoint directory, not a file)")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path}: not a checkpoint directory (no config.json)")
    return path


def read_config(path: str | Path) -> YoutuVLConfig:
    path = check_checkpoint_dir(path)
    try:
        return YoutuVLConfig.from_json_file(path / "config.json")
    except ConfigError as e:
        raise CheckpointError(str(e)) from None


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a checkpoint: the shards named by the index, else the single file."""
    path = check_checkpoint_dir(path)
    index = path / INDEX_FILE
    if index.is_file():
        d = _read_json(index)
        wm = d.get("weight_map")
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index}: no 'weight_map' object")
        shards = sorted(set(wm.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise CheckpointError(f"{index}: names shard(s) that do not exist in {path}: {missing}")
        return [path / s for s in shards]
    single = path / SINGLE_FILE
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path}: no weights ({SINGLE_FILE} or {INDEX_FILE}) found")


def read_all_headers(path: str | Path) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (headers only), checked against the index if there is one."""
    path = check_checkpoint_dir(path)
    files = weight_files(path)
    infos: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_safetensors_header(f).items():
            if name in infos:
                raise CheckpointError(f"tensor {name!r} appears in both {infos[name].path.name} "
                                      f"and {f.name}")
            infos[name] = info
    index = path / INDEX_FILE
    if index.is_file():
        wm = _read_json(index)["weight_map"]
        wrong = sorted(n for n, s in wm.items() if n not in infos or infos[n].path.name != s)
        if wrong:
            raise CheckpointError(f"{index}: weight_map disagrees with the shards for "
                                  f"{len(wrong)} tensor(s), e.g. {wrong[:5]}")
    return infos


# ---------------------------------------------------------------- writing
def _plan_shards(specs, max_shard_bytes: int | None) -> list[list]:
    if not max_shard_bytes:
        return [list(specs)]
    shards: list[list] = [[]]
    size = 0
    for s in specs:
        nbytes = math.prod(s[2]) * s[1].itemsize
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(s)
        size += nbytes
    return shards


def write_weights(out: Path, specs, produce, max_shard_bytes, progress: bool) -> list[str]:
    total = sum(math.prod(s[2]) * s[1].itemsize for s in specs)
    shards = _plan_shards(specs, max_shard_bytes)
    bar = None
    if progress:
        from tqdm import tqdm
        bar = tqdm(total=total, unit="B", unit_scale=True, desc="writing weights")
    names = ([SINGLE_FILE] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    try:
        for fname, shard in zip(names, shards):
            write_safetensors(out / fname, shard, produce, bar.update if bar else None)
    finally:
        if bar:
            bar.close()
    if len(shards) > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {s[0]: fname for fname, shard in zip(names, shards) for s in shard}}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return names


def _dump(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n")


def write_side_files(out: Path, cfg: YoutuVLConfig, tokenizer_json: str) -> None:
    """config.json plus the tokenizer, template, generation and preprocessor files."""
    vocab = tokens.Vocab.from_str(tokenizer_json, "tokenizer.json")
    _check_ids(cfg, vocab)
    cfg.to_json_file(out / "config.json")
    (out / "tokenizer.json").write_text(tokenizer_json)
    special = {"bos_token": tokens.BOS, "eos_token": tokens.EOS, "pad_token": tokens.EOS}
    _dump(out / "special_tokens_map.json", special)
    _dump(out / "tokenizer_config.json", {
        **special, "add_bos_token": False, "add_eos_token": False, "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False, "model_max_length": cfg.max_position_embeddings,
        "tokenizer_class": "PreTrainedTokenizerFast"})
    _dump(out / "chat_template.json", {"chat_template": CHAT_TEMPLATE})
    # Decoding settings of the released README/demo (spec sec. 7): effectively greedy.
    _dump(out / "generation_config.json", {
        "bos_token_id": cfg.bos_token_id, "eos_token_id": cfg.eos_token_id,
        "pad_token_id": cfg.pad_token_id, "do_sample": True, "temperature": 0.1, "top_p": 0.001,
        "repetition_penalty": 1.05})
    vc = cfg.vision_config
    # max_num_patches mirrors the released file (256); the processor really uses 36864 (spec sec. 3).
    _dump(out / "preprocessor_config.json", {
        "image_processor_type": "Siglip2ImageProcessorFast", "processor_class": "YoutuVLProcessor",
        "do_resize": True, "resample": 2, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
        "patch_size": vc.patch_size, "merge_size": vc.spatial_merge_size, "max_num_patches": 256,
        "max_image_patches": 36864})


def _check_ids(cfg: YoutuVLConfig, vocab: tokens.Vocab) -> None:
    want = {"vocab_size": len(vocab), "bos_token_id": vocab.token_id(tokens.BOS),
            "eos_token_id": vocab.token_id(tokens.EOS), "image_token_id": vocab.token_id(tokens.IMAGE_PAD),
            "video_token_id": vocab.token_id(tokens.VIDEO_PAD),
            "vision_start_token_id": vocab.token_id(tokens.VISION_START),
            "vision_end_token_id": vocab.token_id(tokens.VISION_END)}
    bad = {k: (getattr(cfg, k), v) for k, v in want.items() if getattr(cfg, k) != v}
    if bad:
        raise CheckpointError("config token ids disagree with tokenizer.json (config, tokenizer): "
                              f"{bad}; use densert.text.tokenizer.apply_token_ids")


def _tokenizer_text(tokenizer_json: str | Path) -> str:
    if isinstance(tokenizer_json, Path) or not tokenizer_json.lstrip().startswith("{"):
        return Path(tokenizer_json).read_text()
    return tokenizer_json


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: directory is not empty (use --force / overwrite=True)")
    out.mkdir(parents=True, exist_ok=True)
    for old in list(out.glob("*.safetensors")) + [out / INDEX_FILE]:
        old.unlink(missing_ok=True)   # stale shards of a previous write would be picked up
    return out


def saved_names(model_or_cfg) -> list[str]:
    """State-dict names written to disk, in order: everything but a tied lm_head."""
    cfg = model_or_cfg.config
    names = list(model_or_cfg.state_dict().keys())
    if cfg.tie_word_embeddings:
        names.remove("lm_head.weight")
    return names


def write_checkpoint(model, out_dir: str | Path, tokenizer_json: str | Path,
                     dtype: str | torch.dtype = "bfloat16", max_shard_bytes: int | None = None,
                     overwrite: bool = False, progress: bool = False) -> Path:
    """Write ``model`` (a YoutuVLForConditionalGeneration) in the released layout.

    ``tokenizer_json``: the JSON text or a path to a tokenizer.json. The config's token ids must
    match it. ``max_shard_bytes``: None = one model.safetensors, else shards + index; a single
    tensor larger than the limit gets a shard of its own.
    """
    dt = resolve_dtype(dtype)
    out = prepare_out_dir(out_dir, overwrite)
    sd = model.state_dict()
    specs = [(n, dt if sd[n].is_floating_point() else sd[n].dtype, tuple(sd[n].shape))
             for n in saved_names(model)]
    cfg = YoutuVLConfig.from_dict(model.config.to_dict())
    cfg.torch_dtype = dtype_name(dt)
    write_side_files(out, cfg, _tokenizer_text(tokenizer_json))
    want = {n: d for n, d, _ in specs}
    write_weights(out, specs, lambda n: sd[n].to(want[n]), max_shard_bytes, progress)
    return out
