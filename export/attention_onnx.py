"""Expand ``densert::ChunkedAttention`` nodes (``densert.model.attention`` under export) into
standard ONNX: one ``Loop`` over chunks of query rows (or of windows), whose body is MatMul /
Where / Softmax / MatMul on one chunk, and whose scan output is stitched back.

Chunk rule, computed from shapes in the graph exactly like ``attention.chunk_rows``:
``rows = max(1, min(total, budget // (4 * elements per row)))``, ``iters = ceil(total / rows)``.
Every iteration takes exactly ``rows`` rows (the last chunk starts at ``total - rows``, so it
overlaps the one before) because a Loop's scan outputs must all have one shape; the overlap is
dropped when the chunks are stitched. No Pad, no data-dependent shape: ONNX Runtime and the
TensorRT parser (Loop = ILoopLayer with a trip limit and concatenated outputs) both run it.
"""
from __future__ import annotations

import itertools

import numpy as np

from densert.model.attention import ONNX_DOMAIN, ONNX_OP

from .onnx_types import BOOL, FLOAT, INT64, NAMES


class _Builder:
    """Nodes and constants of one expansion, with unique names."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.inits, self._n = prefix, [], [], itertools.count()

    def name(self, hint: str) -> str:
        return f"{self.prefix}/{hint}_{next(self._n)}"

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper
        n = self.name("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, *inputs: str, out: str | None = None, **attrs) -> str:
        from onnx import helper
        o = out or self.name(op_type.lower())
        self.nodes.append(helper.make_node(op_type, list(inputs), [o], name=self.name(op_type), **attrs))
        return o

    def dim(self, shape: str, axis: int) -> str:
        """[1] int64 extent of one axis of a Shape output (negative axes count from the end)."""
        end = axis + 1 if axis != -1 else np.iinfo(np.int64).max
        return self.op("Slice", shape, self.const([axis]), self.const([end]), self.const([0]))


def expand_chunked_attention(model, float_type: int = FLOAT) -> int:
    """Replace every ChunkedAttention node of ``model`` (an onnx ModelProto, edited in place),
    in its graph and in subgraphs (an ``If`` branch of the fused graphs holds one); returns how
    many were expanded. ``float_type``: the ONNX dtype of q/k/v (float or float16)."""
    count = _expand_graph(model.graph, float_type, itertools.count())
    keep = [o for o in model.opset_import if o.domain != ONNX_DOMAIN]
    del model.opset_import[:]
    model.opset_import.extend(keep)
    return count


def _expand_graph(g, float_type: int, counter) -> int:
    from onnx import helper
    count = 0
    out_nodes = []
    for node in g.node:
        if node.domain != ONNX_DOMAIN or node.op_type != ONNX_OP:
            for attr in node.attribute:
                if attr.type == helper.AttributeProto.GRAPH:
                    count += _expand_graph(attr.g, float_type, counter)
                elif attr.type == helper.AttributeProto.GRAPHS:
                    count += sum(_expand_graph(sub, float_type, counter) for sub in attr.graphs)
            out_nodes.append(node)
            continue
        b = _Builder(f"/attn{next(counter)}")
        _expand(b, node, float_type)
        out_nodes.extend(b.nodes)
        g.initializer.extend(b.inits)
        count += 1
    del g.node[:]
    g.node.extend(out_nodes)
    return count


def _expand(b: _Builder, node, float_type: int) -> None:
    from onnx import helper
    a = {x.name: helper.get_attribute_value(x) for x in node.attribute}
    scale, causal, budget, windows, rank = a["scale"], a["causal"], a["budget"], a["windows"], a["rank"]
    q, k, v, *masks = node.input
    post = masks.pop(0) if a.get("post") else None
    fdt = np.dtype(NAMES[float_type])
    axis = 0 if windows else rank - 2          # the axis cut into chunks

    shp_q, shp_k, shp_v = b.op("Shape", q), b.op("Shape", k), b.op("Shape", v)
    total = b.dim(shp_q, axis)
    # fp32 score elements per chunk row: (product of q's other leading dims [x rows]) x keys
    per_row = b.dim(shp_k, -2)
    for ax in (range(1, rank - 1) if windows else range(0, rank - 2)):
        per_row = b.op("Mul", per_row, b.dim(shp_q, ax))
    rows = b.op("Div", b.const([budget // 4]), per_row)
    rows = b.op("Max", b.op("Min", rows, total), b.const([1]))
    iters = b.op("Div", b.op("Sub", b.op("Add", total, rows), b.const([1])), rows)
    last = b.op("Sub", total, rows)            # start of the last (overlapping) chunk

    qs = b.op("Mul", q, b.const(np.array(scale, dtype=fdt), fdt))
    perm = list(range(rank))
    perm[-2], perm[-1] = perm[-1], perm[-2]
    kt = b.op("Transpose", k, perm=perm)
    neg_inf = b.const(np.array(-np.inf, dtype=np.float32), np.float32)

    # ---- loop body: chunk i
    body = _Builder(f"{b.prefix}/body")
    it, cond_in = body.name("i"), body.name("cond")
    start = body.op("Min", body.op("Mul", body.op("Unsqueeze", it, b.const([0])), rows), last)
    end = body.op("Add", start, rows)
    ax = b.const([axis])

    def chunk(t):
        return body.op("Slice", t, start, end, ax)

    if windows:
        s = body.op("MatMul", chunk(qs), chunk(kt))                       # [c, H, S, Sk]
        v_c = chunk(v)
        mask = body.op("Unsqueeze", chunk(masks[0]), b.const([1, 2]))     # [c, 1, 1, Sk]
    else:
        s = body.op("MatMul", chunk(qs), kt)                              # [..., c, Tk]
        v_c = v
        mask = None
        if causal:
            tk = b.op("Squeeze", b.dim(shp_k, -2), b.const([0]))
            offset = b.op("Sub", b.dim(shp_k, -2), b.dim(shp_q, -2))
            qpos = body.op("Range", body.op("Squeeze", body.op("Add", start, offset), b.const([0])),
                           body.op("Squeeze", body.op("Add", end, offset), b.const([0])), b.const(1))
            kpos = body.op("Range", b.const(0), tk, b.const(1))
            mask = body.op("LessOrEqual", body.op("Unsqueeze", kpos, b.const([0])),
                           body.op("Unsqueeze", qpos, b.const([1])))     # [c, Tk]
        if masks:
            qseg = body.op("Slice", masks[0], start, end, b.const([0]))
            seg = body.op("Equal", body.op("Unsqueeze", qseg, b.const([1])),
                          body.op("Unsqueeze", masks[1], b.const([0])))
            mask = seg if mask is None else body.op("And", mask, seg)
    if float_type != FLOAT:
        s = body.op("Cast", s, to=FLOAT)
    if mask is not None:
        s = body.op("Where", mask, s, neg_inf)
    p = body.op("Softmax", s, axis=-1)
    if float_type != FLOAT:
        p = body.op("Cast", p, to=float_type)
    o = body.op("MatMul", p, v_c)
    if post is not None:      # per-chunk output projection: only projected rows are stacked
        o = body.op("MatMul", o, post)
    cond_out = body.op("Identity", cond_in)
    graph = helper.make_graph(
        body.nodes, body.name("graph"),
        [helper.make_tensor_value_info(it, INT64, []), helper.make_tensor_value_info(cond_in, BOOL, [])],
        [helper.make_tensor_value_info(cond_out, BOOL, []),
         helper.make_tensor_value_info(o, float_type, None)], body.inits)
    stacked = b.op("Loop", b.op("Squeeze", iters, b.const([0])), b.const(np.array(True), np.bool_),
                   body=graph)                                            # [iters, <chunk out>]

    # ---- stitch: [iters, ..., c, ...] -> [..., iters * c, ...], minus the last chunk's overlap
    if windows:
        shape = b.op("Concat", b.const([-1]), b.op("Slice", shp_q, b.const([1]), b.const([3]), b.const([0])),
                     b.dim(shp_v, -1), axis=0)
        flat = b.op("Reshape", stacked, shape)
    else:
        moved = b.op("Transpose", stacked, perm=[*range(1, rank - 1), 0, rank - 1, rank])
        shp_m = b.op("Shape", moved)
        shape = b.op("Concat", b.op("Slice", shp_m, b.const([0]), b.const([rank - 2]), b.const([0])),
                     b.const([-1]), b.dim(shp_m, -1), axis=0)
        flat = b.op("Reshape", moved, shape)
    head_end = b.op("Mul", b.op("Sub", iters, b.const([1])), rows)      # rows before the last chunk
    tail_start = b.op("Sub", b.op("Add", head_end, head_end), last)
    head = b.op("Slice", flat, b.const([0]), head_end, ax)
    tail = b.op("Slice", flat, tail_start, b.op("Add", head_end, rows), ax)
    b.op("Concat", head, tail, out=node.output[0], axis=axis)


def op_types(graph) -> set[str]:
    """Op types of a graph and of every subgraph inside it (Loop / If bodies)."""
    from onnx import helper
    out = set()
    for n in graph.node:
        out.add(n.op_type if not n.domain or n.domain == "ai.onnx" else f"{n.domain}::{n.op_type}")
        for attr in n.attribute:
            v = helper.get_attribute_value(attr)
            for sub in (v if isinstance(v, list) else [v]):
                if hasattr(sub, "node"):
                    out |= op_types(sub)
    return out
