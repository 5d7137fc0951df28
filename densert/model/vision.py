"""SigLIP2 vision tower with 2-D RoPE and window attention, and the 2x2 patch merger.

Parameter names follow the checkpoint (``siglip2.vision_model.*``, ``merger.*``), spec
``youtu-vl-checkpoint.md`` sec. 2.1-2.2 and 4. Inputs are patch rows in 2x2 merge-block order;
host metadata (RoPE, window permutation, segments) comes from ``vision_meta``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import VisionConfig
from .layers import ACT2FN, RMSNorm, rotate_half
from .vision_meta import VisionMeta


def apply_vision_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """NeoX rotate-half RoPE on [heads, N, head_dim] with cos/sin [N, head_dim], in fp32."""
    dt = x.dtype
    x = x.float()
    return (x * cos + rotate_half(x) * sin).to(dt)


class Siglip2VisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        # A Linear over flattened 16x16x3 patches, not a conv (spec sec. 2.1).
        self.patch_embedding = nn.Linear(cfg.patch_dim, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.patch_embedding(pixel_values.to(self.patch_embedding.weight.dtype))


class Siglip2Attention(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        d = cfg.hidden_size
        self.num_heads, self.head_dim = cfg.num_attention_heads, cfg.head_dim
        self.scale = self.head_dim**-0.5
        self.q_proj, self.k_proj = nn.Linear(d, d), nn.Linear(d, d)
        self.v_proj, self.out_proj = nn.Linear(d, d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                seqlens: list[int] | None, segment_ids: torch.Tensor | None) -> torch.Tensor:
        """x [N, d]. Attention stays inside segments: ``seqlens`` (eager, a loop over blocks) or
        ``segment_ids`` (one masked call; static control flow for export). Neither = full."""
        n = x.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(0, 1)
        k = self.k_proj(x).view(shape).transpose(0, 1)
        v = self.v_proj(x).view(shape).transpose(0, 1)
        if cos is not None:
            q, k = apply_vision_rope(q, cos, sin), apply_vision_rope(k, cos, sin)
        # A leading batch axis of 1: torch's fused (flash) CPU attention takes 4-D inputs only;
        # with 3-D ones SDPA falls back to the math path and holds the [heads, N, N] scores.
        if seqlens is not None and len(seqlens) > 1:
            outs = [F.scaled_dot_product_attention(qs[None], ks[None], vs[None], scale=self.scale)[0]
                    for qs, ks, vs in zip(q.split(seqlens, 1), k.split(seqlens, 1), v.split(seqlens, 1))]
            o = torch.cat(outs, dim=1)
        else:
            mask = None
            if seqlens is None and segment_ids is not None:
                mask = segment_ids[:, None] == segment_ids[None, :]
            o = F.scaled_dot_product_attention(q[None], k[None], v[None], attn_mask=mask,
                                               scale=self.scale)[0]
        return self.out_proj(o.transpose(0, 1).reshape(n, -1))


class Siglip2MLP(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.act = ACT2FN[cfg.hidden_act]
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Siglip2EncoderLayer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Siglip2Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Siglip2MLP(cfg)

    def forward(self, x, cos, sin, seqlens=None, segment_ids=None):
        x = x + self.self_attn(self.layer_norm1(x), cos, sin, seqlens, segment_ids)
        return x + self.mlp(self.layer_norm2(x))


class Siglip2Encoder(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(Siglip2EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class Siglip2VisionTransformer(nn.Module):
    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Siglip2VisionEmbeddings(cfg)
        self.encoder = Siglip2Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.full_attention = set(cfg.fullatt_block_indexes)

    def forward(self, pixel_values: torch.Tensor, meta: VisionMeta, eager_segments: bool = True
                ) -> torch.Tensor:
        """pixel_values [N, patch_dim] in merge-block order -> [N, hidden] in the same order.

        ``eager_segments`` picks the block loop (fast in eager torch) over one masked attention
        call (a static graph for export); both give the same numbers.
        """
        u = self.config.merge_unit
        h = self.embeddings(pixel_values)
        n, d = h.shape
        h = h.view(n // u, u, d)[meta.window_index].reshape(n, d)
        for i, layer in enumerate(self.encoder.layers):
            full = i in self.full_attention
            if eager_segments:
                seq = meta.image_seqlens if full else meta.window_seqlens
                h = layer(h, meta.cos, meta.sin, seqlens=seq)
            else:
                seg = meta.image_segment_ids if full else meta.window_segment_ids
                h = layer(h, meta.cos, meta.sin, segment_ids=seg)
        h = h.view(n // u, u, d)[meta.reverse_index].reshape(n, d)
        return self.post_layernorm(h)


class Siglip2VisionModel(nn.Module):
    """Holds ``vision_model`` so parameter names read ``siglip2.vision_model.*``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = Siglip2VisionTransformer(cfg)

    def forward(self, pixel_values, meta, eager_segments=True):
        return self.vision_model(pixel_values, meta, eager_segments)


class VLPatchMerger(nn.Module):
    """RMSNorm per patch, concat each 2x2 block (TL TR BL BR), Linear-GELU(erf)-Linear."""

    def __init__(self, cfg: VisionConfig, rms_eps: float = 1e-6):
        super().__init__()
        self.unit_dim = cfg.hidden_size * cfg.merge_unit
        self.ln_q = RMSNorm(cfg.hidden_size, eps=rms_eps)
        self.mlp = nn.Sequential(nn.Linear(self.unit_dim, self.unit_dim), nn.GELU(),
                                 nn.Linear(self.unit_dim, cfg.out_hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.ln_q(x).view(-1, self.unit_dim))
