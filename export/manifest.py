"""``manifest.json`` of an engine directory: what was exported, from which checkpoint, and how.

The runtime reads the manifest before it opens any graph, so a stale, foreign or damaged engine
directory fails with a message that says what differs and which command fixes it, instead of a
shape error deep inside ONNX Runtime or TensorRT.

Identity of a checkpoint = sha256 of ``config.json``, of every ``*.safetensors`` file and of
``tokenizer.json`` when present (the task vocab subsets are read from it). Hashing a 9 GB
checkpoint takes ~20 s, so file digests are memoised in ``<cache root>/file-hashes.json``
keyed by (absolute path, size, mtime_ns, ctime_ns). The inode change time is in the key because
the modification time can be set back (``touch -d``, ``os.utime``) after a file is rewritten in
place, while the kernel moves the change time forward on every write and every utime, and no
unprivileged call sets it back: any rewrite of a file changes the key.
"""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import tempfile
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from densert import __version__
from densert.errors import EngineError

from .onnx_types import NAMES, float_type

if TYPE_CHECKING:
    from .options import ExportOptions

MANIFEST = "manifest.json"
FORMAT = "densert-engine"
FORMAT_VERSION = 2   # 2: vision.onnx + llm.onnx (one decoder graph), side files, tied table
# The symbolic batch axis of llm.onnx (several prompts of one length: a camera rig's frames).
# Directories exported before it have a fixed 1 there; decode and TensorRT profiles use 1.
BATCH_AXIS = "batch"


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
_memo: dict[tuple[str, int, int, int], str] = {}
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
    key = (str(p), st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    with _lock:
        if key in _memo:
            return _memo[key]
        db_key = "|".join(map(str, key))
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
        db = {k: v for k, v in _load_db().items() if os.path.exists(k.rsplit("|", 3)[0])}
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


# ---------------------------------------------------------------- the export's --out
def check_out_dir(out_dir: str | Path, model_dir: str | Path, force: bool = False) -> Path:
    """``densert export --out``, refused before any work when it cannot become an engine
    directory: empty, an existing file, the checkpoint directory itself (its files would be
    mixed with the engine's), a folder that already holds files (unless ``force``: an engine
    directory is whole, files of an older export must not stay beside the new ones), or a
    place this user cannot write. Creates nothing."""
    if not str(out_dir).strip():
        raise EngineError("--out is empty; name the engine directory to write, e.g. --out engines")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EngineError(f"--out {out} is an existing file, not a directory; name a new folder")
    try:
        same = out.is_dir() and Path(model_dir).is_dir() and out.samefile(model_dir)
    except OSError:
        same = False
    if same:
        raise EngineError(f"--out {out} is the checkpoint directory itself; write the engines "
                          "into a folder of their own, e.g. --out engines")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise EngineError(f"--out {out} is not empty; choose a new folder, or pass --force to "
                          "write into it (files of the same name are replaced)")
    parent = out
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        raise EngineError(f"--out {out}: {parent} is a file, so the folder cannot be created")
    try:  # the honest test (root, read-only mounts, /proc): make a folder there, then remove it
        os.rmdir(tempfile.mkdtemp(prefix=".densert-probe.", dir=parent))
    except OSError as e:
        raise EngineError(f"--out {out}: cannot write in {parent} ({e.strerror})") from None
    return out


# ---------------------------------------------------------------- manifest I/O
def build_manifest(o: ExportOptions, *, exporter: dict[str, Any], precision_policy: str,
                   weight_formats: dict[str, str] | None, budget: dict[str, Any],
                   groups: dict[str, dict[str, Any]], model_dir: Path, identity: dict[str, Any],
                   config: dict[str, Any], engine_dir: Path, side_files: Iterable[str],
                   sizes: dict[str, int], tied_table: dict[str, Any] | None,
                   graphs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The manifest of an export written into ``engine_dir``: what was exported (``o``, with the
    image ``budget`` and the task ``groups``), how (``exporter``, the precision), from which
    checkpoint (``identity``), and the sha256 of every file the runtime will check
    (``check_files``); each graph entry gains its files' digests."""
    precision = o.precision
    for g in graphs.values():
        g["sha256"] = {f: file_sha256(engine_dir / f) for f in [g["file"], *g["external_data"]]}
    return {
        "format": FORMAT, "format_version": FORMAT_VERSION, "densert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": exporter,
        "target": o.target, "precision": precision, "io_float_dtype": NAMES[float_type(precision)],
        "precision_policy": precision_policy,
        "weight_formats": weight_formats,
        "int4_block": o.int4_block if precision == "int4" else None,
        "cache_layout": o.cache_layout, **budget, "attention_chunk_bytes": o.attention_chunk_mib << 20,
        "tasks": {t: ({"groups": groups[t]["groups"], "labels": groups[t].get("labels"),
                       "output": f"scores_{t}"} if t in groups else {}) for t in o.tasks},
        "checkpoint": {"path": str(model_dir.resolve()), **identity},
        "config": config,
        "files": {f: file_sha256(engine_dir / f) for f in side_files},
        "sizes": sizes,
        "tied_table": tied_table,
        "graphs": graphs,
    }


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
    _check_fields(m, path, d)
    for g, info in m["graphs"].items():
        for f in [info["file"], *info.get("external_data", [])]:
            if not (d / f).is_file():
                raise EngineError(f"engine dir {d} is missing {f} (graph {g!r} listed in {MANIFEST}); "
                                  f"{_rebuild_hint(d, None, m)}")
    return m


# What the runtime reads from a manifest, with its JSON type: a manifest that passes its integrity
# hash (it can be recomputed by hand) is still checked for these before any of them is used.
FIELDS = {"precision": str, "cache_layout": str, "io_float_dtype": str, "max_patches": int,
          "max_window_slots": int, "grids": list, "tasks": dict, "checkpoint": dict,
          "files": dict, "tied_table": dict, "graphs": dict}
GRAPHS = ("vision", "llm")
GRAPH_FIELDS = {"file": str, "external_data": list, "inputs": list, "outputs": list,
                "sha256": dict}
CHECKPOINT_FIELDS = {"config_sha256": str, "checkpoint_id": str, "files": dict}


def _check_fields(m: dict, path: Path, d: Path) -> None:
    def need(obj, fields, where):
        for k, t in fields.items():
            if not isinstance(obj.get(k), t) or isinstance(obj.get(k), bool):
                got = "missing" if k not in obj else f"a {type(obj[k]).__name__}"
                raise EngineError(f"{path}: {where}{k!r} is {got}, expected a JSON "
                                  f"{ {str: 'string', int: 'integer', list: 'list', dict: 'object'}[t]}; "
                                  f"the manifest is damaged: {_rebuild_hint(d, None, m)}")
    need(m, FIELDS, "")
    need(m["checkpoint"], CHECKPOINT_FIELDS, "checkpoint.")
    for g in GRAPHS:
        if not isinstance(m["graphs"].get(g), dict):
            raise EngineError(f"{path}: no graph {g!r} in 'graphs'; the manifest is damaged: "
                              f"{_rebuild_hint(d, None, m)}")
    for g, info in m["graphs"].items():
        if not isinstance(info, dict):
            raise EngineError(f"{path}: graphs.{g} is not an object; the manifest is damaged: "
                              f"{_rebuild_hint(d, None, m)}")
        need(info, GRAPH_FIELDS, f"graphs.{g}.")
    if m["max_patches"] < 1:
        raise EngineError(f"{path}: max_patches {m['max_patches']} must be >= 1; "
                          f"{_rebuild_hint(d, None, m)}")


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
        wanted = ",".join(sorted(set(m["tasks"]) | set(missing)))
        raise EngineError(f"engine dir {engine_dir} was exported for tasks {sorted(m['tasks'])}, not "
                          f"{missing}; re-run `densert export ... --tasks {wanted}`")


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
