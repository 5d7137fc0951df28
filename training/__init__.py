"""NTP-M training: rendered scenes, targets, losses, trainer, metrics, ablation."""
# This folder is the source of densert.training (densert/training is a symlink to it); imported as a
# top-level `training` from the repo root it would be a second copy of every module.
if __name__ != "densert.training":
    raise ImportError(f"import densert.training, not {__name__}")
