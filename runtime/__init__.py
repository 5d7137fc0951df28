"""The runtime: images in, dense maps out (task flows, dense decoding, outputs, backends by name)."""
# This folder is the source of densert.runtime (densert/runtime is a symlink to it). From the repo root
# it is also reachable as a bare `runtime`: then it is an inert stub, so no module is loaded twice
# under two names and library probes (transformers looks for a `kernels` package) see nothing.
if __name__ != "densert.runtime":
    __path__, __file__ = [], None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("import densert.runtime, not runtime: this folder is the source of densert.runtime")
