"""Export a checkpoint into a self-contained engine directory: two ONNX graphs, the files the
runtime reads (tokenizer, chat template, config), and a manifest.

``vision.onnx``  patches [N, 768] + host metadata (RoPE, window permutation, padded window
                 slots, image segments) -> image_embeds [N/4, d]. N is dynamic.
``llm.onnx``     inputs_embeds [B, T, d] + image_positions [M] + past cache [.., B, P, ..] ->
                 vision_hidden [M, d], pre_vision_hidden [min(M, 1), d], last_logits [B, V],
                 scores_<task> [M, K] and the present cache [.., B, P + T, ..]. B is 1 but
                 for a batched prefill (a camera rig's prompts of one length); image_positions
                 index the B x T positions row after row. Prefill is a call
                 with a zero-length past, a decode step one with T = 1 and M = 0: one graph, one
                 copy of the decoder weights. The lm_head is the tied embedding table, stored
                 once; the runtime reads the embedding rows of the prompt from the same bytes
                 (``tied_table``), so token embedding and the image-row scatter happen on the
                 host: no CumSum, no [M, T] comparison, no data-dependent shape in the graph.

Exporter: the legacy TorchScript exporter (``dynamo=False``, opset 17; 21 for quantized graphs).
On 2 CPU cores dynamo takes ~50x longer for the same graph (env-probe sec. 2) and gains nothing
here: the models have no data-dependent python control flow and every dynamic size is read off a
tensor shape. The graphs are traced one part at a time (the patch embedding, each ViT layer, the
merger; RoPE, each decoder layer, the tail) from the weights of that part alone, and each part's
weights are quantized and streamed to disk before the next part is loaded (``graph_writer``):
export memory is one layer's, not the model's. Attention is ``densert.model.attention``
(chunked, fp32 softmax), exported as Loops over chunks (``attention_onnx``), so its memory is
bounded at any image size and the graph stays inside TensorRT's parser (``trt_rules``, checked
at export). The onnxruntime target (fp32 / int8 / int4) writes the ViT and decoder layers
instead from ONNX Runtime's fused operators, node by node (``ort_fused``).
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch import nn

from densert.checkpoint.loader import materialize, release, skeleton
from densert.checkpoint.safetensors import MappedTensor
from densert.errors import EngineError
from densert.extras import require
from densert.image import DEFAULT_MAX_PATCHES, PATCH
from densert.kernels.dense_head import subset_weight
from densert.model.config import CACHE_LAYOUTS, YoutuVLConfig
from densert.model.llm import append_past, empty_cache
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.model.vision_meta import VisionMeta, build_vision_meta, max_window_slots, window_slot_count
from densert.tasks import DENSE_TASKS

from . import ort_fused, trt_rules
from . import quantize as Q
from .graph_writer import GraphBuilder, placeholder
from .manifest import BATCH_AXIS, build_manifest, check_out_dir, checkpoint_identity, write_manifest
from .onnx_types import NAMES, float_type
from .options import PRECISIONS, ExportOptions

OPSET = 17
VISION_INPUTS = ("pixel_values", "cos", "sin", "window_index", "reverse_index", "window_slots",
                 "window_inverse", "image_segment_ids")
LLM_INPUTS = ("inputs_embeds", "image_positions")
TABLE = "lm_head.weight"            # the tied table's initializer in llm.onnx
# Checkpoint files the runtime reads besides the weights: copied, so the engine directory runs
# with no checkpoint present (the ones a checkpoint lacks are skipped).
SIDE_FILES = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.json",
              "special_tokens_map.json", "generation_config.json", "preprocessor_config.json")


# ---------------------------------------------------------------- task subsets
def resolve_task_groups(model_dir: str | Path, tasks: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Vocab subsets baked into the prefill graph, from the checkpoint's tokenizer.json.

    depth: 1000 single-id groups (``<custom_1>``..``<custom_1000>``); segment: FG/BG/OTHERS;
    refer: FG/BG. Class-name subsets of open-vocabulary segmentation depend on the request, so
    they are not baked: the runtime scores them on ``vision_hidden``.
    """
    out: dict[str, dict[str, Any]] = {}
    tok = Path(model_dir) / "tokenizer.json"
    dense = [t for t in tasks if t in DENSE_TASKS]
    if not dense:
        return out
    if not tok.is_file():
        raise EngineError(f"{model_dir}: no tokenizer.json, so the vocab subsets of tasks {dense} "
                          "cannot be resolved; export with --tasks chat, or add the tokenizer")
    from densert.text.tokens import BG, FG, OTHERS, Vocab
    vocab = Vocab.from_file(tok)
    if "depth" in tasks:
        out["depth"] = {"groups": [[int(i)] for i in vocab.depth_bin_ids().tolist()],
                        "labels": [f"bin_{k}" for k in range(1, 1001)]}
    for task, names in (("segment", (FG, BG, OTHERS)), ("refer", (FG, BG))):
        if task in tasks:
            out[task] = {"groups": [[vocab.token_id(n)] for n in names],
                         "labels": [n.strip("<>") for n in names]}
    return out


