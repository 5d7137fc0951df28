"""Export a checkpoint into a self-describing engine directory of three ONNX graphs.

``vision.onnx``       patches [N, 768] + host metadata (RoPE, window permutation, segment ids)
                      -> image_embeds [N/4, d]. N is dynamic: one graph serves every image size.
``llm_prefill.onnx``  input_ids [1, T] + image_embeds [M, d] -> vision_hidden [M, d],
                      pre_vision_hidden [1, d], last_logits [1, V], scores_<task> [M, K] and the
                      KV cache. The embedding lookup and the scatter of image rows into the
                      image-pad positions are in the graph, so a caller only feeds token ids.
``llm_decode.onnx``   input_ids [1, 1] + past cache [.., P, ..] -> logits [1, V] + present cache.

Exporter: the legacy TorchScript exporter (``dynamo=False``, opset 17). On 2 CPU cores dynamo takes
~50x longer for the same graph (env-probe sec. 2) and gains nothing here: the models have no data-
dependent python control flow once ``eager_segments=False`` and every dynamic size is read off a
tensor shape. Attention is written out as MatMul/Softmax (no SDPA op) so the softmax can be kept
in fp32 inside fp16 graphs, and the same graph parses in TensorRT's ONNX parser.
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import datetime as _dt
import shutil
import tempfile
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from densert import __version__
from densert.checkpoint.loader import load_model
from densert.errors import EngineError
from densert.extras import require
from densert.kernels.dense_head import subset_weight
from densert.model.config import CACHE_LAYOUTS, YoutuVLConfig
from densert.model.modeling import YoutuVLForConditionalGeneration
from densert.model.vision_meta import VisionMeta, build_vision_meta
from densert.tasks import DENSE_TASKS, GENERATING_TASKS

from .manifest import FORMAT, FORMAT_VERSION, checkpoint_identity, file_sha256, write_manifest
from .options import PRECISIONS, ExportOptions

OPSET = 17
EXTERNAL_DATA_THRESHOLD = 2 << 30    # protobuf's hard 2 GiB message limit

VISION_INPUTS = ("pixel_values", "cos", "sin", "window_index", "reverse_index",
                 "window_segment_ids", "image_segment_ids")

# ONNX ops the onnx-tensorrt parser (TensorRT 10.x, docs/operators.md) supports; the export test
# asserts every op of every graph is in here so a graph that TensorRT would reject fails in CI.
TRT_SUPPORTED_OPS = frozenset("""
Abs Add And ArgMax ArgMin Cast Ceil Clip Concat Constant ConstantOfShape Cos CumSum Div Einsum Equal
Erf Exp Expand Flatten Floor Gather GatherElements GatherND Gelu Gemm Greater GreaterOrEqual
Identity If LayerNormalization Less LessOrEqual Log MatMul Max Mean Min Mod Mul Neg NonZero Not
Or Pow Range Reciprocal ReduceMax ReduceMean ReduceMin ReduceSum Relu Reshape Resize ScatterElements
ScatterND Shape Sigmoid Sin Slice Softmax Split Sqrt Squeeze Sub Tanh Tile TopK Transpose Trilu
Unsqueeze Where Xor
""".split())


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
def _attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False):
    """SDPA written out: scores and softmax in fp32 whatever the input dtype (FP16 ViTs overflow
    in QK^T / softmax), q pre-scaled so the fp16 matmul sees smaller values."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q * scale, k.transpose(-2, -1)).float()
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            s = s.masked_fill(~attn_mask, float("-inf"))
        else:
            s = s + attn_mask.float()
    p = s.softmax(dim=-1).to(v.dtype)
    return torch.matmul(p, v)


class _Fp32LayerNorm(nn.Module):
    def __init__(self, ln: nn.LayerNorm):
        super().__init__()
        self.normalized_shape, self.eps = ln.normalized_shape, ln.eps
        self.weight = nn.Parameter(ln.weight.detach().float(), requires_grad=False)
        self.bias = nn.Parameter(ln.bias.detach().float(), requires_grad=False)

    def forward(self, x):
        return F.layer_norm(x.float(), self.normalized_shape, self.weight, self.bias, self.eps).to(x.dtype)


def prepare_for_export(model: YoutuVLForConditionalGeneration, precision: str) -> YoutuVLForConditionalGeneration:
    if precision not in PRECISIONS:
        raise EngineError(f"precision {precision!r}; expected one of {PRECISIONS}")
    model = model.float().eval()
    if precision == "fp16":
        model = copy.deepcopy(model).half()  # never flip the caller's model to fp16
        # LayerNorm statistics in fp32 (RMSNorm already computes in fp32, vision RoPE too).
        for name, mod in list(model.named_modules()):
            for cname, child in list(mod.named_children()):
                if isinstance(child, nn.LayerNorm):
                    setattr(mod, cname, _Fp32LayerNorm(child))
    return model


