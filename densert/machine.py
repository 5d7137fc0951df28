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


def cpu_flags() -> set[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_computes_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matmuls run natively (PyTorch's oneDNN kernels use them); without
    them bf16 is emulated and slower than fp32."""
    return bool(cpu_flags() & {"avx512_bf16", "amx_bf16"})


# A memory cap for this process (bytes, or with a K/M/G suffix): emulate a smaller device (an
# 8 GB Jetson) on a bigger machine, or leave room for the rest of a robot's processes.
MEMORY_ENV = "DENSERT_MAX_MEMORY"


def parse_bytes(text: str) -> int:
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}.get(t[-1:], 1)
    return int(float(t[:-1] if mult > 1 else t) * mult)


def available_memory(device: str = "cpu") -> tuple[int, str]:
    """Bytes this process may still allocate on ``device`` and where that number comes from:
    CUDA free memory; on the CPU the smallest of MemAvailable, the cgroup's limit less its usage
    and ``$DENSERT_MAX_MEMORY`` less this process's resident set."""
    import os
    if str(device).startswith("cuda"):
        import torch
        free, _ = torch.cuda.mem_get_info(torch.device(device))
        return int(free), f"free memory of {device}"
    found: list[tuple[int, str]] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append((int(line.split()[1]) * 1024, "MemAvailable"))
    except OSError:
        pass
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            if limit != "max" and int(limit) < 1 << 60:
                found.append((int(limit) - int(Path(usage_f).read_text()), "the cgroup memory limit"))
            break
        except (OSError, ValueError):
            continue
    cap = os.environ.get(MEMORY_ENV)
    if cap:
        found.append((parse_bytes(cap) - resident_bytes(), f"${MEMORY_ENV}={cap}"))
    if not found:
        return 1 << 62, "unknown"
    return min(found)


def resident_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0
