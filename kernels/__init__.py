"""Dense head and NTP-M loss: torch paths, Triton kernels, the CUDA/C++ tail. Imports nothing
else of densert."""
import functools
import importlib.util

# This folder is the source of densert.kernels (densert/kernels is a symlink to it). From the repo root
# it is also reachable as a bare `kernels`: then it is an inert stub, so no module is loaded twice
# under two names and library probes (transformers looks for a `kernels` package) see nothing.
if __name__ != "densert.kernels":
    __path__, __file__ = [], None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("import densert.kernels, not kernels: this folder is the source of densert.kernels")


@functools.cache
def triton_available() -> bool:
    """Triton is optional (the ``train`` extra; torch's CUDA wheels bring it): without it CUDA
    tensors take the torch paths, which give the same results."""
    return importlib.util.find_spec("triton") is not None
