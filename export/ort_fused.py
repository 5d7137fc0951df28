"""The onnxruntime flavour of the layer parts: each ViT layer and each MLA decoder layer written
node by node out of ONNX Runtime's fused CPU / CUDA operators, the way ONNX Runtime GenAI's model
builder writes its graphs, instead of traced from torch into MatMul / Softmax / Loop chains.

``--target onnxruntime`` (fp32, int8, int4) writes these; ``--target tensorrt`` and fp16 keep
the traced standard-op parts (TensorRT parses only those; the fp16 engine is the GPU's, and
ONNX Runtime's CPU attention is fp32 only). The embedding, merger, RoPE tables and the LLM
tail stay traced in both flavours: ONNX Runtime already fuses their norms and GELU at load.

ViT layer (``vision_layer``)::

    LayerNormalization -> Gemm q, k, v -> [window slots] -> RotaryEmbedding (q, k)
    -> MultiHeadAttention -> Gemm (out) -> SkipLayerNormalization (residual + norm)
    -> Gemm -> FastGelu / Gelu -> Gemm -> Add (residual)

Windowed layers gather q, k and v into the padded [windows, 256 slots] layout and attend per
window. The empty slots are masked as keys by one extra lane per head that the q / k GEMMs
write themselves (a zero weight column; q's bias 1, k's 0) and that the row empty slots read
holds at -1e30: every real score is unchanged, and MultiHeadAttention takes its flash-attention
path (no mask input: bounded memory, ~1.5x faster than its masked path). Full-attention layers
attend over the whole image; a call with several images (segment ids not all equal) takes the
chunked, segment-masked attention of the standard graphs in an ``If`` branch.

MLA decoder layer (``decoder_layer``, latent cache)::

    SimplifiedLayerNormalization -> MatMul kv_a -> Split (latent, rope key)
    q: MatMul q_a -> SimplifiedLayerNormalization -> MatMul q_b -> RotaryEmbedding (first 64
       lanes per head)
    latent: SimplifiedLayerNormalization; rope key: RotaryEmbedding; cache = past ++ [latent, key]
    MatMul kv_b (k_nope; v) on the whole cache -> MultiHeadAttention (causal, query chunks)
    -> MatMul o -> SkipSimplifiedLayerNormalization -> MatMul gate, up -> QuickGelu(1) = SiLU
    -> Mul -> MatMul down -> Add

Each Linear is its own GEMM: a Split of a fused GEMM's output copies it, and the quantized
GEMMs (``DynamicQuantizeMatMul``) are efficient at these widths. The cache is the latent (576
values per token per layer, as the torch model stores it), and the attention runs over keys and
values decompressed from it (kv_b on every cached token): prefill attention at ~2x fewer FLOPs
than the absorbed form and through MultiHeadAttention's kernels (a decode step pays kv_b on the
whole cache instead). Exact rewrites, no approximation: the rope lanes of q_b / kv_a are
permuted in the weights so the interleaved (GPT-J) rotation becomes ONNX Runtime's rotate-half
RotaryEmbedding on lanes already in the [evens ‖ odds] order the torch model caches, and each q
head is stored [rope ‖ nope] so RotaryEmbedding rotates its first lanes in place. Causal masking
is an additive bias built per query chunk; chunks keep the scores under the export's attention
budget, like the standard graphs' Loop.
"""
from __future__ import annotations

import itertools
from typing import Any

import numpy as np

from .onnx_types import BOOL, FLOAT, INT64

MS = "com.microsoft"
# Score of an empty window slot as a key: finite (a window whose first keys are all empty would
# give flash attention's running max -inf and NaN with -inf), far below any real score.
EMPTY_KEY = -1e30
# Graph-level names the prep parts compute once for every layer.
V_COS, V_SIN = "vfused/rope_cos", "vfused/rope_sin"
V_SLOT_POS, V_SLOT_ROW, V_FULL_POS = "vfused/slot_pos", "vfused/slot_row", "vfused/full_pos"
V_ONE_IMAGE = "vfused/one_image"
D_POS, D_PAST = "dfused/pos", "dfused/past_len"
_VISION_SHARED = ((V_COS, FLOAT), (V_SIN, FLOAT), (V_SLOT_POS, INT64), (V_SLOT_ROW, INT64),
                  (V_FULL_POS, INT64), (V_ONE_IMAGE, BOOL))
