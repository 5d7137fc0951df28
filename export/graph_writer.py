"""One engine graph (``<stem>.onnx`` + ``<stem>.onnx.data``), written part by part.

A graph is built from parts: a traced module (one decoder layer, one ViT layer, the embedding
or the head) or a few nodes written directly (the tied lm_head). Each part is rewritten and its
weights are streamed into the data file before the next part exists, so export memory is that of
one layer whatever the depth (the ONNX Runtime GenAI model builder's way). Per part:

1. ``densert::ChunkedAttention`` nodes become Loops (``attention_onnx``);
2. quantized precisions: every MatMul / Gemm whose weight is a 2-D constant gets
   ``DequantizeLinear(q, s) -> MatMul`` (tensorrt target), or an int8 GEMM / ``MatMulNBits``
   (onnxruntime target, ``_layout``; ``quantize`` holds the formats and the policy);
3. names inside the part get the part's prefix (the tracer names every part alike); the names
   of the part's inputs and outputs are the graph's own, so parts connect by name;
4. every initializer is streamed into ``<stem>.onnx.data`` at a page-aligned offset (so ONNX
   Runtime can map it, and the runtime can read the tied lm_head / embedding table straight from
   it: ``tied_table``).

``finish`` puts the graph inputs in the manifest's order (the tracer drops inputs a part never
reads) and saves the weight-free graph beside its data.
"""
from __future__ import annotations

import ctypes
import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from densert.errors import EngineError

from . import quantize as Q
from .attention_onnx import expand_chunked_attention, op_types
from .onnx_types import FLOAT, FLOAT16, FLOAT_FORMATS, INT4, INT8, ONNX_TYPES, UINT8

ALIGN = 4096
INLINE_BYTES = 1024           # smaller tensors stay inside the .onnx file
QUANT_OPSET = 21              # blocked DequantizeLinear
_EXTERNAL = 1


@dataclass
class WrittenGraph:
    files: list[str]
    ops: list[str]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> location in .data
    table: dict[str, Any] | None = None   # the tied lm_head table: format, layout, tensors
    part_bytes: dict[str, int] = field(default_factory=dict)           # bytes in .data per part kind


def source_array(t, src_dir: Path | None) -> np.ndarray:
    """An initializer's values: a read-only memmap of its external data, or its inline data."""
    from onnx import helper, numpy_helper
    if t.data_location != _EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    return np.memmap(src_dir / info["location"], dtype=dt, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(t.dims))


