"""The public ``DensePredictor`` API under hostile arguments: every method raises a
``DensertError`` subclass only (the contract of ``densert/errors.py``), with a message naming the
argument, dtype or range; arrays are read by one documented rule, never by guessing."""
from __future__ import annotations

import numpy as np
import pytest

from densert.errors import DensertError, ImageError
from densert.image.decode import load_rgb
from densert.runtime.options import DenseOptions
from densert.runtime.predictor import DensePredictor

GOOD = np.zeros((32, 48, 3), np.uint8)


@pytest.fixture(scope="module")
def pred():
    return DensePredictor(None, DenseOptions(crf=False), max_new_tokens=4)


def _arr(dtype, fill=0, shape=(32, 48, 3)):
    return np.full(shape, fill, dtype=dtype)


def _nan_float():
    a = np.full((32, 48, 3), 0.5, np.float32)
    a[3, 4, 0] = np.nan
    return a


# (what, array, words the message must hold)
BAD_ARRAYS = [
    ("float with one NaN", _nan_float(), "float32 array holds 1 NaN or infinite value"),
    ("float with inf", _arr(np.float64, np.inf), "float64 array holds 4608 NaN or infinite"),
    ("float above 1", np.linspace(0, 1.2, 32 * 48 * 3, dtype=np.float32).reshape(32, 48, 3),
     "float32 array spans [0, 1.2]; float images are read as [0, 1]"),
    ("negative float", _arr(np.float32, -0.1), "spans [-0.1, -0.1]"),
    ("0..255 float", _arr(np.float32, 200.0), "divide by 255"),
    ("bool", _arr(bool, True), "a bool array is not an image"),
    ("complex", _arr(np.complex64, 1), "a complex64 array is not an image"),
    ("object", np.empty((32, 48, 3), object), "a object array is not an image"),
    ("int8 negative", _arr(np.int8, -3), "int8 array spans [-3, -3]"),
    ("int64 over 255", _arr(np.int64, 300), "int64 array spans [300, 300]"),
    ("two channels", _arr(np.uint8, 0, (32, 48, 2)), "got shape (32, 48, 2)"),
    ("channels first", _arr(np.uint8, 0, (3, 32, 48)), "got shape (3, 32, 48)"),
    ("empty", _arr(np.uint8, 0, (0, 48, 3)), "got shape (0, 48, 3)"),
    ("1-D", _arr(np.uint8, 0, (10,)), "got shape (10,)"),
]


@pytest.mark.parametrize("what, a, words", BAD_ARRAYS, ids=[b[0] for b in BAD_ARRAYS])
def test_arrays_outside_the_rule_are_refused(what, a, words):
    with pytest.raises(ImageError) as e:
        load_rgb(a)
    assert words in str(e.value)


def test_arrays_inside_the_rule_are_read_exactly():
    f = np.linspace(0, 1, 32 * 48 * 3, dtype=np.float32).reshape(32, 48, 3)
    np.testing.assert_array_equal(load_rgb(f), np.rint(f.astype(np.float64) * 255).astype(np.uint8))
    assert load_rgb(_arr(np.uint16, 65535)).max() == 255
    assert load_rgb(_arr(np.int64, 200))[0, 0].tolist() == [200, 200, 200]
    assert load_rgb(_arr(np.uint8, 7, (32, 48, 4))).shape == (32, 48, 3)
    assert load_rgb(_arr(np.uint8, 7, (32, 48))).shape == (32, 48, 3)


def test_a_nan_pixel_no_longer_changes_the_depth_map(pred):
    """It used to rescale the whole image (range guessed from max()); now it is refused."""
    with pytest.raises(ImageError, match="NaN"):
        pred.depth(_nan_float())


NOT_AN_IMAGE = [None, [[0, 1], [2, 3]], 3.5, {"a": 1}]

