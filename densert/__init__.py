"""densert: edge-deployment runtime for DenseMLLM (Youtu-VL)."""
__version__ = "0.1.0"

__all__ = ["__version__", "load_model", "DensePredictor"]


def __getattr__(name):
    # Lazy so that `import densert` (and `densert --help`) does not import torch.
    if name == "load_model":
        from densert.checkpoint.loader import load_model
        return load_model
    if name == "DensePredictor":
        from densert.runtime.predictor import DensePredictor
        return DensePredictor
    raise AttributeError(f"module 'densert' has no attribute {name!r}")
