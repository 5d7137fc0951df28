"""ONNX export, the engine manifest, ONNX Runtime and TensorRT backends, the parity gate."""
# This folder is the source of densert.export (densert/export is a symlink to it); imported as a
# top-level `export` from the repo root it would be a second copy of every module.
if __name__ != "densert.export":
    raise ImportError(f"import densert.export, not {__name__}")
