"""Parity gate: every stage of an engine directory against the eager torch reference.

Per image: vision embeddings, prefill outputs (vision hidden states, the hidden state before the
first image pad, last logits, KV cache, task subset scores), and ``decode_steps`` greedy decode
steps fed with the engine's own cache (logits per step, and the generated tokens). Per tensor:
max abs error, relative error (max abs error / max |reference|) and cosine similarity. Dense maps:
task scores bilinearly upsampled to the image's pixels (``pytorch_half_pixel``), argmax, and the
share of pixels where the engine's argmax equals the reference's, counted over pixels whose
reference top-2 margin is not a near-tie. Next tokens: the share of steps (the prefill's last
position and each decode step, fed the reference's tokens) whose argmax equals the reference's.

Thresholds (``THRESHOLDS``), reference = fp32 torch on CPU. The quantized rows are the lowest
values measured on the bundled densert-tiny and on a random-weight real-width 2 + 2 layer
checkpoint (``benchmarks/bench_engines.py``, results in ``benchmarks/results/engines.md``),
rounded down:

=========  =========  ===========  ==============================  ==========  ===========
precision  cosine >=  rel. err <=  dense agreement >= depth / seg   tie margin  next tokens
                                   / refer
=========  =========  ===========  ==============================  ==========  ===========
fp32       0.99999    1e-3         99.9 / 99.9 / 99.9 %            1e-3        all
fp16       0.999      5e-2         99.0 / 99.0 / 99.0 %            2e-2        reported
int8       0.998      6e-2         90 / 97 / 97 %                  2e-2        >= 80 %
int4       0.93       0.4          30 / 88 / 90 %                  2e-2        reported
=========  =========  ===========  ==============================  ==========  ===========

The tie margin is relative to the standard deviation of the reference scores of that map. int4
on the random-weight checkpoint is the floor: its 1000 depth rows are unrelated random vectors
and its logits have no margin, so a few percent of hidden-state error moves the depth argmax and
the greedy token; on the trained bundled model int4 keeps >= 95 % of the depth bins. int8's
cosine was 0.999 for weight-only int8; the onnxruntime target's int8 GEMMs also quantize the
activations (dynamically, per tensor), and a random-weight tiny checkpoint's last logits then
measured 0.99897 (``tests/test_verify_gates.py``), hence 0.998.

The gate in the units users read (depth AbsRel / delta1, segmentation mIoU, greedy-token
agreement through the runtime's own calls) runs above this layer, in
``densert.training.engine_gate`` (it needs the runtime's predictor and the rendered scenes): it
passes ``verify`` an ``after`` step that fills the report's ``metrics``; the report judges them
against ``GATES`` (a checkpoint marked as random weights is shown the numbers, not judged).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from densert.backend import TorchBackend
from densert.model.generation import greedy_decode
from densert.model.vision_meta import build_vision_meta

from .options import VERIFY_DECODE_STEPS, VERIFY_GRIDS

# ---- the gate in the units users read (densert.training.engine_gate computes the numbers)
# Thresholds per precision, set on the trained bundled densert-tiny by
# benchmarks/measure_verify_gates.py (measurement, margin rule and command in
# benchmarks/results/verify_gates.md / .json; tests/test_verify_gates.py checks they agree).
GATES = {
    "fp32": {"abs_rel": 0.005, "delta1": 0.995, "miou": 0.99, "tokens": 0.937},
    "fp16": {"abs_rel": 0.005, "delta1": 0.995, "miou": 0.99, "tokens": 0.937},
    "int8": {"abs_rel": 0.095, "delta1": 0.895, "miou": 0.878, "tokens": 0.906},
    "int4": {"abs_rel": 0.137, "delta1": 0.849, "miou": 0.698, "tokens": 0.563},
}
# Which way each gate points: AbsRel is an error (at most), the others agreements (at least).
GATE_AT_MOST = ("abs_rel",)
GATE_LABELS = {"abs_rel": "depth AbsRel", "delta1": "depth delta1", "miou": "segmentation mIoU",
               "tokens": "greedy-token agreement"}
# fp32 weights above which the torch reference streams its layers (``verify``).
STREAM_REFERENCE_BYTES = 1 << 30


def _dense(depth: float, segment: float, refer: float) -> dict[str, float]:
    return {"depth": depth, "segment": segment, "refer": refer}


THRESHOLDS = {
    "fp32": {"cosine": 0.99999, "rel": 1e-3, "dense": _dense(0.999, 0.999, 0.999), "tie": 1e-3, "tokens": 1.0},
    "fp16": {"cosine": 0.999, "rel": 5e-2, "dense": _dense(0.99, 0.99, 0.99), "tie": 2e-2, "tokens": None},
    "int8": {"cosine": 0.998, "rel": 6e-2, "dense": _dense(0.90, 0.97, 0.97), "tie": 2e-2, "tokens": 0.8},
    "int4": {"cosine": 0.93, "rel": 0.4, "dense": _dense(0.30, 0.88, 0.90), "tie": 2e-2, "tokens": None},
}


@dataclass
class TensorStat:
    name: str
    max_abs: float
    rel: float
    cosine: float
    ok: bool


@dataclass
class Report:
    precision: str
    tensors: list[TensorStat] = field(default_factory=list)
    dense: list[tuple[str, float, int, bool]] = field(default_factory=list)  # (name, agreement, pixels, ok)
    tokens: list[tuple[str, list[int], list[int], bool]] = field(default_factory=list)
    # (name, next-token argmax agreement on the reference token stream, positions, ok)
    agreement: list[tuple[str, float, int, bool]] = field(default_factory=list)
    # The gate in the units users read: per image {metric: value}, and the mean of each metric.
    metrics: list[tuple[str, dict[str, float]]] = field(default_factory=list)
    metric_notes: list[str] = field(default_factory=list)
    # None: no metric gates run; True: a random-weights checkpoint (numbers shown, not judged).
    random_weights: bool | None = None

    @property
    def metric_means(self) -> dict[str, float]:
        keys = dict.fromkeys(k for _, vals in self.metrics for k in vals)
        return {k: float(sum(v[k] for _, v in self.metrics if k in v)
                         / sum(1 for _, v in self.metrics if k in v)) for k in keys}

    @property
    def metric_gates(self) -> list[tuple[str, float, float, bool]]:
        """(metric, mean over images, threshold, ok) per metric measured."""
        th = GATES[self.precision]
        return [(k, v, th[k], v <= th[k] if k in GATE_AT_MOST else v >= th[k])
                for k, v in self.metric_means.items()]

    @property
    def tensors_ok(self) -> bool:
        return (all(t.ok for t in self.tensors) and all(d[3] for d in self.dense)
                and all(t[3] for t in self.agreement))

    @property
    def ok(self) -> bool:
        return self.tensors_ok and (bool(self.random_weights) or all(g[3] for g in self.metric_gates))

    def format(self) -> str:
        th = THRESHOLDS[self.precision]
        dense = " / ".join(f"{t} {v * 100:g}%" for t, v in th["dense"].items())
        tokens = "reported" if th["tokens"] is None else f">= {th['tokens'] * 100:g}%"
        lines = [f"parity vs torch fp32 ({self.precision}: cosine >= {th['cosine']}, rel <= {th['rel']}, "
                 f"dense agreement >= {dense}, next tokens {tokens})",
                 f"{'tensor':<44}{'max_abs':>12}{'rel':>12}{'cosine':>12}  ok"]
        for t in self.tensors:
            lines.append(f"{t.name:<44}{t.max_abs:>12.3e}{t.rel:>12.3e}{t.cosine:>12.7f}  {'ok' if t.ok else 'FAIL'}")
        for name, agree, n, ok in self.dense:
            lines.append(f"{name:<44} argmax agreement {agree * 100:8.3f}% of {n} non-tie pixels  "
                         f"{'ok' if ok else 'FAIL'}")
        for name, ref, got, ok in self.tokens:
            lines.append(f"{name:<44} torch {ref} engine {got}  {'same' if ok else 'differ'}")
        for name, agree, n, ok in self.agreement:
            lines.append(f"{name:<44} next-token agreement {agree * 100:7.2f}% of {n} steps  {'ok' if ok else 'FAIL'}")
        if self.metrics:
            lines += self._format_metrics()
        elif self.random_weights is None:
            lines.append("metric gates (depth AbsRel / delta1, segmentation mIoU, greedy tokens) not run")
        if self.random_weights and self.tensors_ok:
            lines.append("PASS (tensor checks; random weights: metric gates not applied)")
        else:
            lines.append("PASS" if self.ok else "FAIL")
        return "\n".join(lines)

    def _format_metrics(self) -> list[str]:
        fmt = {"abs_rel": lambda v: f"AbsRel {v:.4f}", "delta1": lambda v: f"delta1 {v * 100:.2f}%",
               "miou": lambda v: f"mIoU {v * 100:.2f}%", "tokens": lambda v: f"tokens {v * 100:.1f}%"}
        lines = ["in the units users read (engine vs torch fp32, the runtime's decoding): "
                 + "; ".join(self.metric_notes)]
        for label, vals in self.metrics:
            lines.append(f"{label:<44} " + "  ".join(fmt[k](v) for k, v in vals.items()))
        th = GATES[self.precision]
        for k, v, t, ok in self.metric_gates:
            op = "<=" if k in GATE_AT_MOST else ">="
            val = f"{v:.4f}" if k in GATE_AT_MOST else f"{v * 100:.2f}%"
            lim = f"{t:g}" if k in GATE_AT_MOST else f"{t * 100:g}%"
            verdict = "info" if self.random_weights else ("ok" if ok else "FAIL")
            n = len(self.metrics)
            lines.append(f"{f'mean of {n} image' + 's' * (n != 1) + ': ' + GATE_LABELS[k]:<44} "
                         f"{val} (gate {op} {lim})  {verdict}")
        if self.random_weights:
            lines.append("random weights: metric gates not applied (numbers shown for information)")
        elif set(th) - set(self.metric_means):
            lines.append("not gated (the engine serves no such task): "
                         + ", ".join(GATE_LABELS[k] for k in th if k not in self.metric_means))
        return lines


def compare(name: str, ref: torch.Tensor, got: torch.Tensor, th: dict) -> TensorStat:
    if tuple(ref.shape) != tuple(got.shape):
        return TensorStat(f"{name} shape {tuple(got.shape)} != {tuple(ref.shape)}", math.inf, math.inf, 0.0, False)
    r, g = ref.double().flatten(), got.to(ref.device).double().flatten()  # engine buffers: GPU
    if r.numel() == 0:
        return TensorStat(name, 0.0, 0.0, 1.0, True)
    max_abs = float((r - g).abs().max())
    rel = max_abs / max(float(r.abs().max()), 1e-12)
    cos = float(F.cosine_similarity(r, g, dim=0)) if r.norm() > 0 or g.norm() > 0 else 1.0
    return TensorStat(name, max_abs, rel, cos, cos >= th["cosine"] and rel <= th["rel"])


def bilinear_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """[n_out, n_in] weights of 1-D bilinear resizing with half-pixel centres (torch
    ``align_corners=False`` = ONNX Resize ``pytorch_half_pixel``)."""
    src = ((torch.arange(n_out, dtype=torch.float64) + 0.5) * (n_in / n_out) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = (i0 + 1).clamp(max=n_in - 1)
    w1 = src - i0
    m = torch.zeros(n_out, n_in, dtype=torch.float64)
    m[torch.arange(n_out), i0] += 1 - w1
    m[torch.arange(n_out), i1] += w1
    return m.float()


def dense_agreement(ref_scores: torch.Tensor, got_scores: torch.Tensor, merged_grid: tuple[int, int],
                    out_hw: tuple[int, int], tie: float, band: int = 64) -> tuple[float, int]:
    """[M, K] scores -> per-pixel argmax at out_hw; share equal over non-near-tie pixels.

    Bilinear upsampling is separable, done as two small matmuls, band by band, so a 1000-bin map
    of a large image never materialises [H, W, K] at once."""
    mh, mw = merged_grid
    H, W = out_hw
    thr = tie * float(ref_scores.float().std())
    wy, wx = bilinear_matrix(mh, H), bilinear_matrix(mw, W)
    r_rows = torch.einsum("hm,mnk->hnk", wy, ref_scores.float().reshape(mh, mw, -1))  # [H, mw, K]
    g_rows = torch.einsum("hm,mnk->hnk", wy, got_scores.cpu().float().reshape(mh, mw, -1))
    equal = kept = 0
    for y in range(0, H, band):
        r = torch.einsum("wn,bnk->bwk", wx, r_rows[y:y + band]).reshape(-1, r_rows.shape[-1])
        g = torch.einsum("wn,bnk->bwk", wx, g_rows[y:y + band]).reshape(-1, r_rows.shape[-1])
        top2 = r.topk(2, dim=1)
        keep = (top2.values[:, 0] - top2.values[:, 1]) >= thr
        kept += int(keep.sum())
        equal += int((top2.indices[:, 0] == g.argmax(1))[keep].sum())
    return (equal / kept if kept else 1.0), kept


def synthetic_images(grids: Sequence[tuple[int, int]], seed: int = 0):
    """Smooth synthetic images (low-frequency colour fields + edges) at the given patch grids,
    through the real patchify of the runtime preprocessor."""
    from densert.image.preprocess import PATCH, normalize, patchify
    g = torch.Generator().manual_seed(seed)
    out = []
    for gh, gw in grids:
        H, W = gh * PATCH, gw * PATCH
        low = torch.rand(1, 3, max(gh // 4, 2), max(gw // 4, 2), generator=g)
        img = F.interpolate(low, size=(H, W), mode="bilinear", align_corners=False)[0]
        img[:, : H // 2, W // 3:] = 1 - img[:, : H // 2, W // 3:]
        arr = (img.permute(1, 2, 0).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
        out.append((f"synthetic {H}x{W}", patchify(normalize(arr)), (gh, gw)))
    return out


def load_images(paths: Sequence[str], max_patches: int):
    from densert.image.preprocess import preprocess
    out = []
    for p in paths:
        pre = preprocess(p, max_patches=max_patches)
        out.append((Path(p).name, pre.pixel_values, pre.grid))
    return out


def prompt_ids(cfg, n_cells: int) -> torch.Tensor:
    """bos, a few text tokens, the image block, more text: the shape of every densert prompt."""
    v = cfg.vocab_size
    ids = [cfg.bos_token_id, 17 % v, 23 % v, cfg.vision_start_token_id,
           *([cfg.image_token_id] * n_cells), cfg.vision_end_token_id, 29 % v, 31 % v]
    return torch.tensor([ids])


def default_grids(m: dict) -> list[tuple[int, int]]:
    """The synthetic images' patch grids for an engine: the sizes it was exported for
    (``--image-size``), else ``VERIFY_GRIDS``, each scaled down (aspect kept, even sides) to fit
    the engine's image budget, so the gate never refuses an engine for its own defaults."""
    if m.get("grids"):
        return [tuple(g) for g in m["grids"]]
    cap, out = int(m["max_patches"]), []
    for gh, gw in VERIFY_GRIDS:
        if gh * gw > cap:
            f = math.sqrt(cap / (gh * gw))
            gh, gw = max(2, int(gh * f) // 2 * 2), max(2, int(gw * f) // 2 * 2)
        if (gh, gw) not in out:
            out.append((gh, gw))
    return out


@torch.no_grad()
def verify(engine_dir: str | Path, model_dir: str | Path, images: Sequence[str] = (),
           grids: Sequence[tuple[int, int]] | None = None, decode_steps: int = VERIFY_DECODE_STEPS,
           model=None, backend=None, log=print,
           after: Callable[[Report, object, TorchBackend, dict], None] | None = None) -> Report:
    """``grids`` None: ``default_grids`` of the engine. ``after(report, engine backend, torch
    reference, manifest)``: run once the tensor checks are done, with both backends still loaded
    (the metric gate, ``densert.training.engine_gate.verify_engine``)."""
    from densert.checkpoint.loader import load_model
    from densert.errors import EngineError
    from densert.kernels.dense_head import subset_weight
    from densert.options import check_range

    from .ort_backend import OrtBackend
    check_range("verify", "decode_steps", decode_steps, 0, integer=True)
    eng = backend or OrtBackend(engine_dir, model_dir=model_dir)
    m = eng.manifest
    if grids is None:
        grids = default_grids(m)
    big = [f"{gh}x{gw}" for gh, gw in grids if gh * gw > int(m["max_patches"])]
    if big:
        raise EngineError(f"--grids {' '.join(big)}: over the engine's image budget of "
                          f"{m['max_patches']} patches ({engine_dir}); pass smaller grids")
    th = THRESHOLDS[m["precision"]]
    # A large reference streams its layers from the checkpoint (one layer held at a time): the
    # fp32 reference of a 4B model beside its engine fits a 24 GB machine; same numbers. A
    # small one is held whole: streaming re-reads every layer at every decode step of the gate.
    if model is None:
        from densert.checkpoint.model_dir import read_all_headers
        fp32_bytes = 4 * sum(i.numel for i in read_all_headers(model_dir).values())
        model = load_model(model_dir, torch.float32, streamed=fp32_bytes > STREAM_REFERENCE_BYTES)
    ref = TorchBackend(model.float().eval(), cache_layout=m["cache_layout"])
    cfg = model.config
    subsets = {t: subset_weight(model.lm_head.weight, info["groups"])
               for t, info in m["tasks"].items() if info.get("groups")}
    rep = Report(m["precision"])
    items = load_images(images, m["max_patches"]) if images else synthetic_images(grids)
    for label, px, grid in items:
        log(f"verify: {label} (grid {grid[0]}x{grid[1]} patches, {px.shape[0] // 4} image tokens)")
        meta = build_vision_meta([grid], cfg.vision_config)
        e_ref = ref.encode_image(px, meta)
        e_got = eng.encode_image(px, meta)
        rep.tensors.append(compare(f"[{label}] vision image_embeds", e_ref, e_got, th))
        ids = prompt_ids(cfg, e_ref.shape[0])
        # Both prefills take the reference embeddings so each stage is judged on its own.
        p_ref, p_got = ref.prefill(ids, e_ref), eng.prefill(ids, e_ref)
        rep.tensors.append(compare(f"[{label}] prefill vision_hidden", p_ref.vision_hidden, p_got.vision_hidden, th))
        rep.tensors.append(compare(f"[{label}] prefill pre_vision_hidden", p_ref.pre_vision_hidden,
                                   p_got.pre_vision_hidden, th))
        rep.tensors.append(compare(f"[{label}] prefill last_logits", p_ref.last_logits, p_got.last_logits, th))
        for i, (cr, cg) in enumerate(zip(ref.cache_tensors(p_ref.cache), eng.cache_tensors(p_got.cache))):
            rep.tensors.append(compare(f"[{label}] prefill cache[{i}]", cr, cg, th))
        out_hw = (grid[0] * cfg.vision_config.patch_size, grid[1] * cfg.vision_config.patch_size)
        for t, w in subsets.items():
            s_ref = p_ref.vision_hidden.float() @ w.T
            s_got = p_got.scores[t]
            rep.tensors.append(compare(f"[{label}] prefill scores_{t}", s_ref, s_got, th))
            agree, n = dense_agreement(s_ref, s_got, (grid[0] // 2, grid[1] // 2), out_hw, th["tie"])
            rep.dense.append((f"[{label}] {t} map {out_hw[0]}x{out_hw[1]}", agree, n, agree >= th["dense"][t]))
        # End-to-end with the engine's own vision output: the dense map a user would get.
        if subsets:
            p_e2e = eng.prefill(ids, e_got)
            for t, w in subsets.items():
                agree, n = dense_agreement(p_ref.vision_hidden.float() @ w.T, p_e2e.scores[t],
                                           (grid[0] // 2, grid[1] // 2), out_hw, th["tie"])
                rep.dense.append((f"[{label}] {t} map end-to-end", agree, n, agree >= th["dense"][t]))
        if decode_steps:
            toks_ref, _ = greedy_decode(ref.decode, p_ref.last_logits, p_ref.cache, decode_steps)
            toks_got, _ = greedy_decode(eng.decode, p_got.last_logits, p_got.cache, decode_steps)
            rep.tokens.append((f"[{label}] greedy tokens", toks_ref, toks_got, toks_ref == toks_got))
            # Per-step logits on the reference token stream (independent of argmax flips). The
            # torch cache grows in place, so the reference starts again from a new prefill.
            cr, cg = ref.prefill(ids, e_ref).cache, p_got.cache
            worst = None
            same = [int(torch.argmax(p_ref.last_logits)) == int(torch.argmax(p_got.last_logits))]
            for tok in toks_ref[:-1] or toks_ref:
                lr, cr = ref.decode(tok, cr)
                lg, cg = eng.decode(tok, cg)
                same.append(int(torch.argmax(lr)) == int(torch.argmax(lg)))
                s = compare(f"[{label}] decode logits", lr, lg, th)
                if worst is None or s.cosine < worst.cosine or s.rel > worst.rel:
                    worst = s
            agree = sum(same) / len(same)
            rep.agreement.append((f"[{label}] next tokens", agree, len(same),
                                  th["tokens"] is None or agree >= th["tokens"]))
            if worst is not None:
                worst.name = f"[{label}] decode logits (worst of {len(toks_ref[:-1] or toks_ref)} steps)"
                rep.tensors.append(worst)
            for i, (a, b) in enumerate(zip(ref.cache_tensors(cr), eng.cache_tensors(cg))):
                rep.tensors.append(compare(f"[{label}] decode cache[{i}] after {cg.length} tokens", a, b, th))
    if after is not None:
        after(rep, eng, ref, m)
    return rep
