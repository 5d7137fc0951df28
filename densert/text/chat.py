"""The Youtu-VL chat template (spec ``youtu-vl-checkpoint.md`` sec. 6), in Python and as Jinja.

One turn with one image renders as::

    <|begin_of_text|>system\\nYou are a helpful assistant.<|end_of_text|>\\n
    <|begin_of_text|>user\\n<|vision_start|>{N x <|image_pad|>}<|vision_end|>{prompt}<|end_of_text|>\\n
    <|begin_of_text|>assistant\\n

(without the line breaks after ``\\n``). Every message is ``<|begin_of_text|>{role}\\n{content}
<|end_of_text|>\\n``; content segments keep their order, so an image may come before the prompt
(segmentation) or after it (the depth dataset presets, ``densemllm-method.md`` sec. 2). The
default system prompt is inserted when the first message is not a system message.

Messages use the HF shape: ``{"role": ..., "content": str | [{"type": "image"} |
{"type": "text", "text": ...}, ...]}``. The Jinja template (written into checkpoints) renders one
``<|image_pad|>`` per image, the way HF processors expect; ``expand_image_pads`` then repeats it
N times, exactly what ``render_chat`` does directly.
"""
from __future__ import annotations

from typing import Any, Sequence

import torch

from densert.errors import ChatError

from . import tokens as T

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant."
ROLES = ("system", "user", "assistant")

CHAT_TEMPLATE = (
    "{% if not messages or messages[0]['role'] != 'system' %}"
    "<|begin_of_text|>system\n" + DEFAULT_SYSTEM_PROMPT + "<|end_of_text|>\n"
    "{% endif %}"
    "{% for message in messages %}"
    "<|begin_of_text|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}"
    "<|end_of_text|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|begin_of_text|>assistant\n{% endif %}"
)


def _segments(message: dict[str, Any], index: int) -> list[tuple[str, str]]:
    """A message's content as [("text", s) | ("image", "")] in order."""
    if not isinstance(message, dict) or "role" not in message or "content" not in message:
        raise ChatError(f"message {index} must be a dict with 'role' and 'content', got {message!r}")
    if message["role"] not in ROLES:
        raise ChatError(f"message {index} has role {message['role']!r}; expected one of {ROLES}")
    content = message["content"]
    if isinstance(content, str):
        return [("text", content)]
    out = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "image":
            out.append(("image", ""))
        elif kind == "text" and isinstance(part.get("text"), str):
            out.append(("text", part["text"]))
        else:
            raise ChatError(f"message {index} segment {j}: expected {{'type': 'image'}} or "
                            f"{{'type': 'text', 'text': str}}, got {part!r}")
    return out


def _pieces(messages: Sequence[dict], image_tokens: Sequence[int],
            add_generation_prompt: bool) -> list[tuple[bool, str, int]]:
    """The rendered chat as (is_special, text, repeat) pieces; text pieces go through BPE."""
    msgs = list(messages)
    if not msgs or msgs[0].get("role") != "system":
        msgs.insert(0, {"role": "system", "content": DEFAULT_SYSTEM_PROMPT})
    n_images = sum(kind == "image" for i, m in enumerate(msgs) for kind, _ in _segments(m, i))
    if n_images != len(image_tokens):
        raise ChatError(f"messages hold {n_images} image(s) but image_tokens has "
                        f"{len(image_tokens)} entries ({list(image_tokens)})")
    bad = [n for n in image_tokens if not (isinstance(n, int) and n > 0)]
    if bad:
        raise ChatError(f"image_tokens must be positive ints, got {list(image_tokens)}")
    counts = iter(image_tokens)
    out: list[tuple[bool, str, int]] = []
    for i, m in enumerate(msgs):
        out += [(True, T.BOS, 1), (False, m["role"] + "\n", 1)]
        for kind, text in _segments(m, i):
            if kind == "image":
                out += [(True, T.VISION_START, 1), (True, T.IMAGE_PAD, next(counts)),
                        (True, T.VISION_END, 1)]
            elif text:
                out.append((False, text, 1))
        out += [(True, T.EOS, 1), (False, "\n", 1)]
    if add_generation_prompt:
        out += [(True, T.BOS, 1), (False, "assistant\n", 1)]
    return out


def render_chat(messages: Sequence[dict], image_tokens: Sequence[int] = (),
                add_generation_prompt: bool = True) -> str:
    """The prompt string; ``image_tokens[k]`` = image-pad count of the k-th image."""
    return "".join(text * n for _, text, n in _pieces(messages, image_tokens, add_generation_prompt))


def encode_chat(vocab: T.Vocab, messages: Sequence[dict], image_tokens: Sequence[int] = (),
                add_generation_prompt: bool = True) -> torch.Tensor:
    """LongTensor [1, T] of the rendered chat.

    Special tokens are emitted by id and only the text pieces go through BPE, so a long run of
    image pads costs nothing. Text that itself spells a control token (e.g. ``<|image_pad|>``)
    would still split into that token; such input is rejected rather than silently miscounted.
    """
    ids: list[int] = []
    control = {vocab.token_id(s) for s in T.CONTROL_TOKENS}
    for special, text, n in _pieces(messages, image_tokens, add_generation_prompt):
        if special:
            ids += [vocab.token_id(text)] * n
        else:
            piece = vocab.encode(text)
            if control.intersection(piece):
                raise ChatError(f"message text {text!r} contains a control token; remove it")
            ids += piece
    return torch.tensor([ids], dtype=torch.long)


def render_jinja(messages: Sequence[dict], add_generation_prompt: bool = True,
                 template: str = CHAT_TEMPLATE) -> str:
    """Render with jinja2 the way HF ``apply_chat_template`` does (one pad per image)."""
    import jinja2
    env = jinja2.Environment(trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True,
                             undefined=jinja2.StrictUndefined)
    return env.from_string(template).render(messages=list(messages),
                                            add_generation_prompt=add_generation_prompt)


def expand_image_pads(text: str, image_tokens: Sequence[int]) -> str:
    """Replace the k-th single ``<|image_pad|>`` by ``image_tokens[k]`` copies (what the
    processor does after the HF template)."""
    parts = text.split(T.IMAGE_PAD)
    if len(parts) - 1 != len(image_tokens):
        raise ChatError(f"text has {len(parts) - 1} image pads, image_tokens has {len(image_tokens)}")
    out = [parts[0]]
    for n, rest in zip(image_tokens, parts[1:]):
        out += [T.IMAGE_PAD * n, rest]
    return "".join(out)


def user_message(prompt: str, image_first: bool = True) -> dict:
    """One user message with one image before (segmentation) or after (depth presets) the prompt."""
    img = {"type": "image"}
    txt = {"type": "text", "text": prompt}
    return {"role": "user", "content": [img, txt] if image_first else [txt, img]}
