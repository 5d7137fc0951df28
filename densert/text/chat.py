"""The chat template: the checkpoint's own (Jinja, rendered the way transformers renders it) or
the built-in Youtu-VL template (spec ``youtu-vl-checkpoint.md`` sec. 6) for checkpoints without one.

The built-in template renders one turn with one image as::

    <|begin_of_text|>system\\nYou are a helpful assistant.<|end_of_text|>\\n
    <|begin_of_text|>user\\n<|vision_start|>{N x <|image_pad|>}<|vision_end|>{prompt}<|end_of_text|>\\n
    <|begin_of_text|>assistant\\n

(without the line breaks after ``\\n``). Every message is ``<|begin_of_text|>{role}\\n{content}
<|end_of_text|>\\n``; content segments keep their order, so an image may come before the prompt
(segmentation) or after it (the depth dataset presets, ``densemllm-method.md`` sec. 2). The
default system prompt is inserted when the first message is not a system message.

Messages use the HF shape: ``{"role": ..., "content": str | [{"type": "image"} |
{"type": "text", "text": ...}, ...]}``. A template renders one ``<|image_pad|>`` per image, the way
HF processors expect; the processor then repeats it N times (``expand_image_pads``), and the ids
are the tokenizer's encoding of that text, as ``apply_chat_template(tokenize=True)`` gives them.
"""
from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Sequence

import torch

from densert.errors import ChatError

from . import tokens

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


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template, where it came from, and the special-token strings transformers
    passes to every template (``bos_token``, ``eos_token``, ...)."""

    template: str
    source: str = "built-in"
    special_tokens: dict = field(default_factory=lambda: {
        "bos_token": tokens.BOS, "eos_token": tokens.EOS, "pad_token": tokens.EOS})


BUILTIN_TEMPLATE = ChatTemplate(CHAT_TEMPLATE)


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


def _check_messages(messages: Sequence[dict], image_tokens: Sequence[int]) -> None:
    n_images = sum(kind == "image" for i, m in enumerate(messages) for kind, _ in _segments(m, i))
    if n_images != len(image_tokens):
        raise ChatError(f"messages hold {n_images} image(s) but image_tokens has "
                        f"{len(image_tokens)} entries ({list(image_tokens)})")
    bad = [n for n in image_tokens if not (isinstance(n, int) and n > 0)]
    if bad:
        raise ChatError(f"image_tokens must be positive ints, got {list(image_tokens)}")
    for i, m in enumerate(messages):
        for kind, text in _segments(m, i):
            hit = [c for c in tokens.CONTROL_TOKENS if c in text]
            if hit:
                raise ChatError(f"message {i} text contains the control token {hit[0]!r}; remove it")


@functools.lru_cache(maxsize=8)
def _compiled(template: str):
    """The template compiled in the environment transformers' ``apply_chat_template`` uses: a
    sandbox, ``trim_blocks`` and ``lstrip_blocks``, loop controls, ``{% generation %}`` blocks,
    ``raise_exception``, ``strftime_now`` and a ``tojson`` that does not escape HTML."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationBlock(jinja2.ext.Extension):
        """``{% generation %}...{% endgeneration %}`` marks assistant text for training masks;
        rendering keeps its body as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, \
        sort_keys=False: json.dumps(x, ensure_ascii=ensure_ascii, indent=indent,
                                    separators=separators, sort_keys=sort_keys)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise ChatError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def render_jinja(messages: Sequence[dict], add_generation_prompt: bool = True,
                 template: ChatTemplate | str = BUILTIN_TEMPLATE) -> str:
    """The chat as text, one ``<|image_pad|>`` per image, rendered the way transformers'
    ``apply_chat_template`` renders ``template`` (checked against it in the tests)."""
    import jinja2
    t = template if isinstance(template, ChatTemplate) else ChatTemplate(template)
    try:
        return _compiled(t.template).render(messages=list(messages), tools=None, documents=None,
                                            add_generation_prompt=add_generation_prompt,
                                            **t.special_tokens)
    except jinja2.TemplateError as e:
        raise ChatError(f"chat template ({t.source}) failed to render: {e}") from None


def render_chat(messages: Sequence[dict], image_tokens: Sequence[int] = (),
                add_generation_prompt: bool = True,
                template: ChatTemplate | str = BUILTIN_TEMPLATE) -> str:
    """The prompt string as the model reads it; ``image_tokens[k]`` = image-pad count of the k-th
    image."""
    _check_messages(messages, image_tokens)
    return expand_image_pads(render_jinja(messages, add_generation_prompt, template), image_tokens)


def encode_chat(vocab: tokens.Vocab, messages: Sequence[dict], image_tokens: Sequence[int] = (),
                add_generation_prompt: bool = True,
                template: ChatTemplate | str = BUILTIN_TEMPLATE) -> torch.Tensor:
    """LongTensor [1, T]: the tokenizer's encoding of ``render_chat``. The text is encoded with one
    pad per image, whose id is then repeated: the pad is a special token, so this equals
    encoding the expanded text, and a long run of image pads costs nothing. Message text that
    spells a control token (e.g. ``<|image_pad|>``) is rejected rather than silently miscounted."""
    _check_messages(messages, image_tokens)
    text = render_jinja(messages, add_generation_prompt, template)
    ids = vocab.encode(text)
    pad = vocab.image_pad_id
    if ids.count(pad) != len(image_tokens):
        src = template.source if isinstance(template, ChatTemplate) else "the given template"
        raise ChatError(f"chat template ({src}) rendered {ids.count(pad)} image pad(s) for "
                        f"{len(image_tokens)} image(s)")
    counts = iter(image_tokens)
    out: list[int] = []
    for i in ids:
        out += [i] * next(counts) if i == pad else [i]
    return torch.tensor([out], dtype=torch.long)


def expand_image_pads(text: str, image_tokens: Sequence[int]) -> str:
    """Replace the k-th single ``<|image_pad|>`` by ``image_tokens[k]`` copies (what the
    processor does after the HF template)."""
    parts = text.split(tokens.IMAGE_PAD)
    if len(parts) - 1 != len(image_tokens):
        raise ChatError(f"text has {len(parts) - 1} image pads, image_tokens has {len(image_tokens)}")
    out = [parts[0]]
    for n, rest in zip(image_tokens, parts[1:]):
        out += [tokens.IMAGE_PAD * n, rest]
    return "".join(out)


def user_message(prompt: str, image_first: bool = True) -> dict:
    """One user message with one image before (segmentation) or after (depth presets) the prompt."""
    img = {"type": "image"}
    txt = {"type": "text", "text": prompt}
    return {"role": "user", "content": [img, txt] if image_first else [txt, img]}
