"""The backend contract, and the PyTorch reference backend.

``Backend`` declares everything the runtime asks of a backend: three stages (the exported engines
run them as ``vision.onnx`` and ``llm.onnx``: prefill is an LLM call with an empty past, decode one
with a single token), so torch, ONNX Runtime and TensorRT are interchangeable and can be compared
stage by stage; where the dense head's lm_head rows come from; the image budget; the provenance a
result's sidecar records; and the optional stages, each behind its declared flag: ``extend`` (a
kept prompt prefix continued), several images in one ``encode_image`` call and ``prefill_batch``
(a camera rig's frames of one size as one batch). The runtime reads nothing else of a backend.
The cache is opaque to the runtime: whatever a backend's ``prefill`` returns, its ``decode``
takes back.

Backends subclass ``Backend`` (it holds the defaults of the optional members);
``tests/test_backend_conformance.py`` runs every backend through the same checks.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, Sequence, runtime_checkable

import torch

from densert.errors import BackendError
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


@runtime_checkable
class HeadRows(Protocol):
    """The [V, d] lm_head as the dense head reads it (``kernels.dense_head.subset_weight``): a
    torch.Tensor, or a table that reads rows on demand (``export.tied_table.TiedTable``: an
    engine's tied table, in the engine's precision) with these four members of the tensor API."""

    shape: torch.Size
    device: torch.device

    def dim(self) -> int: ...

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class Backend(Protocol):
    """What the runtime asks of a backend. Subclass it: the optional members have defaults here."""

    name: str                   # "torch", "onnxruntime", "tensorrt": the sidecar's backend
    config: YoutuVLConfig
    device: str                 # torch device string the stages run on: "cpu", "cuda", "cuda:0"
    dtype: torch.dtype          # host side: the dtype of the tensors the stages take and return
    precision: str              # the sidecar's dtype: torch's dtype name, or the engine's precision
    # Patches one image may have (an engine's export budget; the runtime scales larger images to
    # fit it); None: no limit of the backend's own.
    max_patches: int | None = None
    # The optional extend stage (a prompt prefix prefilled once, continued per frame).
    supports_extend: bool = False
    # encode_image takes several images of one size packed in one call (meta of all their grids)
    # and that is faster than a call each: declared only where it was measured to pay.
    supports_image_batch: bool = False
    # The optional prefill_batch stage: several prompts of one length as one batch.
    supports_prefill_batch: bool = False
    # ONNX Runtime's execution providers in the order it tries them (reports); () elsewhere.
    providers: Sequence[str] = ()

    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """[N, patch_dim] patches (merge-block order) -> [N/4, d] image embeddings (raster). Where
        ``supports_image_batch``: the patches of several images one after another, ``meta`` of
        all their grids (``build_vision_meta(grids)``), each image's rows in the same order and
        equal to its own call's."""
        ...

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> PrefillResult:
        """input_ids [1, T] with one image-pad per image_embeds row."""
        ...

    def decode(self, token_id: int, cache: Any) -> tuple[torch.Tensor, Any]:
        """One generated token -> ([V] logits, the grown cache). The cache passed in may be grown
        in place: use the one returned, and never decode twice from the same cache."""
        ...

    def cache_tensors(self, cache: Any) -> tuple[torch.Tensor, ...]:
        """The cache as torch tensors in the torch model's stacked layout (parity checks)."""
        ...

    def head_weight(self) -> HeadRows:
        """The [V, d] lm_head whose rows the dense head reads (only a few rows are ever used)."""
        ...

    def extend(self, past: tuple[torch.Tensor, ...], input_ids: torch.Tensor,
               image_embeds: torch.Tensor | None) -> PrefillResult:
        """Optional stage, present where ``supports_extend``: prefill ``input_ids`` after the
        positions ``past`` holds (``cache_tensors`` of an earlier prefill: a prompt prefix
        computed once). ``past`` is only read, so one prefix serves every frame. The result equals
        a whole prefill of prefix + ``input_ids``; its cache is stacked tensors, not for decode."""
        raise BackendError(f"backend {self.name!r} has no extend stage (supports_extend is False): "
                           "prefill the whole prompt")

    def prefill_batch(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      past: tuple[torch.Tensor, ...] | None = None) -> list[PrefillResult]:
        """Optional stage, present where ``supports_prefill_batch``: ``input_ids`` [B, T] (B
        prompts of one length, the same number of image pads each), ``image_embeds`` the rows of
        every prompt's pads in row order ([B * pads, d]). ``past``, only where
        ``supports_extend`` too: a prefix cache of one prompt (``extend``'s) that every row
        continues. One result per row, equal to that row's own ``prefill`` (or ``extend``); its
        ``cache`` is None: a batched prefill serves the dense maps, generation prefills one
        prompt at a time."""
        raise BackendError(f"backend {self.name!r} has no prefill_batch stage "
                           "(supports_prefill_batch is False): prefill one prompt at a time")

    def engine_source(self) -> dict | None:
        """An engine backend's directory and the checkpoint it was exported from: {"dir",
        "checkpoint_id", "exported_from"}; None for a backend that runs a checkpoint itself."""
        return None

    def provenance(self) -> dict:
        """The sidecar's backend, device and dtype fields."""
        return {"backend": self.name, "device": self.device, "dtype": self.precision}


