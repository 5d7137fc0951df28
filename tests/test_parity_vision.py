"""The vision tower's host metadata and layers against independent implementations."""
import math

import pytest
import torch
import torch.nn.functional as F
from transformers.models.siglip2.configuration_siglip2 import Siglip2VisionConfig
from transformers.models.siglip2.modeling_siglip2 import Siglip2EncoderLayer as OracleLayer
from transformers.vision_utils import get_vision_position_ids, get_vision_window_index

from densert.model.attention import DEFAULT_SCORE_BUDGET
from densert.model.config import VisionConfig, sized_config
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.model.vision import Siglip2EncoderLayer
from densert.model.vision_meta import (
    VisionMeta,
    build_vision_meta,
    max_window_slots,
    merge_block_positions,
    window_count,
    window_index,
    window_slot_count,
)

RELEASED = VisionConfig()
GRIDS = [(2, 2), (2, 30), (30, 40), (24, 32), (16, 16), (18, 34), (32, 32), (34, 2), (68, 120), (166, 220)]


@pytest.mark.parametrize("gh,gw", GRIDS)
def test_window_index_equals_qwen25vl_algorithm(gh, gw):
    ref_idx, ref_cu = get_vision_window_index(torch.tensor([[1, gh, gw]]), 2, 256, 16)
    idx, lens = window_index(gh, gw, RELEASED)
    assert torch.equal(idx, ref_idx)
    ref_bounds = torch.unique_consecutive(torch.as_tensor(ref_cu)).tolist()
    assert [0] + torch.tensor(lens).cumsum(0).tolist() == ref_bounds


def test_worked_480x640_example():
    idx, lens = window_index(30, 40, RELEASED)
    assert len(idx) == 300
    assert torch.tensor([0] + lens).cumsum(0).tolist() == [0, 256, 512, 640, 864, 1088, 1200]


def test_packed_images_keep_windows_inside_each_image():
    meta = build_vision_meta([(30, 40), (24, 32)], RELEASED)
    assert meta.image_seqlens == [1200, 768]
    assert sum(meta.window_seqlens) == 1968
    assert torch.equal(meta.window_index[meta.reverse_index], torch.arange(492))
    assert set(meta.window_index[:300].tolist()) == set(range(300))


@pytest.mark.parametrize("gh,gw", [(2, 2), (30, 40), (6, 10)])
def test_positions_equal_transformers_merge_block_order(gh, gw):
    ref = get_vision_position_ids(torch.tensor([[1, gh, gw]]), 2)
    assert torch.equal(merge_block_positions(gh, gw, 2), ref)


