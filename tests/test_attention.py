"""Chunked attention (densert.model.attention) against the explicit-mask formula, at budgets that
force one chunk and many chunks."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from densert.model.attention import attention, chunk_rows, window_attention
from densert.model.config import sized_config
from densert.model.modeling import YoutuVLForConditionalGeneration

BUDGETS = [1 << 30, 4 * 2 * 3 * 40, 1]   # one chunk, 3 rows per chunk, one row per chunk


def _ref(q, k, v, scale, mask):
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("budget", BUDGETS)
@pytest.mark.parametrize("past", [0, 5])
def test_causal_with_past_equals_masked_reference(budget, past):
    torch.manual_seed(0)
    t = 11
    q = torch.randn(1, 2, t, 16)
    k, v = torch.randn(1, 2, past + t, 16), torch.randn(1, 2, past + t, 8)
    mask = torch.arange(past + t)[None, :] <= (torch.arange(t) + past)[:, None]
    got = attention(q, k, v, 0.25, causal=True, budget=budget)
    torch.testing.assert_close(got, _ref(q, k, v, 0.25, mask), atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget", BUDGETS)
def test_segments_and_broadcast_keys(budget):
    """Keys shared by every head (the MLA latent) broadcast against per-head queries."""
    torch.manual_seed(1)
    q, k, v = torch.randn(3, 13, 16), torch.randn(1, 13, 16), torch.randn(1, 13, 4)
    seg = torch.tensor([0] * 6 + [1] * 7)
    got = attention(q, k, v, 0.3, q_segments=seg, k_segments=seg, budget=budget)
    ref = _ref(q, k.expand(3, -1, -1), v.expand(3, -1, -1), 0.3, seg[:, None] == seg[None, :])
    torch.testing.assert_close(got, ref, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("budget", BUDGETS)
def test_windows_mask_empty_key_slots(budget):
    torch.manual_seed(2)
    q, k, v = (torch.randn(5, 2, 6, 8) for _ in range(3))
    valid = torch.rand(5, 6) > 0.3
    valid[:, 0] = True
    got = window_attention(q, k, v, valid, 0.5, budget)
    torch.testing.assert_close(got, _ref(q, k, v, 0.5, valid[:, None, None, :]), atol=1e-6, rtol=1e-5)


def test_chunk_rule():
    assert chunk_rows(100, 10, budget=4 * 10 * 7) == 7
    assert chunk_rows(100, 10, budget=1) == 1 and chunk_rows(3, 1, budget=1 << 30) == 3


def test_decoder_in_small_chunks_equals_one_chunk_and_trains():
    """The whole decoder with a budget of a few rows per chunk: same logits, and gradients
    flow through the chunk loop (training uses the same path)."""
    torch.manual_seed(3)
    cfg = sized_config("tiny", text_layers=2, vision_layers=1)
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 64, 1, 2, 2
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id = 3, 4, 5, 6
    model = YoutuVLForConditionalGeneration(cfg)
    ids = torch.randint(7, 64, (1, 23))
    for layout in ("latent", "full"):
        whole = model(ids, cache_layout=layout, logits="all").logits
        model.model.score_budget = 4 * cfg.num_attention_heads * 23 * 3
        chunked = model(ids, cache_layout=layout, logits="all").logits
        model.model.score_budget = 1 << 30
        torch.testing.assert_close(chunked, whole, atol=1e-5, rtol=1e-5)
    chunked.sum().backward()
    assert model.model.layers[0].self_attn.kv_b_proj.weight.grad.abs().sum() > 0
