"""What the served models take and return: the one place for it (the Triton model, the repository
writer, the benchmark client, the tests and docs/serving.md follow this table).

Every model takes one image per request, as exactly one of

  ``image``    UINT8 [1, H, W, 3]   RGB pixels
  ``encoded``  UINT8 [1, N]         the bytes of an image file (PNG, JPEG, ... as ``densert depth``
                                    reads them)

and its task options as request parameters (KServe v2 ``parameters``: tritonclient's
``infer(..., parameters={...})``, the ``"parameters"`` object of an HTTP/JSON request):

  ``depth``    preset (string), focal (number, px)
  ``segment``  classes (string, comma-separated; none: the open set), background (bool)
  ``dense``    preset, focal, classes, background, depth (bool, default true)

Outputs (batch dimension 1 first):

  ``depth``        FP32 [1, H, W]    depth at the input's size, metres (relative without a focal
                                     length in the open world), 0 where invalid
  ``labels``       UINT16 [1, H, W]  index into ``class_names``
  ``class_names``  UINT8 [1, N]      UTF-8 JSON list of the label names
  ``sidecar``      UINT8 [1, N]      UTF-8 JSON: the sidecar ``densert depth|segment`` writes
                                     (``dense``: {"depth": ..., "segmentation": ..., ...})

Text travels as UTF-8 bytes in UINT8 tensors, not as BYTES tensors: the Python-backend stub of
the bundled Triton (2.51) converts BYTES through the numpy 1.x ABI, which numpy 2 breaks (see the
package docstring). ``dense`` leaves out what a request did not ask for: ``labels`` and
``class_names`` without classes, ``depth`` with ``depth: false``.

A bad request (no image or both, undecodable bytes, an unknown parameter, preset or class list, a
wrong type) gets an error response whose message names the problem; the dtype and rank of the
inputs are checked by Triton against ``config.pbtxt`` before the model sees them.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from densert.errors import OptionError

MODELS = ("depth", "segment", "dense")
IMAGE_INPUTS = ("image", "encoded")


@dataclass(frozen=True)
class TensorSpec:
    name: str
    triton_type: str        # config.pbtxt data_type
    dims: tuple[int, ...]   # without the batch dimension
    doc: str


INPUTS = (
    TensorSpec("image", "TYPE_UINT8", (-1, -1, 3), "RGB pixels, H x W x 3"),
    TensorSpec("encoded", "TYPE_UINT8", (-1,), "the bytes of an image file"),
)
_DEPTH = TensorSpec("depth", "TYPE_FP32", (-1, -1), "depth at the input's size (0 invalid)")
_LABELS = TensorSpec("labels", "TYPE_UINT16", (-1, -1), "index into class_names")
_NAMES = TensorSpec("class_names", "TYPE_UINT8", (-1,), "UTF-8 JSON list of the label names")
_SIDECAR = TensorSpec("sidecar", "TYPE_UINT8", (-1,), "UTF-8 JSON sidecar of the result")
OUTPUTS = {
    "depth": (_DEPTH, _SIDECAR),
    "segment": (_LABELS, _NAMES, _SIDECAR),
    "dense": (_DEPTH, _LABELS, _NAMES, _SIDECAR),
}
# request parameter -> (type check, what it must be)
_STR, _NUM, _BOOL = "a string", "a number", "true or false"
PARAMETERS = {
    "depth": {"preset": _STR, "focal": _NUM},
    "segment": {"classes": _STR, "background": _BOOL},
    "dense": {"preset": _STR, "focal": _NUM, "classes": _STR, "background": _BOOL,
              "depth": _BOOL},
}
# Parameters Triton's frontends or clients may add to a request on their own.
_TRITON_PARAMETERS = {"binary_data_output", "priority", "timeout", "sequence_id",
                      "sequence_start", "sequence_end", "headers"}


def _typed(model: str, name: str, value, want: str):
    ok = {_STR: isinstance(value, str),
          _NUM: isinstance(value, (int, float)) and not isinstance(value, bool),
          _BOOL: isinstance(value, bool)}[want]
    if not ok:
        raise OptionError(f"model {model!r}: parameter {name!r} must be {want}, got {value!r}")
    return value


def request_options(model: str, params: dict) -> dict:
    """The request parameters of ``model`` -> keyword arguments of its ``DensePredictor`` call;
    an unknown name or a wrong type is an ``OptionError`` naming it."""
    if model not in PARAMETERS:
        raise OptionError(f"unknown model {model!r}; the served models are {MODELS}")
    allowed = PARAMETERS[model]
    unknown = sorted(k for k in params if k not in allowed and k not in _TRITON_PARAMETERS)
    if unknown:
        raise OptionError(f"model {model!r}: unknown parameter(s) {', '.join(map(repr, unknown))}; "
                          f"it takes {', '.join(allowed)}")
    kw = {k: _typed(model, k, v, allowed[k]) for k, v in params.items() if k in allowed}
    if "classes" in kw:
        names = [c.strip() for c in kw["classes"].split(",") if c.strip()]
        if not names:
            raise OptionError(f"model {model!r}: parameter 'classes' {kw['classes']!r} names no "
                              "class (comma-separated names, e.g. \"floor,wall\")")
        kw["classes"] = names
    if model == "dense" and not kw.get("depth", True) and "classes" not in kw:
        raise OptionError("model 'dense': nothing to compute: 'depth' is false and no 'classes' "
                          "are given")
    return kw


def request_image(inputs: dict) -> np.ndarray | bytes:
    """The one image of a request from its ``image`` / ``encoded`` inputs (arrays with the batch
    dimension first): an HxWx3 uint8 array, or the encoded file's bytes."""
    given = [n for n in IMAGE_INPUTS if inputs.get(n) is not None]
    if len(given) != 1:
        raise OptionError(f"give exactly one of the inputs {' / '.join(IMAGE_INPUTS)} "
                          f"({'none' if not given else 'both'} given)")
    name = given[0]
    a = inputs[name]
    if a.shape[0] != 1:
        raise OptionError(f"input {name!r}: one image per request (batch dimension 1), got shape "
                          f"{list(a.shape)}; concurrent requests are batched by the server")
    if a.dtype != np.uint8:
        raise OptionError(f"input {name!r}: expected UINT8, got {a.dtype}")
    if name == "encoded":
        if a.shape[1] == 0:
            raise OptionError("input 'encoded': empty (0 bytes), not an image")
        return a[0].tobytes()
    if a.ndim != 4 or a.shape[3] != 3 or 0 in a.shape:
        raise OptionError(f"input 'image': expected shape [1, H, W, 3] with H, W > 0, got "
                          f"{list(a.shape)}")
    return np.ascontiguousarray(a[0])


