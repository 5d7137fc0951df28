"""Every dense task of a frame from one prefill.

The decoder is causal: the hidden state at an image pad depends only on the tokens before it. In
an image-first prompt (``<system turn><|begin_of_text|>user\\n<|vision_start|>`` + pads, then the
task's text) nothing the task text says reaches the vision tokens, so the open-world depth map
and the closed-set segmentation of any class list read the same hidden states. ``SharedPrefill``
therefore

- stops the prompt at the last image pad (no text is generated, so nothing after it is needed);
- computes the constant prefix (system turn up to, not including, ``<|vision_start|>``) once per
  backend and continues from its KV cache for every frame, where the backend declares the
  optional ``extend`` stage (``supports_extend``: the torch backend). The ONNX Runtime / TensorRT
  backends have no ``extend`` yet (their one LLM graph takes a past cache, but TensorRT's profiles
  are prefill-from-empty and one-token decode): there the cut prompt is prefilled whole, still
  once for all tasks.

Where the prompt precedes the image (the dataset depth presets: nyuv2, cityscapes, ddad; paper
D.3), the vision tokens see the prompt, so depth needs its own prefill; the image is still
encoded once. ``DenseResult.note`` says so.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from densert.backend import PrefillResult
from densert.text import tokens
from densert.text.chat import BUILTIN_TEMPLATE, ChatTemplate, encode_chat, user_message


def image_first_ids(vocab: tokens.Vocab, n_image_tokens: int, template: ChatTemplate | str = BUILTIN_TEMPLATE
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(prefix [1, P], rest [1, R]): the rendered image-first user turn cut at its last image pad,
    split before ``<|vision_start|>``. Identical to the head of every image-first task prompt:
    the tokenizer splits the text at special tokens, so nothing after the last pad changes the
    ids before it (``tests/test_dense_oneprefill.py`` checks it over the task prompts)."""
    ids = encode_chat(vocab, [user_message("", image_first=True)], [n_image_tokens], template=template)[0]
    start = int((ids == vocab.token_id(tokens.VISION_START)).nonzero()[0])
    last_pad = int((ids == vocab.token_id(tokens.IMAGE_PAD)).nonzero()[-1])
    return ids[None, :start], ids[None, start:last_pad + 1]


class SharedPrefill:
    """The vision-token prefill shared by the dense tasks, with the prompt prefix's cache kept."""

    def __init__(self, backend, vocab: tokens.Vocab, template: ChatTemplate | str = BUILTIN_TEMPLATE):
        self.backend, self.vocab, self.template = backend, vocab, template
        self._ids: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}   # image tokens -> (prefix, rest)
        self._prefix_cache: tuple[torch.Tensor, ...] | None = None

    @property
    def reuses_prefix(self) -> bool:
        return self.backend.supports_extend

    def __call__(self, image_embeds: torch.Tensor, n_image_tokens: int) -> PrefillResult:
        prefix, rest = self._split(n_image_tokens)
        if not self.reuses_prefix:
            return self.backend.prefill(torch.cat([prefix, rest], dim=1), image_embeds)
        return self.backend.extend(self._prefix(prefix), rest, image_embeds)

    def batch(self, image_embeds: torch.Tensor, n_image_tokens: int, frames: int) -> list[PrefillResult]:
        """``frames`` images of one size (their rows one after another) in one
        ``Backend.prefill_batch``: each result equals this prefill of its own rows, with no cache."""
        prefix, rest = self._split(n_image_tokens)
        if not self.reuses_prefix:
            ids = torch.cat([prefix, rest], dim=1)
            return self.backend.prefill_batch(ids.expand(frames, -1), image_embeds)
        return self.backend.prefill_batch(rest.expand(frames, -1), image_embeds,
                                          past=self._prefix(prefix))

    def _split(self, n_image_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        # The prompt is rendered once per image size (a camera has one), not once per frame.
        if n_image_tokens not in self._ids:
            self._ids[n_image_tokens] = image_first_ids(self.vocab, n_image_tokens, self.template)
        return self._ids[n_image_tokens]

    def _prefix(self, prefix: torch.Tensor) -> tuple[torch.Tensor, ...]:
        if self._prefix_cache is None:  # the prefix stops before the image: one for every size
            pf = self.backend.prefill(prefix, None)
            self._prefix_cache = tuple(t.clone() for t in self.backend.cache_tensors(pf.cache))
        return self._prefix_cache


@dataclass
class DenseResult:
    """``DensePredictor.dense``: the depth map and / or segmentation of one frame."""

    depth: object | None            # DepthResult
    segmentation: object | None     # SegResult
    prefills: int                   # decoder prefills run for this frame (1 when shared)
    timings: dict = field(default_factory=dict)
    note: str | None = None         # why a task could not share the prefill

    @property
    def results(self) -> list:
        return [r for r in (self.depth, self.segmentation) if r is not None]

