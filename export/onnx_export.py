"""Export a checkpoint into a self-contained engine directory: two ONNX graphs, the files the
runtime reads (tokenizer, chat template, config), and a manifest.

``vision.onnx``  patches [N, 768] + host metadata (RoPE, window permutation, padded window
                 slots, image segments) -> image_embeds [N/4, d]. N is dynamic.
``llm.onnx``     inputs_embeds [1, T, d] + image_positions [M] + past cache [.., P, ..] ->
                 vision_hidden [M, d], pre_vision_hidden [min(M, 1), d], last_logits [1, V],
                 scores_<task> [M, K] and the present cache [.., P + T, ..]. Prefill is a call
                 with a zero-length past, a decode step one with T = 1 and M = 0: one graph, one
                 copy of the decoder weights. The lm_head is the tied embedding table, stored
                 once; the runtime reads the embedding rows of the prompt from the same bytes
                 (``tied_table``), so token embedding and the image-row scatter happen on the
                 host: no CumSum, no [M, T] comparison, no data-dependent shape in the graph.

Exporter: the legacy TorchScript exporter (``dynamo=False``, opset 17; 21 for quantized graphs).
On 2 CPU cores dynamo takes ~50x longer for the same graph (env-probe sec. 2) and gains nothing
here: the models have no data-dependent python control flow and every dynamic size is read off a
tensor shape. Attention is ``densert.model.attention`` (chunked, fp32 softmax), exported as
Loops over chunks (``attention_onnx``), so its memory is bounded at any image size and the graph
stays inside TensorRT's parser (``trt_rules``, checked at export).
"""
from __future__ import annotations

import copy
import dataclasses
import datetime as _dt
import gc
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densert import __version__
from densert.checkpoint.loader import load_model
from densert.errors import EngineError
from densert.extras import require
from densert.image import DEFAULT_MAX_PATCHES, PATCH
from densert.kernels.dense_head import subset_weight
from densert.model.config import CACHE_LAYOUTS, YoutuVLConfig
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.model.vision_meta import VisionMeta, build_vision_meta, max_window_slots, window_slot_count
from densert.tasks import DENSE_TASKS

from . import quantize as Q
from . import trt_rules
from .graph_writer import finalize_graph
from .manifest import (FORMAT, FORMAT_VERSION, check_out_dir, checkpoint_identity, file_sha256,
                       write_manifest)
from .options import PRECISIONS, ExportOptions

OPSET = 17
VISION_INPUTS = ("pixel_values", "cos", "sin", "window_index", "reverse_index", "window_slots",
                 "window_inverse", "image_segment_ids")
LLM_INPUTS = ("inputs_embeds", "image_positions")
TABLE_INPUT = "lm_head.weight"      # the tied table: a trace input that becomes an initializer
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


# ---------------------------------------------------------------- precision policy
class _Fp32LayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def prepare_for_export(model: YoutuVLForConditionalGeneration, precision: str) -> YoutuVLForConditionalGeneration:
    """fp16: a half copy with fp32 LayerNorms (RMSNorm, softmax and vision RoPE are fp32 in the
    model already). fp32 / int8 / int4: fp32 (weights are quantized in the ONNX graph)."""
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}; expected one of {PRECISIONS}")
    model = model.float().eval()
    if precision == "fp16":
        model = copy.deepcopy(model).half()  # never flip the caller's model to fp16
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(mod, cname, _Fp32LayerNorm(child))
    return model


def table_rows(weight: torch.Tensor, ids: Sequence[int], precision: str, block: int,
               policy: dict[str, str] | None = None) -> torch.Tensor:
    """fp32 rows of the tied table as the engine stores them (quantized formats dequantized)."""
    rows = weight.detach()[torch.as_tensor(list(ids), dtype=torch.long)].float().numpy()
    fmt = Q.weight_format(precision, "table", policy)
    return torch.from_numpy(np.ascontiguousarray(Q.fake_quantize(rows.T, fmt, block).T))


