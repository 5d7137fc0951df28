"""NTP-M training: rendered scenes, targets, losses, trainer, metrics, ablation."""
# This folder is the source of densert.training (densert/training is a symlink to it). From the repo root
# it is also reachable as a bare `training`: then it is an inert stub, so no module is loaded twice
# under two names and library probes (transformers looks for a `kernels` package) see nothing.
if __name__ != "densert.training":
    __path__, __file__ = [], None

    def __getattr__(name):
        if name.startswith("__"):
            raise AttributeError(name)
        raise ImportError("import densert.training, not training: this folder is the source of densert.training")