@contextlib.contextmanager
def export_patches():
    """Swap SDPA for the explicit fp32-softmax attention while tracing."""
    orig = F.scaled_dot_product_attention
    F.scaled_dot_product_attention = _attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = orig


# ---------------------------------------------------------------- graph wrappers
class VisionGraph(nn.Module):
    def __init__(self, model: YoutuVLForConditionalGeneration):
        super().__init__()
        self.m = model

    def forward(self, pixel_values, cos, sin, window_index, reverse_index, window_segment_ids,
                image_segment_ids):
        meta = VisionMeta(grids=[], cos=cos, sin=sin, window_index=window_index,
                          reverse_index=reverse_index, window_seqlens=[], image_seqlens=[],
                          window_segment_ids=window_segment_ids, image_segment_ids=image_segment_ids)
        return self.m.encode_image(pixel_values, meta, eager_segments=False)


def cache_names(layout: str) -> tuple[list[str], list[str]]:
    if layout == "latent":
        return ["past_latent"], ["present_latent"]
    if layout == "full":
        return ["past_key", "past_value"], ["present_key", "present_value"]
    raise EngineError(f"unknown cache layout {layout!r}; expected one of {CACHE_LAYOUTS}")


def _last_logits(model: YoutuVLForConditionalGeneration, h: torch.Tensor) -> torch.Tensor:
    """[1, V] logits of the last position. A 2-D ``linear`` with a bias exports as one
    Gemm(transB=1) on the tied [V, d] table; without a bias it becomes MatMul(h, Transpose(W))
    and constant folding stores a transposed copy (1.45 G values at 4B widths)."""
    w = model.lm_head.weight
    return F.linear(h[0, -1:], w, torch.zeros(w.shape[0], dtype=w.dtype))


class PrefillGraph(nn.Module):
    def __init__(self, model: YoutuVLForConditionalGeneration, layout: str,
                 subsets: dict[str, torch.Tensor]):
        super().__init__()
        self.m, self.layout = model, layout
        self.image_token_id = model.config.image_token_id
        self.tasks = list(subsets)
        dt = model.lm_head.weight.dtype
        for t, w in subsets.items():
            self.register_buffer(f"subset_{t}", w.to(dt))

    def forward(self, input_ids, image_embeds):
        emb = self.m.model.embed_tokens(input_ids)                         # [1, T, d]
        is_img = input_ids == self.image_token_id                          # [1, T]
        # k-th image pad <- k-th image row (masked_scatter order) as CumSum + Gather + Where;
        # the zero row appended keeps the gather valid when the prompt has no image.
        slot = (torch.cumsum(is_img.to(torch.int32), dim=1) - 1).clamp(min=0)
        rows = torch.cat([image_embeds.to(emb.dtype), emb[0, :1] * 0], dim=0)
        x = torch.where(is_img[..., None], rows[slot.long()], emb)
        h, present = self.m.model(x, None, self.layout)
        # Position of the k-th image pad = #positions whose running pad count is <= k. Shapes
        # follow image_embeds (no NonZero), so TensorRT knows every output shape before running.
        cum = torch.cumsum(is_img[0].to(torch.int32), dim=0)              # [T]
        k = torch.arange(image_embeds.shape[0], dtype=torch.int32)        # [M]
        pos = (cum[None, :] <= k[:, None]).to(torch.float32).sum(1).to(torch.int64)  # [M]
        vision_hidden = h[0].index_select(0, pos)
        first = torch.argmax(is_img[0].to(torch.int32)).reshape(1)
        pre = h[0].index_select(0, (first - 1).clamp(min=0))               # [1, d]
        last_logits = _last_logits(self.m, h)                              # [1, V]
        scores = [torch.matmul(vision_hidden, getattr(self, f"subset_{t}").t()) for t in self.tasks]
        return (vision_hidden, pre, last_logits, *scores, *present)


class DecodeGraph(nn.Module):
    def __init__(self, model: YoutuVLForConditionalGeneration, layout: str):
        super().__init__()
        self.m, self.layout = model, layout

    def forward(self, input_ids, *past):
        h, present = self.m.model(self.m.model.embed_tokens(input_ids), tuple(past), self.layout)
        return (_last_logits(self.m, h), *present)


# ---------------------------------------------------------------- export
def _io_spec(names, example, dyn: dict[str, dict[int, str]]) -> list[dict[str, Any]]:
    out = []
    for n, t in zip(names, example):
        shape = [dyn.get(n, {}).get(i, int(s)) for i, s in enumerate(t.shape)]
        out.append({"name": n, "dtype": str(t.dtype).replace("torch.", ""), "shape": shape})
    return out


_ONNX_TYPES = {"float32": 1, "int64": 7, "int32": 6, "float16": 10}


