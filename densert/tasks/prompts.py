"""Task prompts, one builder per task, as ``(text, image_first)``.

``image_first`` says where the image goes in the user turn. The dataset depth presets put the
prompt BEFORE the image (paper appendix D.3: "the prompt must precede the image so that the
model can learn the potential quantization methods"); the vision tokens then see which
quantisation is being asked for. The open-world depth prompt "Estimate the depth." goes AFTER
the image, as in the official demo (the paper says open-world depth accepts either order).
Every other task follows the demo: image first, then text.
"""
from __future__ import annotations

from dataclasses import dataclass

from densert.text import tokens as T

from .depth_bins import OPEN_WORLD, get_preset

OPEN_SET_PROMPT = "Segment all objects in this image."
CORE_TARGET_PROMPT = "Segment the core target."
# The answer classes of "Segment the core target." in the order the demo writes them, FG first.
CORE_TARGET_CLASSES = (T.FG, T.BG)


@dataclass(frozen=True)
class Prompt:
    text: str
    image_first: bool = True


def depth(preset: str = OPEN_WORLD) -> Prompt:
    p = get_preset(preset)
    if p.dataset is None:
        return Prompt("Estimate the depth.", image_first=True)
    return Prompt(f"Please estimate the depth of this image from the {p.dataset} dataset.",
                  image_first=False)


def semantic(classes: list[str], background: bool = False) -> Prompt:
    """Closed-set prompt. Without ``background`` the prompt says "without the background class"
    (paper D.1); with it the phrase is omitted and the ``<OTHERS>`` rule applies."""
    names = [_check_name(c) for c in classes]
    if not names:
        raise ValueError("semantic segmentation needs at least one class name")
    tail = "." if background else ", without the background class."
    return Prompt("Segment: " + ", ".join(names) + tail)


def open_set() -> Prompt:
    return Prompt(OPEN_SET_PROMPT)


def detect_categories(classes: list[str]) -> Prompt:
    """The demo's second open-set stage: detect the named categories (boxes); the demo joins
    the names with "," and no space."""
    names = [_check_name(c) for c in classes]
    if not names:
        raise ValueError("category detection needs at least one class name")
    return Prompt("Detect every objects that belongs to the following categories: "
                  + ",".join(names))


def referring(expression: str) -> Prompt:
    expr = expression.strip()
    if not expr:
        raise ValueError("referring segmentation needs a non-empty expression")
    return Prompt(f'Can you segment "{expr}" in this image?')


def core_target() -> Prompt:
    return Prompt(CORE_TARGET_PROMPT)


def chat(text: str) -> Prompt:
    return Prompt(text)


def _check_name(name: str) -> str:
    n = name.strip()
    if not n:
        raise ValueError(f"empty class name in {name!r}")
    if "," in n:
        raise ValueError(f"class name {n!r} contains a comma, which separates names in the prompt")
    return n
