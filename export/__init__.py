"""ONNX export, the engine manifest, ONNX Runtime and TensorRT backends, the parity gate."""
# This folder is the source of densert.export (densert/export is a symlink to it). From the repo root
# it is also reachable as a bare `export`: then it is an inert stub, so no module is loaded twice
# under two names and library probes (transformers looks for a `kernels` package) see nothing.
if __name__ != "densert.export":
    __path__, __file__ = [], None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("import densert.export, not export: this folder is the source of densert.export")
