"""Dense head and NTP-M loss: torch paths, Triton kernels, the CUDA/C++ tail. Imports nothing
else of densert."""
import functools
import importlib.util

# This folder is the source of densert.kernels (densert/kernels is a symlink to it); imported as a
# top-level `kernels` from the repo root it would be a second copy of every module.
if __name__ != "densert.kernels":
    raise ImportError(f"import densert.kernels, not {__name__}")


@functools.cache
def triton_available() -> bool:
    """Triton is optional (the ``train`` extra; torch's CUDA wheels bring it): without it CUDA
    tensors take the torch paths, which give the same results."""
    return importlib.util.find_spec("triton") is not None
