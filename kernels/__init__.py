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
    """Triton is optional (the ``train`` extra; torch's CUDA wheels bring it): without it, or
    with one that does not import, CUDA tensors take the torch paths, which give the same
    results. Only asked for CUDA tensors, so CPU runs never import triton."""
    if importlib.util.find_spec("triton") is None:
        return False
    try:
        importlib.import_module("triton")
    except ImportError:
        return False
    return True


def use_triton(*tensors) -> bool:
    """The one routing rule of every entry point: the Triton kernels run when all tensors are
    on CUDA and triton is installed; anything else takes the torch path."""
    return all(t.is_cuda for t in tensors) and triton_available()


def arch_key(device, table: dict):
    """The key of ``table`` (compute capability as 87, 90, ...) whose launch configuration a
    device uses: its own capability when listed, else the nearest lower one (the smallest when
    none is lower). Non-CUDA devices (the Triton interpreter) use the largest."""
    if getattr(device, "type", device) != "cuda":
        return max(table)
    import torch

    major, minor = torch.cuda.get_device_capability(device)
    lower = [a for a in table if a <= 10 * major + minor]
    return max(lower) if lower else min(table)