# ---------------------------------------------------------------- weights
def for_precision(module: nn.Module, precision: str) -> nn.Module:
    """fp16: half weights (LayerNorm, RMSNorm, softmax and vision RoPE compute in fp32 inside
    the model). fp32 / int8 / int4: fp32 (weights are quantized in the graph)."""
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}; expected one of {PRECISIONS}")
    return (module.half() if precision == "fp16" else module.float()).eval()


class WeightSource:
    """Where the graph parts' weights come from: the checkpoint's safetensors, one module at a
    time (the model is built on ``meta``; a part's parameters are read, traced and dropped), or a
    model the caller already holds (tests, benchmarks)."""

    def __init__(self, model_dir: Path, precision: str,
                 model: YoutuVLForConditionalGeneration | None = None):
        self.infos, self.precision = None, precision
        if model is not None and precision == "fp16":
            model = for_precision(copy.deepcopy(model), precision)   # never flip a caller's model
        elif model is not None:
            model = for_precision(model, precision)
        else:
            model, self.infos = skeleton(model_dir)
        self.model, self.config = model, model.config

    @contextlib.contextmanager
    def part(self, name: str):
        """The submodule ``name`` with its weights, at the export precision, for tracing."""
        m = self.model.get_submodule(name)
        if self.infos is not None:
            for_precision(materialize(m, f"{name}.", self.infos), self.precision)
        try:
            yield m
        finally:
            if self.infos is not None:
                release(m)

    def table(self):
        """The tied lm_head / embedding table [V, d]: float32 rows, read on demand."""
        if self.infos is None:
            return self.model.lm_head.weight.detach().float().numpy()
        tied = self.config.tie_word_embeddings
        return MappedTensor(self.infos["model.embed_tokens.weight" if tied else "lm_head.weight"])


def head_rows(table, ids: Sequence[int]) -> torch.Tensor:
    """The exact fp32 rows of ``ids``: the dense heads read these, at any table precision."""
    return torch.from_numpy(np.ascontiguousarray(table[np.asarray(list(ids), dtype=np.int64)],
                                                 dtype=np.float32))


# ---------------------------------------------------------------- graph parts
class _VisionPart(nn.Module):
    """One stage of the vision tower over the graph's host-metadata inputs."""

    def __init__(self, fn, *modules: nn.Module):
        super().__init__()
        self.fn = fn
        self.weights = nn.ModuleList(modules)   # traced as parameters, not captured constants

    def forward(self, x, cos, sin, window_index, reverse_index, window_slots, window_inverse,
                image_segment_ids):
        meta = VisionMeta(grids=[], cos=cos, sin=sin, window_index=window_index,
                          reverse_index=reverse_index, window_seqlens=[], image_seqlens=[],
                          window_slots=window_slots, window_inverse=window_inverse,
                          image_segment_ids=image_segment_ids)
        return self.fn(x, meta)


