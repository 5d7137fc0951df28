"""Options dataclasses that carry their own command-line help: the one place for a default.

A field declared with ``opt(default, help, ...)`` keeps its help text and choices in the field's
metadata; the CLI builds the flag from it (``densert.cli.add_dataclass_arguments``), so the
dataclass default, the flag default and the ``--help`` text cannot drift apart. Torch-free, so
``densert <command> --help`` stays instant.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

from .errors import OptionError


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
        raise OptionError(f"{owner}: {name} {value!r} is not one of {tuple(choices)}")


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
        raise OptionError(f"size {s!r} is not HxW (e.g. 480x640)") from None
    if h < 1 or w < 1:
        raise OptionError(f"size {s!r} must be positive")
    return h, w


def comma_list(s: str) -> tuple[str, ...]:
    """``"depth, segment"`` -> ("depth", "segment")."""
    return tuple(t.strip() for t in str(s).split(",") if t.strip())


def check_range(owner: str, name: str, value: Any, lo: float | None = None,
                hi: float | None = None, *, integer: bool = False, lo_open: bool = False,
                hi_open: bool = False) -> None:
    """``value`` is a finite number (an int when ``integer``; never a bool) within [lo, hi] (an
    open end with ``lo_open`` / ``hi_open``), else an ``OptionError`` naming ``owner.name``, the
    value and the range."""
    kinds = (int,) if integer else (int, float)
    ok = isinstance(value, kinds) and not isinstance(value, bool)
    if ok and not integer:
        ok = math.isfinite(value)
    if ok and lo is not None:
        ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
        ok = value < hi if hi_open else value <= hi
    if not ok:
        lo_s = "" if lo is None else f"{'>' if lo_open else '>='} {lo:g}"
        hi_s = "" if hi is None else f"{'<' if hi_open else '<='} {hi:g}"
        want = " and ".join(x for x in (lo_s, hi_s) if x)
        what = "an integer" if integer else "a finite number"
        raise OptionError(f"{owner}: {name} must be {what}{' ' + want if want else ''}, got "
                          f"{value!r}")


def int_at_least(lo: int) -> Callable[[str], int]:
    """An argparse type: an integer >= ``lo`` (a refused value is one line, exit 2)."""
    def parse(s: str) -> int:
        import argparse
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{s!r} is not an integer") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{v} is below {lo}")
        return v
    parse.__name__ = f"integer >= {lo}"
    return parse
