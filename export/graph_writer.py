"""From the tracer's ONNX file to the engine directory's ``<stem>.onnx`` + ``<stem>.onnx.data``.

One pass per graph, one tensor in memory at a time (a 4B checkpoint's graphs do not fit twice):

1. ``densert::ChunkedAttention`` nodes become Loops (``attention_onnx``);
2. inputs the tracer dropped are put back, in the manifest's order;
3. quantized precisions: every MatMul / Gemm whose weight is a 2-D constant gets
   ``DequantizeLinear(q, s) -> MatMul`` (``quantize`` holds the formats and the policy);
4. every initializer is streamed into ``<stem>.onnx.data`` at a page-aligned offset (so ONNX
   Runtime can map it, and the runtime can read the tied lm_head / embedding table straight from
   it: ``tied_table``), and the weight-free graph is saved beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from densert.errors import EngineError

from . import quantize as Q
from .attention_onnx import expand_chunked_attention, op_types

ALIGN = 4096
INLINE_BYTES = 1024           # smaller tensors stay inside the .onnx file
_FLOAT, _INT8, _FLOAT16, _INT4 = 1, 3, 10, 22
_FLOAT_NAMES = {_FLOAT: "fp32", _FLOAT16: "fp16"}
_EXTERNAL = 1


@dataclass
class WrittenGraph:
    files: list[str]
    ops: list[str]
    tensors: dict[str, dict[str, Any]] = field(default_factory=dict)   # name -> location in .data
    table: dict[str, Any] | None = None   # the tied lm_head table: format, layout, tensors


def source_array(t, src_dir: Path) -> np.ndarray:
    """An initializer's values: a read-only memmap of its external data, or its inline data."""
    from onnx import helper, numpy_helper
    if t.data_location != _EXTERNAL:
        return numpy_helper.to_array(t)
    info = {e.key: e.value for e in t.external_data}
    dt = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    return np.memmap(src_dir / info["location"], dtype=dt, mode="r", offset=int(info.get("offset", 0)),
                     shape=tuple(t.dims))


def finalize_graph(onnx_path: Path, out_dir: Path, stem: str, inputs: list[dict[str, Any]], *,
                   precision: str, part: str, float_type: int, block: int = Q.INT4_BLOCK,
                   table_shape: tuple[int, int] | None = None,
                   policy: dict[str, str] | None = None,
                   input_source: dict[str, Any] | None = None) -> WrittenGraph:
    """Rewrite and save the tracer's graph at ``onnx_path`` as ``out_dir/<stem>.onnx``.

    ``part`` ('vision' / 'llm') picks the quantization policy of the graph's weights;
    ``table_shape`` (V, d) marks the tied lm_head weight (its own policy and manifest entry);
    ``input_source`` {name, file, dtype, shape} turns a traced graph input into an initializer
    whose values are the raw file ``file`` beside ``onnx_path``."""
    import onnx
    model = onnx.load(str(onnx_path), load_external_data=False)
    src_dir = onnx_path.parent
    _constants_to_initializers(model)
    if input_source is not None:
        _input_to_initializer(model, input_source)
    expand_chunked_attention(model, float_type)
    _restore_inputs(model, inputs)
    producers: dict[str, Callable[[], np.ndarray]] = {}
    table = None
    if precision in Q.QUANTIZED_PRECISIONS:
        table = _quantize_weights(model, src_dir, producers, precision, part, block, table_shape,
                                  policy)
        _set_opset(model, 21)
    else:
        name = _table_initializer(model, table_shape) if table_shape is not None else None
        table = {"format": precision, "layout": "vd", "tensors": {"weight": name}} if name else None
    written = _write(model, src_dir, out_dir, stem, producers)
    onnx.checker.check_model(str(out_dir / f"{stem}.onnx"))
    if table is not None:
        table = {**table, "file": f"{stem}.onnx.data",
                 "tensors": {k: written[v] for k, v in table["tensors"].items()}}
    return WrittenGraph([f"{stem}.onnx", f"{stem}.onnx.data"], sorted(op_types(model.graph)),
                        written, table)


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


