"""The runtime: images in, dense maps out (task flows, dense decoding, outputs, backends by name)."""
# This folder is the source of densert.runtime (densert/runtime is a symlink to it); imported as a
# top-level `runtime` from the repo root it would be a second copy of every module.
if __name__ != "densert.runtime":
    raise ImportError(f"import densert.runtime, not {__name__}")
