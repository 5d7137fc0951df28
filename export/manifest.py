"""``manifest.json`` of an engine directory: what was exported, from which checkpoint, and how.

The runtime reads the manifest before it opens any graph, so a stale, foreign or damaged engine
directory fails with a message that says what differs and which command fixes it, instead of a
shape error deep inside ONNX Runtime or TensorRT.

Identity of a checkpoint = sha256 of ``config.json``, of every ``*.safetensors`` file and of
``tokenizer.json`` when present (the task vocab subsets are read from it). Hashing a 9 GB
checkpoint takes ~20 s, so file digests are memoised in ``<cache root>/file-hashes.json``
keyed by (absolute path, size, mtime_ns); any rewrite of a file changes the key.
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Iterable

from densert.errors import EngineError

MANIFEST = "manifest.json"
FORMAT = "densert-engine"
FORMAT_VERSION = 2   # 2: vision.onnx + llm.onnx (one decoder graph), side files, tied table
CHECKPOINT_FILES_GLOB = ("config.json", "*.safetensors", "tokenizer.json")


def cache_root() -> Path:
    """``$DENSERT_CACHE_DIR`` or ``$XDG_CACHE_HOME/densert`` or ``~/.cache/densert``.

    A user cache rather than ``<model_dir>/...``: model directories are often read-only
    (a mounted NVMe image on Jetson, a shared HF cache)."""
    env = os.environ.get("DENSERT_CACHE_DIR")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "densert"


# ---------------------------------------------------------------- hashing
_memo: dict[tuple[str, int, int], str] = {}
_lock = threading.Lock()


def _hash_db() -> Path:
    return cache_root() / "file-hashes.json"


def _load_db() -> dict[str, str]:
    try:
        return json.loads(_hash_db().read_text())
    except (OSError, ValueError):
        return {}


def file_sha256(path: str | Path) -> str:
    p = Path(path).resolve()
    st = p.stat()
    key = (str(p), st.st_size, st.st_mtime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
        db_key = f"{key[0]}|{key[1]}|{key[2]}"
        db = _load_db()
        if db_key in db:
            _memo[key] = db[db_key]
            return db[db_key]
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    digest = h.hexdigest()
    with _lock:
        _memo[key] = digest
        # Drop entries of files that no longer exist so the table does not grow without bound.
        db = {k: v for k, v in _load_db().items() if os.path.exists(k.rsplit("|", 2)[0])}
        db[db_key] = digest
        try:
            _hash_db().parent.mkdir(parents=True, exist_ok=True)
            tmp = _hash_db().with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(db))
            tmp.replace(_hash_db())
        except OSError:
            pass  # a read-only home only costs re-hashing next time
    return digest


def checkpoint_files(model_dir: str | Path) -> list[Path]:
    d = Path(model_dir)
    if not (d / "config.json").is_file():
        raise EngineError(f"{d}: not a checkpoint directory (no config.json)")
    files = [d / "config.json", *sorted(d.glob("*.safetensors"))]
    if len(files) == 1:
        raise EngineError(f"{d}: checkpoint has no *.safetensors weight files")
    if (d / "tokenizer.json").is_file():
        files.append(d / "tokenizer.json")
    return files


def checkpoint_identity(model_dir: str | Path) -> dict[str, Any]:
    """{"files": {name: sha256}, "config_sha256", "checkpoint_id"} of a checkpoint directory."""
    files = {p.name: file_sha256(p) for p in checkpoint_files(model_dir)}
    ident = hashlib.sha256("".join(f"{n}:{h}\n" for n, h in sorted(files.items())).encode()).hexdigest()
    return {"files": files, "config_sha256": files["config.json"], "checkpoint_id": ident}


# ---------------------------------------------------------------- manifest I/O
def _canonical(d: dict) -> bytes:
    body = {k: v for k, v in d.items() if k != "integrity"}
    return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()


def write_manifest(engine_dir: str | Path, manifest: dict[str, Any]) -> Path:
    manifest = dict(manifest)
    manifest["integrity"] = {"sha256": hashlib.sha256(_canonical(manifest)).hexdigest()}
    path = Path(engine_dir) / MANIFEST
    path.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    return path


def _rebuild_hint(engine_dir: Path, model_dir: str | Path | None, m: dict | None = None) -> str:
    model = model_dir or (m or {}).get("checkpoint", {}).get("path", "MODEL_DIR")
    extra = ""
    if m:
        extra = f" --precision {m.get('precision', 'fp32')} --cache-layout {m.get('cache_layout', 'latent')}"
    return f"re-run `densert export --model {model} --out {engine_dir}{extra}`"


def read_manifest(engine_dir: str | Path) -> dict[str, Any]:
    """Parse and integrity-check manifest.json; checks every listed file exists."""
    d = Path(engine_dir)
    if not d.is_dir():
        raise EngineError(f"engine dir {d} does not exist; create it with `densert export --model MODEL_DIR --out {d}`")
    path = d / MANIFEST
    if not path.is_file():
        raise EngineError(f"engine dir {d} has no {MANIFEST} (not an engine directory, or an "
                          f"interrupted export); {_rebuild_hint(d, None)}")
    try:
        m = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise EngineError(f"{path} is not valid JSON ({e}); {_rebuild_hint(d, None)}") from None
    if not isinstance(m, dict) or m.get("format") != FORMAT:
        raise EngineError(f"{path} is not a densert engine manifest (format != {FORMAT!r})")
    if m.get("format_version") != FORMAT_VERSION:
        raise EngineError(f"{path} has format_version {m.get('format_version')!r}; this densert reads "
                          f"version {FORMAT_VERSION}; {_rebuild_hint(d, None, m)}")
    want = (m.get("integrity") or {}).get("sha256")
    got = hashlib.sha256(_canonical(m)).hexdigest()
    if want != got:
        raise EngineError(f"{path} was modified after export (integrity sha256 {want} != {got}); "
                          f"a hand-edited manifest cannot be trusted: {_rebuild_hint(d, None, m)}")
    for g, info in m["graphs"].items():
        for f in [info["file"], *info.get("external_data", [])]:
            if not (d / f).is_file():
                raise EngineError(f"engine dir {d} is missing {f} (graph {g!r} listed in {MANIFEST}); "
                                  f"{_rebuild_hint(d, None, m)}")
    return m


def check_files(engine_dir: str | Path, m: dict[str, Any]) -> None:
    """Every graph file and side file (tokenizer, config, ...) still has the sha256 it had at
    export (catches swapped / truncated files)."""
    d = Path(engine_dir)
    listed = [(f, want, f"graph {g!r}") for g, info in m["graphs"].items()
              for f, want in info.get("sha256", {}).items()]
    listed += [(f, want, "side file") for f, want in m.get("files", {}).items()]
    for f, want, what in listed:
        if not (d / f).is_file():
            raise EngineError(f"engine dir {d} is missing {f} ({what} listed in {MANIFEST}); "
                              f"{_rebuild_hint(d, None, m)}")
        got = file_sha256(d / f)
        if got != want:
            raise EngineError(f"engine dir {d}: {f} ({what}) has sha256 {got[:16]}..., the "
                              f"manifest says {want[:16]}...; the file was replaced or damaged; "
                              f"{_rebuild_hint(d, None, m)}")


def check_checkpoint(engine_dir: str | Path, m: dict[str, Any], model_dir: str | Path) -> None:
    d = Path(engine_dir)
    ident = checkpoint_identity(model_dir)
    ck = m["checkpoint"]
    if ck["config_sha256"] != ident["config_sha256"]:
        raise EngineError(
            f"engine dir {d} was exported from checkpoint {ck.get('path')} with config hash "
            f"{ck['config_sha256'][:16]}, this checkpoint ({model_dir}) has {ident['config_sha256'][:16]}; "
            f"{_rebuild_hint(d, model_dir, m)}")
    if ck["checkpoint_id"] != ident["checkpoint_id"]:
        diff = sorted(set(ck["files"].items()) ^ set(ident["files"].items()))
        names = sorted({n for n, _ in diff})
        raise EngineError(
            f"engine dir {d} was exported from checkpoint {ck.get('path')} (id {ck['checkpoint_id'][:16]}), "
            f"this checkpoint ({model_dir}) has id {ident['checkpoint_id'][:16]}: same config, different "
            f"{', '.join(names)}; {_rebuild_hint(d, model_dir, m)}")


def check_tasks(engine_dir: str | Path, m: dict[str, Any], tasks: Iterable[str]) -> None:
    """Dense tasks need their vocab subsets in the graph; text generation (chat) works with
    every engine (the LLM graph decodes)."""
    from densert.tasks import DENSE_TASKS
    missing = [t for t in tasks if t in DENSE_TASKS and t not in m["tasks"]]
    if missing:
        raise EngineError(f"engine dir {engine_dir} was exported for tasks {sorted(m['tasks'])}, not "
                          f"{missing}; re-run `densert export ... --tasks {','.join(sorted(set(m['tasks']) | set(missing)))}`")


def load_manifest(engine_dir: str | Path, model_dir: str | Path | None = None,
                  tasks: Iterable[str] = (), check_hashes: bool = True) -> dict[str, Any]:
    """Everything the runtime checks before it opens a graph, in order of cost. ``model_dir``:
    the checkpoint the caller believes the engine came from (checked against the hashes kept
    for provenance); None, or the engine dir itself: the engine dir stands alone."""
    m = read_manifest(engine_dir)
    check_tasks(engine_dir, m, tasks)
    if check_hashes:
        check_files(engine_dir, m)
    if model_dir is not None and not is_engine_dir(model_dir, engine_dir):
        check_checkpoint(engine_dir, m, model_dir)
    return m


def is_engine_dir(path: str | Path, engine_dir: str | Path | None = None) -> bool:
    """``path`` is an engine directory (``engine_dir`` itself when given), not a checkpoint."""
    p = Path(path)
    if engine_dir is not None and p.resolve() == Path(engine_dir).resolve():
        return True
    return (p / MANIFEST).is_file()
