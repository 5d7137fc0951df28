"""What machine a measurement ran on, for every report that quotes a number (benchmarks,
training ablations): one lookup, no third-party imports."""
from __future__ import annotations

import platform
from pathlib import Path


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def source_commit() -> str | None:
    """The git commit of the densert sources when they run from a checkout (the development
    install), None for an installed package: the repo that holds ``densert/`` must be the one
    that git reports, so a wheel inside someone else's repository does not borrow its commit."""
    import subprocess

    import densert
    pkg_root = Path(densert.__file__).resolve().parent.parent
    try:
        out = subprocess.run(["git", "-C", str(pkg_root), "rev-parse", "--show-toplevel", "--short",
                              "HEAD"], capture_output=True, text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    lines = out.stdout.split()
    if out.returncode or len(lines) != 2 or Path(lines[0]).resolve() != pkg_root:
        return None
    return lines[1]