# Activations -> (op, domain, attributes): the exact function each config names (SiLU is
# QuickGelu's x * sigmoid(alpha * x) at alpha 1).
ACTIVATIONS = {"gelu": ("Gelu", MS, {}), "gelu_pytorch_tanh": ("FastGelu", MS, {}),
               "gelu_new": ("FastGelu", MS, {}), "silu": ("QuickGelu", MS, {"alpha": 1.0})}


def _np(t) -> np.ndarray:
    return t.detach().float().cpu().numpy()


class Part:
    """Nodes, weights and interface of one part, written directly; ``model()`` gives the
    ModelProto that ``GraphBuilder.add`` takes (as it takes a traced part), ``sources`` its
    weights' values: the graph holds placeholders, and the writer reads (and quantizes) each
    weight from the module's own memory, so a layer's weights are not copied into protobuf."""

    def __init__(self, name: str, opset: int):
        self.name, self.opset = name, opset
        self.nodes: list[Any] = []
        self.inits: list[Any] = []
        self.sources: dict[str, np.ndarray] = {}
        self.inputs: list[Any] = []
        self.outputs: list[Any] = []
        self._n = itertools.count()

    def fresh(self, hint: str) -> str:
        return f"{hint}_{next(self._n)}"

    def input(self, name: str, elem: int = FLOAT, shape=None) -> str:
        from onnx import helper
        self.inputs.append(helper.make_tensor_value_info(name, elem, shape))
        return name

    def output(self, name: str, elem: int = FLOAT, shape=None) -> None:
        from onnx import helper
        self.outputs.append(helper.make_tensor_value_info(name, elem, shape))

    def weight(self, name: str, array: np.ndarray) -> str:
        from .graph_writer import placeholder
        if array.dtype != np.float32:
            raise ValueError(f"fused part {self.name}: weight {name} is {array.dtype}, expected float32")
        self.inits.append(placeholder(name, FLOAT, list(array.shape)))
        self.sources[name] = array
        return name

    def const(self, value, dtype=np.int64) -> str:
        from onnx import numpy_helper
        n = self.fresh("const")
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), n))
        return n

    def op(self, op_type: str, *inputs: str, outs: int | list[str] = 1, domain: str = "", **attrs):
        """One node; returns its output name (or names, for ``outs`` > 1 or a list)."""
        from onnx import helper
        names = outs if isinstance(outs, list) else [self.fresh(op_type.lower()) for _ in range(outs)]
        self.nodes.append(helper.make_node(op_type, list(inputs), names, name=self.fresh(op_type),
                                           domain=domain or None, **attrs))
        return names[0] if len(names) == 1 and not isinstance(outs, list) else names

    def linear(self, x: str, w_kn: np.ndarray, bias: np.ndarray | None, name: str, rank2: bool) -> str:
        """x @ W [K, N] (+ bias): a Gemm on 2-D activations, else MatMul (+ Add). The writer
        quantizes W (``graph_writer._quantize_weights``) like any traced Linear."""
        w = self.weight(f"{name}.weight", w_kn)
        if rank2:
            args = [x, w] + ([self.weight(f"{name}.bias", bias)] if bias is not None else [])
            return self.op("Gemm", *args)
        y = self.op("MatMul", x, w)
        return y if bias is None else self.op("Add", y, self.weight(f"{name}.bias", bias))

    def dim(self, shape: str, axis: int) -> str:
        """[1] int64 extent of one axis of a Shape output."""
        end = axis + 1 if axis != -1 else np.iinfo(np.int64).max
        return self.op("Slice", shape, self.const([axis]), self.const([end]), self.const([0]))

    def model(self):
        from onnx import helper
        register_default_domain_ops()
        graph = helper.make_graph(self.nodes, self.name, self.inputs, self.outputs, self.inits)
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", self.opset),
                                                        helper.make_opsetid(MS, 1)])
        model.ir_version = 8      # what the engine graphs declare (GraphBuilder.finish)
        return model


