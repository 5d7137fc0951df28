"""densert: edge-deployment runtime for DenseMLLM (Youtu-VL)."""
__version__ = "0.1.0"
