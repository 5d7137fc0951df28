"""Where a run starts and what it updates: a fresh model or a checkpoint (``--init``), frozen parts
(``--freeze``), LoRA adapters on the LLM (``peft``), gradient checkpointing, and the merged
weights a LoRA run saves in the released layout.

LoRA wraps the decoder's attention and MLP projections (``LORA_TARGETS``) and freezes the LLM's
own weights (layers, embeddings, tied head); the vision tower and the merger keep training unless
``--freeze`` names them. ``kv_b_proj`` is left out on purpose: the runtime's latent-cache attention
reads its weight matrix directly (absorbed into the query and the output, ``densert.model.llm``),
so an adapter there would be skipped by every evaluation until merged.
"""
from __future__ import annotations

import functools
from pathlib import Path

import torch

from densert.extras import require

from .config import TrainConfig

ADAPTER = "default"   # peft's adapter name
LORA_TARGETS = (r"model\.layers\.\d+\.(self_attn\.(q_proj|q_a_proj|q_b_proj|kv_a_proj_with_mqa"
                r"|o_proj)|mlp\.(gate_proj|up_proj|down_proj))")


def part_of(name: str) -> str:
    """"vision", "merger" or "llm": the part a parameter (state-dict name) belongs to."""
    head = name.split(".", 1)[0]
    return {"siglip2": "vision", "merger": "merger"}.get(head, "llm")


def build_model(cfg: TrainConfig):
    """(model in fp32, tokenizer.json text): ``cfg.init`` loaded with its own tokenizer, or a
    freshly initialised model of ``cfg.model_size`` (HF-style init, deterministic per seed)."""
    if cfg.init:
        from densert.checkpoint.loader import load_model
        return load_model(cfg.init, "float32").train(), Path(cfg.init, "tokenizer.json").read_text()
    from densert.checkpoint.random_init import init_kind, init_tensor, sized_config_and_tokenizer
    from densert.model.modeling import YoutuVLForConditionalGeneration
    mcfg, tok_json = sized_config_and_tokenizer(cfg.model_size, cfg.text_layers, cfg.vision_layers)
    model = YoutuVLForConditionalGeneration(mcfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name, init_kind(model, name), tuple(p.shape), p.dtype, cfg.seed,
                                mcfg.initializer_range))
    return model, tok_json


def prepare(model, cfg: TrainConfig):
    """LoRA adapters, frozen parts and gradient checkpointing, in place; returns the model."""
    if cfg.lora_rank:
        peft = require("peft", "LoRA (--lora-rank)")
        from peft.tuners.lora import LoraModel
        lc = peft.LoraConfig(r=cfg.lora_rank, lora_alpha=cfg.lora_alpha,
                             lora_dropout=cfg.lora_dropout, target_modules=LORA_TARGETS)
        LoraModel(model, lc, ADAPTER)   # injects into `model` itself and freezes everything else
    for name, p in model.named_parameters():
        if is_lora(name):
            p.requires_grad_(True)
        else:
            part = part_of(name)
            p.requires_grad_(part not in cfg.freeze and not (cfg.lora_rank and part == "llm"))
    if not any(p.requires_grad for p in model.parameters()):
        raise ValueError(f"nothing to train: --freeze {','.join(cfg.freeze)} leaves no parameter")
    if cfg.grad_checkpoint:
        for layer in [*model.model.layers, *model.siglip2.vision_model.encoder.layers]:
            checkpoint_layer(layer)
    return model


def checkpoint_layer(layer: torch.nn.Module) -> None:
    """Recompute ``layer``'s activations in the backward instead of keeping them (the forward is
    patched on the instance, so parameter names and the state dict do not change)."""
    from torch.utils.checkpoint import checkpoint
    fwd = layer.forward
    layer.forward = functools.wraps(fwd)(
        lambda *a, **k: checkpoint(fwd, *a, use_reentrant=False, **k))


def is_lora(name: str) -> bool:
    return ".lora_" in name


def lora_modules(model) -> dict[str, torch.nn.Module]:
    """Module path -> peft LoRA layer (empty without adapters)."""
    return {n: m for n, m in model.named_modules()
            if hasattr(m, "base_layer") and hasattr(m, "get_delta_weight")}


def released_name(name: str) -> str:
    """State-dict name of a LoRA-wrapped model -> the checkpoint's name."""
    return name.replace(".base_layer.", ".")


def merged_state_dict(model) -> dict[str, torch.Tensor]:
    """The weights in the released names, LoRA deltas merged (W + B A * alpha / r); the model
    itself is not changed, so training can go on."""
    sd = {released_name(n): t for n, t in model.state_dict().items() if not is_lora(n)}
    with torch.no_grad():
        for path, m in lora_modules(model).items():
            sd[f"{path}.weight"] = m.base_layer.weight + m.get_delta_weight(ADAPTER).to(
                m.base_layer.weight.dtype)
    return sd


class Weights:
    """A config + state dict that ``densert.checkpoint.model_dir.write_checkpoint`` writes like a
    model (it reads ``.config`` and ``.state_dict()`` only)."""

    def __init__(self, config, state: dict[str, torch.Tensor]):
        self.config, self._state = config, state

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self._state


def count_parameters(model) -> dict[str, int]:
    seen, total, train = set(), 0, 0
    for p in model.parameters():
        if id(p) in seen:
            continue
        seen.add(id(p))
        total += p.numel()
        train += p.numel() if p.requires_grad else 0
    return {"total": total, "trainable": train}