def _restore_inputs(model, inputs: list[dict[str, Any]]) -> None:
    """The tracer drops inputs the graph never reads (e.g. window_segment_ids when every vision
    layer is a full-attention layer). Put them back, in order, so every engine has one interface."""
    import onnx
    have = {i.name: i for i in model.graph.input}
    ordered = []
    for spec in inputs:
        if spec["name"] in have:
            ordered.append(have[spec["name"]])
        else:
            ordered.append(onnx.helper.make_tensor_value_info(spec["name"], _ONNX_TYPES[spec["dtype"]], spec["shape"]))
    extra = [i for i in model.graph.input if i.name not in {s["name"] for s in inputs}]
    del model.graph.input[:]
    model.graph.input.extend(ordered + extra)


def _save(tmp_onnx: Path, out_dir: Path, stem: str, threshold: int,
          inputs: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    """Re-save the exported graph inline, or with one external data file when over threshold."""
    import onnx
    model = onnx.load(str(tmp_onnx), load_external_data=True)
    _restore_inputs(model, inputs)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    dst = out_dir / f"{stem}.onnx"
    for p in (dst, out_dir / f"{stem}.onnx.data"):
        p.unlink(missing_ok=True)
    if size >= threshold:
        data = f"{stem}.onnx.data"
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data, size_threshold=1024)
        files = [dst.name, data]
    else:
        onnx.save_model(model, str(dst))
        files, data = [dst.name], None
    onnx.checker.check_model(str(dst))
    ops = sorted({n.op_type for n in model.graph.node})
    return files, ops


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


