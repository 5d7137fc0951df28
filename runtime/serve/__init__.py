"""Serving on Triton Inference Server: ``densert serve`` (needs ``densert[serve]``).

densert does not run a server of its own. It writes a Triton model repository whose models
(``depth``, ``segment``, ``dense``) are Python-backend models around one ``DensePredictor`` per
model instance, and runs the ``tritonserver`` binary that the ``nvidia-pytriton`` wheel bundles on
it; a datacenter deployment points its own ``tritonserver`` at the same repository
(``--write-repo``). Triton brings the rest: dynamic batching, model instances, HTTP and gRPC,
Prometheus metrics.

- ``contract``: what each model takes and returns (one place; the model, the tests, the client and
  the docs read it).
- ``triton_model``: the Python-backend model (``TritonPythonModel``) every repository model runs.
- ``repo``: writes the repository (``config.pbtxt`` + a two-line ``model.py`` per model).
- ``bundled``: the bundled ``tritonserver``: its backend directory, environment and process.
- ``cli``: ``densert serve``.

Why not PyTriton's in-process callables: the Python-backend stub that nvidia-pytriton 0.7.0
bundles (Triton 2.51) reads numpy arrays through the numpy 1.x C ABI (pybind11), and densert runs
on numpy 2 (``numpy==2.4.6``; OpenCV needs numpy >= 2), under which every tensor PyTriton's proxy
hands over arrives as zeros. The repository's model moves numeric tensors by DLPack, reads the
options from the request parameters and returns text as UTF-8 bytes, none of which touch that
ABI, so it runs on the bundled server and on current Triton releases alike.
"""
