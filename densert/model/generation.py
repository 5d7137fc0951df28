"""Greedy decoding on top of an explicit KV cache, independent of who runs the steps.

``greedy_decode`` takes a step function (token, cache) -> (logits, cache), so the torch model,
ONNX Runtime and TensorRT backends all share one loop and can be compared token for token.

The release decodes with ``temperature=0.1, top_p=0.001, repetition_penalty=1.05`` and
``max_new_tokens=4096`` (the official demo's call, ``release-demo.md``). With top_p 0.001 the
nucleus is the single most likely token whenever its probability after the temperature is at
least 0.001, so the release's sampling is greedy decoding of the *penalised* logits; densert
decodes greedily and applies the penalty exactly as transformers' ``RepetitionPenaltyLogitsProcessor``
does (``penalize_repetition``; tested token for token against transformers' ``generate``).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch

from .llm import KVCache
from .modeling import YoutuVLForConditionalGeneration
from .vision_meta import VisionMeta

StepFn = Callable[[int, Any], tuple[torch.Tensor, Any]]

# The official demo's generation call: what densert uses when neither the caller nor the
# checkpoint's generation_config.json says otherwise.
RELEASE_MAX_NEW_TOKENS = 4096
RELEASE_REPETITION_PENALTY = 1.05


def penalize_repetition(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' repetition penalty on one row of float32 logits [V]: every id in the sequence
    so far (``seen``, bool [V]: prompt and generated ids) has its logit divided by ``penalty``
    when positive and multiplied by it otherwise (CTRL, Keskar et al. 2019)."""
    return torch.where(seen, torch.where(logits < 0, logits * penalty, logits / penalty), logits)


def greedy_decode(step: StepFn, first_logits: torch.Tensor, cache: Any, max_new_tokens: int,
                  stop_ids: Iterable[int] = (), repetition_penalty: float = 1.0,
                  prompt_ids: Iterable[int] | torch.Tensor = ()) -> tuple[list[int], Any]:
    """Argmax tokens starting from the prefill's last logits; stops after a stop id (kept in the
    output) or ``max_new_tokens``. Ties go to the lowest id (torch.argmax).

    ``repetition_penalty`` != 1 penalises every id of ``prompt_ids`` (the whole prompt, image
    pads included, as transformers' ``generate`` sees it) and of the tokens generated so far,
    on float32 logits (``generate`` upcasts the last logits the same way)."""
    if not repetition_penalty > 0:
        raise ValueError(f"repetition_penalty must be > 0, got {repetition_penalty}")
    stop = set(stop_ids)
    out: list[int] = []
    logits = first_logits
    seen = None
    if repetition_penalty != 1.0:
        V = first_logits.numel()
        seen = torch.zeros(V, dtype=torch.bool, device=first_logits.device)
        ids = torch.as_tensor(prompt_ids, dtype=torch.long).reshape(-1)
        # ids the lm_head cannot emit (an embedding table wider than the head) are never penalised
        seen[ids[ids < V].to(seen.device)] = True
    for _ in range(max_new_tokens):
        row = logits.reshape(-1)
        if seen is not None:
            row = penalize_repetition(row.to(torch.float32), seen, repetition_penalty)
        tok = int(torch.argmax(row))
        out.append(tok)
        if tok in stop or len(out) == max_new_tokens:
            break
        if seen is not None:
            seen[tok] = True
        logits, cache = step(tok, cache)
    return out, cache


@torch.no_grad()
def generate(model: YoutuVLForConditionalGeneration, input_ids: torch.Tensor,
             pixel_values: torch.Tensor | None = None, vision_meta: VisionMeta | None = None,
             max_new_tokens: int = 64, cache_layout: str = "latent",
             stop_ids: Iterable[int] | None = None, repetition_penalty: float = 1.0) -> list[int]:
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
    tokens, _ = greedy_decode(step, out.logits, out.past, max_new_tokens, stops,
                              repetition_penalty, input_ids[0].cpu())
    return tokens
