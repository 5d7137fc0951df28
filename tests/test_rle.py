"""The released ``(value,count)`` text: round trips and the official demo's strings."""
from __future__ import annotations

import re

import numpy as np
import pytest

from densert.errors import RLEError
from densert.tasks import rle


def test_segmentation_round_trip():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 3, (7, 11)).astype(np.uint16)
    labels[2:5] = 1
    text = rle.encode_segmentation(labels, ["road", "sky", "traffic light"])
    assert text.startswith("<ref>road</ref><ref>sky</ref><ref>traffic light</ref><mask>(")
    names, back = rle.decode_segmentation(text, labels.shape)
    assert names == ["road", "sky", "traffic light"] and np.array_equal(back, labels)


def test_runs_are_row_major_and_merge_across_rows():
    assert rle.encode_runs(np.array([[0, 0, 1], [1, 1, 2]])) == "(0,2),(1,3),(2,1)"
    assert rle.encode_runs(np.zeros((0,))) == ""


def test_reads_demo_strings():
    # Spacing as the demo's regex tolerates it; FG listed first (the demo then flips 0/1).
    text = ("The results are 0 for <ref><FG></ref> and 1 for <ref><BG></ref>. "
            "<mask>(1, 3),( 0,2 ),(1,1)</mask>")
    names, labels = rle.decode_segmentation(text, (2, 3))
    assert names == ["<FG>", "<BG>"]
    assert labels.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert rle.foreground_mask(text, (2, 3)).tolist() == [[False, False, False], [True, True, False]]


def test_depth_form_and_demo_expansion():
    codes = np.array([[10, 20], [30, 40]], np.uint16)
    text = rle.encode_depth(codes)
    assert text == "This is the <depth>.<mask>(10,1),(20,1),(30,1),(40,1)</mask>"
    assert np.array_equal(rle.decode_depth(text, (32, 47)), codes)  # grid = (32//16, 47//16)
    full = rle.expand_depth_codes(codes, (4, 4))
    # cv2 INTER_LINEAR on a 2x2 -> 4x4 upsample: half-pixel centres, then np.rint
    assert full.tolist() == [[10, 12, 18, 20], [15, 18, 22, 25], [25, 28, 32, 35], [30, 32, 38, 40]]


@pytest.mark.parametrize("grid,image_hw", [((30, 40), (480, 640)), ((4, 5), (70, 90)),
                                           ((7, 9), (117, 150)), ((1, 1), (20, 16))])
def test_depth_expansion_is_opencv_inter_linear(grid, image_hw):
    """The demo's expansion spelled out (decode the RLE, reshape to H//16 x W//16, cv2.resize
    INTER_LINEAR on the uint16 codes, rint) equals ``expand_depth_codes``; float code maps resize
    as cv2 does on float32."""
    import cv2
    codes = np.random.default_rng(sum(grid)).integers(1, 1001, grid).astype(np.uint16)
    H, W = image_hw
    text = rle.encode_depth(codes)
    pairs = re.findall(r"\(\s*(\d+)\s*,\s*(\d+)\s*\)", text)
    pred = np.repeat(np.array([int(v) for v, _ in pairs], np.uint16), [int(n) for _, n in pairs])
    pred = cv2.resize(pred.reshape(H // 16 or 1, W // 16 or 1), (W, H), interpolation=cv2.INTER_LINEAR)
    want = np.rint(pred).astype(np.uint16)
    got = rle.expand_depth_codes(rle.decode_depth(text, image_hw), image_hw)
    assert got.dtype == np.uint16 and np.array_equal(got, want)
    f = codes.astype(np.float32) + 0.25
    assert np.array_equal(rle.resize_codes(f, image_hw),
                          cv2.resize(f, (W, H), interpolation=cv2.INTER_LINEAR))


def test_bad_strings_fail_clearly():
    with pytest.raises(RLEError, match="expands to 5 values, expected 6"):
        rle.decode_runs("(0,5)", (2, 3))
    with pytest.raises(RLEError, match="no <mask>"):
        rle.decode_segmentation("<ref>a</ref>", (1, 1))
    with pytest.raises(RLEError, match="no <depth>"):
        rle.decode_depth("<mask>(1,1)</mask>", (16, 16))
    with pytest.raises(RLEError, match="no \\(value,count\\) pairs"):
        rle.decode_runs("1,2,3")
