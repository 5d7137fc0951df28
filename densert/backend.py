"""The stages every backend runs, and the PyTorch reference backend.

The runtime talks to a backend only through these three stages (the exported engines run them
as ``vision.onnx`` and ``llm.onnx``: prefill is an LLM call with an empty past, decode one with a
single token), so torch, ONNX Runtime and TensorRT are interchangeable and can be compared stage
by stage. The cache is opaque to the runtime: whatever a backend's ``prefill`` returns, its
``decode`` takes back.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from densert.model.config import YoutuVLConfig
from densert.model.llm import KVCache
from densert.model.vision_meta import VisionMeta

# Decode steps a prefill's cache holds before it first grows.
CACHE_HEADROOM = 256


@dataclass
class PrefillResult:
    vision_hidden: torch.Tensor | None  # [M, d] final-normed hidden states at the image-pad positions
    # [d] hidden state one position before the first image pad (<|vision_start|>): with the
    # k-1 token alignment (a runtime option) cell k is read from position k-1.
    pre_vision_hidden: torch.Tensor | None
    last_logits: torch.Tensor           # [V] next-token logits after the last prompt token
    cache: Any                          # backend-specific KV cache, handed back to decode()


class Backend(Protocol):
    name: str
    config: YoutuVLConfig

    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """[N, patch_dim] patches (merge-block order) -> [N/4, d] image embeddings (raster)."""

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> PrefillResult:
        """input_ids [1, T] with one image-pad per image_embeds row."""

    def decode(self, token_id: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """One generated token -> ([V] logits, the grown cache). The cache passed in may be grown
        in place: use the one returned, and never decode twice from the same cache."""

    def cache_tensors(self, cache: Any) -> tuple[torch.Tensor, ...]:
        """The cache as torch tensors in the torch model's stacked layout (parity checks)."""


class TorchBackend:
    """Eager PyTorch: the reference every other backend is held against."""

    name = "torch"

    def __init__(self, model, cache_layout: str = "latent"):
        self.model = model.eval()
        self.config: YoutuVLConfig = model.config
        self.cache_layout = cache_layout
        p = next(model.parameters())
        self.device, self.dtype = p.device, p.dtype

    @torch.inference_mode()
    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        return self.model.encode_image(pixel_values.to(self.device, self.dtype), meta.to(self.device))

    @torch.inference_mode()
    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> PrefillResult:
        ids = input_ids.to(self.device)
        cache = KVCache(self.config, self.cache_layout, capacity=ids.shape[1] + CACHE_HEADROOM,
                        dtype=self.dtype, device=self.device)
        h, cache = self.model.model(self.model.embed(ids, image_embeds), cache, self.cache_layout)
        return self._result(ids, h, cache)

    def _result(self, ids: torch.Tensor, h: torch.Tensor, cache) -> PrefillResult:
        pos = (ids[0] == self.config.image_token_id).nonzero().flatten()
        vision = h[0, pos] if len(pos) else None
        pre = h[0, pos[0] - 1] if len(pos) and int(pos[0]) > 0 else None
        return PrefillResult(vision_hidden=vision, pre_vision_hidden=pre,
                             last_logits=self.model.logits(h[0, -1]), cache=cache)

    @torch.inference_mode()
    def extend(self, past: tuple[torch.Tensor, ...], input_ids: torch.Tensor,
               image_embeds: torch.Tensor | None) -> PrefillResult:
        """Optional stage: prefill ``input_ids`` after the positions ``past`` holds (stacked cache
        tensors of an earlier prefill: a prompt prefix computed once). ``past`` is only read, so
        one prefix serves every frame. Backends without it run whole prefills (the runtime checks
        ``hasattr(backend, "extend")``). The result's cache is stacked tensors, not for decode."""
        ids = input_ids.to(self.device)
        h, cache = self.model.model(self.model.embed(ids, image_embeds), past, self.cache_layout)
        return self._result(ids, h, cache)

    @torch.inference_mode()
    def decode(self, token_id: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        ids = torch.tensor([[token_id]], device=self.device)
        h, cache = self.model.model(self.model.embed(ids), cache, self.cache_layout)
        return self.model.logits(h[0, -1]), cache

    @staticmethod
    def cache_tensors(cache: KVCache) -> tuple[torch.Tensor, ...]:
        """The cache in the stacked layout every backend reports (parity checks)."""
        return cache.tensors()