def test_rope_against_straightforward_computation():
    """Per patch, by hand: 18 row frequencies on h, 18 on w, duplicated to 72, rotate-half."""
    gh, gw = 6, 8
    meta = build_vision_meta([(gh, gw)], RELEASED)
    # Undo the window permutation to get rows back in merge-block order.
    u = RELEASED.merge_unit
    cos = meta.cos.view(-1, u, 72)[meta.reverse_index].reshape(-1, 72)
    n = 0
    for bh in range(gh // 2):
        for bw in range(gw // 2):
            for dh in range(2):
                for dw in range(2):
                    h, w = 2 * bh + dh, 2 * bw + dw
                    freqs = [10000 ** (-2 * j / 36) for j in range(18)]
                    ang = [h * f for f in freqs] + [w * f for f in freqs]
                    expect = torch.tensor([math.cos(a) for a in ang * 2])
                    torch.testing.assert_close(cos[n], expect, atol=1e-6, rtol=0)
                    n += 1
    # Rotation: pairs (i, i+36) rotate by the same angle.
    x = torch.randn(1, n, 72)
    from densert.model.vision import apply_vision_rope
    y = apply_vision_rope(x, meta.cos, meta.sin)
    a = torch.atan2(meta.sin, meta.cos)[:, :36]
    x1, x2 = x[0, :, :36], x[0, :, 36:]
    torch.testing.assert_close(y[0, :, :36], x1 * a.cos() - x2 * a.sin(), atol=1e-5, rtol=0)
    torch.testing.assert_close(y[0, :, 36:], x2 * a.cos() + x1 * a.sin(), atol=1e-5, rtol=0)


def test_encoder_layer_equals_siglip2_without_rope():
    torch.manual_seed(0)
    vc = VisionConfig(hidden_size=96, intermediate_size=160, num_attention_heads=4, num_hidden_layers=1,
                      fullatt_block_indexes=[0], out_hidden_size=96)
    ours = Siglip2EncoderLayer(vc).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.copy_(0.1 * torch.randn_like(p))
    oc = Siglip2VisionConfig(hidden_size=96, intermediate_size=160, num_attention_heads=4,
                             hidden_act="gelu_pytorch_tanh", layer_norm_eps=1e-6)
    oc._attn_implementation = "eager"
    oracle = OracleLayer(oc).eval()
    oracle.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(37, 96)
    one_image = VisionMeta(grids=[], cos=None, sin=None, window_index=None, reverse_index=None,
                           window_seqlens=[], image_seqlens=[37], window_slots=None,
                           window_inverse=None, image_segment_ids=None)
    with torch.no_grad():
        ref = oracle(x[None], attention_mask=None)
        ref = ref[0] if isinstance(ref, tuple) else ref
        got = ours(x, one_image, full=True)
    torch.testing.assert_close(got, ref[0], atol=1e-5, rtol=1e-5)


def by_hand_rope(t, cos, sin):
    half = t.shape[-1] // 2
    return t * cos + torch.cat([-t[..., half:], t[..., :half]], -1) * sin


def reference_tower(model, pixel_values, gh, gw):
    """No permutation at all: window attention as an explicit mask over merge-block order."""
    vm = model.siglip2.vision_model
    vc = vm.config
    pos = merge_block_positions(gh, gw, 2)
    cell_r, cell_c = pos[:, 0] // 2, pos[:, 1] // 2
    win = (cell_r // vc.window_cells) * 1000 + cell_c // vc.window_cells
    same_window = win[:, None] == win[None, :]
    inv = 1.0 / (vc.rope_theta ** (torch.arange(0, vc.head_dim // 2, 2).double() / (vc.head_dim // 2)))
    ang = torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], -1)
    cos, sin = torch.cat([ang, ang], -1).cos().float(), torch.cat([ang, ang], -1).sin().float()
    h = vm.embeddings(pixel_values)
    for i, layer in enumerate(vm.encoder.layers):
        attn = layer.self_attn
        x = layer.layer_norm1(h)
        n = x.shape[0]
        q, k, v = (p(x).view(n, attn.num_heads, -1).transpose(0, 1) for p in (attn.q_proj, attn.k_proj, attn.v_proj))
        q, k = by_hand_rope(q, cos, sin), by_hand_rope(k, cos, sin)
        mask = None if i in vc.fullatt_block_indexes else same_window
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        h = h + attn.out_proj(o.transpose(0, 1).reshape(n, -1))
        h = h + layer.mlp(layer.layer_norm2(h))
    return model.merger(vm.post_layernorm(h))


@pytest.mark.parametrize("gh,gw", [(30, 40), (2, 2), (20, 36)])
@pytest.mark.parametrize("budget", [DEFAULT_SCORE_BUDGET, 40_000])
def test_tower_window_mechanics_equal_masked_reference(gh, gw, budget):
    """Released geometry (8x8-cell windows) with small widths: the permute / padded-window
    attention / un-permute path equals attention restricted by an explicit window mask in raster
    order, whole (the default budget) and in many small chunks of queries and windows."""
    torch.manual_seed(1)
    cfg = sized_config("tiny", vision_layers=3)
    cfg.vision_config.hidden_size, cfg.vision_config.num_attention_heads = 144, 2  # head_dim 72
    cfg.vocab_size, cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 64, 1, 2, 2
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id = 3, 4, 5, 6
    model = YoutuVLForConditionalGeneration(cfg).eval()
    px = torch.randn(gh * gw, 768)
    meta = build_vision_meta([(gh, gw)], cfg.vision_config)
    model.siglip2.vision_model.score_budget = budget
    with torch.no_grad():
        ref = reference_tower(model, px, gh, gw)
        got = model.encode_image(px, meta)
    torch.testing.assert_close(got, ref, atol=2e-5, rtol=1e-4)
    assert got.shape == (gh * gw // 4, cfg.hidden_size)


def test_packed_images_attend_within_their_image():
    """Two images packed along the patch axis: the full-attention layers take the segment mask,
    so each image's embeddings equal those of the image encoded alone."""
    torch.manual_seed(2)
    cfg = sized_config("tiny", vision_layers=2)
    model = YoutuVLForConditionalGeneration(cfg).eval()
    a, b = torch.randn(8 * 12, 768), torch.randn(6 * 4, 768)
    vc = cfg.vision_config
    model.siglip2.vision_model.score_budget = 30_000  # several query chunks
    with torch.no_grad():
        both = model.encode_image(torch.cat([a, b]), build_vision_meta([(8, 12), (6, 4)], vc))
        ea = model.encode_image(a, build_vision_meta([(8, 12)], vc))
        eb = model.encode_image(b, build_vision_meta([(6, 4)], vc))
    torch.testing.assert_close(both, torch.cat([ea, eb]), atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("gh,gw", [(30, 40), (2, 30), (34, 2)])
def test_window_layout_round_trips(gh, gw):
    meta = build_vision_meta([(gh, gw)], RELEASED)
    n, s = gh * gw, window_slot_count(RELEASED)
    assert meta.window_slots.numel() == window_count(gh, gw, RELEASED) * s
    filled = meta.window_slots[meta.window_slots < n]
    assert torch.equal(filled, torch.arange(n))          # every patch once, in window order
    assert torch.equal(meta.window_slots[meta.window_inverse], torch.arange(n))
    assert meta.window_slots.numel() <= max_window_slots(n, RELEASED)


def test_max_window_slots_is_the_worst_aspect_ratio():
    # 1024 tokens: a 1 x 1024-cell image needs 128 windows; a 32x32-cell one only 16.
    assert max_window_slots(4096, RELEASED) == 128 * 256
    assert max_window_slots(4096, RELEASED, grids=[(64, 64)]) == 16 * 256


def test_bad_grid_is_rejected():
    with pytest.raises(ValueError, match="multiples of the merge size"):
        build_vision_meta([(3, 4)], RELEASED)