class TorchBackend(Backend):
    """Eager PyTorch: the reference every other backend is held against."""

    name = "torch"
    supports_extend = True
    supports_prefill_batch = True

    def __init__(self, model, cache_layout: str = "latent"):
        self.model = model.eval()
        self.config: YoutuVLConfig = model.config
        self.cache_layout = cache_layout
        p = next(model.parameters())
        self.device, self.dtype = str(p.device), p.dtype
        self.precision = str(p.dtype).removeprefix("torch.")
        # The tower takes a rig's images packed (each attends over its own patches: model.vision),
        # but on a CPU that measured no faster than one call each and needs the rig's
        # activations at once (benchmarks/results/rig.md): packed on a GPU only, where one launch
        # per layer serves the whole rig. No GPU was lent to measure it (docs/streaming.md).
        self.supports_image_batch = torch.device(self.device).type == "cuda"

    def head_weight(self) -> torch.Tensor:
        """The model's own lm_head weight (no copy)."""
        return self.model.lm_head.weight.detach()

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
        ids = input_ids.to(self.device)
        h, cache = self.model.model(self.model.embed(ids, image_embeds), past, self.cache_layout)
        return self._result(ids, h, cache)

    @torch.inference_mode()
    def prefill_batch(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      past: tuple[torch.Tensor, ...] | None = None) -> list[PrefillResult]:
        ids = check_batch(input_ids, image_embeds, self.config)
        b = ids.shape[0]
        if past is not None:   # one prefix for every row: a view, nothing copied
            past = tuple(t.expand(t.shape[0], b, *t.shape[2:]) for t in past)
        h, _ = self.model.model(self.model.embed(ids.to(self.device), image_embeds), past,
                                self.cache_layout, use_cache=False)
        ids = ids.to(self.device)
        return [self._result(ids[i:i + 1], h[i:i + 1], None) for i in range(b)]

    @torch.inference_mode()
    def decode(self, token_id: int, cache: KVCache) -> tuple[torch.Tensor, KVCache]:
        ids = torch.tensor([[token_id]], device=self.device)
        h, cache = self.model.model(self.model.embed(ids), cache, self.cache_layout)
        return self.model.logits(h[0, -1]), cache

    @staticmethod
    def cache_tensors(cache: KVCache) -> tuple[torch.Tensor, ...]:
        """The cache in the stacked layout every backend reports (parity checks)."""
        return cache.tensors()


def check_batch(input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                cfg: YoutuVLConfig) -> torch.Tensor:
    """``prefill_batch``'s arguments: [B, T] ids with the same image pads per row, as many
    embedding rows as pads in all (every backend checks the same way)."""
    if input_ids.dim() != 2 or input_ids.shape[0] < 1:
        raise BackendError(f"prefill_batch: input_ids must be [B, T], got shape {list(input_ids.shape)}")
    pads = (input_ids == cfg.image_token_id).sum(dim=1)
    if bool((pads != pads[0]).any()):
        raise BackendError(f"prefill_batch: every row needs the same number of image pads, got "
                           f"{pads.tolist()}")
    rows = 0 if image_embeds is None else int(image_embeds.shape[0])
    if rows != int(pads.sum()):
        raise BackendError(f"prefill_batch: input_ids hold {int(pads.sum())} image pads (id "
                           f"{cfg.image_token_id}) but {rows} image embedding rows were given")
    return input_ids
