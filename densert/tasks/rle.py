"""The released model's dense-output text: ``(value,count)`` run-length strings, row-major.

Segmentation: ``<ref>NAME_0</ref><ref>NAME_1</ref>...<mask>(v,n),(v,n),...</mask>``, values
index the ``<ref>`` list; the expanded length is H*W of the image the map belongs to.
Depth: ``This is the <depth>.<mask>(v,n),...</mask>``, values are depth codes (0 invalid,
1..1000 bins) on the (H//16, W//16) grid of the image (spec sec. 9.1); the demo expands them to
H x W with OpenCV's bilinear resize of the uint16 codes (``expand_depth_codes``).
Parsing follows the official demo's regexes, so its strings read back unchanged.
"""
from __future__ import annotations

import re

import numpy as np

from densert.errors import RLEError
from densert.text import tokens

_PAIR = re.compile(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)")
_MASK = re.compile(r"<mask>\s*(.*?)\s*</mask>", re.DOTALL)
_REF = re.compile(r"<ref>(.*?)</ref>", re.DOTALL)


def encode_runs(values: np.ndarray) -> str:
    """Row-major runs of a 2-D (or 1-D) integer map as ``(v,n),(v,n),...``."""
    flat = np.asarray(values).reshape(-1)
    if flat.size == 0:
        return ""
    change = np.flatnonzero(flat[1:] != flat[:-1]) + 1
    starts = np.concatenate([[0], change])
    counts = np.diff(np.concatenate([starts, [flat.size]]))
    return ",".join(f"({int(v)},{int(n)})" for v, n in zip(flat[starts], counts))


def decode_runs(text: str, shape: tuple[int, ...] | None = None, dtype=np.int64) -> np.ndarray:
    """``(v,n),...`` -> values (reshaped to ``shape`` when given; its size must match)."""
    pairs = _PAIR.findall(text)
    if not pairs and text.strip():
        raise RLEError(f"no (value,count) pairs in {text[:60]!r}")
    values = np.fromiter((int(v) for v, _ in pairs), dtype=np.int64, count=len(pairs))
    counts = np.fromiter((int(n) for _, n in pairs), dtype=np.int64, count=len(pairs))
    out = np.repeat(values, counts).astype(dtype)
    if shape is not None:
        if out.size != int(np.prod(shape)):
            raise RLEError(f"run-length string expands to {out.size} values, expected "
                           f"{int(np.prod(shape))} for shape {tuple(shape)}")
        out = out.reshape(shape)
    return out


def ref_tags(class_names) -> str:
    """``<ref>a</ref><ref>b</ref>...``: the class list of a segmentation answer."""
    return "".join(f"{tokens.REF}{n}{tokens.REF_END}" for n in class_names)


def encode_segmentation(labels: np.ndarray, class_names: list[str]) -> str:
    return f"{ref_tags(class_names)}<mask>{encode_runs(labels)}</mask>"


def decode_segmentation(text: str, shape: tuple[int, int]) -> tuple[list[str], np.ndarray]:
    """-> (ref names in order, labels [H, W]). A leading ``<FG>`` is *not* flipped here (the
    values keep indexing the ref list); see ``foreground_mask``."""
    m = _MASK.search(text)
    if not m:
        raise RLEError("no <mask>...</mask> in the text")
    return _REF.findall(text[:m.start()]), decode_runs(m.group(1), shape)


def foreground_mask(text: str, shape: tuple[int, int]) -> np.ndarray:
    """Binary core-target answer -> bool mask, whichever order ``<FG>``/``<BG>`` were listed."""
    names, labels = decode_segmentation(text, shape)
    if "<FG>" not in names:
        raise RLEError(f"no <ref><FG></ref> in the answer (refs: {names})")
    return labels == names.index("<FG>")


def depth_grid_shape(image_hw: tuple[int, int]) -> tuple[int, int]:
    """The (H//16, W//16) grid the released depth RLE is written on (at least 1x1)."""
    return max(1, image_hw[0] // 16), max(1, image_hw[1] // 16)


def encode_depth(codes_grid: np.ndarray) -> str:
    return f"This is the <depth>.<mask>{encode_runs(codes_grid)}</mask>"


def decode_depth(text: str, image_hw: tuple[int, int]) -> np.ndarray:
    """Released depth text -> codes on the (H//16, W//16) grid, uint16."""
    if "<depth>" not in text:
        raise RLEError("not a depth answer: no <depth> token in the text")
    m = _MASK.search(text)
    if not m:
        raise RLEError("no <mask>...</mask> in the text")
    return decode_runs(m.group(1), depth_grid_shape(image_hw), np.uint16)


def resize_codes(codes: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """OpenCV ``INTER_LINEAR`` resize of a code map to ``size`` = (h, w), the demo's expansion:
    uint16 codes come back as uint16 (OpenCV rounds), anything else as float32."""
    import cv2  # here, not at import: the CLI's --help reads the task contract
    a = np.ascontiguousarray(codes)
    if a.dtype != np.uint16:
        a = a.astype(np.float32)
    h, w = (int(v) for v in size)
    return cv2.resize(a, (w, h), interpolation=cv2.INTER_LINEAR)


def expand_depth_codes(codes_grid: np.ndarray, image_hw: tuple[int, int]) -> np.ndarray:
    """The demo's expansion of the (H//16, W//16) codes to H x W: ``cv2.resize(INTER_LINEAR)`` of
    the uint16 codes."""
    return resize_codes(np.asarray(codes_grid).astype(np.uint16), image_hw)
