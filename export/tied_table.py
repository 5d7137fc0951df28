"""The tied lm_head / embedding table of an engine directory, read on the host from the one copy
the LLM graph holds (``llm.onnx.data``; the manifest's ``tied_table`` says where and how).

The LLM graph uses the table as its lm_head; the runtime needs its rows too: the embedding of
each prompt token (the graph takes ``inputs_embeds``), and the depth-bin / class rows of the
dense head. Rows are read by memory-mapping the file for the duration of one call, so only the
pages of the requested rows are touched, and dequantized to fp32 exactly as the graph's
DequantizeLinear does.

Layouts: ``vd`` = [V, d] rows (float tables, the lm_head as Gemm(transB=1)); ``dv`` = [d, V]
(quantized tables of the tensorrt target: DequantizeLinear -> MatMul needs K = d first; int8 one
scale per vocab column, int4 in blocks of ``block`` along d, two values per byte); ``nbits`` =
MatMulNBits' [V, d / block, block / 2] (the onnxruntime target's int4 table: each row's bytes
together, unsigned nibbles with zero point 8, fp16 scales [V, d / block]).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from densert.errors import EngineError


class TiedTable:
    """[V, d] rows on demand. Implements the part of the tensor API ``subset_weight`` uses
    (``dim``, ``shape``, ``device``, ``index_select``), so the dense head takes it as is."""

    device = torch.device("cpu")

    def __init__(self, engine_dir: str | Path, info: dict[str, Any], vocab_size: int, hidden: int):
        self.path = Path(engine_dir) / info["file"]
        self.format, self.layout = info["format"], info["layout"]
        self.block = info.get("block")
        self.tensors = info["tensors"]
        self.shape = torch.Size([vocab_size, hidden])
        # Rows of the baked task heads, exact (quantized tables keep them beside the table).
        self.head = info.get("head_rows")
        self.head_ids = {int(i): k for k, i in enumerate(self.head["ids"])} if self.head else {}
        if not self.path.is_file():
            raise EngineError(f"engine dir {engine_dir}: the tied table's file {info['file']} is missing; re-run "
                              "`densert export` into this directory")

    def dim(self) -> int:
        return 2

    def _map(self, key: str, dtype, shape, entry=None):
        t = entry or self.tensors[key]
        dt = np.dtype(t.get("dtype", dtype)) if t.get("dtype") not in (None, "int4") else dtype
        return np.memmap(self.path, dtype=dt, mode="r", offset=t["offset"], shape=tuple(shape))

    def rows(self, ids) -> np.ndarray:
        """float32 [n, d] rows of the given token ids."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        V, d = self.shape
        if ids.size and (ids.min() < 0 or ids.max() >= V):
            raise EngineError(f"token id out of range [0, {V}) for the tied table of {self.path.parent}")
        out = self._table_rows(ids)
        exact = [k for k, i in enumerate(ids.tolist()) if i in self.head_ids]
        if exact:
            h = self._map("head_rows", np.float32, (len(self.head_ids), d), self.head)
            out[exact] = h[[self.head_ids[int(ids[k])] for k in exact]]
            del h
        return out

    def _table_rows(self, ids: np.ndarray) -> np.ndarray:
        V, d = self.shape
        if self.layout == "vd":
            w = self._map("weight", np.dtype(self.format.replace("fp", "float")), (V, d))
            out = np.asarray(w[ids], dtype=np.float32)
        elif self.format == "int8":
            w = self._map("weight", np.int8, (d, V))
            s = self._map("scale", np.float32, (V,))
            out = w[:, ids].T.astype(np.float32) * s[ids][:, None]
        elif self.layout == "nbits":   # MatMulNBits: uint8 [V, d / block, block / 2], zero point 8
            w = self._map("weight", np.uint8, (V, d // 2))
            s = self._map("scale", np.float16, (V, d // self.block))
            byte = np.asarray(w[ids], dtype=np.uint8)
            q = np.empty((ids.size, d), np.int8)
            q[:, 0::2], q[:, 1::2] = byte & 0x0F, byte >> 4
            scale = np.repeat(np.asarray(s[ids], dtype=np.float32), self.block, axis=1)
            out = (q.astype(np.float32) - 8) * scale
        else:   # int4 [d, V] packed row-major; element (k, v) is nibble k * V + v
            w = self._map("weight", np.uint8, (-(-d * V // 2),))
            s = self._map("scale", np.float32, (d // self.block, V))
            flat = np.arange(d, dtype=np.int64)[:, None] * V + ids[None, :]
            byte = np.asarray(w[flat // 2], dtype=np.uint8)
            q = np.where(flat % 2 == 0, byte & 0x0F, byte >> 4).astype(np.int8)
            q[q > 7] -= 16
            scale = np.repeat(np.asarray(s[:, ids], dtype=np.float32), self.block, axis=0)
            out = (q.astype(np.float32) * scale).T
        del w   # unmap: the pages of these rows leave the process
        return np.array(out, dtype=np.float32, order="C")

    def index_select(self, dim: int, index: torch.Tensor) -> torch.Tensor:
        if dim != 0:
            raise ValueError("TiedTable selects rows (dim 0) only")
        return torch.from_numpy(self.rows(index.cpu().numpy()))