def register_default_domain_ops() -> None:
    """Teach onnx's checker ONNX Runtime's RMSNorm, ``SimplifiedLayerNormalization``, which
    ONNX Runtime registers in the default domain (its own optimizer writes it there; the standard
    RMSNormalization needs opset 23). Without the schema ``onnx.checker`` rejects the graph."""
    from onnx import defs
    if defs.has("SimplifiedLayerNormalization"):
        return
    S = defs.OpSchema
    floats = ["tensor(float)", "tensor(float16)"]
    defs.register_schema(S(
        "SimplifiedLayerNormalization", "", 1, doc="ONNX Runtime's RMSNorm: x / sqrt(mean(x^2) + eps) * scale",
        inputs=[S.FormalParameter("X", "T"), S.FormalParameter("scale", "V")],
        outputs=[S.FormalParameter("Y", "V"),
                 S.FormalParameter("inv_std_var", "U", param_option=S.FormalParameterOption.Optional)],
        type_constraints=[("T", floats, ""), ("V", floats, ""), ("U", ["tensor(float)"], "")],
        attributes=[S.Attribute(a, t, "", required=False) for a, t in
                    (("axis", S.AttrType.INT), ("epsilon", S.AttrType.FLOAT), ("stash_type", S.AttrType.INT))]))


