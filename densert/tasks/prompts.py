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

from densert.errors import OptionError
from densert.text import tokens

from .depth_bins import OPEN_WORLD, get_preset

OPEN_SET_PROMPT = "Segment all objects in this image."
CORE_TARGET_PROMPT = "Segment the core target."
# The answer classes of "Segment the core target." in the order the demo writes them, FG first.
CORE_TARGET_CLASSES = (tokens.FG, tokens.BG)


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
    names = [check_name(c) for c in classes]
    if not names:
        raise OptionError("classes: semantic segmentation needs at least one class name")
    tail = "." if background else ", without the background class."
    return Prompt("Segment: " + ", ".join(names) + tail)


def open_set() -> Prompt:
    return Prompt(OPEN_SET_PROMPT)


def detect_categories(classes: list[str]) -> Prompt:
    """The demo's second open-set stage: detect the named categories (boxes); the demo joins
    the names with "," and no space."""
    names = [check_name(c) for c in classes]
    if not names:
        raise OptionError("classes: category detection needs at least one class name")
    return Prompt("Detect every objects that belongs to the following categories: "
                  + ",".join(names))


DETECT_ALL_PROMPT = "Detect all objects in the provided image."
# MPII Human Pose joints in the order the release's pose prompt asks for them.
MPII_JOINTS = ("right_ankle", "right_knee", "right_hip", "left_hip", "left_knee", "left_ankle",
               "pelvis", "thorax", "upper_neck", "head_top", "right_wrist", "right_elbow",
               "right_shoulder", "left_shoulder", "left_elbow", "left_wrist")


def detect_all() -> Prompt:
    """The demo's object detection: every object, labelled boxes."""
    return Prompt(DETECT_ALL_PROMPT)


def grounding(expression: str) -> Prompt:
    """The demo's grounding: one box for an expression (also the paper's recommended first stage
    of referring segmentation)."""
    return Prompt("Please provide the bounding box coordinate of the region this sentence "
                  "describes: " + _check_expression(expression))


def pose() -> Prompt:
    """The demo's pose estimation: persons with a box and the 16 MPII keypoints each."""
    joints = ", ".join(f"({i}) {n}" for i, n in enumerate(MPII_JOINTS))
    return Prompt(
        "Detect all persons and their poses from the image within the class set of MPII Human "
        "Pose Dataset. The output format should be a JSON-like string, containing person "
        "instances. Each person instance is enclosed in <person>...</person> tags. Within each "
        "person instance, provide the bounding box using <box>...</box> tags and their 16 "
        "keypoints using <kpt>...</kpt> tags. The bounding box is defined by "
        "<x_x1><y_y1><x_x2><y_y2> tags, and each keypoint is defined by <x_...><y_...><v_...> "
        "tags, where x, y are coordinates and v is visibility. The joints must be in this "
        f"specific order: {joints}. Please output all detected persons with their bounding boxes "
        "and keypoints.")


def referring(expression: str) -> Prompt:
    return Prompt(f'Can you segment "{_check_expression(expression)}" in this image?')


def core_target() -> Prompt:
    return Prompt(CORE_TARGET_PROMPT)


def chat(text: str) -> Prompt:
    if not isinstance(text, str):
        raise OptionError(f"prompt must be a string, got {type(text).__name__}")
    return Prompt(text)


def check_name(name: str, arg: str = "classes") -> str:
    if not isinstance(name, str):
        raise OptionError(f"{arg}: a class name must be a string, got {name!r} "
                          f"({type(name).__name__})")
    n = name.strip()
    if not n:
        raise OptionError(f"{arg}: empty class name in {name!r}")
    if "," in n:
        raise OptionError(f"{arg}: class name {n!r} contains a comma, which separates names in "
                          "the prompt")
    return n


def _check_expression(expression: str) -> str:
    if not isinstance(expression, str):
        raise OptionError(f"expression must be a string, got {type(expression).__name__}")
    expr = expression.strip()
    if not expr:
        raise OptionError("expression is empty; say what to find, e.g. \"the red cup\"")
    return expr
