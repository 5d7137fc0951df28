"""The MLA decoder against transformers' own Youtu implementation (same random weights, same names)."""
import pytest
import torch
import transformers

from densert.model.config import CACHE_LAYOUTS, sized_config
from densert.model.generation import generate
from densert.model.llm import KVCache, empty_cache
from densert.model.modeling import YoutuVLForConditionalGeneration

VOCAB = 512


def small_config(tie: bool, q_lora: bool = True):
    cfg = sized_config("tiny", text_layers=3, vision_layers=2)
    cfg.vocab_size = VOCAB
    cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = 1, 2, 2
    cfg.vision_start_token_id, cfg.vision_end_token_id, cfg.image_token_id, cfg.video_token_id = 3, 4, 5, 6
    cfg.tie_word_embeddings = tie
    if not q_lora:
        cfg.q_lora_rank = None
    return cfg


def oracle_config(cfg) -> transformers.YoutuConfig:
    return transformers.YoutuConfig(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size, intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers, num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_attention_heads, q_lora_rank=cfg.q_lora_rank,
        kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
        qk_nope_head_dim=cfg.qk_nope_head_dim, v_head_dim=cfg.v_head_dim,
        rope_parameters={"rope_type": "default", "rope_theta": cfg.rope_theta},
        rope_interleave=cfg.rope_interleave, rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings, bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)


def pair(tie=False, q_lora=True, seed=0):
    """Our model and the oracle holding identical random weights (loaded by name, strictly)."""
    torch.manual_seed(seed)
    cfg = small_config(tie, q_lora)
    ours = YoutuVLForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        for name, p in ours.named_parameters():
            # Norm weights away from 1 so a swapped or missing norm shows up.
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name or "ln_q" in name
                    else 0.06 * torch.randn_like(p))
    oracle = transformers.YoutuForCausalLM(oracle_config(cfg)).eval()
    text_sd = {k: v for k, v in ours.state_dict().items() if k.startswith(("model.", "lm_head."))}
    result = oracle.load_state_dict(text_sd, strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    return ours, oracle


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
@pytest.mark.parametrize("tie,q_lora", [(False, True), (True, True), (False, False)])
def test_prefill_logits_match_oracle(layout, tie, q_lora):
    ours, oracle = pair(tie, q_lora)
    ids = torch.randint(0, VOCAB, (2, 23))
    with torch.no_grad():
        ref = oracle(ids).logits
        got = ours(ids, cache_layout=layout, logits="all").logits
    assert rel_err(got, ref) < 1e-4


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
def test_decode_steps_match_oracle(layout):
    """Prefill 17 tokens, then decode one token at a time and two at a time against the oracle's
    own cache; each step's logits must agree."""
    ours, oracle = pair()
    ids = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        ref = oracle(ids).logits
        out = ours(ids[:, :17], cache_layout=layout, logits="all")
        assert rel_err(out.logits, ref[:, :17]) < 1e-4
        past, pos = out.past, 17
        for step in (1, 1, 2, 1, 2):
            out = ours(ids[:, pos:pos + step], past=past, cache_layout=layout, logits="all")
            assert rel_err(out.logits, ref[:, pos:pos + step]) < 1e-4, f"step at {pos}"
            past, pos = out.past, pos + step
        assert past[0].shape[-2] == 24


def test_cache_layouts_hold_the_advertised_sizes():
    ours, _ = pair()
    cfg = ours.config
    ids = torch.randint(0, VOCAB, (1, 9))
    with torch.no_grad():
        latent = ours(ids, cache_layout="latent").past
        full = ours(ids, cache_layout="full").past
    assert [tuple(t.shape) for t in latent] == [(cfg.num_hidden_layers, 1, 9, cfg.kv_lora_rank + cfg.qk_rope_head_dim)]
    h = cfg.num_attention_heads
    assert [tuple(t.shape) for t in full] == [(cfg.num_hidden_layers, 1, h, 9, cfg.qk_head_dim),
                                              (cfg.num_hidden_layers, 1, h, 9, cfg.v_head_dim)]


def test_latent_cache_equals_oracle_cache_contents():
    """Our latent cache stores exactly what the oracle caches: normed latent ‖ rotated k_rope."""
    ours, oracle = pair()
    ids = torch.randint(0, VOCAB, (1, 11))
    with torch.no_grad():
        cache = oracle(ids, use_cache=True).past_key_values
        c = ours(ids, cache_layout="latent").past[0]
    for i, layer in enumerate(cache.layers):
        ref = torch.cat([layer.keys[:, 0], layer.values[:, 0]], dim=-1)
        assert rel_err(c[i], ref) < 1e-5


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
def test_empty_cache_is_the_same_as_no_cache(layout):
    ours, _ = pair()
    ids = torch.randint(0, VOCAB, (1, 7))
    with torch.no_grad():
        a = ours(ids, cache_layout=layout, logits="all")
        b = ours(ids, past=empty_cache(ours.config, layout), cache_layout=layout, logits="all")
    torch.testing.assert_close(a.logits, b.logits)


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
def test_greedy_generation_matches_oracle_generate(layout):
    ours, oracle = pair(seed=3)
    ids = torch.randint(7, VOCAB, (1, 10))
    with torch.no_grad():
        ref = oracle.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=None,
                              min_new_tokens=12)[0, 10:].tolist()
    got = generate(ours, ids, max_new_tokens=12, cache_layout=layout, stop_ids=[])
    assert got == ref


