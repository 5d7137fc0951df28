"""What a checkpoint holds, from its headers only (no weights read): ``densert inspect``.
Given an engine directory (``densert export``), what its manifest says: precision, image budget,
tasks, and the bytes of each part of the model (decoder, tied table, vision, task heads).

Exit 0 with a summary when the checkpoint would load; exit 2 with the reason when it would not
(the same validation as ``load_model``: config, safetensors headers against file sizes, the
index, and every tensor name and shape against the architecture in config.json).
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

from densert.errors import CheckpointError, TokenizerError
from densert.text import tokens

from .model_dir import read_all_headers, read_config


def summarize(path: str | Path) -> dict:
    """The inspection result as a JSON-able dict; raises CheckpointError if broken."""
    import torch
    if (Path(path) / "manifest.json").is_file():
        return summarize_engine(path)

    from densert.model.modeling import YoutuVLForConditionalGeneration

    from .loader import IGNORED_KEYS, validate
    path = Path(path)
    cfg = read_config(path)
    infos = read_all_headers(path)
    with torch.device("meta"):
        meta = YoutuVLForConditionalGeneration(cfg)
    validate({n: tuple(p.shape) for n, p in meta.state_dict().items()}, infos,
             cfg.tie_word_embeddings, path)

    params: Counter = Counter()
    dtypes: Counter = Counter()
    for name, info in infos.items():
        if name in IGNORED_KEYS:
            continue
        params[name.split(".")[0]] += info.numel
        dtypes[info.dtype] += info.numel
    tied = cfg.tie_word_embeddings
    if tied:
        params["lm_head"] = 0
    vc = cfg.vision_config
    out = {
        "path": str(path),
        "architecture": {
            "text": {"layers": cfg.num_hidden_layers, "hidden_size": cfg.hidden_size,
                     "heads": cfg.num_attention_heads, "q_lora_rank": cfg.q_lora_rank,
                     "kv_lora_rank": cfg.kv_lora_rank, "qk_nope_head_dim": cfg.qk_nope_head_dim,
                     "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
                     "intermediate_size": cfg.intermediate_size, "vocab_size": cfg.vocab_size,
                     "rope_theta": cfg.rope_theta},
            "vision": {"layers": vc.num_hidden_layers, "hidden_size": vc.hidden_size,
                       "heads": vc.num_attention_heads, "patch_size": vc.patch_size,
                       "spatial_merge_size": vc.spatial_merge_size, "window_size": vc.window_size,
                       "fullatt_block_indexes": vc.fullatt_block_indexes},
        },
        "parameters": {k: params.get(k, 0) for k in ("siglip2", "merger", "model", "lm_head")},
        "parameters_total": sum(params.values()),
        "dtypes_on_disk": dict(sorted(dtypes.items())),
        "bytes_on_disk": sum(i.end - i.begin for i in infos.values()),
        "files": sorted({i.path.name for i in infos.values()}),
        "tied_lm_head": tied,
        "lm_head_on_disk": "lm_head.weight" in infos,
        "ignored_tensors": sorted(set(infos) & IGNORED_KEYS),
        "config_token_ids": {k: getattr(cfg, k) for k in (
            "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id", "video_token_id",
            "vision_start_token_id", "vision_end_token_id")},
    }
    out.update(_tokenizer_summary(path, cfg))
    return out


def _tokenizer_summary(path: Path, cfg) -> dict:
    if not (path / "tokenizer.json").is_file():
        return {"tokenizer": None}
    try:
        vocab = tokens.Vocab.from_file(path / "tokenizer.json")
    except TokenizerError as e:
        raise CheckpointError(str(e)) from None
    special = vocab.special_ids()
    if special.get(tokens.IMAGE_PAD) not in (None, cfg.image_token_id):
        raise CheckpointError(f"{path}: config image_token_id {cfg.image_token_id} but tokenizer.json "
                              f"has {tokens.IMAGE_PAD} = {special[tokens.IMAGE_PAD]}")
    if len(vocab) > cfg.vocab_size:
        raise CheckpointError(f"{path}: tokenizer.json has {len(vocab)} ids but vocab_size is "
                              f"{cfg.vocab_size}")
    try:
        bins = vocab.depth_bin_ids()
        depth = {"first": int(bins[0]), "last": int(bins[-1]),
                 "contiguous": bool((bins.diff() == 1).all())}
    except TokenizerError:
        depth = None
    coords = [vocab.tok.token_to_id(s) for s in (tokens.x_token(0), tokens.y_token(tokens.N_COORDS - 1))]
    return {"tokenizer": {"size": len(vocab), "special_ids": special, "depth_bins": depth,
                          "coord_ids": coords if None not in coords else None}}


def summarize_engine(path: str | Path) -> dict:
    import json
    path = Path(path)
    try:
        m = json.loads((path / "manifest.json").read_text())
        m["precision"], m["checkpoint"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise CheckpointError(f"{path / 'manifest.json'}: not a densert engine manifest ({e!r}); "
                              "re-run `densert export` into this directory") from None
    files = {f.name: f.stat().st_size for f in sorted(path.iterdir()) if f.is_file()}
    return {"engine_dir": str(path), "precision": m["precision"], "precision_policy": m.get("precision_policy"),
            "weight_formats": m.get("weight_formats"), "int4_block": m.get("int4_block"),
            "cache_layout": m["cache_layout"], "max_image_tokens": m["max_image_tokens"],
            "image_sizes": m.get("image_sizes", []), "tasks": list(m["tasks"]),
            "sizes": m.get("sizes", {}), "files": files, "bytes_total": sum(files.values()),
            "checkpoint": m["checkpoint"].get("checkpoint_id"), "config": m.get("config", {})}


def _format_engine(s: dict) -> str:
    c = s["config"]
    sizes = s["sizes"]
    lines = [f"engine dir  {s['engine_dir']}",
             f"precision   {s['precision']}"
             + (f" (int4 blocks of {s['int4_block']})" if s.get("int4_block") else "")
             + (f"; {s['precision_policy']}" if s.get("precision_policy") else ""),
             f"model       decoder {c.get('num_hidden_layers')} layers x {c.get('hidden_size')}, vocab "
             f"{c.get('vocab_size')}, vision {c.get('vision', {}).get('num_hidden_layers')} layers",
             f"images      up to {s['max_image_tokens']} tokens"
             + (f", sized for {' '.join('x'.join(map(str, z)) for z in s['image_sizes'])} px"
                if s["image_sizes"] else ""),
             f"tasks       {', '.join(s['tasks'])}; cache {s['cache_layout']}"]
    if sizes:
        lines.append("weights     " + ", ".join(f"{k} {v / 1e6:,.1f} MB" for k, v in sizes.items())
                     + f"  (total {sum(sizes.values()) / 1e6:,.1f} MB)")
    lines.append(f"on disk     {s['bytes_total'] / 1e6:,.1f} MB ({s['bytes_total'] / 2**30:.3f} GiB) in "
                 f"{len(s['files'])} files; checkpoint {str(s['checkpoint'])[:16]}")
    return "\n".join(lines)


def format_text(s: dict) -> str:
    if "engine_dir" in s:
        return _format_engine(s)
    a, p = s["architecture"], s["parameters"]
    t, v = a["text"], a["vision"]

    def m(n):
        return f"{n / 1e6:,.2f} M"

    lines = [
        f"checkpoint  {s['path']}",
        f"text        {t['layers']} layers, d={t['hidden_size']}, {t['heads']} heads, MLA q_lora "
        f"{t['q_lora_rank']} kv_lora {t['kv_lora_rank']} (nope {t['qk_nope_head_dim']} + rope "
        f"{t['qk_rope_head_dim']}, v {t['v_head_dim']}), mlp {t['intermediate_size']}, "
        f"vocab {t['vocab_size']}",
        f"vision      {v['layers']} layers, d={v['hidden_size']}, {v['heads']} heads, patch "
        f"{v['patch_size']}, merge {v['spatial_merge_size']}, window {v['window_size']} px, "
        f"full attention at {v['fullatt_block_indexes']}",
        "parameters  " + ", ".join(f"{k} {m(n)}" for k, n in p.items())
        + f"  (total {m(s['parameters_total'])})",
        f"lm_head     {'tied to model.embed_tokens' if s['tied_lm_head'] else 'separate'}"
        f"{' (also stored on disk)' if s['lm_head_on_disk'] and s['tied_lm_head'] else ''}",
        "on disk     " + ", ".join(f"{d}: {m(n)}" for d, n in s["dtypes_on_disk"].items())
        + f"; {s['bytes_on_disk'] / 2**20:,.1f} MiB in {len(s['files'])} file(s)",
        "token ids   " + ", ".join(f"{k.removesuffix('_token_id')}={v}"
                                   for k, v in s["config_token_ids"].items()),
    ]
    if s["ignored_tensors"]:
        lines.append(f"ignored     {', '.join(s['ignored_tensors'])}")
    tok = s["tokenizer"]
    if tok is None:
        lines.append("tokenizer   (no tokenizer.json)")
    else:
        lines.append(f"tokenizer   {tok['size']} ids; " + ", ".join(
            f"{k}={i}" for k, i in tok["special_ids"].items()))
        d = tok["depth_bins"]
        lines.append("depth bins  " + ("not in vocabulary" if d is None else
                                       f"<custom_1>..<custom_1000> = {d['first']}..{d['last']}"
                                       f"{'' if d['contiguous'] else ' (not contiguous)'}"))
        if tok["coord_ids"]:
            lines.append(f"coords      <x_0>={tok['coord_ids'][0]} .. <y_2047>={tok['coord_ids'][1]}")
    return "\n".join(lines)