# ---------------------------------------------------------------- vision
def vision_prep(vc, opset: int):
    """Per-image tensors every fused ViT layer reads, computed once: the RoPE half-lane tables
    with zero rows for empty slots, position ids of the slot layout (an empty slot: N) and of
    the whole image, the row each slot reads (an empty slot: any real row, N - 1: what it holds
    is masked or dropped), and whether the call holds one image."""
    p = Part("vision_prep", opset)
    hd, s = vc.head_dim, window_slots_per(vc)
    cos, sin = p.input("cos", FLOAT, ["patches", hd]), p.input("sin", FLOAT, ["patches", hd])
    slots = p.input("window_slots", INT64, ["slots"])
    seg = p.input("image_segment_ids", INT64, ["patches"])
    # zero rows for the empty slots' position N; a window's worth, as RotaryEmbedding wants a
    # table no shorter than the sequence it rotates (a window: S rows)
    zero_rows = p.const(np.zeros((s, hd // 2), np.float32), np.float32)
    for src, out in ((cos, V_COS), (sin, V_SIN)):
        half = p.op("Slice", src, p.const([0]), p.const([hd // 2]), p.const([1]))
        p.op("Concat", half, zero_rows, outs=[out], axis=0)
    n = p.dim(p.op("Shape", cos), 0)
    p.op("Reshape", slots, p.const([-1, s]), outs=[V_SLOT_POS])
    p.op("Min", slots, p.op("Sub", n, p.const([1])), outs=[V_SLOT_ROW])
    rng = p.op("Range", p.const(0), p.op("Squeeze", n, p.const([0])), p.const(1))
    p.op("Unsqueeze", rng, p.const([0]), outs=[V_FULL_POS])
    p.op("Equal", p.op("ReduceMin", seg, keepdims=0), p.op("ReduceMax", seg, keepdims=0), outs=[V_ONE_IMAGE])
    for name, elem in _VISION_SHARED:
        p.output(name, elem)
    return p


def window_slots_per(vc) -> int:
    from densert.model.vision_meta import window_slot_count
    return window_slot_count(vc)


def vision_layer(layer, vc, full: bool, x_in: str, x_out: str, opset: int, budget: int):
    """One Siglip2 encoder layer (``layer``: its module, fp32) from ``x_in`` [N, d] (window
    order) to ``x_out``."""
    p = Part("vision_layer", opset)
    d, h, hd = vc.hidden_size, vc.num_attention_heads, vc.head_dim
    x = p.input(x_in, FLOAT, ["patches", d])
    for name, elem in _VISION_SHARED:
        p.input(name, elem)
    for name in ("window_slots", "window_inverse", "image_segment_ids"):
        p.input(name, INT64)
    a = layer.self_attn
    ln1, ln2 = layer.layer_norm1, layer.layer_norm2
    y = p.op("LayerNormalization", x, p.weight("ln1.weight", _np(ln1.weight)), p.weight("ln1.bias", _np(ln1.bias)),
             axis=-1, epsilon=float(ln1.eps))
    wq, bq, wk, bk = _np(a.q_proj.weight).T, _np(a.q_proj.bias), _np(a.k_proj.weight).T, _np(a.k_proj.bias)
    v = p.linear(y, _np(a.v_proj.weight).T, _np(a.v_proj.bias), "v_proj", rank2=True)      # [N, d]
    rope = dict(domain=MS, num_heads=h, rotary_embedding_dim=hd, interleaved=0)
    if full:
        q = p.op("Unsqueeze", p.linear(y, wq, bq, "q_proj", rank2=True), p.const([0]))       # [1, N, d]
        k = p.op("Unsqueeze", p.linear(y, wk, bk, "k_proj", rank2=True), p.const([0]))
        v = p.op("Unsqueeze", v, p.const([0]))
        q = p.op("RotaryEmbedding", q, V_FULL_POS, V_COS, V_SIN, **rope)
        k = p.op("RotaryEmbedding", k, V_FULL_POS, V_COS, V_SIN, **rope)
        o = _full_attention(p, q, k, v, h, hd, a.scale, budget)                  # [1, N, d]
        o = p.op("Squeeze", o, p.const([0]))
    else:
        # One extra lane per head masks the empty slots as keys: q's lane is 1 (a bias), k's 0,
        # and the row the empty slots read, N, has -1e30 there. RotaryEmbedding rotates the
        # first hd lanes of each head and passes the lane through.
        s = window_slots_per(vc)
        q = p.linear(y, _with_lane(wq, h, 0.0), _with_lane(bq, h, 1.0), "q_proj", rank2=True)   # [N, h*(hd+1)]
        k = p.linear(y, _with_lane(wk, h, 0.0), _with_lane(bk, h, 0.0), "k_proj", rank2=True)
        empty = np.zeros((1, h, hd + 1), np.float32)
        empty[..., hd] = EMPTY_KEY
        k = p.op("Concat", k, p.const(empty.reshape(1, -1), np.float32), axis=0)             # [N + 1, .]

        def window(t, rows, width):
            return p.op("Reshape", p.op("Gather", t, rows, axis=0), p.const([-1, s, width]))

        q = p.op("RotaryEmbedding", window(q, V_SLOT_ROW, h * (hd + 1)), V_SLOT_POS, V_COS, V_SIN, **rope)
        k = p.op("RotaryEmbedding", window(k, "window_slots", h * (hd + 1)), V_SLOT_POS, V_COS, V_SIN, **rope)
        o = p.op("MultiHeadAttention", q, k, window(v, V_SLOT_ROW, d), domain=MS, num_heads=h, scale=float(a.scale))
        o = p.op("Gather", p.op("Reshape", o, p.const([-1, d])), "window_inverse", axis=0)
    o = p.linear(o, _np(a.out_proj.weight).T, _np(a.out_proj.bias), "out_proj", rank2=True)
    y2, res = p.op("SkipLayerNormalization", o, x, p.weight("ln2.weight", _np(ln2.weight)),
                   p.weight("ln2.bias", _np(ln2.bias)), outs=[p.fresh("ln2"), "", "", p.fresh("res")],
                   domain=MS, epsilon=float(ln2.eps))[::3]
    m = layer.mlp
    op, dom, attrs = ACTIVATIONS[vc.hidden_act]
    f = p.op(op, p.linear(y2, _np(m.fc1.weight).T, _np(m.fc1.bias), "fc1", rank2=True), domain=dom, **attrs)
    f = p.linear(f, _np(m.fc2.weight).T, _np(m.fc2.bias), "fc2", rank2=True)
    p.op("Add", res, f, outs=[x_out])
    p.output(x_out, FLOAT, ["patches", d])
    return p


def _with_lane(w: np.ndarray, heads: int, value: float) -> np.ndarray:
    """Weight [K, heads * hd] (or bias [heads * hd]) with one more lane per head, ``value`` in
    every lane (a weight's lane column: zeros)."""
    lead = w.shape[:-1]
    x = w.reshape(*lead, heads, -1)
    lane = np.full((*lead, heads, 1), value if w.ndim == 1 else 0.0, np.float32)
    return np.concatenate([x, lane], axis=-1).reshape(*lead, -1)


def _full_attention(p: Part, q: str, k: str, v: str, h: int, hd: int, scale: float, budget: int) -> str:
    """[1, N, d] attention over the whole call: MultiHeadAttention (flash) when it holds one
    image, else the segment-masked chunked attention of the standard graphs."""
    from onnx import helper

    from densert.model.attention import ONNX_DOMAIN, ONNX_OP
    one = Part("one_image", p.opset)
    one._n = p._n                                 # names unique across the branches
    o1 = one.op("MultiHeadAttention", q, k, v, domain=MS, num_heads=h, scale=float(scale))
    many = Part("several_images", p.opset)
    many._n = p._n
    heads = many.const([-1, h, hd])
    qh, kh, vh = (many.op("Transpose", many.op("Reshape", t, heads), perm=[1, 0, 2]) for t in (q, k, v))
    seg = "image_segment_ids"
    many.nodes.append(helper.make_node(ONNX_OP, [qh, kh, vh, seg, seg], [many.fresh("attn")], domain=ONNX_DOMAIN,
                                       name=many.fresh("attn"), scale=float(scale), causal=0, budget=int(budget),
                                       windows=0, post=0, rank=3))
    o2 = many.op("Unsqueeze", many.op("Reshape", many.op("Transpose", many.nodes[-1].output[0], perm=[1, 0, 2]),
                                      many.const([0, h * hd])), many.const([0]))
    branches = {}
    for key, part, out in (("then_branch", one, o1), ("else_branch", many, o2)):
        branches[key] = helper.make_graph(part.nodes, part.name, [], [helper.make_tensor_value_info(out, FLOAT, None)],
                                          part.inits)
    return p.op("If", V_ONE_IMAGE, **branches)


# ---------------------------------------------------------------- decoder
def decoder_prep(opset: int):
    """Position ids of the new tokens ([B, T], one row per prompt of the batch axis: the RoPE
    tables already start at the past length) and the past length, for every fused decoder
    layer."""
    p = Part("decoder_prep", opset)
    emb = p.input("inputs_embeds", FLOAT)
    past = p.input("past_latent", FLOAT)
    shape = p.op("Shape", emb)
    t = p.op("Squeeze", p.dim(shape, 1), p.const([0]))
    row = p.op("Unsqueeze", p.op("Range", p.const(0), t, p.const(1)), p.const([0]))
    p.op("Expand", row, p.op("Slice", shape, p.const([0]), p.const([2]), p.const([0])), outs=[D_POS])
    p.op("Identity", p.dim(p.op("Shape", past), 2), outs=[D_PAST])
    p.output(D_POS, INT64)
    p.output(D_PAST, INT64)
    return p


def rope_lane_order(rope: int, interleave: bool) -> np.ndarray:
    """Lanes of a rope block in the order the rotate-half RotaryEmbedding reads them: for the
    interleaved (GPT-J) model [evens ‖ odds], the order its rotated output (and cache) has."""
    idx = np.arange(rope)
    return np.concatenate([idx[0::2], idx[1::2]]) if interleave else idx


def decoder_layer(layer, cfg, index: int, h_in: str, h_out: str, present: str, opset: int, budget: int):
    """One MLA decoder layer (latent cache) from ``h_in`` [B, T, d] to ``h_out``, writing this
    layer's whole cache (past ++ new) as ``present`` [B, P + T, rank + rope]."""
    p = Part("decoder_layer", opset)
    d, H = cfg.hidden_size, cfg.num_attention_heads
    nope, rope, vdim, rank = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
    qk = nope + rope
    x = p.input(h_in, FLOAT, ["batch", "seq", d])
    cos, sin = p.input("cos", FLOAT, ["seq", rope // 2]), p.input("sin", FLOAT, ["seq", rope // 2])
    past = p.input("past_latent", FLOAT)
    p.input(D_POS, INT64)
    p.input(D_PAST, INT64)
    a = layer.self_attn
    order = rope_lane_order(rope, cfg.rope_interleave)
    # q heads stored [rope (RotaryEmbedding's lane order) ‖ nope]
    q_cols = np.concatenate([np.concatenate([hh * qk + nope + order, hh * qk + np.arange(nope)]) for hh in range(H)])
    kv_a_cols = np.concatenate([np.arange(rank), rank + order])

    def w(m):
        return _np(m.weight).T                                                   # [in, out]

    def b(m):
        return _np(m.bias) if getattr(m, "bias", None) is not None else None

    def rms(t, norm, name):
        return p.op("SimplifiedLayerNormalization", t, p.weight(f"{name}.weight", _np(norm.weight)),
                    axis=-1, epsilon=float(norm.eps))

    y = rms(x, layer.input_layernorm, "input_layernorm")
    kv_a_b = b(a.kv_a_proj_with_mqa)
    lat, k_rot = p.op("Split", p.linear(y, w(a.kv_a_proj_with_mqa)[:, kv_a_cols], None if kv_a_b is None else
                                        kv_a_b[kv_a_cols], "kv_a", rank2=False), p.const([rank, rope]), outs=2, axis=-1)
    if cfg.q_lora_rank is not None:
        qa = p.linear(y, w(a.q_a_proj), b(a.q_a_proj), "q_a", rank2=False)
        q = p.linear(rms(qa, a.q_a_layernorm, "q_a_layernorm"), w(a.q_b_proj)[:, q_cols], None, "q_b", rank2=False)
    else:
        q = p.linear(y, w(a.q_proj)[:, q_cols], None, "q", rank2=False)
    q = p.op("RotaryEmbedding", q, D_POS, cos, sin, domain=MS, num_heads=H, rotary_embedding_dim=rope)
    k_rot = p.op("RotaryEmbedding", k_rot, D_POS, cos, sin, domain=MS, num_heads=1, rotary_embedding_dim=rope)
    new = p.op("Concat", rms(lat, a.kv_a_layernorm, "kv_a_layernorm"), k_rot, axis=-1)     # [B, T, rank+rope]
    past_i = p.op("Gather", past, p.const(index), axis=0)                                  # [B, P, rank+rope]
    p.op("Concat", past_i, new, outs=[present], axis=1)
    p.output(present, FLOAT, ["batch", "total_seq", rank + rope])
    # keys and values of every cached token, from the latent (kv_b's two halves)
    kv_b = w(a.kv_b_proj).reshape(rank, H, nope + vdim)
    c_lat = p.op("Slice", present, p.const([0]), p.const([rank]), p.const([2]))            # [B, Tk, rank]
    k_nope = p.linear(c_lat, kv_b[:, :, :nope].reshape(rank, H * nope), None, "kv_b_k", rank2=False)
    v = p.linear(c_lat, kv_b[:, :, nope:].reshape(rank, H * vdim), None, "kv_b_v", rank2=False)
    c_rot = p.op("Slice", present, p.const([rank]), p.const([rank + rope]), p.const([2]))    # [B, Tk, rope]
    shape_k = p.op("Shape", k_nope)
    heads_rot = p.op("Concat", p.op("Slice", shape_k, p.const([0]), p.const([2]), p.const([0])),
                     p.const([H, rope]), axis=0)
    k_rot_h = p.op("Expand", p.op("Unsqueeze", c_rot, p.const([2])), heads_rot)            # [B, Tk, H, rope]
    k = p.op("Reshape", p.op("Concat", k_rot_h, p.op("Reshape", k_nope, p.const([0, 0, H, nope])), axis=-1),
             p.const([0, 0, H * qk]))
    o = causal_attention(p, q, k, v, H, H * vdim, float(cfg.softmax_scale), budget)                  # [B, T, H*vdim]
    o = p.linear(o, w(a.o_proj), b(a.o_proj), "o_proj", rank2=False)
    norm = layer.post_attention_layernorm
    y2, res = p.op("SkipSimplifiedLayerNormalization", o, x, p.weight("post_norm.weight", _np(norm.weight)),
                   outs=[p.fresh("post_norm"), "", "", p.fresh("res")], domain=MS, epsilon=float(norm.eps))[::3]
    m = layer.mlp
    gate = p.linear(y2, w(m.gate_proj), b(m.gate_proj), "gate_proj", rank2=False)
    up = p.linear(y2, w(m.up_proj), b(m.up_proj), "up_proj", rank2=False)
    op, dom, attrs = ACTIVATIONS[cfg.hidden_act]
    act = p.op("Mul", p.op(op, gate, domain=dom, **attrs), up)
    p.op("Add", res, p.linear(act, w(m.down_proj), b(m.down_proj), "down", rank2=False), outs=[h_out])
    p.output(h_out, FLOAT, ["batch", "seq", d])
    return p


def causal_attention(p: Part, q: str, k: str, v: str, heads: int, v_width: int, scale: float,
                     budget: int) -> str:
    """MultiHeadAttention of q [B, T, H*qk] over k [B, P+T, H*qk], v [B, P+T, H*vd], query i
    seeing keys <= P + i, in chunks of query rows whose fp32 scores [H, rows, P+T] stay under
    ``budget`` bytes (a Loop; one iteration for a frame's prompt). Every iteration takes exactly
    ``rows`` rows (the last chunk overlaps the one before, as in ``attention_onnx``)."""
    from onnx import helper
    one = p.const([1])
    total = p.dim(p.op("Shape", q), 1)
    tk = p.dim(p.op("Shape", k), 1)
    rows = p.op("Div", p.const([budget // 4]), p.op("Mul", tk, p.const([heads])))
    rows = p.op("Max", p.op("Min", rows, total), one)
    iters = p.op("Div", p.op("Sub", p.op("Add", total, rows), one), rows)
    last = p.op("Sub", total, rows)
    kpos = p.op("Unsqueeze", p.op("Range", p.const(0), p.op("Squeeze", tk, p.const([0])), p.const(1)), p.const([0]))
    body = Part("causal_chunk", p.opset)
    body._n = p._n
    it, cond = body.fresh("i"), body.fresh("cond")
    start = body.op("Min", body.op("Mul", body.op("Unsqueeze", it, p.const([0])), rows), last)
    end = body.op("Add", start, rows)
    q_c = body.op("Slice", q, start, end, p.const([1]))
    first = body.op("Add", start, D_PAST)
    qpos = body.op("Range", body.op("Squeeze", first, p.const([0])),
                   body.op("Squeeze", body.op("Add", first, rows), p.const([0])), p.const(1))
    allowed = body.op("LessOrEqual", kpos, body.op("Unsqueeze", qpos, p.const([1])))        # [rows, Tk]
    bias = body.op("Where", allowed, p.const(np.float32(0), np.float32), p.const(np.float32(-np.inf), np.float32))
    bias = body.op("Unsqueeze", bias, p.const([0, 1]))
    o = body.op("MultiHeadAttention", q_c, k, v, "", "", bias, domain=MS, num_heads=heads, scale=scale)
    cond_out = body.op("Identity", cond)
    graph = helper.make_graph(
        body.nodes, body.name,
        [helper.make_tensor_value_info(it, INT64, []), helper.make_tensor_value_info(cond, BOOL, [])],
        [helper.make_tensor_value_info(cond_out, BOOL, []), helper.make_tensor_value_info(o, FLOAT, None)],
        body.inits)
    stacked = p.op("Loop", p.op("Squeeze", iters, p.const([0])), p.const(np.array(True), np.bool_), body=graph)
    flat = p.op("Reshape", p.op("Transpose", stacked, perm=[1, 0, 2, 3]), p.const([0, -1, v_width]))
    head_end = p.op("Mul", p.op("Sub", iters, one), rows)
    tail_start = p.op("Sub", p.op("Add", head_end, head_end), last)
    axis = p.const([1])
    head = p.op("Slice", flat, p.const([0]), head_end, axis)
    tail = p.op("Slice", flat, tail_start, p.op("Add", head_end, rows), axis)
    return p.op("Concat", head, tail, axis=1)
