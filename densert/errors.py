"""Every error densert raises on purpose, in one module at the bottom of the import graph.

Each is a ``DensertError``: a problem the user can act on, whose message names the file, tensor,
shape or value and says what to do. ``densert`` (the CLI) prints such an error as one line and
exits with ``exit_code``; library users catch the specific type. The standard bases
(``ValueError``, ``RuntimeError``, ``ImportError``) are kept so code that catches those still does.
"""
from __future__ import annotations


class DensertError(Exception):
    """An error the user can fix; the CLI prints it without a traceback."""

    exit_code = 2


class CLIError(DensertError):
    """Bad command-line usage (a flag value, a missing input)."""


class OptionError(DensertError, ValueError):
    """An option or argument value with no sensible meaning (a negative step count, a class list
    given as one string, a NaN focal length); the message names the option and what it accepts.
    The options dataclasses raise it, so the CLI, the API and the ROS parameters share it."""


class ConfigError(DensertError, ValueError):
    """A config.json that is missing, unreadable or describes something densert cannot run."""


class CheckpointError(DensertError, ValueError):
    """A checkpoint directory or file that cannot be read as a Youtu-VL checkpoint."""


class ModelDirError(CheckpointError):
    """A model directory that is missing or lacks a file the runtime needs."""


class TokenizerError(DensertError, ValueError):
    """A tokenizer.json that is missing, unreadable or lacks a token densert needs."""


class ChatError(DensertError, ValueError):
    """Messages that do not fit the chat template (unknown role, bad segment, image count)."""


class ImageError(DensertError, ValueError):
    """An input that is not a usable image; the message names the file and the problem."""


class RLEError(DensertError, ValueError):
    """A run-length string that does not describe the map it claims to."""


class BackendError(DensertError, RuntimeError):
    """A backend that cannot be created here (unknown name, missing package or engine)."""


class EngineError(DensertError, RuntimeError):
    """An engine directory that cannot serve this checkpoint or task; the message says why and
    which command rebuilds it."""


class MissingExtraError(DensertError, ImportError):
    """An optional dependency group (``pip install 'densert[EXTRA]'``) that is not installed."""


class DatasetError(DensertError, ValueError):
    """A training / evaluation dataset on disk that does not follow the documented layout
    (training/README.md, "One folder layout"); the message names the file and what is wrong
    with it."""


class SourceError(DensertError, ValueError):
    """A frame source (image files, video, camera, stream URL, ROS 2 bag) that cannot be opened
    or read; the message names it and says what to check."""
