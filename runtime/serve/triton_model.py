"""The Python-backend model of every served task (``TritonPythonModel``, Triton's name for it).

Triton runs one stub process per model instance; each loads one ``DensePredictor`` in
``initialize`` (the server reports ready once all are loaded) and answers the requests of a batch
one by one in ``execute``: the predictor runs one image at a time, and a request that fails gets
its own error response while the rest of the batch is answered.

Settings come from the ``densert`` parameter of ``config.pbtxt`` (JSON, written by ``repo``):
``task``, ``model`` (checkpoint directory; null: the bundled densert-tiny or, for an engine
backend, the engine directory alone), ``settings`` (``PredictorOptions``), ``options``
(``DenseOptions``), ``threads`` (torch intra-op threads per instance; null: torch's default).

Tensors cross the stub by DLPack (``np.from_dlpack`` / ``Tensor.from_dlpack``) and never through
``as_numpy``: see ``contract`` for why.
"""
from __future__ import annotations

import json
import sys
import time
import traceback

import numpy as np

from densert.errors import DensertError

from .contract import IMAGE_INPUTS, infer, request_image, request_options

CONFIG_PARAMETER = "densert"


def settings_of(model_config: dict) -> dict:
    """The ``densert`` parameter of a model's config (the dict Triton passes as JSON)."""
    try:
        raw = model_config["parameters"][CONFIG_PARAMETER]["string_value"]
    except KeyError:
        raise DensertError(f"model {model_config.get('name')!r}: config.pbtxt has no "
                           f"'{CONFIG_PARAMETER}' parameter; write the repository with "
                           "`densert serve --write-repo DIR`") from None
    try:
        return json.loads(raw)
    except ValueError as e:
        raise DensertError(f"model {model_config.get('name')!r}: the '{CONFIG_PARAMETER}' "
                           f"parameter of config.pbtxt is not JSON ({e})") from None


def _quiet_dlpack_capsules() -> None:
    """The bundled stub takes an output tensor from numpy's DLPack capsule without marking the
    capsule used, so numpy's capsule destructor then reports "PyCapsule_GetPointer called with
    incorrect name" (unraisable, after the data was copied: the answers are right) for every
    output of every request; keep that one message out of the server log."""
    default = sys.unraisablehook

    def hook(u):
        if not (isinstance(u.exc_value, ValueError)
                and "PyCapsule_GetPointer called with incorrect name" in str(u.exc_value)):
            default(u)
    sys.unraisablehook = hook


def load_predictor(conf: dict):
    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    if conf.get("threads"):
        import torch
        torch.set_num_threads(int(conf["threads"]))
    return DensePredictor(conf.get("model"), DenseOptions(**conf.get("options", {})),
                          **conf.get("settings", {}))


class TritonPythonModel:
    def initialize(self, args):
        cfg = json.loads(args["model_config"])
        conf = settings_of(cfg)
        self.task = conf["task"]
        self.name = args.get("model_instance_name", cfg.get("name"))
        _quiet_dlpack_capsules()
        t0 = time.perf_counter()
        self.predictor = load_predictor(conf)
        print(f"densert: {self.name}: {self.task} on {self.predictor.backend_name}, model "
              f"{self.predictor.model_dir}, loaded in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)

    def execute(self, requests):
        import triton_python_backend_utils as pb_utils
        return [self._answer(pb_utils, r) for r in requests]

    def _answer(self, pb_utils, request):
        try:
            inputs = {}
            for name in IMAGE_INPUTS:
                t = pb_utils.get_input_tensor_by_name(request, name)
                inputs[name] = None if t is None else np.array(np.from_dlpack(t))
            kw = request_options(self.task, json.loads(request.parameters() or "{}"))
            outputs = infer(self.predictor, self.task, request_image(inputs), kw)
            return pb_utils.InferenceResponse(
                [pb_utils.Tensor.from_dlpack(k, v) for k, v in outputs.items()])
        except DensertError as e:
            msg = str(e)
        except Exception as e:   # the server keeps serving; the traceback goes to its log
            traceback.print_exc(file=sys.stderr)
            msg = f"{type(e).__name__}: {e}"
        return pb_utils.InferenceResponse(error=pb_utils.TritonError(f"densert {self.task}: {msg}"))

    def finalize(self):
        self.predictor = None