class _RopePart(nn.Module):
    def __init__(self, decoder):
        super().__init__()
        self.decoder = decoder

    def forward(self, inputs_embeds, *past):
        return self.decoder.rope_for(inputs_embeds, past)


class _DecoderLayerPart(nn.Module):
    """Decoder layer ``index``: reads its slice of the stacked past, returns its whole cache."""

    def __init__(self, layer, index: int, layout: str, budget: int):
        super().__init__()
        self.layer, self.index, self.layout, self.budget = layer, index, layout, budget

    def forward(self, h, cos, sin, *past):
        full: list[torch.Tensor] = []

        def store(new):
            full.extend(append_past(past, self.index, new))
            return tuple(full)

        return (self.layer(h, cos, sin, store, self.layout, self.budget), *full)


class _LLMTail(nn.Module):
    """Final norm, the rows a dense map reads, the last position's hidden state (the lm_head is
    written after it), the baked task scores and the stacked present cache."""

    def __init__(self, norm, subsets: dict[str, torch.Tensor], dtype, n_cache: int):
        super().__init__()
        self.norm, self.tasks, self.n_cache = norm, list(subsets), n_cache
        for t, w in subsets.items():   # stored [d, K]: the graph's MatMul weight, by this name
            self.register_buffer(f"subset_{t}", w.to(dtype).t().contiguous())

    def forward(self, h, image_positions, *presents):
        hn = self.norm(h)
        rows = hn.reshape(-1, hn.shape[-1])       # [B*T, d]: the batch's prompts row after row
        vision_hidden = rows.index_select(0, image_positions)               # [M, d]
        # The position before the first image pad (<|vision_start|>); [0, d] without an image.
        pre = rows.index_select(0, (image_positions[:1] - 1).clamp(min=0))
        scores = [torch.matmul(vision_hidden, getattr(self, f"subset_{t}")) for t in self.tasks]
        stacked = [torch.stack(presents[k::self.n_cache]) for k in range(self.n_cache)]
        return (vision_hidden, pre, hn[:, -1], *scores, *stacked)


def cache_names(layout: str) -> tuple[list[str], list[str]]:
    if layout == "latent":
        return ["past_latent"], ["present_latent"]
    if layout == "full":
        return ["past_key", "past_value"], ["present_key", "present_value"]
    raise EngineError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")