# (method, args, kwargs, words in the message). Arguments are checked before any model work.
CALLS = [
    *[("depth", (x,), {}, "image: expected a file path") for x in NOT_AN_IMAGE],
    ("depth", (GOOD,), {"preset": "moon"}, "preset: unknown depth preset 'moon'"),
    ("depth", (GOOD,), {"preset": ["nyuv2"]}, "preset: unknown depth preset"),
    ("depth", (GOOD,), {"focal": -1.0}, "focal: the focal length must be a positive number"),
    ("depth", (GOOD,), {"focal": float("nan")}, "focal"),
    ("depth", (GOOD,), {"focal": "500"}, "focal"),
    ("depth", (GOOD,), {"focal": 500.0, "preset": "nyuv2"}, "applies to the open-world preset"),
    ("depth", (GOOD,), {"focal": 1e12, "preset": "open-world"}, "focal length 1e+12 px rescales"),
    ("depth", (_arr(bool),), {}, "bool array"),
    ("segment", (GOOD,), {"classes": "floor"}, "classes must be a list of class names, got the string 'floor'"),
    ("segment", (GOOD,), {"classes": ["floor", 3]}, "classes: a class name must be a string, got 3"),
    ("segment", (GOOD,), {"classes": ["floor", "floor"]}, "'floor' given more than once"),
    ("segment", (GOOD,), {"classes": ["a,b"]}, "contains a comma"),
    ("segment", (GOOD,), {"classes": []}, "classes: semantic segmentation needs at least one"),
    ("segment", (GOOD,), {"classes": 5}, "classes must be a list of class names, got int"),
    ("segment", (GOOD,), {"classes": ["floor"], "background": "yes"}, "background must be True or False"),
    ("segment", (object(),), {}, "image: expected a file path"),
    ("dense", (GOOD,), {"classes": "floor"}, "got the string 'floor'"),
    ("dense", (GOOD,), {"depth": False}, "dense() needs depth=True or at least one class name"),
    ("dense", (GOOD,), {"depth": "no"}, "depth must be True or False"),
    ("dense", (GOOD,), {"classes": ["a"], "background": None}, "background must be True or False"),
    ("dense", (GOOD,), {"preset": "moon"}, "unknown depth preset"),
    ("refer", (GOOD, 42), {}, "expression must be a string, got int"),
    ("refer", (GOOD, "  "), {}, "expression is empty"),
    ("refer", (GOOD, None), {}, "expression must be a string"),
    ("ground", (GOOD, ["cup"]), {}, "expression must be a string, got list"),
    ("detect", (GOOD,), {"classes": "cat"}, "got the string 'cat'"),
    ("detect", (GOOD,), {"classes": [None]}, "a class name must be a string, got None"),
    ("pose", ([1, 2, 3],), {}, "wrap a nested list with np.asarray"),
    ("chat", (None, "hi"), {"max_new_tokens": -1}, "max_new_tokens must be an integer >= 1, got -1"),
    ("chat", (None, "hi"), {"max_new_tokens": 2.5}, "max_new_tokens must be an integer >= 1"),
    ("chat", (None, None), {}, "prompt must be a string, got NoneType"),
    ("chat", (_arr(np.complex128), "hi"), {}, "complex128 array"),
    ("prepare", (object(),), {}, "image: expected a file path"),
    ("prepare", (GOOD,), {"focal": -2}, "focal: the focal length must be a positive number"),
    ("prepare", (GOOD,), {"focal": 500.0, "preset": "nyuv2"}, "--focal applies to the open-world"),
    ("prepare", (GOOD,), {"preset": "moon"}, "unknown depth preset"),
    ("prepare", (GOOD,), {"timings": {}}, "timings must be a densert.runtime.speed.Timings"),
    ("stream", (None,), {}, "frames: expected a source"),
    ("stream", (10**20,), {}, "camera index 100000000000000000000 is out of range"),
    ("stream", (True,), {}, "frames: expected a source"),
    ("stream", (3.5,), {}, "frames: expected a source or an iterable of frames, got float"),
    ("stream", ([GOOD],), {"task": "fly"}, "task 'fly': expected one of"),
    ("stream", ([GOOD],), {"task": "segment", "classes": "floor"}, "got the string 'floor'"),
    ("stream", ([GOOD],), {"colour": 1}, "unknown task option(s) colour"),
    ("stream", ([GOOD],), {"task": "segment", "focal": 500.0}, "a segment stream takes classes"),
    ("stream", ([GOOD],), {"drop": "yes"}, "drop must be True or False or None"),
    ("stream", ([GOOD],), {"focal": -2}, "focal: the focal length must be a positive number"),
    ("stream", ([GOOD],), {"task": "dense", "depth": False}, "a dense stream needs depth or classes"),
    ("stream", ({},), {}, "frames: an empty dict of cameras"),
    ("stream", ({"front": [GOOD], "2nd": [GOOD]},), {}, "camera name '2nd': use a letter"),
    ("stream", ({"front": [GOOD], "rear": None},), {}, "frames['rear']: expected a source"),
    ("batch", (GOOD,), {}, "images must be a list of images, got ndarray"),
    ("batch", ([GOOD, _arr(np.int64, 300)],), {}, "int64 array spans [300, 300]"),
    ("batch", ([GOOD],), {"task": "chat"}, "task 'chat': expected one of"),
    ("batch", ([GOOD],), {"task": "segment", "classes": "floor"}, "got the string 'floor'"),
]


@pytest.mark.parametrize("method, args, kwargs, words", CALLS,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(CALLS)])
def test_every_public_method_raises_densert_errors_naming_the_argument(pred, method, args, kwargs,
                                                                        words):
    with pytest.raises(Exception) as e:
        r = getattr(pred, method)(*args, **kwargs)
        if method == "stream":
            next(iter(r))
    assert isinstance(e.value, DensertError), f"{type(e.value).__name__}: {e.value}"
    assert words in str(e.value)


def test_every_public_method_is_walked():
    public = {n for n in dir(DensePredictor) if not n.startswith("_")
              and callable(getattr(DensePredictor, n)) and n != "from_backend"}
    assert public == {c[0] for c in CALLS}


@pytest.mark.parametrize("args, kwargs, words", [
    ((123,), {}, "model_dir must be a checkpoint directory path or None, got int"),
    ((None, {"crf": False}), {}, "options must be a DenseOptions"),
    ((None,), {"colour": 1}, "unknown setting(s) colour"),
    ((None,), {"max_new_tokens": -1}, "max_new_tokens must be an integer >= 1"),
    ((None,), {"backend": "tpu"}, "backend 'tpu' is not one of"),
    ((None,), {"max_patches": 10**0}, "max_patches must be an integer >= 4"),
])
def test_the_constructor_raises_densert_errors(args, kwargs, words):
    with pytest.raises(DensertError) as e:
        DensePredictor(*args, **kwargs)
    assert words in str(e.value)
