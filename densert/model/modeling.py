"""YoutuVLForConditionalGeneration: vision tower + merger + MLA decoder + lm_head.

Top-level module names equal the checkpoint prefixes (``siglip2``, ``merger``, ``model``,
``lm_head``), so ``state_dict()`` keys are the safetensors names with no renaming table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .config import YoutuVLConfig
from .llm import Cache, YoutuModel
from .vision import Siglip2VisionModel, VLPatchMerger
from .vision_meta import VisionMeta


@dataclass
class VLOutput:
    hidden_states: torch.Tensor          # [B, T, d], after the final norm
    past: Cache                          # the present cache (past + these T tokens)
    logits: torch.Tensor | None = None   # [B, T', vocab] for the requested text positions


class YoutuVLForConditionalGeneration(nn.Module):
    def __init__(self, config: YoutuVLConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.siglip2 = Siglip2VisionModel(config.vision_config)
        self.merger = VLPatchMerger(config.vision_config, rms_eps=config.rms_norm_eps)
        self.model = YoutuModel(config)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ---- stages (each one is also an export unit) ----
    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """[N, patch_dim] patches in merge-block order -> [N/4, d] embeddings, raster order."""
        return self.merger(self.siglip2(pixel_values, meta))

    def embed(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Token embeddings with the k-th image-pad position replaced by the k-th image row."""
        emb = self.model.embed_tokens(input_ids)
        is_img = input_ids == self.config.image_token_id
        n_slots = int(is_img.sum())
        n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
        if n_slots != n_rows:
            raise ValueError(f"input_ids hold {n_slots} image-pad tokens (id "
                             f"{self.config.image_token_id}) but {n_rows} image embeddings were given")
        if n_rows:
            emb = emb.masked_scatter(is_img[..., None], image_embeds.to(emb.dtype))
        return emb

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    # ---- full forward ----
    def forward(self, input_ids: torch.Tensor, pixel_values: torch.Tensor | None = None,
                vision_meta: VisionMeta | None = None, past: Cache | None = None,
                cache_layout: str = "latent", logits: str = "last") -> VLOutput:
        """input_ids [B, T] (+ patches for the image pads in it) -> hidden states and cache.

        ``logits``: "last" (the next-token logits, [B, 1, V]), "all" ([B, T, V]) or "none".
        Dense maps never go through here: they take the hidden states at image positions and
        the few lm_head rows they need (``densert.kernels``).
        """
        image_embeds = None
        if pixel_values is not None:
            if vision_meta is None:
                raise ValueError("pixel_values given without vision_meta (see densert.model.vision_meta)")
            image_embeds = self.encode_image(pixel_values, vision_meta)
        h, present = self.model(self.embed(input_ids, image_embeds), past, cache_layout)
        if logits == "none":
            lg = None
        elif logits == "last":
            lg = self.logits(h[:, -1:])
        elif logits == "all":
            lg = self.logits(h)
        else:
            raise ValueError(f"logits={logits!r}; expected 'last', 'all' or 'none'")
        return VLOutput(hidden_states=h, past=present, logits=lg)

    def num_parameters_by_part(self) -> dict[str, int]:
        seen: set[int] = set()
        out: dict[str, int] = {}
        for name, p in self.named_parameters(remove_duplicate=False):
            if id(p) in seen:
                continue
            seen.add(id(p))
            part = name.split(".")[0]
            out[part] = out.get(part, 0) + p.numel()
        return out
