"""Optional dependency groups: which ``pip install 'densert[EXTRA]'`` brings which package.

The base install runs depth / segment / refer / chat on the torch and ONNX Runtime backends; the
rest is opt-in so a robot does not carry the exporter, the trainer's tools or the test oracles.
This table is the one place that maps a missing module to the extra that installs it: the CLI
turns any ``ModuleNotFoundError`` of these into a one-line message, and library code that needs
one calls ``require`` first. Keep it in step with ``[project.optional-dependencies]``.
"""
from __future__ import annotations

import importlib

from .errors import MissingExtraError

# top-level module -> extra (pyproject.toml [project.optional-dependencies])
EXTRA_OF_MODULE: dict[str, str] = {
    "onnx": "export",
    "onnxscript": "export",
    "triton": "train",
    "peft": "train",
    "pycocotools": "train",
    "matplotlib": "bench",
    "jsonschema": "bench",
    "pydensecrf": "crf",
    "transformers": "dev",
    "pytest": "dev",
    "jedi": "dev",
    "mcap": "bag",
    "mcap_ros2": "bag",
    "rclpy": "ros2",
    "sensor_msgs": "ros2",
    "std_msgs": "ros2",
    "tritonclient": "serve",
}


def message(module: str, purpose: str | None = None) -> str | None:
    """The one-line hint for a missing top-level ``module``, or None if no extra provides it."""
    root = module.split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    what = f"{purpose} needs" if purpose else "this needs"
    return (f"{what} the optional package {root!r}, which is not installed: "
            f"pip install 'densert[{extra}]'")


def require(module: str, purpose: str):
    """Import ``module`` or raise ``MissingExtraError`` naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        hint = message(e.name or module, purpose)
        if hint is None:
            raise
        raise MissingExtraError(hint) from None
