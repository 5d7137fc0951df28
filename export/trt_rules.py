"""The ONNX subset the oldest supported TensorRT (10.3, JetPack 6.x) parses and runs well: the
export checks every graph against it, so a graph TensorRT would reject fails here, on any machine.

Sources: onnx-tensorrt ``docs/operators.md`` (TensorRT 10.x), the TensorRT operator reference for
Dequantize (INT8: per-tensor / per-channel scales; INT4: 2-D block scales; scales build-time
constants; zero points absent or zero) and the TensorRT 10.8 release notes (CumSum gets a native
layer; before it onnx-tensorrt lowers CumSum to a loop with one iteration per element).
"""
from __future__ import annotations

from typing import Any

from .onnx_types import BOOL, FLOAT, FLOAT16, INT4, INT8, INT32, INT64, NAMES

OLDEST_TENSORRT = "10.3"
MAX_OPSET = 21     # blocked DequantizeLinear (int4 weights) is opset 21

# ONNX ops the onnx-tensorrt parser (TensorRT 10.x, docs/operators.md) supports, of those an
# export may use. CumSum is supported but left out: see FORBIDDEN.
TRT_SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos DequantizeLinear Div
Einsum Equal Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater
GreaterOrEqual Identity If LayerNormalization Less LessOrEqual Log Loop MatMul Max Mean Min Mod Mul
Neg NonZero Not Or Pow Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape
Resize ScatterElements ScatterND Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile
TopK Transpose Trilu Unsqueeze Where Xor
""".split())

FORBIDDEN = {
    "CumSum": "onnx-tensorrt before TensorRT 10.8 turns CumSum into a loop over the elements "
              "(JetPack 6 ships 10.3)",
}

# ONNX TensorProto data types TensorRT 10 tensors and weights can hold.
IO_TYPES = {FLOAT, FLOAT16, INT32, INT64, BOOL}
WEIGHT_TYPES = {FLOAT, FLOAT16, INT32, INT64, BOOL, INT8, INT4}


def _walk(graph, path=""):
    """(node, where) for every node of the graph and of its subgraphs."""
    from onnx import helper
    for n in graph.node:
        yield n, f"{path}{n.name or n.op_type}"
        for attr in n.attribute:
            v = helper.get_attribute_value(attr)
            for sub in (v if isinstance(v, list) else [v]):
                if hasattr(sub, "node"):
                    yield from _walk(sub, f"{path}{n.name}/")


def problems(model) -> list[str]:
    """Everything in ``model`` (an onnx ModelProto, external data not needed) that TensorRT
    10.3's parser would reject or run as a per-element loop; empty when the graph is fine."""
    from onnx import helper, numpy_helper
    g = model.graph
    out: list[str] = []
    opset = max((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=0)
    if opset > MAX_OPSET:
        out.append(f"opset {opset} > {MAX_OPSET}")
    inits = {t.name: t for t in g.initializer}
    consumers: dict[str, list[Any]] = {}
    casts: dict[str, Any] = {}
    for n, _ in _walk(g):
        for i in n.input:
            consumers.setdefault(i, []).append(n)
        if n.op_type == "Cast":
            casts[n.output[0]] = n
    for n, where in _walk(g):
        if n.domain not in ("", "ai.onnx"):
            out.append(f"{where}: custom op {n.domain}::{n.op_type}")
        elif n.op_type in FORBIDDEN:
            out.append(f"{where}: {n.op_type}: {FORBIDDEN[n.op_type]}")
        elif n.op_type not in TRT_SUPPORTED_OPS:
            out.append(f"{where}: {n.op_type} is not in TensorRT's ONNX op set")
        if n.op_type == "DequantizeLinear":
            out += [f"{where}: {p}" for p in _dq_problems(n, inits, consumers, casts, helper, numpy_helper)]
    for vi in [*g.input, *g.output]:
        t = vi.type.tensor_type.elem_type
        if t not in IO_TYPES:
            out.append(f"graph I/O {vi.name}: dtype {t} is not a TensorRT I/O type")
    for t in g.initializer:
        if t.data_type not in WEIGHT_TYPES:
            out.append(f"initializer {t.name}: dtype {t.data_type} is not a TensorRT weight type")
    return out


def _dq_problems(n, inits, consumers, casts, helper, numpy_helper) -> list[str]:
    attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
    x, scale = n.input[0], n.input[1]
    zp = n.input[2] if len(n.input) > 2 and n.input[2] else None
    out = []
    # int4 block scales are stored fp16 and widened by a Cast of the constant (folded at build)
    cast = casts.get(scale)
    if cast is not None and cast.input[0] in inits:
        scale = cast.input[0]
    if x not in inits or scale not in inits:
        return ["DequantizeLinear of a non-constant (only weight-only quantization is exported)"]
    xt, st = inits[x], inits[scale]
    if st.data_type not in (FLOAT, FLOAT16):
        out.append(f"scale {scale} must be float32/float16")
    if zp is not None:
        z = inits.get(zp)
        if z is None or z.data_location == 1 or numpy_helper.to_array(z).any():
            out.append(f"zero point {zp} must be absent or zero")
    kind = NAMES.get(xt.data_type, str(xt.data_type))
    if xt.data_type == INT8:
        if "block_size" in attrs and attrs["block_size"]:
            out.append("INT8 weights take per-tensor or per-channel scales, not blocks")
        if len(st.dims) > 1:
            out.append(f"INT8 scale of rank {len(st.dims)} (per-channel scales are 1-D)")
    elif xt.data_type == INT4:
        if len(xt.dims) != 2 or len(st.dims) != 2 or not attrs.get("block_size"):
            out.append("INT4 weights must be 2-D with 2-D block scales (block_size set)")
    else:
        out.append(f"DequantizeLinear of {kind}: TensorRT quantizes weights to INT8 or INT4 only")
    users = consumers.get(n.output[0], [])
    if not users or any(u.op_type not in ("MatMul", "Gemm") for u in users):
        out.append(f"dequantized {x} feeds {[u.op_type for u in users]}, not a MatMul/Gemm "
                   "(the weight-only pattern TensorRT fuses)")
    return out
