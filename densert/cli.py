"""``densert <command>``: one entry point; each command lives in the CLI module that owns it.

A command module defines ``configure(parser[, command])`` (add its arguments) and
``run(args) -> int``. Modules are imported only for the command being run, and no ``configure``
imports torch, so ``densert --help`` and ``densert <command> --help`` stay instant.

Errors: a ``densert.errors.DensertError`` is printed as one line (``densert CMD: error: ...``)
with its exit code; a missing optional package names the extra that installs it.
"""
from __future__ import annotations

import argparse
import dataclasses
import importlib
import inspect
import re
import sys
from typing import Any, Iterable

from .errors import DensertError
from .options import field_default
from .runtime.registry import REGISTRY as TASK_REGISTRY

# name -> (module, one-line help). One table; adding a command is one line here (a task's command
# comes with its record in the task registry, densert.runtime.registry).
COMMANDS: dict[str, tuple[str, str]] = {
    "make-test-checkpoint": ("densert.checkpoint.cli",
                             "write a randomly initialised checkpoint in the released layout"),
    "inspect": ("densert.checkpoint.cli",
                "summarise a checkpoint (or an engine directory: sizes per part); non-zero exit if it is broken"),
    **{name: ("densert.runtime.cli", task.help) for name, task in TASK_REGISTRY.items()},
    "ros2": ("densert.runtime.cli", "ROS 2 node: image (+ camera_info) in, depth / labels images out"),
    "export": ("densert.export.cli",
               "export a self-contained ONNX engine directory (vision, LLM; fp32/fp16/int8/int4)"),
    "verify": ("densert.export.cli", "parity gate: an engine directory against the torch reference"),
    "build-engine": ("densert.export.cli", "build TensorRT engines from an engine directory"),
    "bench": ("densert.benchmarks.cli", "per-stage latency and memory, backend against backend"),
    "serve": ("densert.runtime.serve.cli",
              "serve depth / segment / dense on Triton Inference Server (HTTP, gRPC, metrics)"),
    "render": ("densert.training.cli", "render procedural dense-scene samples to disk"),
    "train": ("densert.training.cli", "NTP-M training (text NTP + multi-label vision tokens)"),
    "eval": ("densert.training.cli", "scores on held-out rendered scenes, or on dataset folders (--data)"),
    "example-data": ("densert.training.cli", "write a small example dataset folder for train / eval --data"),
    "ablation": ("densert.training.cli", "loss ablation: BCE vs independent means vs NTP-M vs softmax NTP"),
}


class HelpFormatter(argparse.HelpFormatter):
    """Every flag's help ends with its default, unless the help already says what it is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if (action.default is argparse.SUPPRESS or not action.option_strings
                or "default" in text or isinstance(action, argparse._HelpAction)):
            return text
        if action.default is None:
            return text  # the help text must say what happens without the flag
        return f"{text} (default: {show_default(action.default)})"


def show_default(v: Any) -> str:
    if isinstance(v, bool):
        return "on" if v else "off"
    if isinstance(v, (tuple, list)):
        if len(v) == 2 and all(isinstance(x, int) for x in v):
            return f"{v[0]}x{v[1]}"
        return ",".join(str(x) for x in v)
    return str(v).replace("%", "%%")


class Parser(argparse.ArgumentParser):
    """Usage errors are one line that points at ``--help`` (not the usage block), exit 2.

    A value that starts with a minus and a digit (``--range -5:10``, ``--lr -1e-3``) is a value,
    not a flag, so the option's own check names what is wrong with it; argparse alone only
    knows plain negative numbers. ``intermixed``: positionals may follow options (``verify
    ENGINES --model DIR IMAGES``)."""

    intermixed = False

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._negative_number_matcher = re.compile(r"^-\.?\d")

    def parse_args(self, args=None, namespace=None):
        if self.intermixed:
            return self.parse_intermixed_args(args, namespace)
        return super().parse_args(args, namespace)

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def new_parser(prog: str, description: str) -> argparse.ArgumentParser:
    return Parser(prog=prog, description=description, formatter_class=HelpFormatter)


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls, names: Iterable[str] | None = None,
                            exclude: Iterable[str] = ()) -> list[str]:
    """One flag per field of ``cls`` (declared with ``densert.options.opt``): default, help,
    choices and parser from the field. Booleans become ``--x/--no-x``. Returns the field names
    added, for ``dataclass_kwargs``."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    wanted = list(fields) if names is None else list(names)
    added = []
    for name in wanted:
        if name in exclude:
            continue
        f = fields[name]
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        default = field_default(f)
        flag = meta.get("flag") or "--" + name.replace("_", "-")
        kw: dict[str, Any] = {"dest": name, "default": default, "help": meta.get("help", "")}
        if isinstance(default, bool):
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw["type"] = _type_error_says_why(meta.get("type") or (type(default) if default is not
                                                                    None else str))
            if meta.get("choices"):
                kw["choices"] = meta["choices"]
            if meta.get("metavar"):
                kw["metavar"] = meta["metavar"]
        parser.add_argument(flag, **kw)
        added.append(name)
    return added


def _type_error_says_why(parse):
    """argparse shows only "invalid VALUE" for a ValueError of a type function; an
    ``OptionError`` says what the value should be, so its message is kept."""
    from .errors import OptionError
    if parse in (int, float, str):
        return parse

    def wrapped(s):
        try:
            return parse(s)
        except OptionError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    wrapped.__name__ = getattr(parse, "__name__", "value")
    return wrapped


def dataclass_kwargs(args: argparse.Namespace, names: Iterable[str]) -> dict[str, Any]:
    """The parsed values of ``names`` (the ones the parser has), for the dataclass."""
    return {n: getattr(args, n) for n in names if hasattr(args, n)}


def fields_of(cls) -> list[str]:
    return [f.name for f in dataclasses.fields(cls)]


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densert", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(
                                    f"  {n:<22}{h}" for n, (_, h) in COMMANDS.items())
                                + "\n\n`densert COMMAND --help` lists a command's options.")
    p.add_argument("command", choices=list(COMMANDS), metavar="command")
    p.add_argument("--version", action="version", version=_version())
    return p


def _version() -> str:
    from . import __version__
    return f"densert {__version__}"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "--version") or argv[0] not in COMMANDS:
        _top_parser().parse_args(argv or ["--help"])
        return 2
    name, rest = argv[0], argv[1:]
    module_name, help_text = COMMANDS[name]
    try:
        module = importlib.import_module(module_name)
        parser = new_parser(f"densert {name}", help_text)
        if len(inspect.signature(module.configure).parameters) >= 2:
            module.configure(parser, name)
        else:
            module.configure(parser)
        args = parser.parse_args(rest)
        args.command = name
        return int(module.run(args) or 0)
    except DensertError as e:
        print(f"densert {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except ModuleNotFoundError as e:
        from .extras import message
        hint = message(e.name or "", f"densert {name}")
        if hint is None:
            raise
        print(f"densert {name}: error: {hint}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densert {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
