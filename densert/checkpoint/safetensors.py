"""The safetensors format, read and written directly: headers, tensors, dtypes.

The format (8-byte little-endian header length, JSON header, raw little-endian data) is read and
written here rather than through ``safetensors.torch`` because:
- writing streams one tensor at a time, so a full-width test checkpoint never exists twice in RAM;
- reading validates every header entry against the file size before any data is touched, which
  gives a precise error for truncated or corrupt files;
- reading with ``readinto`` (no mmap) keeps the page cache out of the process RSS, so loading
  peaks near the size of the weights themselves (see ``densert.checkpoint.loader``).
The files are byte-compatible with the ``safetensors`` library (tests read them with it). Which
files make up a checkpoint is ``model_dir.py``.
"""
from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from densert.errors import CheckpointError
from densert.model.config import DTYPES

MAX_HEADER_BYTES = 100 * 2**20

# safetensors dtype names <-> torch dtypes (the ones a checkpoint may hold).
ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U8": torch.uint8, "BOOL": torch.bool,
}
TORCH_TO_ST = {v: k for k, v in ST_DTYPES.items()}
# dtypes a model can be loaded in / written as.
WEIGHT_DTYPES = dict(zip(DTYPES, (torch.float32, torch.bfloat16, torch.float16)))


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        if dtype in WEIGHT_DTYPES.values():
            return dtype
    elif isinstance(dtype, str):
        key = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "half": "float16",
               "float": "float32"}.get(dtype, dtype).removeprefix("torch.")
        if key in WEIGHT_DTYPES:
            return WEIGHT_DTYPES[key]
    raise CheckpointError(f"dtype {dtype!r} is not supported; expected one of {sorted(WEIGHT_DTYPES)}")


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


# ---------------------------------------------------------------- reading headers
@dataclass(frozen=True)
class TensorInfo:
    name: str
    dtype: str                 # safetensors name, e.g. "BF16"
    shape: tuple[int, ...]
    begin: int                 # absolute file offsets
    end: int
    path: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return ST_DTYPES[self.dtype]


class MappedTensor:
    """One stored 2-D tensor as float32 rows on demand, through a read-only memory map: the
    exporter streams the 283k-row tied table from the checkpoint without holding it (numpy has
    no bfloat16; its bits are widened here). Supports ``shape``, ``ndim``, ``T`` and row
    indexing (slices or integer arrays), which is what the quantizer and the writer use."""

    ndim = 2

    def __init__(self, info: TensorInfo, rows: slice | None = None):
        import numpy as np
        if len(info.shape) != 2:
            raise CheckpointError(f"{info.path}: {info.name!r} is not 2-D")
        self.info = info
        raw = {"BF16": np.uint16, "F16": np.float16, "F32": np.float32}.get(info.dtype)
        if raw is None:
            raise CheckpointError(f"{info.path}: {info.name!r} has dtype {info.dtype}; expected a float")
        self._map = np.memmap(info.path, dtype=raw, mode="r", offset=info.begin, shape=info.shape)
        self.shape = tuple(info.shape)

    def __getitem__(self, key):
        import numpy as np
        part = np.asarray(self._map[key])
        if self.info.dtype == "BF16":
            return (part.astype(np.uint32) << 16).view(np.float32)
        return part.astype(np.float32)

    @property
    def T(self):
        return _TransposedRows(self)


class _TransposedRows:
    """``MappedTensor.T``: [d, V] whose column slices are row slices of the table."""

    ndim = 2

    def __init__(self, base: MappedTensor):
        self.base = base
        self.shape = base.shape[::-1]

    def __getitem__(self, key):
        rows, cols = key
        if rows != slice(None):
            raise IndexError("only whole columns of a transposed MappedTensor are read")
        return self.base[cols].T


