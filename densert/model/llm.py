"""The Youtu-LLM decoder: DeepSeek-style multi-head latent attention (MLA), dense SwiGLU MLP.

Spec ``youtu-vl-checkpoint.md`` sec. 5; parameter names are the checkpoint's ``model.*``.
The KV cache is stacked over layers, in one of two layouts:

``full``   k [layers, B, heads, S, qk_head_dim], v [layers, B, heads, S, v_head_dim]
``latent`` c [layers, B, S, kv_lora_rank + qk_rope_head_dim]: the normalised latent and the
           shared, already-rotated rope key; attention runs with kv_b absorbed into q and out.
Both are exact; ``latent`` stores 576 values per token per layer instead of 32*(192+128).

It is passed in two forms. Plain tensors in, plain tensors out (``past`` a tuple, the present
returned as a new tuple): the export graphs' interface, where one graph input and one output per
cache tensor is what ONNX Runtime and TensorRT bind. A ``KVCache`` for eager decoding: one
preallocated buffer per cache tensor that each step writes into in place, so appending a token
does not restack every layer's cache.
"""
from __future__ import annotations

import functools
from typing import Callable

import torch
from torch import nn

from .attention import DEFAULT_SCORE_BUDGET, attention
from .config import CACHE_LAYOUTS, YoutuVLConfig
from .layers import ACT2FN, RMSNorm, rotate_half

# The q_a / kv_a norms are built without the config eps in the reference implementation.
LATENT_NORM_EPS = 1e-6

Cache = tuple[torch.Tensor, ...]


def rope_inv_freq(cfg: YoutuVLConfig) -> torch.Tensor:
    d = cfg.qk_rope_head_dim
    return 1.0 / (cfg.rope_theta ** (torch.arange(0, d, 2, dtype=torch.int64).float() / d))


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """x [..., T, rope_dim], cos/sin [T, rope_dim/2] (one angle per rotated pair).

    Interleaved (GPT-J) pairs (2i, 2i+1) rotate together; the result is written as
    [evens ‖ odds], the lane order the reference implementation caches, so cached keys match it.
    """
    if interleave:
        x1, x2 = x[..., 0::2], x[..., 1::2]
        return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)
    cos2, sin2 = torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)
    return x * cos2 + rotate_half(x) * sin2


class KVCache:
    """Eager decoding cache: per cache tensor one buffer [layers, B, (heads,) capacity, D] whose
    first ``length`` positions hold the cache. A forward pass writes its T new entries in place at
    [length, length + T) and attends over views of [0, length + T); the capacity doubles when it
    runs out (amortised O(1) copying per token). Decoding grows the cache in place: a caller that
    needs to branch from a cache must build it again."""

    def __init__(self, cfg: YoutuVLConfig, layout: str, batch: int = 1, capacity: int = 256,
                 dtype=torch.float32, device=None):
        self.layout, self.length = layout, 0
        self.buffers = [torch.empty(_grow_seq(t.shape, capacity), dtype=dtype, device=device)
                        for t in empty_cache(cfg, layout, batch, dtype, device)]

    @property
    def capacity(self) -> int:
        return int(self.buffers[0].shape[-2])

    def reserve(self, total: int) -> None:
        """Room for ``total`` positions (copies the filled part once when it must grow)."""
        if total <= self.capacity:
            return
        cap = max(total, 2 * self.capacity)
        grown = [b.new_empty(_grow_seq(b.shape, cap)) for b in self.buffers]
        for g, b in zip(grown, self.buffers):
            g[..., : self.length, :] = b[..., : self.length, :]
        self.buffers = grown

    def update(self, layer: int, new: Cache) -> Cache:
        """Write one layer's new entries after the filled part; the layer's whole cache, as views."""
        end = self.length + new[0].shape[-2]
        out = []
        for b, n in zip(self.buffers, new):
            b[layer, ..., self.length:end, :] = n
            out.append(b[layer, ..., :end, :])
        return tuple(out)

    def tensors(self) -> Cache:
        """The cache in the stacked tensor form (views, no copy)."""
        return tuple(b[..., : self.length, :] for b in self.buffers)


