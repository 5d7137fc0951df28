"""Options dataclasses that carry their own command-line help: the one place for a default.

A field declared with ``opt(default, help, ...)`` keeps its help text and choices in the field's
metadata; the CLI builds the flag from it (``densert.cli.add_dataclass_arguments``), so the
dataclass default, the flag default and the ``--help`` text cannot drift apart. Torch-free, so
``densert <command> --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence


def opt(default: Any = dataclasses.MISSING, help: str = "", *, choices: Sequence | None = None,
        type: Callable | None = None, metavar: str | None = None, flag: str | None = None,
        default_factory: Callable | None = None, cli: bool = True) -> Any:
    """A dataclass field with CLI metadata. ``type`` parses the flag's string (default: the type
    of the default value); ``flag`` overrides ``--field-name``; ``cli=False`` keeps the field off
    the command line."""
    meta = {"help": help, "choices": tuple(choices) if choices is not None else None,
            "type": type, "metavar": metavar, "flag": flag, "cli": cli}
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def field_default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        return f.default_factory()  # type: ignore[misc]
    return dataclasses.MISSING


def check_choice(owner: str, name: str, value: Any, choices: Sequence) -> None:
    if value not in choices:
        raise ValueError(f"{owner}: {name} {value!r} is not one of {tuple(choices)}")


def check_choices(obj) -> None:
    """Validate every field of a dataclass instance that declares ``choices``."""
    for f in dataclasses.fields(obj):
        choices = f.metadata.get("choices")
        if choices:
            check_choice(type(obj).__name__, f.name, getattr(obj, f.name), choices)


def hw_size(s: str) -> tuple[int, int]:
    """``"480x640"`` -> (480, 640): an image size as height x width, both positive."""
    try:
        h, w = (int(v) for v in str(s).lower().split("x"))
    except ValueError:
        raise ValueError(f"size {s!r} is not HxW (e.g. 480x640)") from None
    if h < 1 or w < 1:
        raise ValueError(f"size {s!r} must be positive")
    return h, w


def comma_list(s: str) -> tuple[str, ...]:
    """``"depth, segment"`` -> ("depth", "segment")."""
    return tuple(t.strip() for t in str(s).split(",") if t.strip())
