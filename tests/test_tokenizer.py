"""Tokenizer builder (both layouts), Vocab look-ups and the chat template."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys

import pytest
import torch

from densert.errors import ChatError, CheckpointError, TokenizerError
from densert.text import tokens
from densert.text.chat import (
    CHAT_TEMPLATE,
    ChatTemplate,
    encode_chat,
    expand_image_pads,
    render_chat,
    render_jinja,
    user_message,
)
from densert.text.tokenizer import build_tokenizer_json


@pytest.fixture(scope="module")
def tiny():
    return tokens.Vocab.from_str(build_tokenizer_json("tiny"), "tiny")


@pytest.fixture(scope="module")
def big():
    return tokens.Vocab.from_str(build_tokenizer_json("youtu-vl-4b"), "youtu-vl-4b")


def test_build_is_deterministic_across_processes():
    code = ("import hashlib,sys; from densert.text.tokenizer import build_tokenizer_json as b; "
            "sys.stdout.write(hashlib.sha256(b('tiny').encode()).hexdigest())")
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    here = hashlib.sha256(build_tokenizer_json("tiny").encode()).hexdigest()
    assert other.stdout == here


def test_youtu_layout_verified_ids(big):
    assert len(big) == 283386
    assert big.token_id(tokens.BOS) == 128000 and big.token_id(tokens.EOS) == 128001
    assert [big.token_id(s) for s in (tokens.VISION_START, tokens.VISION_END, tokens.IMAGE_PAD, tokens.VIDEO_PAD)] == \
        [128262, 128263, 128264, 128265]
    for k in (0, 1, 777, 2047):
        assert big.token_id(tokens.x_token(k)) == 278267 + 2 * k
        assert big.token_id(tokens.y_token(k)) == 278268 + 2 * k
        assert big.coord_value(278267 + 2 * k) == ("x", k)
        assert big.coord_value(278268 + 2 * k) == ("y", k)
    assert big.coord_value(128000) is None
    bins = big.depth_bin_ids()
    assert bins.dtype == torch.long and bins.shape == (1000,)
    assert int(bins.min()) >= 282363 and int(bins.max()) <= 283385
    assert torch.equal(bins, torch.arange(int(bins[0]), int(bins[0]) + 1000))
    tags = [big.token_id(s) for s in tokens.TAG_TOKENS]
    assert min(tags) == 282363 and len(set(tags) | set(bins.tolist())) == len(tags) + 1000


def test_tiny_layout_contiguous(tiny):
    n = len(tiny)
    assert 1000 <= tiny.token_id(tokens.BOS) <= 2100   # base BPE vocab of ~1-2k
    assert sorted(tiny.tok.get_vocab(with_added_tokens=True).values()) == list(range(n))
    ids = [tiny.token_id(s) for s in tokens.CONTROL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + 6))
    assert tiny.coord_value(tiny.token_id("<y_5>")) == ("y", 5)
    assert tiny.depth_bin_ids()[-1] == n - 1


@pytest.mark.parametrize("layout", ["tiny", "youtu-vl-4b"])
def test_special_strings_encode_to_one_id(layout, tiny, big):
    v = tiny if layout == "tiny" else big
    text = "a <ref>floor</ref><box><x_12><y_2047></box><mask>(0,3)</mask><custom_1000><|image_pad|>"
    ids = v.encode(text)
    for s in ("<ref>", "</ref>", "<x_12>", "<y_2047>", "<custom_1000>", tokens.IMAGE_PAD, "<mask>"):
        assert ids.count(v.token_id(s)) == 1, s
    assert v.decode(ids) == text
    assert tokens.BOS not in v.decode(v.encode("hello"))     # no implicit bos
    assert v.decode(v.encode("hello") + [v.eos_id], skip_special_tokens=True) == "hello"


def test_name_ids_leading_space(tiny):
    from densert.tasks.classes import NAME_LEADING_SPACE, name_ids
    spaced = name_ids(tiny, "floor", leading_space=True)
    bare = name_ids(tiny, "floor", leading_space=False)
    assert tiny.decode(spaced) == " floor" and tiny.decode(bare) == "floor"
    assert spaced != bare
    assert name_ids(tiny, "floor") == (spaced if NAME_LEADING_SPACE else bare)
    assert len(name_ids(tiny, "traffic light")) >= 2
    with pytest.raises(ValueError, match="empty"):
        name_ids(tiny, "  ")


def test_token_id_error_names_token_and_file(tiny):
    with pytest.raises(TokenizerError, match=r"<nope>.*tiny"):
        tiny.token_id("<nope>")
    with pytest.raises(ValueError, match="depth bin"):
        tokens.custom_token(0)
    with pytest.raises(ValueError, match="x coordinate"):
        tokens.x_token(2048)


def test_vocab_from_missing_or_bad_file(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        tokens.Vocab.from_file(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="not a valid"):
        tokens.Vocab.from_file(tmp_path)


# ---------------------------------------------------------------- chat template
SPEC_ONE_TURN = ("<|begin_of_text|>system\nYou are a helpful assistant.<|end_of_text|>\n"
                 "<|begin_of_text|>user\n<|vision_start|>" + "<|image_pad|>" * 3 +
                 "<|vision_end|>Estimate the depth.<|end_of_text|>\n<|begin_of_text|>assistant\n")


def test_render_matches_spec_string():
    assert render_chat([user_message("Estimate the depth.")], [3]) == SPEC_ONE_TURN


def test_prompt_before_image_and_multi_turn():
    msgs = [{"role": "system", "content": "Be brief."},
            user_message("Please estimate the depth of this image from the NYUv2 dataset.",
                         image_first=False),
            {"role": "assistant", "content": "<depth><mask>(1,4)</mask>"},
            {"role": "user", "content": "Again."}]
    want = ("<|begin_of_text|>system\nBe brief.<|end_of_text|>\n"
            "<|begin_of_text|>user\nPlease estimate the depth of this image from the NYUv2 dataset."
            "<|vision_start|><|image_pad|><|image_pad|><|vision_end|><|end_of_text|>\n"
            "<|begin_of_text|>assistant\n<depth><mask>(1,4)</mask><|end_of_text|>\n"
            "<|begin_of_text|>user\nAgain.<|end_of_text|>\n<|begin_of_text|>assistant\n")
    assert render_chat(msgs, [2]) == want
    assert render_chat(msgs, [2], add_generation_prompt=False) == want.removesuffix(
        "<|begin_of_text|>assistant\n")


@pytest.mark.parametrize("msgs,counts", [
    ([user_message("Segment: floor, wall.")], [5]),
    ([user_message("Estimate the depth.", image_first=False)], [1]),
    ([{"role": "user", "content": "no image"}], []),
    ([{"role": "system", "content": "S"}, {"role": "user", "content": [
        {"type": "image"}, {"type": "text", "text": "compare"}, {"type": "image"}]},
      {"role": "assistant", "content": "ok"}, {"role": "user", "content": "and?"}], [4, 2]),
])
@pytest.mark.parametrize("gen", [True, False])
def test_render_equals_transformers_renderer(msgs, counts, gen):
    """Our Jinja environment against transformers' own chat-template renderer (sandbox,
    trim_blocks, lstrip_blocks, special tokens), on the built-in template."""
    from transformers.utils.chat_template_utils import render_jinja_template
    ref, _ = render_jinja_template([msgs], chat_template=CHAT_TEMPLATE, add_generation_prompt=gen,
                                   bos_token=tokens.BOS, eos_token=tokens.EOS, pad_token=tokens.EOS)
    assert render_jinja(msgs, gen) == ref[0]
    assert render_chat(msgs, counts, gen) == expand_image_pads(ref[0], counts)


# A template of the kind checkpoints ship: uses bos_token, whitespace control, loop controls, a
# generation block and a trailing newline that transformers' environment drops.
OWN_TEMPLATE = (
    "{%- for m in messages %}{{ bos_token }}{{ m['role'] | upper }}: "
    "{%- if m['content'] is string %} {{ m['content'] }}{% else %}"
    "{%- for p in m['content'] %}{% if p['type'] == 'image' %}<|vision_start|><|image_pad|>"
    "<|vision_end|>{% continue %}{% endif %} {{ p['text'] }}{% endfor %}{% endif %}\n"
    "{%- endfor %}{% if add_generation_prompt %}{% generation %}ASSISTANT:{% endgeneration %}"
    "{% endif %}\n")


@pytest.mark.parametrize("gen", [True, False])
def test_own_template_equals_transformers_renderer(gen):
    from transformers.utils.chat_template_utils import render_jinja_template
    msgs = [user_message("Segment: floor, wall."), {"role": "assistant", "content": "ok"}]
    ref, _ = render_jinja_template([msgs], chat_template=OWN_TEMPLATE, add_generation_prompt=gen,
                                   bos_token="<s>")
    got = render_jinja(msgs, gen, ChatTemplate(OWN_TEMPLATE, "own", {"bos_token": "<s>"}))
    assert got == ref[0] and got.startswith("<s>USER:<|vision_start|>")
    assert got.endswith("okASSISTANT:" if gen else " ok")


def test_checkpoint_template_is_read_and_used(tiny_checkpoint, tmp_path, tiny):
    """The checkpoint's own template wins over the built-in one, from chat_template.jinja, then
    chat_template.json, then tokenizer_config.json (a list of named templates gives "default");
    the bundled model's own template renders the spec's example byte for byte."""
    import shutil

    from densert.checkpoint.model_dir import read_chat_template
    from densert.resources import bundled_model_dir
    own = read_chat_template(bundled_model_dir())
    assert own.source.endswith("chat_template.json")
    assert render_chat([user_message("Estimate the depth.")], [3], template=own) == SPEC_ONE_TURN
    d = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, d)
    (d / "chat_template.json").unlink()
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "x"},
                            {"name": "default", "template": OWN_TEMPLATE}]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    t = read_chat_template(d)
    assert t.template == OWN_TEMPLATE and t.source.endswith("tokenizer_config.json")
    assert t.special_tokens["bos_token"] == tokens.BOS
    ids = encode_chat(tiny, [user_message("hi")], [4], template=t)[0].tolist()
    assert ids == tiny.encode(f"{tokens.BOS}USER:{tokens.VISION_START}" + tokens.IMAGE_PAD * 4
                              + f"{tokens.VISION_END} hiASSISTANT:")
    (d / "chat_template.jinja").write_text("{{ bos_token }}only {{ messages[0]['role'] }}")
    t = read_chat_template(d)
    assert t.source.endswith("chat_template.jinja")
    assert render_jinja([{"role": "user", "content": "x"}], template=t) == f"{tokens.BOS}only user"
    with pytest.raises(ChatError, match=r"rendered 0 image pad\(s\) for 1 image"):
        encode_chat(tiny, [user_message("hi")], [4], template=t)
    cfg["chat_template"] = 3
    (d / "chat_template.jinja").unlink()
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="chat_template must be a string"):
        read_chat_template(d)
    (d / "tokenizer_config.json").write_text(json.dumps({}))
    assert read_chat_template(d) is None


def test_encode_chat_ids(tiny):
    msgs = [user_message("Segment: floor, wall.")]
    ids = encode_chat(tiny, msgs, [7])
    assert ids.shape[0] == 1 and ids.dtype == torch.long
    assert ids[0].tolist() == tiny.encode(render_chat(msgs, [7]))
    assert int((ids == tiny.image_pad_id).sum()) == 7
    assert ids[0, 0] == tiny.bos_id and int((ids == tiny.bos_id).sum()) == 3


def test_chat_errors(tiny):
    with pytest.raises(ChatError, match="1 image.*0 entries"):
        render_chat([user_message("x")], [])
    with pytest.raises(ChatError, match="role"):
        render_chat([{"role": "robot", "content": "x"}])
    with pytest.raises(ChatError, match="segment 0"):
        render_chat([{"role": "user", "content": [{"type": "video"}]}])
    with pytest.raises(ChatError, match="control token"):
        encode_chat(tiny, [{"role": "user", "content": "sneaky <|image_pad|>"}])


def test_template_files_in_checkpoint(tiny_checkpoint):
    ct = json.loads((tiny_checkpoint / "chat_template.json").read_text())["chat_template"]
    tc = json.loads((tiny_checkpoint / "tokenizer_config.json").read_text())
    assert ct == tc["chat_template"] == CHAT_TEMPLATE
    assert expand_image_pads(render_jinja([user_message("Estimate the depth.")], template=ct), [3]) \
        == SPEC_ONE_TURN


def test_config_ids_come_from_tokenizer(big, tiny):
    from densert.model.config import YoutuVLConfig, sized_config
    from densert.text.tokenizer import apply_token_ids
    cfg = apply_token_ids(sized_config("youtu-vl-4b"), big)
    released = YoutuVLConfig()   # the spec's verified ids are the config defaults
    for k in ("vocab_size", "bos_token_id", "eos_token_id", "pad_token_id", "image_token_id",
              "video_token_id", "vision_start_token_id", "vision_end_token_id"):
        assert getattr(cfg, k) == getattr(released, k), k
    small = apply_token_ids(sized_config("tiny"), tiny)
    assert small.vocab_size == len(tiny) and small.image_token_id == tiny.image_pad_id
    small.validate()


@pytest.mark.slow
def test_hf_transformers_reads_the_checkpoint_tokenizer(tiny_checkpoint, tiny):
    """An independent consumer: HF AutoTokenizer + apply_chat_template on our files."""
    from transformers import AutoTokenizer
    hf = AutoTokenizer.from_pretrained(str(tiny_checkpoint))
    msgs = [{"role": "system", "content": "S"}, user_message("Segment: floor, wall."),
            {"role": "assistant", "content": "<ref>floor</ref>"}, {"role": "user", "content": "ok"}]
    text = hf.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text == render_chat(msgs, [1])
    ids = hf.apply_chat_template(msgs, tokenize=True, add_generation_prompt=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert list(ids) == encode_chat(tiny, msgs, [1])[0].tolist()
    assert (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id) == (tiny.bos_id, tiny.eos_id, tiny.eos_id)
