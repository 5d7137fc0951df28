"""``densert <command>``: one entry point; each command lives in the module that owns it.

A command module defines ``configure(parser)`` (add its arguments) and ``run(args) -> int``.
Modules are imported only for the command being run, so ``densert --help`` stays instant.
"""
from __future__ import annotations

import argparse
import importlib
import sys

# name -> (module, one-line help). One table; adding a command is one line here.
COMMANDS: dict[str, tuple[str, str]] = {
    "make-test-checkpoint": ("densert.checkpoint", "write a randomly initialised checkpoint in the released layout"),
    "inspect": ("densert.inspect", "summarise a checkpoint; non-zero exit if it is broken"),
    "depth": ("densert.runtime.cli", "metric depth maps from images"),
    "segment": ("densert.runtime.cli", "semantic / open-set segmentation maps from images"),
    "refer": ("densert.runtime.cli", "referring segmentation of an expression"),
    "chat": ("densert.runtime.cli", "plain chat / VQA with greedy decoding"),
    "export": ("densert.export.cli", "export ONNX engines (vision, LLM prefill, LLM decode) + manifest"),
    "verify": ("densert.export.cli", "parity gate: an engine directory against the torch reference"),
    "build-engine": ("densert.export.cli", "build TensorRT engines from an engine directory"),
    "bench": ("densert.benchmarks.cli", "per-stage latency and memory, backend against backend"),
    "render": ("densert.training.cli", "render procedural dense-scene samples to disk"),
    "train": ("densert.training.cli", "NTP-M training (text NTP + multi-label vision tokens)"),
    "eval": ("densert.training.cli", "depth / segmentation scores on held-out rendered scenes"),
    "ablation": ("densert.training.cli", "loss ablation: BCE vs independent means vs NTP-M vs softmax NTP"),
}


class CLIError(Exception):
    """An error the user can fix; printed without a traceback, exit code 2."""


def _top_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="densert", description=__doc__.splitlines()[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="commands:\n" + "\n".join(
                                    f"  {n:<22}{h}" for n, (_, h) in COMMANDS.items()))
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
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("densert"):
            print(f"densert {name}: not available in this build ({e.name} is missing)", file=sys.stderr)
            return 2
        raise
    parser = argparse.ArgumentParser(prog=f"densert {name}", description=help_text)
    module.configure(parser, name) if _takes_name(module.configure) else module.configure(parser)
    args = parser.parse_args(rest)
    args.command = name
    try:
        return int(module.run(args) or 0)
    except CLIError as e:
        print(f"densert {name}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"densert {name}: interrupted", file=sys.stderr)
        return 130


def _takes_name(fn) -> bool:
    import inspect
    return len(inspect.signature(fn).parameters) >= 2


if __name__ == "__main__":
    sys.exit(main())