def _input_to_initializer(model, src: dict[str, Any]) -> None:
    from onnx import helper
    g = model.graph
    keep = [i for i in g.input if i.name != src["name"]]
    del g.input[:]
    g.input.extend(keep)
    t = _placeholder(src["name"], helper.np_dtype_to_tensor_dtype(np.dtype(src["dtype"])), src["shape"])
    t.data_location = _EXTERNAL
    for key, val in (("location", src["file"]), ("offset", "0")):
        e = t.external_data.add()
        e.key, e.value = key, val
    g.initializer.append(t)


# ---------------------------------------------------------------- inputs
_ONNX_TYPES = {"float32": 1, "int64": 7, "int32": 6, "float16": 10, "bool": 9}


def _restore_inputs(model, inputs: list[dict[str, Any]]) -> None:
    """The tracer drops inputs the graph never reads (e.g. image_segment_ids of a tower without
    a full-attention layer). Put them back, in order, so every engine has one interface."""
    from onnx import helper
    have = {i.name: i for i in model.graph.input}
    ordered = [have[s["name"]] if s["name"] in have else
               helper.make_tensor_value_info(s["name"], _ONNX_TYPES[s["dtype"]], s["shape"])
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
def _table_initializer(model, shape) -> str:
    hits = [t.name for t in model.graph.initializer if tuple(t.dims) == tuple(shape)]
    if len(hits) != 1:
        raise EngineError(f"export: expected one lm_head table of shape {list(shape)} in the LLM "
                          f"graph, found {hits}")
    return hits[0]


def _quantize_weights(model, src_dir, producers, precision, part, block, table_shape, policy):
    """Rewrite MatMul/Gemm on 2-D constant weights to DequantizeLinear -> MatMul [+ Add]."""
    from onnx import helper
    g = model.graph
    inits = {t.name: t for t in g.initializer}
    table_name = _table_initializer(model, table_shape) if table_shape is not None else None
    new_nodes, replaced, table = [], {}, None
    for n in g.node:
        w = n.input[1] if n.op_type in ("MatMul", "Gemm") and len(n.input) > 1 else None
        t = inits.get(w)
        attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
        usable = (t is not None and len(t.dims) == 2 and t.data_type in (_FLOAT, _FLOAT16)
                  and not w.startswith("subset_") and t.dims[0] * t.dims[1] >= 4096
                  and (n.op_type == "MatMul" or (attrs.get("alpha", 1.0) == 1.0 and not attrs.get("transA"))))
        if not usable:
            new_nodes.append(n)
            continue
        transpose = n.op_type == "Gemm" and bool(attrs.get("transB"))
        k = t.dims[1] if transpose else t.dims[0]
        fmt = Q.weight_format(precision, "table" if w == table_name else part, policy)
        if fmt is None:        # this part stays float under the policy
            new_nodes.append(n)
            if w == table_name:
                table = {"format": _FLOAT_NAMES[t.data_type], "layout": "vd", "tensors": {"weight": w}}
            continue
        if fmt == "int4" and k % block:
            fmt = "int8"   # K not a whole number of blocks (no densert weight today)
        qn, sn = f"{w}_q{fmt[3:]}", f"{w}_scale"
        replaced[w] = (qn, sn, fmt, transpose)
        dq = helper.make_node("DequantizeLinear", [qn, sn], [f"{w}_dq"], name=f"{n.name}/dq",
                              axis=1 if fmt == "int8" else 0,
                              **({"block_size": block} if fmt == "int4" else {}))
        new_nodes.append(dq)
        y = n.output[0]
        bias = n.input[2] if n.op_type == "Gemm" and len(n.input) > 2 and n.input[2] else None
        if bias is not None and bias in inits and not source_array(inits[bias], src_dir).any():
            bias = None   # the lm_head's zero bias only chose Gemm over Transpose+MatMul
        mm_out = y if bias is None else f"{y}_nobias"
        new_nodes.append(helper.make_node("MatMul", [n.input[0], f"{w}_dq"], [mm_out], name=f"{n.name}/mm"))
        if bias is not None:
            new_nodes.append(helper.make_node("Add", [mm_out, bias], [y], name=f"{n.name}/bias"))
        if w == table_name:
            table = {"format": fmt, "layout": "dv", "block": block if fmt == "int4" else None,
                     "tensors": {"weight": qn, "scale": sn}}
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for sub in _graphs(g) for node in sub.node for i in node.input}
    kept = []
    for t in g.initializer:
        if t.name in replaced:
            qn, sn, fmt, transpose = replaced[t.name]
            k, nn_ = (t.dims[1], t.dims[0]) if transpose else (t.dims[0], t.dims[1])
            cache: dict[str, Any] = {}

            def make(src=t, fmt=fmt, transpose=transpose, cache=cache):
                if not cache:
                    a = source_array(src, src_dir)
                    cache["q"], cache["s"] = Q.quantize(a.T if transpose else a, fmt, block)
                return cache

            producers[qn] = lambda make=make: make().pop("q")
            producers[sn] = lambda make=make: make().pop("s")
            kept.append(_placeholder(qn, _INT8 if fmt == "int8" else _INT4, [k, nn_]))
            scale_dims = [nn_] if fmt == "int8" else [k // block, nn_]
            kept.append(_placeholder(sn, _FLOAT, scale_dims))
        elif t.name in used:
            kept.append(t)
    del g.initializer[:]
    g.initializer.extend(kept)
    return table


def _placeholder(name, data_type, dims):
    from onnx import TensorProto
    t = TensorProto()
    t.name, t.data_type = name, data_type
    t.dims.extend(dims)
    return t


# ---------------------------------------------------------------- writing
def _write(model, src_dir: Path, out_dir: Path, stem: str,
           producers: dict[str, Callable[[], np.ndarray]]) -> dict[str, dict[str, Any]]:
    """Stream every initializer's bytes into ``<stem>.onnx.data`` (page-aligned) and save the
    graph; returns {name: {"offset", "length", "dtype", "shape"}} of the external tensors."""
    import onnx
    from onnx import helper
    data_name = f"{stem}.onnx.data"
    out_dir.mkdir(parents=True, exist_ok=True)
    locations = {}
    with open(out_dir / data_name, "wb") as f:
        for t in model.graph.initializer:
            arr = producers[t.name]() if t.name in producers else source_array(t, src_dir)
            if t.data_type == _INT4:
                raw = Q.pack_int4(np.asarray(arr))
            else:
                raw = np.ascontiguousarray(arr, dtype=helper.tensor_dtype_to_np_dtype(t.data_type))
            nbytes = raw.nbytes
            t.ClearField("raw_data")
            for fld in ("float_data", "int32_data", "int64_data", "double_data"):
                t.ClearField(fld)
            del t.external_data[:]
            if nbytes < INLINE_BYTES:
                t.data_location = 0
                t.raw_data = raw.tobytes()
                continue
            f.seek(0, 2)
            off = -(-f.tell() // ALIGN) * ALIGN
            f.seek(off)
            flat = raw.reshape(-1)
            step = (64 << 20) // flat.itemsize     # a memmapped source is copied 64 MiB at a time
            for a in range(0, flat.size, step):
                f.write(flat[a:a + step].tobytes())
            t.data_location = _EXTERNAL
            for key, val in (("location", data_name), ("offset", str(off)), ("length", str(nbytes))):
                e = t.external_data.add()
                e.key, e.value = key, val
            locations[t.name] = {"offset": off, "length": nbytes,
                                 "dtype": "int4" if t.data_type == _INT4 else np.dtype(raw.dtype).name,
                                 "shape": list(t.dims)}
            del arr, raw
    onnx.save_model(model, str(out_dir / f"{stem}.onnx"))
    return locations