class GraphBuilder:
    """Accumulates one graph from parts; see the module docstring.

    ``precision`` / ``part`` (the policy part of this graph's weights: 'vision' or 'llm') /
    ``block`` / ``policy`` choose the weight formats; ``float_type`` is the graph's float type."""

    def __init__(self, out_dir: Path, stem: str, *, precision: str, part: str, float_type: int,
                 block: int = Q.INT4_BLOCK, policy: dict[str, str] | None = None,
                 target: str = "onnxruntime", ort_matmul: str = "int8-gemm"):
        self.out_dir, self.stem = Path(out_dir), stem
        self.precision, self.part, self.float_type = precision, part, float_type
        self.block, self.policy, self.target, self.ort_matmul = block, policy, target, ort_matmul
        from onnx import GraphProto
        # Parts are copied into this graph: a protobuf message lives in its part's arena, and
        # holding one node of a part would keep all of that part's weight bytes alive.
        self.graph = GraphProto()
        self.outputs: dict[str, Any] = {}         # graph output name -> ValueInfoProto
        self.opsets: dict[str, int] = {}
        self.locations: dict[str, dict[str, Any]] = {}
        self.part_bytes: dict[str, int] = {}
        self.table: dict[str, Any] | None = None
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.data_name = f"{stem}.onnx.data"
        self._f = open(self.out_dir / self.data_name, "wb")
        self._prefixes: set[str] = set()

    @property
    def quantized(self) -> bool:
        return self.precision in Q.QUANTIZED_PRECISIONS

    # ---- parts
    def add(self, model, prefix: str, *, keep: set[str], outputs: list[str] = (),
            src_dir: Path | None = None, sources: dict[str, Any] | None = None,
            kind: str | None = None, table: str | None = None) -> None:
        """Append one part (an onnx ModelProto, edited in place).

        ``keep``: the graph-level names the part reads or writes (left unprefixed); ``outputs``:
        those that are graph outputs; ``sources``: {initializer name: array-like} for
        placeholders whose values come from elsewhere (the tied table, read from the
        checkpoint); ``kind``: the size-report bucket ('decoder', 'table', 'vision', ...);
        ``table``: the name of the tied lm_head initializer, if the part holds it."""
        if prefix in self._prefixes:
            raise EngineError(f"export: part prefix {prefix!r} used twice in {self.stem}.onnx")
        self._prefixes.add(prefix)
        sources = dict(sources or {})

        def source(t, name=None):   # name: the one it had before prefixing
            name = name or t.name
            return sources[name] if name in sources else source_array(t, src_dir)

        _constants_to_initializers(model)
        expand_chunked_attention(model, self.float_type)
        producers: dict[str, Callable[[], Any]] = {}
        if self.quantized:
            tinfo = _quantize_weights(model, source, producers, self.precision, self.part,
                                      self.block, table, self.policy, target=self.target,
                                      ort_matmul=self.ort_matmul)
        else:
            tinfo = ({"format": FLOAT_FORMATS[self.float_type], "layout": "vd", "tensors": {"weight": table}}
                     if table else None)
        _prefix_names(model.graph, f"{prefix}/", keep | {""})
        if tinfo is not None:
            tinfo["tensors"] = {k: f"{prefix}/{v}" for k, v in tinfo["tensors"].items()}
            self.table = tinfo
        producers = {f"{prefix}/{k}": v for k, v in producers.items()}
        renamed = {f"{prefix}/{k}": v for k, v in sources.items()}
        g = model.graph
        for t in g.initializer:
            if t.name in producers:
                arr = producers[t.name]()
            elif t.name in renamed:
                arr = renamed[t.name]
            else:
                arr = source_array(t, src_dir)
            n = self._append(t, arr)
            bucket = kind or self.part
            if tinfo is not None and t.name in tinfo["tensors"].values():
                bucket = "table"
            self.part_bytes[bucket] = self.part_bytes.get(bucket, 0) + n
            del arr
        self.graph.node.extend(g.node)
        self.graph.initializer.extend(g.initializer)
        for o in g.output:
            if o.name in outputs:
                self.outputs[o.name] = type(o)()
                self.outputs[o.name].CopyFrom(o)
        for o in model.opset_import:
            d = o.domain or ""
            self.opsets[d] = max(self.opsets.get(d, 0), o.version)
        _trim_heap()

    def add_raw(self, name: str, arr: np.ndarray, kind: str) -> dict[str, Any]:
        """Bytes in the data file that no graph node reads (the runtime maps them itself)."""
        from onnx import helper
        t = placeholder(name, helper.np_dtype_to_tensor_dtype(arr.dtype), list(arr.shape))
        n = self._append(t, arr, inline=False)
        self.part_bytes[kind] = self.part_bytes.get(kind, 0) + n
        return self.locations.pop(name)

    def finish(self, inputs: list[dict[str, Any]], output_order: list[str]) -> WrittenGraph:
        """Save ``<stem>.onnx``: graph inputs in the order of ``inputs`` (specs from the
        manifest), outputs in ``output_order``."""
        import onnx
        from onnx import helper
        self._f.close()
        missing = [o for o in output_order if o not in self.outputs]
        if missing:
            raise EngineError(f"export: {self.stem}.onnx has no part producing {missing}")
        graph = self.graph
        graph.name = self.stem
        graph.output.extend(self.outputs[o] for o in output_order)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v)
                                                        for d, v in sorted(self.opsets.items())])
        model.ir_version = 8
        _restore_inputs(model, inputs)
        if self.quantized:
            _set_opset(model, QUANT_OPSET)
        onnx.save_model(model, str(self.out_dir / f"{self.stem}.onnx"))
        onnx.checker.check_model(str(self.out_dir / f"{self.stem}.onnx"))
        table = self.table
        if table is not None:
            table = {**table, "file": self.data_name,
                     "tensors": {k: self.locations[v] for k, v in table["tensors"].items()}}
        return WrittenGraph([f"{self.stem}.onnx", self.data_name], sorted(op_types(model.graph)),
                            self.locations, table, dict(self.part_bytes))

    def close(self) -> None:
        if not self._f.closed:
            self._f.close()

    # ---- writing
    def _append(self, t, arr, inline: bool = True) -> int:
        """Stream one initializer's values into the data file (page-aligned) or inline it;
        returns its bytes. ``arr`` may be a lazy array (the checkpoint's table): it is read
        64 MiB at a time."""
        from onnx import helper
        if t.data_type == INT4:
            raw = Q.pack_int4(np.asarray(arr))
        elif isinstance(arr, np.ndarray):
            raw = np.ascontiguousarray(arr, dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
        else:
            raw = arr
        dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type)) if t.data_type != INT4 else np.dtype(np.uint8)
        nbytes = int(np.prod(raw.shape)) * dt.itemsize
        t.ClearField("raw_data")
        for fld in ("float_data", "int32_data", "int64_data", "double_data"):
            t.ClearField(fld)
        del t.external_data[:]
        if inline and nbytes < INLINE_BYTES:
            t.data_location = 0
            t.raw_data = np.ascontiguousarray(raw, dtype=dt).tobytes()
            return nbytes
        f = self._f
        f.seek(0, 2)
        off = -(-f.tell() // ALIGN) * ALIGN
        f.seek(off)
        if raw.ndim >= 2 and not isinstance(raw, np.ndarray):
            rows = max(1, (64 << 20) // max(1, nbytes // raw.shape[0]))
            for a in range(0, raw.shape[0], rows):
                f.write(np.ascontiguousarray(raw[a:a + rows], dtype=dt).tobytes())
        else:
            flat = np.asarray(raw).reshape(-1)
            step = (64 << 20) // max(flat.itemsize, 1)   # a memmapped source is copied 64 MiB at a time
            for a in range(0, flat.size, step):
                f.write(np.ascontiguousarray(flat[a:a + step], dtype=dt).tobytes())
        t.data_location = _EXTERNAL
        for key, val in (("location", self.data_name), ("offset", str(off)), ("length", str(nbytes))):
            e = t.external_data.add()
            e.key, e.value = key, val
        self.locations[t.name] = {"offset": off, "length": nbytes,
                                  "dtype": "int4" if t.data_type == INT4 else dt.name,
                                  "shape": list(t.dims)}
        return nbytes


@functools.lru_cache(maxsize=1)
def _malloc_trim():
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _trim_heap() -> None:
    """Give the heap a written part freed back to the OS. glibc keeps freed pages of a
    fragmented heap, so without this the export's peak grew with depth (12 vs 4 decoder layers of
    the real widths: +1.2 GiB); with it the RSS after each layer stays flat. No-op off glibc."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def _prefix_names(g, prefix: str, keep: set[str]) -> None:
    """Prefix every value, initializer and node name of ``g`` and its subgraphs, except ``keep``."""
    from onnx import helper

    def r(name: str) -> str:
        return name if name in keep else prefix + name

    for t in g.initializer:
        t.name = r(t.name)
    for coll in (g.input, g.output, g.value_info):
        for v in coll:
            v.name = r(v.name)
    for n in g.node:
        n.name = prefix + (n.name or n.op_type)
        n.input[:] = [r(i) for i in n.input]
        n.output[:] = [r(o) for o in n.output]
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            for sub in (v if isinstance(v, list) else [v]):
                if hasattr(sub, "node"):
                    _prefix_names(sub, prefix, keep)


def _constants_to_initializers(model) -> None:
    """Constant nodes holding tensors (the tracer stores big ones as external data too) become
    initializers, so every weight is streamed by one writer."""
    g = model.graph
    keep = []
    for n in g.node:
        attrs = {a.name: a for a in n.attribute}
        if n.op_type == "Constant" and "value" in attrs and attrs["value"].t.dims:
            t = attrs["value"].t
            t.name = n.output[0]
            g.initializer.append(t)
        else:
            keep.append(n)
    del g.node[:]
    g.node.extend(keep)


# ---------------------------------------------------------------- inputs
def _restore_inputs(model, inputs: list[dict[str, Any]]) -> None:
    """The tracer drops inputs the graph never reads (e.g. image_segment_ids of a tower without
    a full-attention layer). Put them back, in order, so every engine has one interface."""
    from onnx import helper
    have = {i.name: i for i in model.graph.input}
    ordered = [have[s["name"]] if s["name"] in have else
               helper.make_tensor_value_info(s["name"], ONNX_TYPES[s["dtype"]], s["shape"])
               for s in inputs]
    extra = [i for i in model.graph.input if i.name not in {s["name"] for s in inputs}]
    del model.graph.input[:]
    model.graph.input.extend(ordered + extra)


def _set_opset(model, version: int) -> None:
    """Raise the default-domain opset (blocked DequantizeLinear is opset 21). Only ReduceMean
    changed meaning on the way for the ops densert exports (axes became an input in 18)."""
    from onnx import helper, numpy_helper
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            o.version = max(o.version, version)
    for g in _graphs(model.graph):
        for n in g.node:
            if n.op_type in ("ReduceMean", "ReduceMax", "ReduceMin", "ReduceProd", "ReduceL2") and \
                    any(a.name == "axes" for a in n.attribute):
                axes = [helper.get_attribute_value(a) for a in n.attribute if a.name == "axes"][0]
                keep = [a for a in n.attribute if a.name != "axes"]
                del n.attribute[:]
                n.attribute.extend(keep)
                name = f"{n.name or n.output[0]}/axes"
                model.graph.initializer.append(numpy_helper.from_array(np.array(axes, np.int64), name))
                n.input.append(name)
    if model.ir_version < 10:
        model.ir_version = 10   # INT4 tensors; ONNX Runtime 1.31 reads up to 13


def _graphs(g):
    from onnx import helper
    yield g
    for n in g.node:
        for a in n.attribute:
            v = helper.get_attribute_value(a)
            for sub in (v if isinstance(v, list) else [v]):
                if hasattr(sub, "node"):
                    yield from _graphs(sub)


# ---------------------------------------------------------------- quantization
def _quantize_weights(model, source, producers, precision, part, block, table_name, policy,
                      target: str = "tensorrt", ort_matmul: str = "int8-gemm"):
    """Rewrite MatMul/Gemm on constant weights to DequantizeLinear -> MatMul [+ Add], or, for
    the onnxruntime ``target`` (``_layout``), to ``com.microsoft.DynamicQuantizeMatMul`` (int8
    GEMM, its bias fused; int4 weights per column, widened by a Cast) and the int4 tied table to
    ``com.microsoft.MatMulNBits`` in its own layout (``quantize.matmulnbits_weight``).

    2-D weights take the part's format. 3-D weights (MLA's absorbed kv_b halves, [heads, K, N],
    one batched MatMul, the value half inside the attention Loop) take int8 with a scale per
    last-axis column: blocked int4 and multi-axis scales are not in TensorRT's weight-only
    patterns. The DequantizeLinear of a weight read inside a Loop body is placed in the outer
    graph (the body sees outer values), so the body is unchanged but for its weight's name.

    ``source(initializer, name)`` gives a weight's values; ``producers`` receives, per new
    initializer, a callable that quantizes on demand (the writer calls it when it reaches that
    tensor). int4 block scales are stored fp16 (half the bytes of fp32) and widened by a Cast that
    ONNX Runtime folds at load, so its DequantizeLinear -> MatMul fusion into MatMulNBits sees a
    constant fp32 scale. Returns the tied table's entry when ``table_name`` is among the weights."""
    from onnx import helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    dq_nodes, replaced, table = [], {}, None
    # Loop bodies first: rewriting a graph copies its nodes, bodies included.
    for sub in reversed(list(_graphs(g))):
        new_nodes = []
        for n in sub.node:
            w = n.input[1] if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
            t = inits.get(w)
            attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
            usable = (t is not None and len(t.dims) in (2, 3) and t.data_type in (FLOAT, FLOAT16)
                      and not w.startswith("subset_") and int(np.prod(t.dims)) >= 4096
                      and (n.op_type == "MatMul" or (len(t.dims) == 2 and attrs.get("alpha", 1.0) == 1.0
                                                     and not attrs.get("transA"))))
            if not usable:
                new_nodes.append(n)
                continue
            transpose = n.op_type == "Gemm" and bool(attrs.get("transB"))
            k = t.dims[-1] if transpose else t.dims[-2]
            fmt = Q.weight_format(precision, "table" if w == table_name else part, policy)
            if fmt is None:        # this part stays float under the policy
                new_nodes.append(n)
                if w == table_name:
                    table = {"format": FLOAT_FORMATS[t.data_type], "layout": "vd", "tensors": {"weight": w}}
                continue
            layout = _layout(target, ort_matmul, fmt, w == table_name, len(t.dims))
            blk = Q.int4_block_for(k, block) if fmt == "int4" and len(t.dims) == 2 else None
            if fmt == "int4" and blk is None and layout != "qgemm":   # (per column: any K)
                fmt = "int8"   # batched, or K not a whole number of any block (small test widths)
                layout = _layout(target, ort_matmul, fmt, w == table_name, len(t.dims))
            qn, sn = f"{w}_q{fmt[3:]}", f"{w}_scale"
            if w not in replaced:
                replaced[w] = (qn, sn, fmt, transpose, blk, layout)
                scale_in = sn
                if layout == "qgemm" and fmt == "int4":   # int4 -> int8, folded once at load
                    dq_nodes.append(helper.make_node("Cast", [qn], [f"{qn}_i8"], name=f"{w}/widen", to=INT8))
                elif fmt == "int4":
                    scale_in = f"{sn}_f32"
                    dq_nodes.append(helper.make_node("Cast", [sn], [scale_in], name=f"{w}/scale", to=FLOAT))
                if layout == "dq":
                    dq_nodes.append(helper.make_node(
                        "DequantizeLinear", [qn, scale_in], [f"{w}_dq"], name=f"{w}/dq",
                        axis=len(t.dims) - 1 if fmt == "int8" else 0,
                        **({"block_size": blk} if fmt == "int4" else {})))
            y = n.output[0]
            bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] else None
            if bias is not None and bias in inits and not np.asarray(source(inits[bias])).any():
                bias = None   # a zero bias only chose Gemm over Transpose+MatMul
            mm_out = y if bias is None else f"{y}_nobias"
            if layout == "qgemm":
                wq = f"{qn}_i8" if fmt == "int4" else qn
                new_nodes.append(helper.make_node(
                    "DynamicQuantizeMatMul", [n.input[0], wq, sn, "", bias or ""], [y], name=f"{n.name}/mm",
                    domain="com.microsoft"))
                bias = None
            elif layout == "nbits":
                kn = (t.dims[1], t.dims[0]) if transpose else tuple(t.dims)
                new_nodes.append(helper.make_node(
                    "MatMulNBits", [n.input[0], qn, f"{sn}_f32"], [mm_out], name=f"{n.name}/mm",
                    domain="com.microsoft", K=kn[0], N=kn[1], bits=4, block_size=blk,
                    accuracy_level=Q.NBITS_ACCURACY_LEVEL))
            else:
                new_nodes.append(helper.make_node("MatMul", [n.input[0], f"{w}_dq"], [mm_out], name=f"{n.name}/mm"))
            if bias is not None:
                new_nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{n.name}/bias"))
            if w == table_name:
                table = {"format": fmt, "layout": "nbits" if layout == "nbits" else "dv", "block": blk,
                         "tensors": {"weight": qn, "scale": sn}}
        del sub.node[:]
        sub.node.extend(new_nodes)
    # Dequantization reads initializers only: first in the graph, before any consumer.
    nodes = dq_nodes + list(g.node)
    del g.node[:]
    g.node.extend(nodes)
    if any(r[5] in ("nbits", "qgemm") for r in replaced.values()) and \
            not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for sub in _graphs(g) for node in sub.node for i in node.input}
    kept = []
    for t in g.initializer:
        if t.name in replaced:
            qn, sn, fmt, transpose, blk, layout = replaced[t.name]
            dims = [t.dims[1], t.dims[0]] if transpose else list(t.dims)
            cache: dict[str, Any] = {}

            def make(src=t, name=t.name, fmt=fmt, transpose=transpose, dims=dims, blk=blk,
                     layout=layout, cache=cache):
                if not cache:
                    a = source(src, name)
                    a = a.T if transpose else a
                    if layout == "qgemm" and fmt == "int4":
                        cache["q"], cache["s"] = Q.quantize_int4_columns(a)
                    elif len(dims) == 3:     # per last-axis column over all heads
                        q, s = Q.quantize(np.asarray(a, dtype=np.float32).reshape(-1, dims[-1]), fmt)
                        cache["q"], cache["s"] = q.reshape(dims), s
                    else:
                        cache["q"], cache["s"] = Q.quantize(a, fmt, blk)
                    if layout == "nbits":   # per output column: [N, K / blk, blk / 2] and [N * K / blk]
                        cache["q"] = Q.matmulnbits_weight(cache["q"], blk)
                        cache["s"] = np.ascontiguousarray(cache["s"].T).reshape(-1)
                return cache

            producers[qn] = lambda make=make: make().pop("q")
            producers[sn] = lambda make=make: make().pop("s")
            k, n_out = dims[-2], dims[-1]
            if layout == "qgemm":
                kept.append(placeholder(qn, INT8 if fmt == "int8" else INT4, dims))
                kept.append(placeholder(sn, FLOAT, [n_out]))
            elif layout == "nbits":
                kept.append(placeholder(qn, UINT8, [n_out, k // blk, blk // 2]))
                kept.append(placeholder(sn, FLOAT16, [n_out * (k // blk)]))
            else:
                kept.append(placeholder(qn, INT8 if fmt == "int8" else INT4, dims))
                scale_dims = [dims[-1]] if fmt == "int8" else [dims[0] // blk, dims[1]]
                kept.append(placeholder(sn, FLOAT if fmt == "int8" else FLOAT16, scale_dims))
        elif t.name in used:
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    return table


def _layout(target: str, ort_matmul: str, fmt: str, is_table: bool, rank: int) -> str:
    """How a quantized weight is written. tensorrt: ``dq`` (standard DequantizeLinear -> MatMul).
    onnxruntime: the int4 tied table (read one row at a time, memory-bound) as ``nbits``
    (MatMulNBits, blocks along K); with ``ort_matmul`` "int8-gemm" the other 2-D weights as
    ``qgemm``: int8 (or int4 per output column, widened to int8 by a Cast ONNX Runtime folds at
    load) into DynamicQuantizeMatMul, whose int8 GEMM (VNNI / AMX) is several times faster than
    MatMulNBits on prompts; with "nbits" int4 ones as MatMulNBits too and int8 ones as ``dq``."""
    if target != "onnxruntime" or rank != 2:
        return "dq"
    if is_table or ort_matmul == "nbits":
        return "nbits" if fmt == "int4" else "dq"
    return "qgemm"


def placeholder(name, data_type, dims):
    from onnx import TensorProto
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(dims)
    return t
