"""`densert bench`, the roofline model and the kernel benchmarks (results in benchmarks/results)."""
# This folder is the source of densert.benchmarks (densert/benchmarks is a symlink to it). From the repo root
# it is also reachable as a bare `benchmarks`: then it is an inert stub, so no module is loaded twice
# under two names and library probes (transformers looks for a `kernels` package) see nothing.
if __name__ != "densert.benchmarks":
    __path__, __file__ = [], None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("import densert.benchmarks, not benchmarks: this folder is the source of densert.benchmarks")
