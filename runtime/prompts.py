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

DEPTH_PRESETS = ("open-world", "nyuv2", "cityscapes", "ddad")
# Dataset names as the paper spells them inside the prompt.
_DEPTH_DATASET = {"nyuv2": "NYUv2", "cityscapes": "Cityscapes", "ddad": "DDAD"}

OPEN_SET_PROMPT = "Segment all objects in this image."
CORE_TARGET_PROMPT = "Segment the core target."


@dataclass(frozen=True)
class Prompt:
    text: str
    image_first: bool = True


def depth(preset: str = "open-world") -> Prompt:
    if preset == "open-world":
        return Prompt("Estimate the depth.", image_first=True)
    if preset not in _DEPTH_DATASET:
        raise ValueError(f"unknown depth preset {preset!r}; expected one of {DEPTH_PRESETS}")
    return Prompt(f"Please estimate the depth of this image from the {_DEPTH_DATASET[preset]} "
                  "dataset.", image_first=False)


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