# ---------------------------------------------------------------- graph wrappers
class VisionGraph(nn.Module):
    def __init__(self, model: YoutuVLForConditionalGeneration):
        super().__init__()
        self.m = model

    def forward(self, pixel_values, cos, sin, window_index, reverse_index, window_slots,
                window_inverse, image_segment_ids):
        meta = VisionMeta(grids=[], cos=cos, sin=sin, window_index=window_index,
                          reverse_index=reverse_index, window_seqlens=[], image_seqlens=[],
                          window_slots=window_slots, window_inverse=window_inverse,
                          image_segment_ids=image_segment_ids)
        return self.m.encode_image(pixel_values, meta)


def cache_names(layout: str) -> tuple[list[str], list[str]]:
    if layout == "latent":
        return ["past_latent"], ["present_latent"]
    if layout == "full":
        return ["past_key", "past_value"], ["present_key", "present_value"]
    raise EngineError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")


def _last_logits(w: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """[1, V] logits of the last position. A 2-D ``linear`` with a bias exports as one
    Gemm(transB=1) on the tied [V, d] table; without a bias it becomes MatMul(h, Transpose(W))
    and constant folding stores a transposed copy (1.45 G values at 4B widths)."""
    return F.linear(h[0, -1:], w, torch.zeros(w.shape[0], dtype=w.dtype))


class LLMGraph(nn.Module):
    """One decoder graph for prefill (past of length 0) and decode (T = 1, no image rows).

    The tied table is the trace's last input (``TABLE_INPUT``), not a parameter: the tracer
    would otherwise serialize a second in-memory copy of its V x d values; the writer streams
    it from a raw file into ``llm.onnx.data`` as the lm_head initializer instead."""

    def __init__(self, model: YoutuVLForConditionalGeneration, layout: str,
                 subsets: dict[str, torch.Tensor]):
        super().__init__()
        self.m, self.layout = model, layout
        self.tasks = list(subsets)
        dt = model.lm_head.weight.dtype
        for t, w in subsets.items():   # stored [d, K]: the graph's MatMul weight, by this name
            self.register_buffer(f"subset_{t}", w.to(dt).t().contiguous())

    def forward(self, inputs_embeds, image_positions, *past_and_table):
        *past, table = past_and_table
        h, present = self.m.model(inputs_embeds, tuple(past), self.layout)
        h0 = h[0]
        vision_hidden = h0.index_select(0, image_positions)                 # [M, d]
        # The position before the first image pad (<|vision_start|>); [0, d] without an image.
        pre = h0.index_select(0, (image_positions[:1] - 1).clamp(min=0))
        scores = [torch.matmul(vision_hidden, getattr(self, f"subset_{t}")) for t in self.tasks]
        return (vision_hidden, pre, _last_logits(table, h), *scores, *present)


# ---------------------------------------------------------------- export
def _io_spec(names, example, dyn: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    out = []
    for n, t in zip(names, example):
        shape = [dyn.get(n, {}).get(i, int(s)) for i, s in enumerate(t.shape)]
        out.append({"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return out


def _export_one(module, args, path: Path, in_names, out_names, dyn):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings and the legacy-exporter deprecation notice
        torch.onnx.export(module, tuple(args), str(path), dynamo=False, opset_version=OPSET,
                          input_names=list(in_names), output_names=list(out_names),
                          dynamic_axes=dyn, do_constant_folding=True)


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


def export_engine(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  *, task_groups: dict[str, dict[str, Any]] | None = None, progress: bool = True,
                  model: YoutuVLForConditionalGeneration | None = None,
                  quant_policy: dict[str, str] | None = None, **overrides) -> dict[str, Any]:
    """Write vision.onnx, llm.onnx (each with its .onnx.data), the side files and manifest.json
    into ``out_dir``; returns the manifest.

    ``options`` (or ``overrides``: its fields) say what to export. ``task_groups`` overrides the
    subsets read from tokenizer.json ({task: {"groups": [[ids]], "labels": [...]}}); ``model``
    skips loading when the caller already holds the checkpoint; ``quant_policy`` overrides
    ``quantize.POLICY`` part by part (benchmarks measure the alternatives).
    """
    from tqdm.auto import tqdm

    require("onnx", "densert export")
    try:
        o = dataclasses.replace(options or ExportOptions(), **overrides)
    except ValueError as e:
        raise EngineError(str(e)) from None
    check_out_dir(out_dir, model_dir, o.force)
    precision, tasks, cache_layout = o.precision, list(o.tasks), o.cache_layout
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    steps = ["hash checkpoint", "load model", "trace vision", "trace llm", "vision.onnx", "llm.onnx",
             "manifest.json"]
    bar = tqdm(total=len(steps), desc="densert export", unit="step", disable=not progress)

    def step(name):
        bar.set_postfix_str(name)

    step("hash checkpoint")
    ident = checkpoint_identity(model_dir)
    bar.update()
    step("load model")
    if model is None:
        model = load_model(model_dir)
    cfg = model.config
    budget = image_budget(o, cfg)
    groups = task_groups if task_groups is not None else resolve_task_groups(model_dir, tasks)
    groups = {t: g for t, g in groups.items() if t in tasks}
    # Task rows as the engine's own table holds them, so the scores equal the runtime's head.
    subsets = {}
    for t, g in groups.items():
        ids = sorted({i for grp in g["groups"] for i in grp})
        rows = table_rows(model.lm_head.weight, ids, precision, o.int4_block, quant_policy)
        pos = {i: k for k, i in enumerate(ids)}
        subsets[t] = subset_weight(rows, [[pos[i] for i in grp] for grp in g["groups"]])
    model = prepare_for_export(model, precision)
    score_budget = o.attention_chunk_mib << 20
    model.siglip2.vision_model.score_budget = model.model.score_budget = score_budget
    fdt = torch.float16 if precision == "fp16" else torch.float32
    float_type = 10 if precision == "fp16" else 1
    bar.update()

    vc = cfg.vision_config
    gh, gw = example_grid(budget["max_patches"])
    meta = build_vision_meta([(gh, gw)], vc)
    n, m_cells = gh * gw, gh * gw // vc.merge_unit
    if budget["max_patches"] < n:
        raise EngineError(f"the engines' image budget ({budget['max_patches']} patches) is below "
                          f"the export example's {n} patches")
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="densert-export-"))
    past_in, pres_out = cache_names(cache_layout)
    seq_axis = 2 if cache_layout == "latent" else 3
    try:
        with torch.no_grad():
            step("trace vision")
            v_args = [torch.randn(n, vc.patch_dim, dtype=fdt), meta.cos, meta.sin, meta.window_index,
                      meta.reverse_index, meta.window_slots, meta.window_inverse, meta.image_segment_ids]
            v_dyn = {"pixel_values": {0: "patches"}, "cos": {0: "patches"}, "sin": {0: "patches"},
                     "window_index": {0: "cells"}, "reverse_index": {0: "cells"},
                     "window_slots": {0: "slots"}, "window_inverse": {0: "patches"},
                     "image_segment_ids": {0: "patches"}, "image_embeds": {0: "cells"}}
            vg = VisionGraph(model)
            v_out = vg(*v_args)
            (tmp / "vision").mkdir()
            _export_one(vg, v_args, tmp / "vision" / "vision.onnx", VISION_INPUTS, ["image_embeds"], v_dyn)
            v_in = _io_spec(VISION_INPUTS, v_args, v_dyn)
            v_outs = _io_spec(["image_embeds"], [v_out], v_dyn)
            bar.update()

            # ---- llm: a prompt of text, vision_start, M pads, vision_end, text after a short
            # past, so no size is 0 or 1 while tracing (the graph stays shape-generic).
            step("trace llm")
            past_len, t_len = 3, m_cells + 6
            emb = torch.randn(1, t_len, cfg.hidden_size, dtype=fdt) * 0.02
            positions = torch.arange(3, 3 + m_cells)
            _, past = model.model(torch.randn(1, past_len, cfg.hidden_size, dtype=fdt) * 0.02, None,
                                  cache_layout)
            table = model.lm_head.weight.detach()
            l_args = [emb, positions, *past]
            l_out_names = ["vision_hidden", "pre_vision_hidden", "last_logits",
                           *[f"scores_{t}" for t in subsets], *pres_out]
            l_dyn = {"inputs_embeds": {1: "seq"}, "image_positions": {0: "cells"},
                     **{n_: {seq_axis: "past_seq"} for n_ in past_in},
                     "vision_hidden": {0: "cells"}, "pre_vision_hidden": {0: "first_cell"},
                     **{f"scores_{t}": {0: "cells"} for t in subsets},
                     **{n_: {seq_axis: "total_seq"} for n_ in pres_out}}
            lg = LLMGraph(model, cache_layout, subsets)
            l_out = lg(*l_args, table)
            in_names = [*LLM_INPUTS, *past_in]
            (tmp / "llm").mkdir()
            _export_one(lg, [*l_args, table], tmp / "llm" / "llm.onnx", [*in_names, TABLE_INPUT],
                        l_out_names, l_dyn)
            table_file = tmp / "llm" / "table.bin"
            table.numpy().tofile(table_file)
            table_source = {"name": TABLE_INPUT, "file": table_file.name,
                            "dtype": str(table.dtype).replace("torch.", ""), "shape": list(table.shape)}
            l_in = _io_spec(in_names, l_args, l_dyn)
            l_outs = _io_spec(l_out_names, l_out, l_dyn)
            bar.update()
        # The traced graphs hold the weights now; free the model before they are rewritten.
        table_shape = tuple(table.shape)
        del model, vg, lg, l_out, v_out, past, l_args, table
        gc.collect()

        step("vision.onnx")
        wv = finalize_graph(tmp / "vision" / "vision.onnx", out_dir, "vision", v_in, precision=precision,
                            part="vision", float_type=float_type, block=o.int4_block,
                            policy=quant_policy)
        graphs["vision"] = _graph_entry(wv, v_in, v_outs)
        shutil.rmtree(tmp / "vision", ignore_errors=True)
        bar.update()
        step("llm.onnx")
        wl = finalize_graph(tmp / "llm" / "llm.onnx", out_dir, "llm", l_in, precision=precision,
                            part="llm", float_type=float_type, block=o.int4_block,
                            table_shape=table_shape, policy=quant_policy, input_source=table_source)
        graphs["llm"] = _graph_entry(wl, l_in, l_outs)
        bar.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    step("manifest.json")
    import onnx
    for g in graphs:
        bad = trt_rules.problems(onnx.load(str(out_dir / graphs[g]["file"]), load_external_data=False))
        if bad:
            raise EngineError(f"export: {g}.onnx would not parse in TensorRT {trt_rules.OLDEST_TENSORRT}: "
                              + "; ".join(bad[:5]))
    side = [f for f in SIDE_FILES if (model_dir / f).is_file()]
    for f in side:
        shutil.copyfile(model_dir / f, out_dir / f)
    for g in graphs.values():
        g["sha256"] = {f: file_sha256(out_dir / f) for f in [g["file"], *g["external_data"]]}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "densert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "onnx_opset": OPSET, "mode": "torchscript (dynamo=False)"},
        "precision": precision, "io_float_dtype": str(fdt).replace("torch.", ""),
        "precision_policy": PRECISION_POLICY[precision].format(block=o.int4_block),
        "weight_formats": ({**Q.POLICY[precision], **(quant_policy or {})}
                           if precision in Q.QUANTIZED_PRECISIONS else None),
        "cache_layout": cache_layout, **budget, "attention_chunk_bytes": score_budget,
        "tasks": {t: ({"groups": groups[t]["groups"], "labels": groups[t].get("labels"),
                       "output": f"scores_{t}"} if t in groups else {}) for t in tasks},
        "checkpoint": {"path": str(model_dir.resolve()), **ident},
        "config": _config_summary(cfg),
        "files": {f: file_sha256(out_dir / f) for f in side},
        "tied_table": wl.table,
        "graphs": graphs,
    }
    write_manifest(out_dir, manifest)
    bar.update()
    bar.close()
    return manifest


PRECISION_POLICY = {
    "fp32": "fp32 throughout",
    "fp16": "fp16 weights/activations; LayerNorm, RMSNorm, attention scores+softmax and vision "
            "RoPE computed in fp32",
    "int8": "weight-only int8 (per output channel) for every Linear and the tied lm_head / "
            "embedding table; norms, biases, RoPE and task rows fp32; fp32 activations",
    "int4": "weight-only int4 (blocks of {block} along the input dim) for the decoder Linears; "
            "the tied lm_head / embedding table, vision tower and merger int8 per channel; norms, "
            "biases, RoPE and task rows fp32; fp32 activations",
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
