"""SigLIP2 vision tower with 2-D RoPE and window attention, and the 2x2 patch merger.

Parameter names follow the checkpoint (``siglip2.vision_model.*``, ``merger.*``), spec
``youtu-vl-checkpoint.md`` sec. 2.1-2.2 and 4. Inputs are patch rows in 2x2 merge-block order;
host metadata (RoPE, window permutation, segments) comes from ``vision_meta``.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import DEFAULT_SCORE_BUDGET, attention, window_attention
from .config import VisionConfig
from .layers import ACT2FN, LayerNorm, RMSNorm, rotate_half
from .vision_meta import VisionMeta, window_slot_count


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
        self.slots_per_window = window_slot_count(cfg)

    def forward(self, x: torch.Tensor, meta: VisionMeta, full: bool,
                budget: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
        """x [N, d] in window order. ``full``: attention over each whole image (query-chunked);
        else inside each window, on the padded [W, S] slot layout of ``meta``. One path for
        eager torch and export (static control flow)."""
        n = x.shape[0]
        shape = (n, self.num_heads, self.head_dim)
        q = self.q_proj(x).view(shape).transpose(0, 1)
        k = self.k_proj(x).view(shape).transpose(0, 1)
        v = self.v_proj(x).view(shape).transpose(0, 1)
        if meta.cos is not None:
            q, k = apply_vision_rope(q, meta.cos, meta.sin), apply_vision_rope(k, meta.cos, meta.sin)
        # Images of one size (a camera rig) attend image by image, each with the very shapes of
        # its own call (so its result and its peak memory are its own call's): no (B n)^2
        # segment mask, no chunk of scores over several images. Each image's patches and
        # windows are contiguous in window order (``build_vision_meta`` offsets them).
        rig = len(meta.image_seqlens) if len(set(meta.image_seqlens)) == 1 else 1
        if full:
            if rig > 1:
                m = n // rig
                o = torch.cat([attention(q[:, a:a + m], k[:, a:a + m], v[:, a:a + m], self.scale,
                                         budget=budget) for a in range(0, n, m)], dim=1)
                return self.out_proj(o.transpose(0, 1).reshape(n, -1))
            # One image (the runtime's case) needs no segment mask; the graph always applies it.
            seg = meta.image_segment_ids if len(meta.image_seqlens) != 1 else None
            o = attention(q, k, v, self.scale, q_segments=seg, k_segments=seg, budget=budget)
            return self.out_proj(o.transpose(0, 1).reshape(n, -1))
        slots, s = meta.window_slots, self.slots_per_window

        def windows(t):  # [H, N, hd] -> [W, H, S, hd]; empty slots read a zero row
            rows = torch.cat([t.transpose(0, 1), t.new_zeros(1, self.num_heads, self.head_dim)])
            return rows.index_select(0, slots).view(-1, s, self.num_heads, self.head_dim).transpose(1, 2)

        valid = (slots < n).view(-1, s)
        qw, kw, vw = windows(q), windows(k), windows(v)
        per = qw.shape[0] // rig
        o = torch.cat([window_attention(qw[a:a + per], kw[a:a + per], vw[a:a + per], valid[a:a + per],
                                        self.scale, budget) for a in range(0, qw.shape[0], per)])
        o = o.transpose(1, 2).reshape(-1, self.num_heads * self.head_dim).index_select(0, meta.window_inverse)
        return self.out_proj(o)


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
        self.layer_norm1 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Siglip2Attention(cfg)
        self.layer_norm2 = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = Siglip2MLP(cfg)

    def forward(self, x, meta: VisionMeta, full: bool, budget: int = DEFAULT_SCORE_BUDGET):
        x = x + self.self_attn(self.layer_norm1(x), meta, full, budget)
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
        self.post_layernorm = LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.full_attention = set(cfg.fullatt_block_indexes)
        # fp32 score bytes per attention chunk; the exporter sets it from its options.
        self.score_budget = DEFAULT_SCORE_BUDGET

    # Stages: the export traces each one (and each layer) as its own graph part.
    def embed(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """Patch embeddings, permuted into window order."""
        u = self.config.merge_unit
        h = self.embeddings(pixel_values)
        n, d = h.shape
        return h.view(n // u, u, d)[meta.window_index].reshape(n, d)

    def layer(self, i: int, h: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        return self.encoder.layers[i](h, meta, i in self.full_attention, self.score_budget)

    def finish(self, h: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """Back to merge-block order, post-LayerNorm."""
        u = self.config.merge_unit
        n, d = h.shape
        return self.post_layernorm(h.view(n // u, u, d)[meta.reverse_index].reshape(n, d))

    def forward(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """pixel_values [N, patch_dim] in merge-block order -> [N, hidden] in the same order."""
        h = self.embed(pixel_values, meta)
        for i in range(len(self.encoder.layers)):
            h = self.layer(i, h, meta)
        return self.finish(h, meta)


class Siglip2VisionModel(nn.Module):
    """Holds ``vision_model`` so parameter names read ``siglip2.vision_model.*``."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.vision_model = Siglip2VisionTransformer(cfg)

    def forward(self, pixel_values, meta):
        return self.vision_model(pixel_values, meta)


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
