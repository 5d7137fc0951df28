"""Files that ship inside the package, found through ``importlib.resources``: the same lookup in
the repo, an editable install and an installed wheel (no ``__file__`` path arithmetic)."""
from __future__ import annotations

from importlib import resources
from pathlib import Path

from .errors import ModelDirError

BUNDLED_MODEL = "densert-tiny"


def bundled_model_dir() -> Path:
    """The bundled demo model (``densert/assets/densert-tiny``): small, trained on rendered
    scenes, so every command runs without a download."""
    p = Path(str(resources.files("densert") / "assets" / BUNDLED_MODEL))
    if not (p / "config.json").is_file():
        raise ModelDirError(f"no bundled model at {p} (this install was built without package "
                            "data); pass --model DIR, e.g. one written by "
                            "`densert make-test-checkpoint`")
    return p