def read_safetensors_header(path: str | Path) -> dict[str, TensorInfo]:
    """Parse and validate a safetensors header; raises CheckpointError naming the file."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{path}: {size} bytes, too short for a safetensors file "
                                      "(truncated or not safetensors)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise CheckpointError(f"{path}: header length field says {n} bytes but the file has "
                                      f"{size} bytes (corrupt or truncated safetensors header)")
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("header is not a JSON object")
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e}); "
                              "the file is corrupt") from None
    header.pop("__metadata__", None)
    data_start, data_len = 8 + n, size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, e in header.items():
        try:
            dt, shape, (b, en) = e["dtype"], tuple(int(s) for s in e["shape"]), e["data_offsets"]
            b, en = int(b), int(en)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: header entry {name!r} is malformed: {e!r}") from None
        if dt not in ST_DTYPES:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {dt!r}, which densert does not "
                                  f"read (supported: {sorted(ST_DTYPES)})")
        nbytes = math.prod(shape) * ST_DTYPES[dt].itemsize
        if any(s < 0 for s in shape) or not 0 <= b <= en or en - b != nbytes:
            raise CheckpointError(f"{path}: tensor {name!r} data_offsets [{b}, {en}] do not fit "
                                  f"dtype {dt} shape {list(shape)} ({nbytes} bytes); corrupt header")
        if en > data_len:
            raise CheckpointError(f"{path}: truncated: tensor {name!r} needs data bytes up to {en} "
                                  f"but the file holds only {data_len} after the header")
        out[name] = TensorInfo(name, dt, shape, data_start + b, data_start + en, path)
    _check_tiling(path, out, data_start, data_len)
    _reference_check(path)
    return out


def _check_tiling(path: Path, infos: dict[str, TensorInfo], data_start: int, data_len: int) -> None:
    """The tensors' data must tile the data section exactly, in offset order (what the
    safetensors format requires): an overlap would alias two weights, a gap hides bytes."""
    at, prev = 0, None
    for i in sorted(infos.values(), key=lambda i: (i.begin, i.end, i.name)):
        b = i.begin - data_start
        if b != at:
            what = "overlaps" if b < at else "leaves a gap after"
            raise CheckpointError(f"{path}: tensor {i.name!r} data starts at byte {b} and {what} "
                                  f"{'the header' if prev is None else repr(prev)} (ending at "
                                  f"{at}); corrupt header")
        at, prev = i.end - data_start, i.name
    if at != data_len:
        raise CheckpointError(f"{path}: {data_len - at} bytes after the last tensor's data; "
                              "corrupt or not a safetensors file")


def _reference_check(path: Path) -> None:
    """The safetensors library's own header validation on top of ours (overlapping or gapped
    offsets, ...): a file densert loads is one the reference implementation loads too."""
    from safetensors import SafetensorError, safe_open
    try:
        with safe_open(str(path), framework="pt"):
            pass
    except SafetensorError as e:
        raise CheckpointError(f"{path}: the safetensors library rejects this file ({e}); it is "
                              "corrupt") from None


# ---------------------------------------------------------------- writing
def write_safetensors(path: Path, specs: list[tuple[str, torch.dtype, tuple[int, ...]]],
                      produce: Callable[[str], torch.Tensor],
                      on_tensor: Callable[[int], None] | None = None) -> None:
    """Write ``specs`` (name, dtype, shape) in order, asking ``produce(name)`` for one tensor at a
    time; the header is fixed up front from the specs and each tensor is checked against it."""
    header: dict = {"__metadata__": {"format": "pt"}}
    off = 0
    for name, dt, shape in specs:
        nbytes = math.prod(shape) * dt.itemsize
        header[name] = {"dtype": TORCH_TO_ST[dt], "shape": list(shape), "data_offsets": [off, off + nbytes]}
        off += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)   # data starts 8-byte aligned, as the reference writer does
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for name, dt, shape in specs:
            t = produce(name)
            if t.dtype != dt or tuple(t.shape) != tuple(shape):
                raise RuntimeError(f"{name}: produced {t.dtype} {tuple(t.shape)}, planned {dt} {shape}")
            f.write(t.detach().cpu().contiguous().view(torch.uint8).numpy().data)
            if on_tensor:
                on_tensor(t.numel() * t.element_size())
    tmp.replace(path)