def _grow_seq(shape, capacity: int) -> tuple[int, ...]:
    return (*shape[:-2], capacity, shape[-1])


class YoutuMLAttention(nn.Module):
    def __init__(self, cfg: YoutuVLConfig):
        super().__init__()
        self.cfg = cfg
        h, d = cfg.num_attention_heads, cfg.hidden_size
        self.num_heads = h
        self.nope, self.rope, self.vdim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.rank = cfg.kv_lora_rank
        if cfg.q_lora_rank is None:
            self.q_proj = nn.Linear(d, h * cfg.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(d, cfg.q_lora_rank, bias=cfg.attention_bias)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, eps=LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(cfg.q_lora_rank, h * cfg.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(d, self.rank + self.rope, bias=cfg.attention_bias)
        self.kv_a_layernorm = RMSNorm(self.rank, eps=LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, h * (self.nope + self.vdim), bias=False)
        self.o_proj = nn.Linear(h * self.vdim, d, bias=cfg.attention_bias)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.cfg.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                store: Callable[[Cache], Cache], layout: str,
                budget: int = DEFAULT_SCORE_BUDGET) -> torch.Tensor:
        """``store(new)`` takes this step's cache entries and returns the layer's whole cache
        (past + new) to attend over; causal (query i of T sees the past and keys up to i),
        query-chunked so no [heads, T, T] scores exist (``attention``)."""
        b, t, _ = x.shape
        q = self._query(x).view(b, t, self.num_heads, -1).transpose(1, 2)
        q_nope, q_rot = q.split([self.nope, self.rope], dim=-1)
        latent, k_rot = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)
        latent = self.kv_a_layernorm(latent)                             # [B, T, rank]
        il = self.cfg.rope_interleave
        q_rot = apply_rope(q_rot, cos, sin, il)
        k_rot = apply_rope(k_rot, cos, sin, il)                          # [B, T, rope], shared
        scale = self.cfg.softmax_scale

        if layout == "full":
            kv = self.kv_b_proj(latent).view(b, t, self.num_heads, -1).transpose(1, 2)
            k_nope, v = kv.split([self.nope, self.vdim], dim=-1)
            k = torch.cat([k_nope, k_rot[:, None].expand(-1, self.num_heads, -1, -1)], dim=-1)
            k, v = store((k, v))
            qf = torch.cat([q_nope, q_rot], dim=-1)
            o = attention(qf, k, v, scale, causal=True, budget=budget)
        elif layout == "latent":
            (c,) = store((torch.cat([latent, k_rot], dim=-1),))          # [B, P+T, rank+rope]
            w = self.kv_b_proj.weight.view(self.num_heads, self.nope + self.vdim, self.rank)
            w_uk, w_uv = w[:, : self.nope], w[:, self.nope:]
            # Absorb kv_b's key half into the query: q_nope . (W_uk c) == (W_uk^T q_nope) . c
            q_lat = torch.cat([torch.matmul(q_nope, w_uk), q_rot], dim=-1)      # [B, H, T, rank]
            # The latent is both key (all 576 lanes) and value (the first 512), shared by heads.
            # kv_b's value half is applied per query chunk (``post``): [H, rank, vdim].
            c1 = c.unsqueeze(1)
            o = attention(q_lat, c1, c1[..., : self.rank], scale, causal=True,
                          post=w_uv.transpose(1, 2), budget=budget)             # [B, H, T, vdim]
        else:
            raise ValueError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")
        return self.o_proj(o.transpose(1, 2).reshape(b, t, -1))