def test_image_pad_count_mismatch_is_a_clear_error():
    ours, _ = pair()
    ids = torch.tensor([[1, 3, 5, 5, 4]])
    with pytest.raises(ValueError, match="2 image-pad tokens.*3 image embeddings"):
        ours.embed(ids, torch.zeros(3, ours.config.hidden_size))


def test_unknown_cache_layout_is_rejected():
    ours, _ = pair()
    with pytest.raises(ValueError, match="unknown cache layout"):
        ours(torch.tensor([[1, 2]]), cache_layout="paged")


@pytest.mark.parametrize("layout", CACHE_LAYOUTS)
def test_kv_cache_writes_in_place_and_equals_the_tensor_cache(layout):
    """The eager KVCache gives the tensor path's logits and cache; a step within capacity writes
    into the same buffers (no restack), and growing past the capacity keeps every entry."""
    ours, _ = pair(seed=5)
    ids = torch.randint(0, ours.config.vocab_size, (1, 14))
    with torch.no_grad():
        cache = KVCache(ours.config, layout, capacity=8)
        a = ours(ids[:, :6], past=cache, cache_layout=layout, logits="all")
        b = ours(ids[:, :6], cache_layout=layout, logits="all")
        torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
        past = b.past
        for pos in range(6, 14):
            before = [t.data_ptr() for t in cache.buffers]
            a = ours(ids[:, pos:pos + 1], past=cache, cache_layout=layout, logits="all")
            b = ours(ids[:, pos:pos + 1], past=past, cache_layout=layout, logits="all")
            past = b.past
            torch.testing.assert_close(a.logits, b.logits, rtol=1e-6, atol=1e-6)
            grew = pos == 8  # the 9th token outgrows capacity 8
            assert ([t.data_ptr() for t in cache.buffers] != before) == grew
        assert cache.length == 14 and cache.capacity == 16
        for x, y in zip(cache.tensors(), past):
            torch.testing.assert_close(x, y, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("layout,seed", [("latent", 0), ("full", 4)])
def test_repetition_penalty_matches_oracle_generate(layout, seed):
    """The release's decoding (repetition_penalty=1.05 over prompt and generated ids, greedy)
    equals transformers' generate token for token; on these seeds the penalty changes the answer,
    so a penalty that were ignored, or applied to the generated ids only, would fail here."""
    ours, oracle = pair(seed=seed)
    torch.manual_seed(seed)
    ids = torch.randint(7, VOCAB, (1, 10))
    kw = dict(max_new_tokens=24, do_sample=False, eos_token_id=None, min_new_tokens=24)
    with torch.no_grad():
        ref = oracle.generate(ids, repetition_penalty=1.05, **kw)[0, 10:].tolist()
        plain = oracle.generate(ids, **kw)[0, 10:].tolist()
    got = generate(ours, ids, max_new_tokens=24, cache_layout=layout, stop_ids=[],
                   repetition_penalty=1.05)
    assert got == ref and got != plain


def test_repetition_penalty_covers_the_prompt():
    """A penalised prompt id: logits of ids in the prompt shrink, others stay; ids the head cannot
    emit are ignored."""
    from densert.model.generation import greedy_decode, penalize_repetition
    logits = torch.tensor([2.0, -1.0, 1.9, 0.5])
    seen = torch.tensor([True, True, False, False])
    assert torch.equal(penalize_repetition(logits, seen, 1.25), torch.tensor([1.6, -1.25, 1.9, 0.5]))
    toks, _ = greedy_decode(lambda t, c: (logits, c), logits, None, 1, repetition_penalty=1.25,
                            prompt_ids=[0, 99])
    assert toks == [2]
    toks, _ = greedy_decode(lambda t, c: (logits, c), logits, None, 1)
    assert toks == [0]
    with pytest.raises(ValueError, match="repetition_penalty must be > 0"):
        greedy_decode(lambda t, c: (logits, c), logits, None, 1, repetition_penalty=0.0)
