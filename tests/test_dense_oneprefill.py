"""Every dense task from one prefill (runtime.multitask): the maps equal the separate task calls,
on the torch backend (prefix cache kept, ``extend``) and on the ONNX Runtime engine backend
(whole cut prompt), and dataset presets, whose prompt precedes the image, get their own prefill."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from densert.runtime.multitask import image_first_ids
from densert.runtime.options import DenseOptions
from densert.runtime.predictor import DensePredictor
from densert.tasks import prompts
from densert.text.chat import encode_chat, user_message

ROOT = Path(__file__).resolve().parents[1]
CLASSES = ["floor", "wall", "chair"]


def _frames():
    rng = np.random.default_rng(3)
    noise = rng.integers(0, 256, (70, 130, 3), dtype=np.uint8)
    return [ROOT / "samples" / "scene_0.png", ROOT / "samples" / "scene_4.png", noise]


# dense() scores every given class from the shared prefill: segment()'s one-prefill flow (the
# release's default flow generates the names present first, a prefill of its own).
FAST = DenseOptions(fast=True)


@pytest.fixture(scope="module")
def pred():
    return DensePredictor(options=FAST, dtype="float32")  # bundled densert-tiny, torch fp32 (vs the fp32 engine)


def _assert_equal_to_separate(p, image, preset, classes=CLASSES):
    r = p.dense(image, depth=True, classes=classes, preset=preset)
    d = p.depth(image, preset=preset)
    s = p.segment(image, classes=classes)
    np.testing.assert_array_equal(r.depth.depth, d.depth)
    np.testing.assert_array_equal(r.depth.bins, d.bins)
    np.testing.assert_array_equal(r.segmentation.labels, s.labels)
    assert r.segmentation.class_names == s.class_names
    return r


def test_image_first_prompts_share_the_cut_prefix(pred):
    """The cut prompt is the head of every image-first task prompt, token for token."""
    prefix, rest = image_first_ids(pred.vocab, 12, pred.chat_template)
    cut = torch.cat([prefix, rest], 1)[0]
    for p in (prompts.depth("open-world"), prompts.semantic(CLASSES), prompts.open_set()):
        ids = encode_chat(pred.vocab, [user_message(p.text, p.image_first)], [12],
                          template=pred.chat_template)[0]
        assert torch.equal(ids[: len(cut)], cut), p.text
    dataset = prompts.depth("nyuv2")
    ids = encode_chat(pred.vocab, [user_message(dataset.text, dataset.image_first)], [12],
                      template=pred.chat_template)[0]
    assert not torch.equal(ids[: len(cut)], cut)  # the prompt sits before the image


def test_one_prefill_equals_two_task_calls(pred):
    for image in _frames():
        r = _assert_equal_to_separate(pred, image, "open-world")
        assert r.prefills == 1 and r.note is None
        assert set(r.timings) >= {"vision", "prefill", "depth_head", "segment_head"}
    assert pred._shared_prefill.reuses_prefix  # the torch backend continues from the kept prefix


def test_prefix_cache_is_computed_once_and_not_modified(pred):
    pred.dense(_frames()[0], classes=CLASSES, preset="open-world")
    cache = pred._shared_prefill._prefix_cache
    before = [t.clone() for t in cache]
    pred.dense(_frames()[1], classes=["floor"], preset="open-world")
    assert pred._shared_prefill._prefix_cache is cache
    assert all(torch.equal(a, b) for a, b in zip(before, cache))


@pytest.mark.slow
def test_one_prefill_with_k_minus_1_alignment():
    """k-1 reads the hidden state at <|vision_start|>: the first token after the kept prefix."""
    p = DensePredictor(options=DenseOptions(alignment="k-1", fast=True))
    for image in _frames()[:2]:
        _assert_equal_to_separate(p, image, "open-world")


def test_dataset_preset_runs_its_own_prefill(pred):
    r = _assert_equal_to_separate(pred, _frames()[0], "cityscapes")
    assert r.prefills == 2 and "precedes the image" in r.note and "prefill_depth" in r.timings
    only = pred.dense(_frames()[0], depth=True, classes=None, preset="cityscapes")
    assert only.prefills == 1 and only.segmentation is None
    np.testing.assert_array_equal(only.depth.depth, r.depth.depth)


def test_dense_requests_are_checked(pred):
    with pytest.raises(ValueError, match="needs depth=True or at least one class"):
        pred.dense(_frames()[0], depth=False)
    with pytest.raises(ValueError, match="comma"):
        pred.dense(_frames()[0], classes=["a,b"])


def test_one_prefill_on_the_onnxruntime_engine(pred):
    """The engine backend has no ``extend`` (not implemented for engines): the cut prompt
    is prefilled whole, and the maps still equal its own separate calls."""
    ort = DensePredictor(backend="onnxruntime", options=FAST)  # exports the bundled model into the test cache
    assert not ort._shared_prefill.reuses_prefix
    for image in _frames():
        r = _assert_equal_to_separate(ort, image, "open-world")
        assert r.prefills == 1
        t = pred.dense(image, classes=CLASSES, preset="open-world")
        np.testing.assert_allclose(r.depth.depth, t.depth.depth, atol=1e-3)  # engine vs torch