class YoutuMLP(nn.Module):
    def __init__(self, cfg: YoutuVLConfig):
        super().__init__()
        d, i = cfg.hidden_size, cfg.intermediate_size
        self.gate_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(d, i, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(i, d, bias=cfg.mlp_bias)
        self.act = ACT2FN[cfg.hidden_act]

    def forward(self, x):
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class YoutuDecoderLayer(nn.Module):
    def __init__(self, cfg: YoutuVLConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.self_attn = YoutuMLAttention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.mlp = YoutuMLP(cfg)

    def forward(self, x, cos, sin, store, layout, budget: int = DEFAULT_SCORE_BUDGET):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, store, layout, budget)
        return x + self.mlp(self.post_attention_layernorm(x))


class YoutuModel(nn.Module):
    """Embeddings, decoder layers and the final norm; names read ``model.*`` in the checkpoint."""

    def __init__(self, cfg: YoutuVLConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(YoutuDecoderLayer(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, eps=cfg.rms_norm_eps)
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        # fp32 score bytes per attention chunk; the exporter sets it from its options.
        self.score_budget = DEFAULT_SCORE_BUDGET

    def rope(self, t: int, past_len, device) -> tuple[torch.Tensor, torch.Tensor]:
        pos = (torch.arange(t, device=device) + past_len).float()
        ang = pos[:, None] * self.inv_freq.to(device)[None, :]
        return ang.cos(), ang.sin()

    def rope_for(self, inputs_embeds: torch.Tensor, past: Cache | KVCache | None
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        """cos, sin of the positions after ``past``, in the dtype of the embeddings."""
        cos, sin = self.rope(inputs_embeds.shape[1], cache_length(past), inputs_embeds.device)
        return cos.to(inputs_embeds.dtype), sin.to(inputs_embeds.dtype)

    def forward(self, inputs_embeds: torch.Tensor, past: Cache | KVCache | None = None,
                layout: str = "latent", use_cache: bool = True
                ) -> tuple[torch.Tensor, Cache | KVCache | None]:
        """inputs_embeds [B, T, d] -> final-normed hidden states [B, T, d] and the present cache
        (past + these T tokens): a new tuple for a tuple ``past`` (or None), the same, grown
        ``KVCache`` for a ``KVCache``, None when ``use_cache`` is off (training)."""
        if layout not in CACHE_LAYOUTS:
            raise ValueError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")
        if isinstance(past, KVCache) and past.layout != layout:
            raise ValueError(f"the KVCache holds the {past.layout!r} layout, not {layout!r}")
        t = inputs_embeds.shape[1]
        cos, sin = self.rope_for(inputs_embeds, past)
        presents: list[Cache] = []

        def store(i: int, new: Cache) -> Cache:
            if isinstance(past, KVCache):
                return past.update(i, new)
            full = append_past(past, i, new)
            if use_cache:
                presents.append(full)
            return full

        if isinstance(past, KVCache):
            past.reserve(cache_length(past) + t)
        h = inputs_embeds
        for i, layer in enumerate(self.layers):
            h = layer(h, cos, sin, functools.partial(store, i), layout, self.score_budget)
        if isinstance(past, KVCache):
            past.length += t
            return self.norm(h), past
        present = tuple(torch.stack(parts) for parts in zip(*presents)) if use_cache else None
        return self.norm(h), present


def append_past(past: Cache | None, i: int, new: Cache) -> Cache:
    """Layer ``i``'s whole cache: its past (from the stacked tensors) followed by ``new``."""
    return new if past is None else tuple(torch.cat([p[i], n], dim=-2) for p, n in zip(past, new))


def empty_cache(cfg: YoutuVLConfig, layout: str, batch: int = 1, dtype=torch.float32,
                device=None) -> Cache:
    """A zero-length cache: the same code path serves prefill and decode."""
    n = cfg.num_hidden_layers
    if layout == "full":
        h = cfg.num_attention_heads
        return (torch.zeros(n, batch, h, 0, cfg.qk_head_dim, dtype=dtype, device=device),
                torch.zeros(n, batch, h, 0, cfg.v_head_dim, dtype=dtype, device=device))
    if layout == "latent":
        return (torch.zeros(n, batch, 0, cfg.latent_cache_dim, dtype=dtype, device=device),)
    raise ValueError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")


def cache_length(past: Cache | KVCache | None) -> int:
    """Tokens in the cache. For tensors this is read off the shape without int(): under the ONNX
    tracer it must stay symbolic, so one decode graph serves every past length."""
    if past is None:
        return 0
    return past.length if isinstance(past, KVCache) else past[0].shape[-2]
