"""Backends by name.

``torch`` is the reference (``TorchBackend``); ``onnxruntime`` and ``tensorrt`` live in
``densert.export`` and are imported only when asked for, so a torch-only install works.
"""
from __future__ import annotations

from pathlib import Path

import torch

from densert.errors import BackendError

from .options import BACKENDS


def make_backend(name: str, model_dir: str | Path, dtype: str | torch.dtype = "auto",
                 engine_dir: str | Path | None = None, device: str | None = None,
                 max_patches: int | None = None):
    """``device``: torch's device for the torch backend (None or "auto": cuda when available);
    for onnxruntime, the execution provider's (``densert.export.ort_backend.pick_providers``).
    ``dtype`` "auto": see ``loader.auto_dtype``; the torch backend checks that the model fits the
    memory left (``loader.check_fits``, for images of ``max_patches``) before reading weights."""
    if name == "torch":
        from densert.backend import TorchBackend
        from densert.checkpoint.loader import auto_dtype, check_fits, load_model
        dev = device if device not in (None, "auto") else (
            "cuda" if torch.cuda.is_available() else "cpu")
        check_device(dev)
        dt = auto_dtype(model_dir, dev) if dtype == "auto" else dtype
        check_fits(model_dir, dt, dev, max_patches, chosen="auto" if dtype == "auto" else "--dtype")
        return TorchBackend(load_model(model_dir, dt, device=dev))
    if dtype == "auto":
        dtype = "float32"     # engines carry their own precision; this is the host-side dtype
    where = {}
    if name == "onnxruntime":
        try:
            from densert.export.ort_backend import OrtBackend as cls
        except ImportError as e:
            raise _unavailable(name, e) from None
        where = {"device": device or "auto"}
    elif name == "tensorrt":
        try:
            from densert.export.trt_backend import TrtBackend as cls
        except ImportError as e:
            raise _unavailable(name, e) from None
    else:
        raise BackendError(f"unknown backend {name!r}; expected one of {BACKENDS}")
    from densert.checkpoint.safetensors import resolve_dtype
    return cls.from_model(model_dir, engine_dir=engine_dir, dtype=resolve_dtype(dtype), **where)


def check_device(device: str) -> None:
    """A torch device this process can use, before any weights are read."""
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            build = "a CPU-only build of torch" if torch.version.cuda is None else "no visible GPU"
            raise BackendError(f"--device {device}: CUDA is not available here ({build}); use "
                               "--device cpu")
        idx = int(device.split(":")[1]) if ":" in device else 0
        if idx >= torch.cuda.device_count():
            raise BackendError(f"--device {device}: only {torch.cuda.device_count()} GPU(s) visible")


def _unavailable(name: str, e: ImportError) -> BackendError:
    return BackendError(f"backend {name!r} is not available in this install ({e}); use --backend torch")
