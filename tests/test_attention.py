"""Chunked attention (densert.model.attention) against the explicit-mask formula, at budgets that
force one chunk and many chunks."""
from __future__ import annotations

import numpy as np
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


def test_post_projection_per_chunk():
    torch.manual_seed(4)
    q, k, v = torch.randn(1, 3, 9, 16), torch.randn(1, 1, 9, 16), torch.randn(1, 1, 9, 8)
    post = torch.randn(3, 8, 5)
    mask = torch.arange(9)[None, :] <= torch.arange(9)[:, None]
    ref = _ref(q, k.expand(1, 3, -1, -1), v.expand(1, 3, -1, -1), 0.2, mask) @ post
    for budget in BUDGETS:
        torch.testing.assert_close(attention(q, k, v, 0.2, causal=True, post=post, budget=budget), ref,
                                   atol=1e-5, rtol=1e-5)


class _Attn(torch.nn.Module):
    def __init__(self, budget):
        super().__init__()
        self.budget = budget

    def forward(self, q, k, v, post, seg, wq, wk, wv, valid):
        a = attention(q, k, v, 0.3, causal=True, post=post, budget=self.budget)
        b = attention(q[0], q[0], q[0], 0.3, q_segments=seg, k_segments=seg, budget=self.budget)
        return a, b, window_attention(wq, wk, wv, valid, 0.5, self.budget)


@pytest.mark.parametrize("budget", [1 << 30, 4 * 3 * 20 * 2])
def test_exported_loops_equal_eager(tmp_path, budget):
    """One export, then sizes other than the traced one (past lengths, one query, many chunks):
    the ONNX Loops (densert.export.attention_onnx) give the eager numbers in ONNX Runtime."""
    import warnings

    import onnx
    import onnxruntime as ort

    from densert.export.attention_onnx import expand_chunked_attention, op_types

    def args(t, past, w=5):
        g = torch.Generator().manual_seed(t * 100 + past)

        def r(*s):
            return torch.randn(*s, generator=g)

        valid = torch.rand(w, 6, generator=g) > 0.3
        valid[:, 0] = True
        return (r(1, 3, t, 16), r(1, 1, past + t, 16), r(1, 1, past + t, 8), r(3, 8, 4),
                torch.tensor([0] * (t // 2) + [1] * (t - t // 2)), r(w, 2, 6, 8), r(w, 2, 6, 8), r(w, 2, 6, 8), valid)

    names = ["q", "k", "v", "post", "seg", "wq", "wk", "wv", "valid"]
    dyn = {"q": {2: "T"}, "k": {2: "P"}, "v": {2: "P"}, "seg": {0: "T"}, **{n: {0: "W"} for n in names[5:]}}
    m = _Attn(budget)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(m, args(9, 3), str(tmp_path / "a.onnx"), dynamo=False, opset_version=17,
                          input_names=names, output_names=["a", "b", "c"], dynamic_axes=dyn)
    model = onnx.load(str(tmp_path / "a.onnx"))
    assert expand_chunked_attention(model) == 3
    onnx.checker.check_model(model)
    assert "Loop" in op_types(model.graph) and not any("::" in o for o in op_types(model.graph))
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for t, past, w in ((9, 3, 5), (1, 7, 1), (13, 0, 9), (4, 0, 2)):
        a = args(t, past, w)
        got = sess.run(None, {n: x.numpy() for n, x in zip(names, a)})
        for g, r in zip(got, m(*a)):
            np.testing.assert_allclose(g, r.numpy(), atol=2e-6, rtol=1e-5)
