"""`densert bench`, the roofline model and the kernel benchmarks (results in benchmarks/results)."""
# This folder is the source of densert.benchmarks (densert/benchmarks is a symlink to it); imported as a
# top-level `benchmarks` from the repo root it would be a second copy of every module.
if __name__ != "densert.benchmarks":
    raise ImportError(f"import densert.benchmarks, not {__name__}")
