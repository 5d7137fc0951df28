"""Result files as all-or-nothing sets in an output folder, and the names they get there.

The files of one image form a set that appears whole or not at all (``write_set``): each file goes
to a temporary name in the destination folder, and only when all are complete are they renamed
into place, with SIGINT/SIGTERM held off for the renames. What goes into each file is a
``writers.Writer``.
"""
from __future__ import annotations

import contextlib
import errno
import functools
import os
import signal
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from densert.errors import DensertError

if TYPE_CHECKING:
    from .writers import Writer


class OutputError(DensertError, OSError):
    """A result set that could not be written (disk full, permission, ...); nothing of it is
    left behind."""


@dataclass
class Artifact:
    """One file of a result set: its name in the output folder and what streams its bytes."""

    name: str
    write: Writer


@functools.cache
def _umask() -> int:
    # The umask can only be read by setting it; read once, on the first set written, not at import.
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_set(out_dir: str | Path, artifacts: Sequence[Artifact]) -> list[Path]:
    """Write every artifact, or none: temporary files first, then one rename each with
    SIGINT/SIGTERM held until all are in place. Any failure (disk full, permission, an
    interrupt while writing) removes the temporary files and raises; earlier sets are kept."""
    out_dir = Path(out_dir)
    temps: list[tuple[str, Path]] = []
    try:
        for a in artifacts:
            final = out_dir / a.name  # a name may hold subfolders (inputs that share a stem)
            final.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
            temps.append((tmp, final))
            # mkstemp makes the file 0600; give it the mode a plain open() would (0666 & ~umask).
            os.fchmod(fd, 0o666 & ~_umask())
            with os.fdopen(fd, "wb") as f:
                a.write(f)
                f.flush()
                os.fsync(f.fileno())
        with _signals_held():
            for tmp, final in temps:
                os.replace(tmp, final)
        return [final for _, final in temps]
    except OSError as e:
        raise OutputError(_describe(e, out_dir)) from None
    finally:
        for tmp, _ in temps:
            if os.path.exists(tmp):
                os.unlink(tmp)


def _describe(e: OSError, out_dir: Path) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing into {out_dir}; nothing of this image was kept"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write into {out_dir}: {e.strerror}"
    return f"cannot write into {out_dir}: {e.strerror or e}"


class _signals_held:
    """SIGINT/SIGTERM are delivered after the block, not inside it (main thread, POSIX)."""

    SIGNALS = {signal.SIGINT, signal.SIGTERM}

    def __enter__(self):
        self.active = hasattr(signal, "pthread_sigmask")
        if self.active:
            signal.pthread_sigmask(signal.SIG_BLOCK, self.SIGNALS)

    def __exit__(self, *exc):
        if self.active:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, self.SIGNALS)
        return False


def check_writable(out_dir: str | Path) -> Path:
    """Create ``out_dir`` and prove a file can be made in it, before any work is done."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".densert-probe.", dir=out)
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise OutputError(_describe(e, out) if e.errno != errno.ENOTDIR and e.errno != errno.EEXIST
                          else f"cannot create output directory {out}: {e.strerror}") from None
    return out


@contextlib.contextmanager
def no_empty_out(out_dir):
    """Around a whole run: an output folder the run created (with its subfolders) is removed
    again if the run leaves nothing in it, so a failed run leaves no empty ``--out`` behind."""
    out = Path(out_dir)
    top = None  # the outermost folder the run may create (``--out a/b``: a, when a is new)
    for p in (out, *out.parents):
        if p.exists():
            break
        top = p
    try:
        yield
    finally:
        if top is not None and top.is_dir():
            for d in sorted((p for p in top.rglob("*") if p.is_dir()), key=lambda p: -len(p.parts)):
                with contextlib.suppress(OSError):
                    d.rmdir()  # only an empty folder goes
            with contextlib.suppress(OSError):
                top.rmdir()


def output_stems(paths: Sequence[Path]) -> tuple[list[str], list[str]]:
    """A unique output stem per input, in input order. Inputs whose stems collide keep their path
    relative to the inputs' common folder (``a/img``, ``b/img``: subfolders of the output), files
    that differ only in their extension keep it (``x_png``, ``x_bmp``), and a file given twice is
    numbered (``x-2``). Returns the stems and one note per renamed input."""
    resolved = [p.resolve() for p in paths]
    root = Path(os.path.commonpath([str(r.parent) for r in resolved])) if paths else Path(".")
    groups: dict[str, set[Path]] = {}
    for p, r in zip(paths, resolved):
        groups.setdefault(p.stem, set()).add(r)
    stems, notes, seen = [], [], {}
    for p, r in zip(paths, resolved):
        s = p.stem
        if len(groups[s]) > 1:
            same_dir = sum(q.parent == r.parent for q in groups[s]) > 1
            s = r.relative_to(root).with_suffix("").as_posix()
            if same_dir:
                s += f"_{p.suffix.lstrip('.').lower()}"
            notes.append(f"{p} shares the name {p.stem!r} with another input: its results are "
                         f"named {s}.*")
        seen[s] = seen.get(s, 0) + 1
        if seen[s] > 1:
            s = f"{s}-{seen[s]}"
            notes.append(f"{p} is given more than once: results {s}.*")
        stems.append(s)
    return stems, notes
