"""Greedy decoding on top of an explicit KV cache, independent of who runs the steps.

``greedy_decode`` takes a step function (token, cache) -> (logits, cache), so the torch model,
ONNX Runtime and TensorRT backends all share one loop and can be compared token for token.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .llm import KVCache
from .modeling import YoutuVLForConditionalGeneration
from .vision_meta import VisionMeta

StepFn = Callable[[int, Any], tuple[torch.Tensor, Any]]


def greedy_decode(step: StepFn, first_logits: torch.Tensor, cache: Any, max_new_tokens: int,
                  stop_ids: Iterable[int] = ()) -> tuple[list[int], Any]:
    """Argmax tokens starting from the prefill's last logits; stops after a stop id (kept in the
    output) or ``max_new_tokens``. Ties go to the lowest id (torch.argmax)."""
    stop = set(stop_ids)
    out: list[int] = []
    logits = first_logits
    for _ in range(max_new_tokens):
        tok = int(torch.argmax(logits.reshape(-1)))
        out.append(tok)
        if tok in stop or len(out) == max_new_tokens:
            break
        logits, cache = step(tok, cache)
    return out, cache


@torch.no_grad()
def generate(model: YoutuVLForConditionalGeneration, input_ids: torch.Tensor,
             pixel_values: torch.Tensor | None = None, vision_meta: VisionMeta | None = None,
             max_new_tokens: int = 64, cache_layout: str = "latent",
             stop_ids: Iterable[int] | None = None) -> list[int]:
    """Greedy generation for one sequence (input_ids [1, T]) with the torch model."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"generate takes input_ids of shape [1, T], got {tuple(input_ids.shape)}")
    dev = input_ids.device
    p = next(model.parameters())
    cache = KVCache(model.config, cache_layout, capacity=input_ids.shape[1] + max_new_tokens,
                    dtype=p.dtype, device=p.device)
    out = model(input_ids, pixel_values, vision_meta, past=cache, cache_layout=cache_layout,
                logits="last")

    def step(tok: int, cache: KVCache):
        o = model(torch.tensor([[tok]], device=dev), past=cache, cache_layout=cache_layout)
        return o.logits, o.past

    stops = [model.config.eos_token_id] if stop_ids is None else list(stop_ids)
    tokens, _ = greedy_decode(step, out.logits, out.past, max_new_tokens, stops)
    return tokens
