"""The onnxruntime flavour's fused layers (``export/ort_fused.py``) against the torch model: the
paths the default engine's parity tests (test_export_onnx.py) do not take, each checked for
equal outputs."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.export import quantize as Q
from densert.export.onnx_export import export_engine
from densert.export.ort_backend import OrtBackend
from densert.export.verify import verify
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.model.vision_meta import build_vision_meta


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32)


def _variant(model, **changes) -> YoutuVLForConditionalGeneration:
    """The tiny model with other config choices, random weights (norms and biases random too, so
    a weight read in the wrong place shows)."""
    cfg = copy.deepcopy(model.config)
    vision = changes.pop("vision", {})
    cfg = dataclasses.replace(cfg, **changes)
    cfg.vision_config = dataclasses.replace(cfg.vision_config, **vision)
    torch.manual_seed(0)
    m = YoutuVLForConditionalGeneration(cfg).float().eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if p.ndim == 1:
                p.copy_(1 + 0.2 * torch.randn_like(p) if "norm" in name else 0.05 * torch.randn_like(p))
    return m


@pytest.mark.parametrize("changes", [
    {"rope_interleave": False, "vision": {"hidden_act": "gelu"}},
    {"q_lora_rank": None, "vision": {"fullatt_block_indexes": [0, 1, 2, 3]}},
], ids=["rotate-half-rope+erf-gelu", "no-q-lora+all-full-attention"])
def test_config_variants_match_torch(tiny_checkpoint, model, tmp_path, changes):
    """The rope lane permutation without interleave, erf GELU, a q_proj without LoRA and a tower
    of full-attention layers: the fp32 fused engine equals torch (the fp32 gate)."""
    variant = _variant(model, **changes)
    out = tmp_path / "eng"
    export_engine(tiny_checkpoint, out, progress=False, model=variant, max_image_tokens=64)
    rep = verify(out, tiny_checkpoint, grids=((8, 12), (2, 2)), decode_steps=3, model=variant, log=lambda s: None)
    assert rep.ok, rep.format()


def test_several_images_in_one_call(tiny_checkpoint, model, tmp_path):
    """Two images packed in one vision call: the full-attention layers take the segment-masked
    branch (MultiHeadAttention alone would let them attend across images)."""
    out = tmp_path / "eng"
    export_engine(tiny_checkpoint, out, progress=False, model=model, max_image_tokens=64)
    ob = OrtBackend(out)
    vc = model.config.vision_config
    torch.manual_seed(1)
    a, b = torch.rand(8 * 12, vc.patch_dim) * 2 - 1, torch.rand(6 * 4, vc.patch_dim) * 2 - 1
    meta = build_vision_meta([(8, 12), (6, 4)], vc)
    with torch.no_grad():
        want = model.encode_image(torch.cat([a, b]), meta)
        alone = model.encode_image(a, build_vision_meta([(8, 12)], vc))
    got = ob.encode_image(torch.cat([a, b]), meta)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(got[:24], alone, atol=2e-5, rtol=1e-4)   # nothing leaks across images


@pytest.mark.parametrize("past,rows_budget", [(0, 3), (5, 3), (5, 100)])
def test_causal_attention_in_query_chunks(past, rows_budget):
    """The decoder's attention Loop over query chunks (the last one overlapping), with and
    without a past, against torch's causal attention with the past offset."""
    import onnxruntime as ort

    from densert.export import ort_fused as F
    from densert.export.onnx_export import OPSET
    from densert.export.onnx_types import FLOAT, INT64
    heads, qk, vd, t = 2, 8, 6, 7
    p = F.Part("attn", OPSET)
    q, k, v = p.input("q", FLOAT, [1, t, heads * qk]), p.input("k", FLOAT), p.input("v", FLOAT)
    p.input(F.D_PAST, INT64, [1])
    budget = 4 * heads * (past + t) * rows_budget          # `rows_budget` query rows per chunk
    o = F.causal_attention(p, q, k, v, heads, heads * vd, 0.3, budget)
    p.op("Identity", o, outs=["o"])
    p.output("o", FLOAT, None)
    sess = ort.InferenceSession(p.model().SerializeToString(), providers=["CPUExecutionProvider"])
    rng = np.random.default_rng(0)
    qa = rng.standard_normal((1, t, heads * qk)).astype(np.float32)
    ka = rng.standard_normal((1, past + t, heads * qk)).astype(np.float32)
    va = rng.standard_normal((1, past + t, heads * vd)).astype(np.float32)
    got = sess.run(None, {"q": qa, "k": ka, "v": va, F.D_PAST: np.array([past], np.int64)})[0]
    split = lambda x, d: torch.from_numpy(x).view(1, -1, heads, d).transpose(1, 2)  # noqa: E731
    mask = torch.arange(past + t)[None, :] <= (torch.arange(t) + past)[:, None]
    want = torch.nn.functional.scaled_dot_product_attention(split(qa, qk), split(ka, qk), split(va, vd),
                                                            attn_mask=mask, scale=0.3)
    np.testing.assert_allclose(got, want.transpose(1, 2).reshape(1, t, -1).numpy(), atol=1e-5, rtol=1e-5)


def test_int4_columns_quantizer():
    """int4 per output column: values in [-7, 7] (exact in int8), one scale per column, and the
    clip search never does worse than the column's absmax scale (it is one of the candidates)."""
    rng = np.random.default_rng(0)
    w = (rng.standard_t(4, (256, 40)) * 0.02).astype(np.float32)
    w[:, 3] = 0
    q, s = Q.quantize_int4_columns(w)
    assert q.dtype == np.int8 and q.min() >= -7 and q.max() <= 7 and s.shape == (40,)
    assert not q[:, 3].any()
    absmax = np.abs(w).max(0) / 7
    absmax[3] = 1
    plain = np.clip(np.rint(w / absmax), -7, 7) * absmax
    err, err_plain = ((q * s - w) ** 2).sum(0), ((plain - w) ** 2).sum(0)
    assert (err <= err_plain * (1 + 1e-6)).all() and err.sum() < 0.9 * err_plain.sum()
