"""The class list of the procedural scenes: the one place that fixes class ids and names.

Ids index ``CLASS_NAMES``. Names are plain real-world words because the model names the classes
it sees in text (``<ref>name</ref>``) and the dense head averages the logits of each name's
sub-word ids (method spec sec. 2); another module maps these names to tokenizer ids.
"""
from __future__ import annotations

# Order is part of the data format (label PNGs, targets): append new classes, never reorder.
CLASS_NAMES: tuple[str, ...] = (
    # indoor (0-13)
    "floor", "wall", "ceiling", "table", "chair", "sofa", "bed", "cabinet",
    "lamp", "box", "ball", "plant", "door", "painting",
    # outdoor (14-25)
    "sky", "road", "sidewalk", "grass", "tree", "car", "building", "person",
    "pole", "traffic sign", "rock", "bench",
)
NUM_CLASSES = len(CLASS_NAMES)
CLASS_IDS: dict[str, int] = {name: i for i, name in enumerate(CLASS_NAMES)}

# Label-map value for pixels without a class (never produced by the renderer, used by user data).
IGNORE_LABEL = 255

INDOOR_CLASSES: tuple[str, ...] = CLASS_NAMES[:14]
OUTDOOR_CLASSES: tuple[str, ...] = CLASS_NAMES[14:]

# Binary referring-segmentation classes; the token mapper turns them into <BG>/<FG>.
BG, FG = 0, 1


def class_id(name: str) -> int:
    """Id of a class name; raises KeyError listing the known names."""
    try:
        return CLASS_IDS[name]
    except KeyError:
        raise KeyError(f"unknown class {name!r}; known classes: {', '.join(CLASS_NAMES)}") from None