def text(s: str) -> np.ndarray:
    """A string as the UINT8 [1, N] output tensor."""
    return np.frombuffer(s.encode("utf-8"), dtype=np.uint8)[None].copy()


def read_text(a: np.ndarray) -> str:
    """A UINT8 [1, N] output tensor back to its string (what a client does)."""
    return np.asarray(a, dtype=np.uint8).tobytes().decode("utf-8")


def _map(a: np.ndarray, dtype) -> np.ndarray:
    return np.ascontiguousarray(a, dtype=dtype)[None]


def infer(predictor, model: str, image, kw: dict) -> dict[str, np.ndarray]:
    """Run ``model`` on one image with the request's options (``request_options``) -> the output
    tensors by name."""
    if model == "depth":
        r = predictor.depth(image, **kw)
        return {"depth": _map(r.depth, np.float32), "sidecar": text(r.to_json())}
    if model == "segment":
        r = predictor.segment(image, **kw)
        return {"labels": _map(r.labels, np.uint16), "class_names": text(json.dumps(r.class_names)),
                "sidecar": text(r.to_json())}
    if model == "dense":
        r = predictor.dense(image, **kw)
        d, s = r.depth, r.segmentation
        doc = {"depth": None if d is None else json.loads(d.to_json()),
               "segmentation": None if s is None else json.loads(s.to_json()),
               "prefills": r.prefills, "note": r.note}
        out = {"sidecar": text(json.dumps(doc, indent=2))}
        if d is not None:
            out["depth"] = _map(d.depth, np.float32)
        if s is not None:
            out.update(labels=_map(s.labels, np.uint16), class_names=text(json.dumps(s.class_names)))
        return out
    raise OptionError(f"unknown model {model!r}; the served models are {MODELS}")