def _io_spec(names, example, dyn: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    out = []
    for n, t in zip(names, example):
        shape = [dyn.get(n, {}).get(i, int(s)) for i, s in enumerate(t.shape)]
        out.append({"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return out


def _trace(module, args, path: Path, in_names, out_names, dyn):
    """One part through the TorchScript exporter; its ModelProto (weights inline, or beside
    ``path`` for a part over protobuf's 2 GB)."""
    import onnx
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter deprecation notice
        torch.onnx.export(module, tuple(args), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(in_names), output_names=list(out_names),
                          dynamic_axes={k: v for k, v in dyn.items() if k in (*in_names, *out_names)},
                          do_constant_folding=True)
    return onnx.load(str(path), load_external_data=False)


class _Parts:
    """Traces parts into a temporary folder and hands them to a ``GraphBuilder``."""

    def __init__(self, builder: GraphBuilder, tmp: Path, dyn: dict[str, dict[int, str]], tick):
        self.builder, self.tmp, self.dyn, self.tick = builder, tmp, dyn, tick

    def add(self, prefix: str, module, args, in_names, out_names, *, kind: str, graph_outputs=()):
        d = self.tmp / prefix
        d.mkdir()
        with torch.no_grad():
            model = _trace(module, args, d / "part.onnx", in_names, out_names, self.dyn)
        self.builder.add(model, prefix, keep={*in_names, *out_names},
                         outputs=list(graph_outputs), src_dir=d, kind=kind)
        shutil.rmtree(d, ignore_errors=True)
        self.tick(prefix)

    def add_written(self, prefix: str, part: ort_fused.Part, *, kind: str) -> None:
        """A part written node by node (``ort_fused``): its inputs and outputs are graph-level
        names, like a traced part's; its weights come from the module (``part.sources``)."""
        model = part.model()
        g = model.graph
        self.builder.add(model, prefix, keep={v.name for v in (*g.input, *g.output)}, sources=part.sources,
                         kind=kind)
        self.tick(prefix)


def fused(o: ExportOptions) -> bool:
    """Whether the layers are written from ONNX Runtime's fused operators (``ort_fused``): the
    onnxruntime target at fp32 / int8 / int4. fp16 (the GPU's engine; ONNX Runtime's CPU
    attention is fp32 only) and the tensorrt target keep the traced standard-op layers."""
    return o.target == "onnxruntime" and o.precision != "fp16"


def example_grid(max_patches: int) -> tuple[int, int]:
    """Example image for tracing: not square, several windows, so nothing specialises to 1 or to
    a square grid (the trace is shape-generic; the example only has to avoid 0/1 sizes)."""
    return (12, 20) if max_patches >= 240 else (4, 6)


def image_budget(o: ExportOptions, cfg: YoutuVLConfig) -> dict[str, Any]:
    """What the engines are sized for: the largest image (patches), the most window slots, and
    the deployed sizes when ``--image-size`` names them (the processor's resize of each)."""
    vc = cfg.vision_config
    if o.image_sizes:
        from densert.image.preprocess import target_size
        sizes = [target_size(h, w, DEFAULT_MAX_PATCHES) for h, w in o.image_sizes]
        grids = [(th // PATCH, tw // PATCH) for th, tw in sizes]
        max_patches = max(gh * gw for gh, gw in grids)
        slots = max_window_slots(max_patches, vc, grids)
    else:
        sizes, grids, max_patches = [], [], o.max_patches
        slots = max_window_slots(max_patches, vc)
    return {"max_patches": max_patches, "max_image_tokens": max_patches // vc.merge_unit,
            "max_window_slots": slots, "image_sizes": [list(s) for s in sizes],
            "grids": [list(g) for g in grids]}


# ---------------------------------------------------------------- make_* steps
def make_vision(weights: WeightSource, out_dir: Path, tmp: Path, o: ExportOptions, budget, tick,
                quant_policy=None):
    """vision.onnx: patch embedding, each ViT layer, then the post-norm and the merger."""
    cfg, precision = weights.config, o.precision
    vc = cfg.vision_config
    fdt = getattr(torch, NAMES[float_type(precision)])
    gh, gw = example_grid(budget["max_patches"])
    meta = build_vision_meta([(gh, gw)], vc)
    n = gh * gw
    if budget["max_patches"] < n:
        raise EngineError(f"the engines' image budget ({budget['max_patches']} patches) is below "
                          f"the export example's {n} patches")
    meta_args = [meta.cos, meta.sin, meta.window_index, meta.reverse_index, meta.window_slots,
                 meta.window_inverse, meta.image_segment_ids]
    meta_names = list(VISION_INPUTS[1:])
    dyn = {"pixel_values": {0: "patches"}, "cos": {0: "patches"}, "sin": {0: "patches"},
           "window_index": {0: "cells"}, "reverse_index": {0: "cells"}, "window_slots": {0: "slots"},
           "window_inverse": {0: "patches"}, "image_segment_ids": {0: "patches"},
           "image_embeds": {0: "cells"}}
    layers = vc.num_hidden_layers
    for i in range(layers + 1):
        dyn[f"vh_{i}"] = {0: "patches"}
    b = GraphBuilder(out_dir, "vision", precision=precision, part="vision",
                     float_type=float_type(precision), block=o.int4_block, policy=quant_policy,
                     target=o.target, ort_matmul=o.ort_matmul)
    parts = _Parts(b, tmp, dyn, tick)
    vt_name = "siglip2.vision_model"
    try:
        vt = weights.model.get_submodule(vt_name)
        with weights.part(f"{vt_name}.embeddings") as emb:
            px = torch.randn(n, vc.patch_dim, dtype=fdt)
            part = _VisionPart(lambda x, m: vt.embed(x, m), emb)
            h = part(px, *meta_args)
            parts.add("embed", part, [px, *meta_args], ["pixel_values", *meta_names], ["vh_0"],
                      kind="vision")
        if fused(o):
            parts.add_written("prep", ort_fused.vision_prep(vc, OPSET), kind="vision")
        for i in range(layers):
            with weights.part(f"{vt_name}.encoder.layers.{i}") as layer:
                if fused(o):   # the example h only gives the merger's trace its shape
                    parts.add_written(f"layer{i}", ort_fused.vision_layer(
                        layer, vc, i in vt.full_attention, f"vh_{i}", f"vh_{i + 1}", OPSET,
                        o.attention_chunk_mib << 20), kind="vision")
                    continue
                part = _VisionPart(lambda x, m, i=i: vt.layer(i, x, m), layer)
                h_next = part(h, *meta_args)
                parts.add(f"layer{i}", part, [h, *meta_args], [f"vh_{i}", *meta_names],
                          [f"vh_{i + 1}"], kind="vision")
                h = h_next
        with weights.part(f"{vt_name}.post_layernorm") as ln, weights.part("merger") as merger:
            part = _VisionPart(lambda x, m: merger(vt.finish(x, m)), ln, merger)
            out = part(h, *meta_args)
            parts.add("merger", part, [h, *meta_args], [f"vh_{layers}", *meta_names],
                      ["image_embeds"], kind="vision", graph_outputs=["image_embeds"])
        v_in = _io_spec(VISION_INPUTS, [px, *meta_args], dyn)
        written = b.finish(v_in, ["image_embeds"])
    finally:
        b.close()
    return written, v_in, _io_spec(["image_embeds"], [out], dyn)
def make_llm(weights: WeightSource, out_dir: Path, tmp: Path, o: ExportOptions, groups, tick,
             quant_policy=None):
    """llm.onnx: RoPE of the positions, each decoder layer, the tail (norm, task scores, stacked
    cache) and the tied lm_head, whose table is streamed from the checkpoint (``make_lm_head``)."""
    cfg, precision, layout = weights.config, o.precision, o.cache_layout
    fdt = getattr(torch, NAMES[float_type(precision)])
    table = weights.table()
    # Task rows exactly as the checkpoint holds them, at any table precision: the engine's dense
    # scores and the runtime's head (``TiedTable.head_rows``) read these, not quantized rows.
    rows = {}
    subsets = {}
    for t, g in groups.items():
        ids = sorted({i for grp in g["groups"] for i in grp})
        exact = head_rows(table, ids)
        rows.update(zip(ids, exact))
        pos = {i: k for k, i in enumerate(ids)}
        subsets[t] = subset_weight(exact, [[pos[i] for i in grp] for grp in g["groups"]])
    past_in, pres_out = cache_names(layout)
    seq_axis = 2 if layout == "latent" else 3
    n_layers, n_cache = cfg.num_hidden_layers, len(past_in)
    m_cells = 60
    past_len, t_len = 3, m_cells + 6
    batch = 2   # traced with two prompts, so nothing specialises to a batch of 1
    emb = torch.randn(batch, t_len, cfg.hidden_size, dtype=fdt) * 0.02
    positions = torch.arange(3, 3 + m_cells)
    past = [torch.randn(*c.shape[:seq_axis], past_len, c.shape[-1], dtype=fdt) * 0.02
            for c in empty_cache(cfg, layout, batch)]
    layer_out = [[f"{n}_{i}" for n in pres_out] for i in range(n_layers)]
    out_names = ["vision_hidden", "pre_vision_hidden", "last_hidden",
                 *[f"scores_{t}" for t in subsets], *pres_out]
    B = BATCH_AXIS
    dyn = {"inputs_embeds": {0: B, 1: "seq"}, "image_positions": {0: "cells"}, "cos": {0: "seq"},
           "sin": {0: "seq"}, **{n: {1: B, seq_axis: "past_seq"} for n in past_in},
           **{n: {0: B, seq_axis - 1: "total_seq"} for names in layer_out for n in names},
           **{f"h_{i}": {0: B, 1: "seq"} for i in range(n_layers + 1)},
           "vision_hidden": {0: "cells"}, "pre_vision_hidden": {0: "first_cell"},
           "last_hidden": {0: B}, "last_logits": {0: B},
           **{f"scores_{t}": {0: "cells"} for t in subsets},
           **{n: {1: B, seq_axis: "total_seq"} for n in pres_out}}
    b = GraphBuilder(out_dir, "llm", precision=precision, part="llm", float_type=float_type(precision),
                     block=o.int4_block, policy=quant_policy, target=o.target, ort_matmul=o.ort_matmul)
    parts = _Parts(b, tmp, dyn, tick)
    dec = weights.model.model
    dec.score_budget = o.attention_chunk_mib << 20
    try:
        rope = _RopePart(dec)      # no weights: inv_freq is a buffer
        cos, sin = rope(emb, *past)
        parts.add("rope", rope, [emb, *past], ["inputs_embeds", *past_in], ["cos", "sin"], kind="decoder")
        h, presents = emb, []
        fused_layers = fused(o) and layout == "latent"
        if fused_layers:
            parts.add_written("prep", ort_fused.decoder_prep(OPSET), kind="decoder")
        for i in range(n_layers):
            with weights.part(f"model.layers.{i}") as layer:
                if fused_layers:   # example caches only give the tail's trace its shapes
                    parts.add_written(f"layer{i}", ort_fused.decoder_layer(
                        layer, cfg, i, "inputs_embeds" if i == 0 else f"h_{i}", f"h_{i + 1}",
                        layer_out[i][0], OPSET, dec.score_budget), kind="decoder")
                    presents.append(torch.cat([past[0][i], torch.randn(*past[0].shape[1:-2], t_len,
                                                                       past[0].shape[-1], dtype=fdt)], dim=-2))
                    continue
                part = _DecoderLayerPart(layer, i, layout, dec.score_budget)
                h_next, *full = part(h, cos, sin, *past)
                ins = ["inputs_embeds" if i == 0 else f"h_{i}", "cos", "sin", *past_in]
                parts.add(f"layer{i}", part, [h, cos, sin, *past], ins, [f"h_{i + 1}", *layer_out[i]],
                          kind="decoder")
                h = h_next
                presents.extend(full)
        with weights.part("model.norm") as norm:
            tail = _LLMTail(norm, subsets, fdt, n_cache)
            out = tail(h, positions, *presents)
            parts.add("tail", tail, [h, positions, *presents],
                      [f"h_{n_layers}", "image_positions", *[n for names in layer_out for n in names]],
                      out_names, kind="heads", graph_outputs=[n for n in out_names if n != "last_hidden"])
        make_lm_head(b, table, cfg, precision, tick)
        tied = b.table
        if rows and tied is not None and tied["format"] not in ("fp32", "fp16"):
            ids = sorted(rows)
            loc = b.add_raw("head_rows", torch.stack([rows[i] for i in ids]).numpy(), kind="table")
            tied_extra = {"head_rows": {"ids": ids, **loc}}
        else:
            tied_extra = {}
        logits = torch.zeros(batch, cfg.vocab_size, dtype=fdt)
        names = ["vision_hidden", "pre_vision_hidden", "last_logits", *out_names[3:]]
        outs = [out[0], out[1], logits, *out[3:]]
        l_in = _io_spec([*LLM_INPUTS, *past_in], [emb, positions, *past], dyn)
        written = b.finish(l_in, names)
        if written.table is not None:
            written.table.update(tied_extra)
    finally:
        b.close()
    return written, l_in, _io_spec(names, outs, dyn)


def make_lm_head(b: GraphBuilder, table, cfg: YoutuVLConfig, precision: str, tick) -> None:
    """last_logits = last_hidden @ table^T, written directly: Gemm(transB=1) on the [V, d] table,
    which the quantizer turns into DequantizeLinear -> MatMul like every other weight. The table
    is a placeholder whose values the writer streams from the checkpoint."""
    from onnx import helper
    ft = float_type(precision)
    V, d = cfg.vocab_size, cfg.hidden_size
    t = placeholder(TABLE, ft, [V, d])
    node = helper.make_node("Gemm", ["last_hidden", TABLE], ["last_logits"], name="lm_head", transB=1)
    graph = helper.make_graph([node], "lm_head",
                              [helper.make_tensor_value_info("last_hidden", ft, [BATCH_AXIS, d])],
                              [helper.make_tensor_value_info("last_logits", ft, [BATCH_AXIS, V])], [t])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])
    b.add(model, "lm_head", keep={"last_hidden", "last_logits"}, outputs=["last_logits"],
          sources={TABLE: table}, kind="table", table=TABLE)
    tick("lm_head")


def export_engine(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  *, task_groups: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                  model: YoutuVLForConditionalGeneration | None = None,
                  quant_policy: dict[str, str] | None = None, **overrides) -> dict[str, Any]:
    """Write vision.onnx, llm.onnx (each with its .onnx.data), the side files and manifest.json
    into ``out_dir``; returns the manifest.

    ``options`` (or ``overrides``: its fields) say what to export. ``task_groups`` overrides the
    subsets read from tokenizer.json ({task: {"groups": [[ids]], "labels": [...]}}); ``model``
    takes the weights from a model the caller holds instead of the checkpoint files;
    ``quant_policy`` overrides ``quantize.POLICY`` part by part (benchmarks measure the
    alternatives). Memory: one layer's weights at a time (plus the quantized tied table).
    """
    from tqdm.auto import tqdm

    require("onnx", "densert export")
    try:
        o = dataclasses.replace(options or ExportOptions(), **overrides)
    except ValueError as e:
        raise EngineError(str(e)) from None
    check_out_dir(out_dir, model_dir, o.force)
    precision, tasks = o.precision, list(o.tasks)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    weights = WeightSource(model_dir, precision, model)
    cfg = weights.config
    vc = cfg.vision_config
    total = vc.num_hidden_layers + cfg.num_hidden_layers + 9
    bar = tqdm(total=total, desc="densert export", unit="part", disable=not progress)

    def tick(name):
        bar.set_postfix_str(name)
        bar.update()

    tick("hash checkpoint")
    ident = checkpoint_identity(model_dir)
    budget = image_budget(o, cfg)
    groups = task_groups if task_groups is not None else resolve_task_groups(model_dir, tasks)
    groups = {t: g for t, g in groups.items() if t in tasks}
    weights.model.siglip2.vision_model.score_budget = o.attention_chunk_mib << 20
    out_dir.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="densert-export-"))
    try:
        wv, v_in, v_out = make_vision(weights, out_dir, tmp, o, budget, tick, quant_policy)
        wl, l_in, l_out = make_llm(weights, out_dir, tmp, o, groups, tick, quant_policy)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    graphs = {"vision": _graph_entry(wv, v_in, v_out), "llm": _graph_entry(wl, l_in, l_out)}
    if o.target == "tensorrt":
        check_tensorrt_rules(out_dir, graphs)
    tick("TensorRT rules")
    side = copy_side_files(model_dir, out_dir)
    manifest = build_manifest(
        o, exporter={"torch": torch.__version__, "onnx_opset": OPSET,
                     "mode": "torchscript (dynamo=False), one part per layer"},
        precision_policy=PRECISION_POLICY[precision].format(block=o.int4_block),
        weight_formats=({**Q.POLICY[precision], **(quant_policy or {})}
                        if precision in Q.QUANTIZED_PRECISIONS else None),
        budget=budget, groups=groups, model_dir=model_dir, identity=ident, config=_config_summary(cfg),
        engine_dir=out_dir, side_files=side, sizes=part_sizes(wv, wl), tied_table=wl.table,
        graphs=graphs)
    tick("hash engine")
    write_manifest(out_dir, manifest)
    tick("manifest.json")
    bar.close()
    return manifest


def part_sizes(*written) -> dict[str, int]:
    """Bytes of weights per part of the model (vision, decoder, heads, table), both graphs."""
    out: dict[str, int] = {}
    for w in written:
        for k, v in w.part_bytes.items():
            out[k] = out.get(k, 0) + v
    return dict(sorted(out.items()))


def check_tensorrt_rules(out_dir: Path, graphs: dict[str, Any]) -> None:
    import onnx
    for g in graphs:
        bad = trt_rules.problems(onnx.load(str(out_dir / graphs[g]["file"]), load_external_data=False))
        if bad:
            raise EngineError(f"export: {g}.onnx would not parse in TensorRT {trt_rules.OLDEST_TENSORRT}: "
                              + "; ".join(bad[:5]))


def copy_side_files(model_dir: Path, out_dir: Path) -> list[str]:
    side = [f for f in SIDE_FILES if (model_dir / f).is_file()]
    for f in side:
        shutil.copyfile(model_dir / f, out_dir / f)
    return side


PRECISION_POLICY = {
    "fp32": "fp32 throughout",
    "fp16": "fp16 weights/activations; LayerNorm, RMSNorm, attention scores+softmax and vision "
            "RoPE computed in fp32",
    "int8": "weight-only int8 (per output channel) for every Linear, MLA's batched kv_b halves and the "
            "tied lm_head / embedding table; norms, biases, RoPE and the task rows fp32; fp32 activations "
            "(onnxruntime target, --ort-matmul int8-gemm: the Linears as int8 GEMMs, activations quantized "
            "to int8 per tensor at run time)",
    "int4": "weight-only int4 for the decoder Linears, the tied lm_head / embedding table, the vision "
            "tower and merger (blocks of {block} along the input dim, fp16 scales; onnxruntime target "
            "with --ort-matmul int8-gemm: the table so, the Linears one clip-searched scale per output "
            "column, run as int8 GEMMs with activations quantized to int8 per tensor at run time); MLA's "
            "batched kv_b halves int8 (onnxruntime target: int4 as the Linears); the task rows (depth "
            "bins, FG/BG) exact fp32 beside the table; norms, biases, RoPE fp32; fp32 activations",
}


def _graph_entry(w, inputs, outputs) -> dict[str, Any]:
    return {"file": w.files[0], "external_data": w.files[1:], "op_types": w.ops,
            "opset": 21 if any(op == "DequantizeLinear" for op in w.ops) else OPSET,
            "inputs": inputs, "outputs": outputs}


def _config_summary(cfg: YoutuVLConfig) -> dict[str, Any]:
    vc = cfg.vision_config
    return {
        "vocab_size": cfg.vocab_size, "hidden_size": cfg.hidden_size, "num_hidden_layers": cfg.num_hidden_layers,
        "num_attention_heads": cfg.num_attention_heads, "kv_lora_rank": cfg.kv_lora_rank,
        "qk_rope_head_dim": cfg.qk_rope_head_dim, "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "v_head_dim": cfg.v_head_dim, "latent_cache_dim": cfg.latent_cache_dim,
        "image_token_id": cfg.image_token_id, "vision_start_token_id": cfg.vision_start_token_id,
        "vision_end_token_id": cfg.vision_end_token_id, "bos_token_id": cfg.bos_token_id,
        "eos_token_id": cfg.eos_token_id,
        "vision": {"hidden_size": vc.hidden_size, "num_hidden_layers": vc.num_hidden_layers,
                   "num_attention_heads": vc.num_attention_heads, "head_dim": vc.head_dim,
                   "patch_dim": vc.patch_dim, "merge_unit": vc.merge_unit,
                   "window_cells": vc.window_cells, "window_slots": window_slot_count(vc),
                   "fullatt_block_indexes": list(vc.fullatt_block_indexes)},
    }