def export_engine(model_dir: str | Path, out_dir: str | Path, options: ExportOptions | None = None,
                  *, task_groups: dict[str, dict[str, Any]] | None = None,
                  external_data_threshold: int = EXTERNAL_DATA_THRESHOLD, progress: bool = True,
                  model: YoutuVLForConditionalGeneration | None = None, **overrides) -> dict[str, Any]:
    """Write vision.onnx, llm_prefill.onnx, llm_decode.onnx (when a task generates text) and
    manifest.json into ``out_dir``; returns the manifest.

    ``options`` (or ``overrides``: its fields precision, max_patches, tasks, cache_layout) say
    what to export. ``task_groups`` overrides the subsets read from tokenizer.json ({task:
    {"groups": [[ids]], "labels": [...]}}); ``model`` skips loading when the caller already holds
    the checkpoint.
    """
    from tqdm.auto import tqdm

    require("onnx", "densert export")
    try:
        o = dataclasses.replace(options or ExportOptions(), **overrides)
    except ValueError as e:
        raise EngineError(str(e)) from None
    precision, max_patches, tasks, cache_layout = o.precision, o.max_patches, list(o.tasks), o.cache_layout
    decode = any(t in GENERATING_TASKS for t in tasks)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    steps = ["hash checkpoint", "load model", "vision.onnx", "llm_prefill.onnx"]
    if decode:
        steps.append("llm_decode.onnx")
    steps.append("manifest.json")
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
    groups = task_groups if task_groups is not None else resolve_task_groups(model_dir, tasks)
    groups = {t: g for t, g in groups.items() if t in tasks}
    subsets = {t: subset_weight(model.lm_head.weight.detach(), g["groups"]) for t, g in groups.items()}
    model = prepare_for_export(model, precision)
    fdt = torch.float16 if precision == "fp16" else torch.float32
    bar.update()

    vc = cfg.vision_config
    gh, gw = example_grid(max_patches)
    meta = build_vision_meta([(gh, gw)], vc)
    n, m_cells = gh * gw, gh * gw // vc.merge_unit
    if max_patches < n:
        raise EngineError(f"--max-patches {max_patches} is below the export example's {n} patches")
    out_dir.mkdir(parents=True, exist_ok=True)
    graphs: dict[str, Any] = {}
    tmp = Path(tempfile.mkdtemp(prefix="densert-export-"))
    try:
        with torch.no_grad(), export_patches():
            # ---- vision
            step("vision.onnx")
            v_args = [torch.randn(n, vc.patch_dim, dtype=fdt), meta.cos, meta.sin, meta.window_index,
                      meta.reverse_index, meta.window_segment_ids, meta.image_segment_ids]
            v_dyn = {"pixel_values": {0: "patches"}, "cos": {0: "patches"}, "sin": {0: "patches"},
                     "window_index": {0: "cells"}, "reverse_index": {0: "cells"},
                     "window_segment_ids": {0: "patches"}, "image_segment_ids": {0: "patches"},
                     "image_embeds": {0: "cells"}}
            vg = VisionGraph(model)
            v_out = vg(*v_args)
            _export_one(vg, v_args, tmp / "vision.onnx", VISION_INPUTS, ["image_embeds"], v_dyn)
            v_in = _io_spec(VISION_INPUTS, v_args, v_dyn)
            files, ops = _save(tmp / "vision.onnx", out_dir, "vision", external_data_threshold, v_in)
            graphs["vision"] = _graph_entry(files, ops, v_in,
                                            _io_spec(["image_embeds"], [v_out], v_dyn))
            (tmp / "vision.onnx").unlink(missing_ok=True)
            bar.update()

            # ---- prefill: prompt = text, vision_start, pads, vision_end, text (no 0/1 sizes)
            step("llm_prefill.onnx")
            pads = [cfg.image_token_id] * m_cells
            ids = [cfg.bos_token_id, 7 % cfg.vocab_size, cfg.vision_start_token_id, *pads,
                   cfg.vision_end_token_id, 9 % cfg.vocab_size, 11 % cfg.vocab_size]
            p_args = [torch.tensor([ids]), v_out.detach()]
            past_in, pres_out = cache_names(cache_layout)
            p_out_names = ["vision_hidden", "pre_vision_hidden", "last_logits",
                           *[f"scores_{t}" for t in subsets], *pres_out]
            seq_axis = 2 if cache_layout == "latent" else 3
            p_dyn = {"input_ids": {1: "seq"}, "image_embeds": {0: "cells"},
                     "vision_hidden": {0: "cells"}, **{f"scores_{t}": {0: "cells"} for t in subsets},
                     **{n_: {seq_axis: "seq"} for n_ in pres_out}}
            pg = PrefillGraph(model, cache_layout, subsets)
            p_out = pg(*p_args)
            _export_one(pg, p_args, tmp / "llm_prefill.onnx", ["input_ids", "image_embeds"], p_out_names, p_dyn)
            p_in = _io_spec(["input_ids", "image_embeds"], p_args, p_dyn)
            files, ops = _save(tmp / "llm_prefill.onnx", out_dir, "llm_prefill", external_data_threshold, p_in)
            graphs["llm_prefill"] = _graph_entry(files, ops, p_in,
                                                 _io_spec(p_out_names, p_out, p_dyn))
            (tmp / "llm_prefill.onnx").unlink(missing_ok=True)
            bar.update()

            # ---- decode
            if decode:
                step("llm_decode.onnx")
                past = p_out[len(p_out) - len(pres_out):]
                d_args = [torch.tensor([[13 % cfg.vocab_size]]), *past]
                d_dyn = {**{n_: {seq_axis: "past_seq"} for n_ in past_in},
                         **{n_: {seq_axis: "total_seq"} for n_ in pres_out}}
                dg = DecodeGraph(model, cache_layout)
                d_out = dg(*d_args)
                _export_one(dg, d_args, tmp / "llm_decode.onnx", ["input_ids", *past_in],
                            ["logits", *pres_out], d_dyn)
                d_in = _io_spec(["input_ids", *past_in], d_args, d_dyn)
                files, ops = _save(tmp / "llm_decode.onnx", out_dir, "llm_decode", external_data_threshold, d_in)
                graphs["llm_decode"] = _graph_entry(files, ops, d_in,
                                                    _io_spec(["logits", *pres_out], d_out, d_dyn))
                (tmp / "llm_decode.onnx").unlink(missing_ok=True)
                bar.update()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    step("manifest.json")
    # A copy of the config makes the engine dir usable without the checkpoint (config lookups only).
    shutil.copyfile(model_dir / "config.json", out_dir / "config.json")
    for g in graphs.values():
        g["sha256"] = {f: file_sha256(out_dir / f) for f in [g["file"], *g["external_data"]]}
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION, "densert_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "exporter": {"torch": torch.__version__, "onnx_opset": OPSET, "mode": "torchscript (dynamo=False)"},
        "precision": precision, "io_float_dtype": str(fdt).replace("torch.", ""),
        "precision_policy": ("fp32 throughout" if precision == "fp32" else
                             "fp16 weights/activations; LayerNorm, RMSNorm, attention scores+softmax and "
                             "vision RoPE computed in fp32"),
        "cache_layout": cache_layout, "max_patches": int(max_patches),
        "tasks": {t: ({"groups": groups[t]["groups"], "labels": groups[t].get("labels"),
                       "output": f"scores_{t}"} if t in groups else {}) for t in tasks},
        "checkpoint": {"path": str(model_dir.resolve()), **ident},
        "config": _config_summary(cfg),
        "graphs": graphs,
    }
    write_manifest(out_dir, manifest)
    bar.update()
    bar.close()
    return manifest


def _graph_entry(files, ops, inputs, outputs) -> dict[str, Any]:
    return {"file": files[0], "external_data": files[1:], "op_types": ops, "opset": OPSET,
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
                   "fullatt_block_indexes": list(vc.fullatt_block_indexes)},
    }
