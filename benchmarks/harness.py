"""Per-stage timing of the dense pipeline on one backend, run in its own process.

One worker process per backend (``python -m densert.benchmarks.harness SPEC OUT``) so that the
process RSS high-water mark (``VmHWM``) belongs to that backend alone. Inside a worker, for
every (task, size):

  preprocess      decode-free synthetic RGB -> resize/patchify + vision metadata + prompt ids
  vision_encoder  backend.encode_image (SigLIP2 + merger)
  llm_prefill     backend.prefill (MLA decoder over the whole prompt, last logits, KV cache)
  dense_head      runtime.dense.depth_map / segment_labels (subset GEMM, upsample, argmax)
  postprocess     output arrays (uint16 millimetres / uint8 labels) + the released RLE text

are timed separately with ``time.perf_counter`` (``torch.cuda.synchronize()`` before and after a
stage when the torch model is on a GPU), ``warmup`` untimed runs first, then ``runs`` timed runs.
Then, still per (task, size), the "generate everything" path of the released model: the map's
RLE text is tokenised and fed through ``backend.decode`` one token per step (teacher forced:
the same cost as greedy generation, which also runs one step per token); at most ``decode_cap``
steps are run and the rest is extrapolated with the measured mean step time (a lower bound:
attention grows with the cache). The torch worker finally runs the naive full-vocabulary head
against the subset head on the same hidden states, after the RSS snapshot of the pipeline.
"""
from __future__ import annotations

import json
import os
import resource
import sys
import time
import traceback
from pathlib import Path

import numpy as np

from densert.options import hw_size

STAGES = ("preprocess", "vision_encoder", "llm_prefill", "dense_head", "postprocess")
TASKS = ("depth", "segment")
# Classes of the segmentation benchmark prompt (names of the bundled model's scenes).
SEG_CLASSES = ("floor", "wall", "ceiling", "table", "chair", "sky", "road", "tree", "car", "person")


def stats(xs) -> dict:
    a = np.asarray(list(xs), dtype=np.float64)
    if a.size == 0:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "mean": None, "min": None}
    p50, p90, p99 = np.percentile(a, [50, 90, 99])
    return {"n": int(a.size), "p50": float(p50), "p90": float(p90), "p99": float(p99),
            "mean": float(a.mean()), "min": float(a.min())}


def max_rss_mb() -> float:
    """This process's RSS high-water mark in MiB: ``VmHWM`` of /proc/self/status on Linux.

    Not ``ru_maxrss``: Linux carries the pre-exec high-water mark across execve, and a child
    spawned with vfork+exec (what subprocess does) would report its *parent's* peak."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def synthetic_image(h: int, w: int, seed: int = 0) -> np.ndarray:
    """A deterministic structured RGB scene (gradient sky/floor + boxes): smooth regions like a
    photo, so run-length encodings are not pure noise."""
    rng = np.random.default_rng(seed)
    y = np.linspace(0, 1, h, dtype=np.float32)[:, None, None]
    x = np.linspace(0, 1, w, dtype=np.float32)[None, :, None]
    img = np.where(y < 0.45, np.array([120, 170, 230]) * (1 - 0.3 * y),
                   np.array([110, 90, 70]) * (0.6 + 0.4 * y)) + 20 * x
    img = np.broadcast_to(img, (h, w, 3)).copy()
    for _ in range(6):
        y0, x0 = rng.integers(0, max(1, h // 2)), rng.integers(0, max(1, w - w // 4))
        img[y0:y0 + h // 3, x0:x0 + w // 5] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def _sync_fn(backend):
    import torch
    dev = getattr(backend, "device", None)
    if dev is not None and torch.device(dev).type == "cuda":
        return torch.cuda.synchronize
    return lambda: None


class _Timer:
    def __init__(self, sync):
        self.sync = sync

    def __call__(self, fn, *a, **k):
        self.sync()
        t0 = time.perf_counter()
        out = fn(*a, **k)
        self.sync()
        return out, time.perf_counter() - t0


def _head_rows(backend, model_dir: Path, ids: list[int]):
    """lm_head rows for the given ids without loading the full [V, d] matrix (non-torch backends),
    so the worker's RSS is what a dense-only deployment needs."""
    import torch
    model = getattr(backend, "model", None)
    if model is not None and hasattr(model, "lm_head"):
        return model.lm_head.weight.detach()[torch.as_tensor(ids)].float()
    from safetensors import safe_open

    from densert.checkpoint.model_dir import weight_files
    for f in weight_files(model_dir):
        with safe_open(str(f), framework="pt") as sf:
            keys = set(sf.keys())
            for key in ("lm_head.weight", "model.embed_tokens.weight"):
                if key in keys:
                    sl = sf.get_slice(key)
                    return torch.stack([sl[i:i + 1][0] for i in ids]).float()
    raise RuntimeError(f"{model_dir}: neither lm_head.weight nor model.embed_tokens.weight found")


def _subset_weights(backend, model_dir, vocab, opts):
    """task -> (K x d weight, id groups, class names). Static per task: built once, not timed."""
    from densert.kernels.dense_head import subset_weight
    from densert.tasks.classes import class_id_groups
    groups = {"depth": [[int(i)] for i in vocab.depth_bin_ids().tolist()],
              "segment": class_id_groups(vocab, list(SEG_CLASSES), opts.name_leading_space)}
    out = {}
    for task, g in groups.items():
        flat = sorted({i for grp in g for i in grp})
        rows = _head_rows(backend, model_dir, flat)
        pos = {i: k for k, i in enumerate(flat)}
        out[task] = (subset_weight(rows, [[pos[i] for i in grp] for grp in g]), g)
    return out


def _make_backend(spec: dict):
    from densert.runtime.backends import make_backend
    name = spec["backend"]
    if name == "torch":
        return make_backend("torch", spec["model"], spec["dtype"], device=spec.get("device"))
    return make_backend(name, spec["model"], spec["dtype"], spec.get("engine_dir"))


def run_worker(spec: dict) -> dict:
    """Measure one backend. Returns a dict for the ``backends[]`` entry of the report."""
    import torch

    from densert.image.preprocess import preprocess
    from densert.kernels.dense_head import dense_head, naive_full_vocab_head
    from densert.model.vision_meta import build_vision_meta
    from densert.runtime.dense import depth_map, segment_labels
    from densert.runtime.options import DenseOptions
    from densert.tasks import prompts
    from densert.tasks.rle import depth_grid_shape, encode_depth, encode_segmentation
    from densert.text.chat import encode_chat, user_message
    from densert.text.tokens import Vocab

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    name = spec["backend"]
    model_dir = Path(spec["model"])
    rec: dict = {"backend": name, "status": "ok", "reason": None, "cases": [],
                 "memory": {"rss_mb_after_imports": max_rss_mb()}}
    t0 = time.perf_counter()
    try:
        backend = _make_backend(spec)
    except Exception as e:  # an unavailable backend is a result, not a crash
        rec.update(status="skipped", reason=f"{type(e).__name__}: {e}".strip())
        return rec
    rec["setup_s"] = time.perf_counter() - t0
    rec["memory"]["rss_mb_after_setup"] = max_rss_mb()
    if spec.get("prepare_only"):
        return rec
    on_gpu = torch.device(getattr(backend, "device", "cpu")).type == "cuda"
    rec["device"] = "cuda" if on_gpu else (
        "cpu" if name == "torch" else str(getattr(backend, "providers", ["cpu"])[0]))
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    timer = _Timer(_sync_fn(backend))
    vocab = Vocab.from_file(model_dir / "tokenizer.json")
    opts = DenseOptions(crf=False)  # the dense_head stage times the head alone
    weights = _subset_weights(backend, model_dir, vocab, opts)
    cfg = backend.config
    runs, warmup, cap = int(spec["runs"]), int(spec["warmup"]), int(spec["decode_cap"])
    naive_inputs = []

    for task in spec["tasks"]:
        W, groups = weights[task]
        for size in spec["sizes"]:
            h, w = hw_size(size)
            img = synthetic_image(h, w, seed=0)
            prompt = prompts.depth() if task == "depth" else prompts.semantic(list(SEG_CLASSES))
            samples = {s: [] for s in STAGES}
            e2e, rle_ids, case = [], None, {}
            for r in range(warmup + runs):
                t = {}

                def pre_stage():
                    p = preprocess(img)
                    meta = build_vision_meta([p.grid], cfg.vision_config)
                    ids = encode_chat(vocab, [user_message(prompt.text, prompt.image_first)],
                                      [p.num_image_tokens])
                    return p, meta, ids
                (pre, meta, ids), t["preprocess"] = timer(pre_stage)
                emb, t["vision_encoder"] = timer(backend.encode_image, pre.pixel_values, meta)
                pf, t["llm_prefill"] = timer(backend.prefill, ids, emb)
                hid = pf.vision_hidden
                if task == "depth":
                    out, t["dense_head"] = timer(depth_map, hid, W, pre.merged_grid,
                                                 pre.original_hw, opts, "open-world")

                    def post():
                        mm = np.clip(np.rint(out.depth * 1000.0), 0, 65535).astype(np.uint16)
                        return mm, encode_depth(out.codes_grid)
                else:
                    out, t["dense_head"] = timer(segment_labels, hid, W, pre.merged_grid,
                                                 pre.original_hw, opts, background=False)

                    def post():
                        return out.astype(np.uint8), encode_segmentation(out, list(SEG_CLASSES))
                (_, text), t["postprocess"] = timer(post)
                if r == 0:
                    rle_ids = vocab.encode(text)
                    case = {"task": task, "size": size, "image_hw": [h, w],
                            "resized_hw": list(pre.resized_hw), "grid": list(pre.grid),
                            "window_seqlens": list(meta.window_seqlens),
                            "image_tokens": pre.num_image_tokens, "prompt_tokens": int(ids.shape[1]),
                            "num_classes": int(W.shape[0]),
                            "head_out_hw": list(depth_grid_shape(pre.original_hw)) if task == "depth"
                            else list(pre.original_hw)}
                    if name == "torch" and spec.get("baselines", True):
                        naive_inputs.append((case, hid.detach().clone(), pre.merged_grid))
                if r >= warmup:
                    for s in STAGES:
                        samples[s].append(t[s])
                    e2e.append(sum(t.values()))
            case["stages"] = {s: stats(v) for s, v in samples.items()}
            case["end_to_end"] = stats(e2e)
            case["generate_path"] = _decode_path(backend, timer, ids, emb, rle_ids, cap,
                                                 max(1, min(runs, spec.get("decode_runs", 3))),
                                                 case, vocab)
            rec["cases"].append(case)

    rec["memory"]["peak_rss_mb_pipeline"] = max_rss_mb()
    if on_gpu:
        rec["memory"]["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    # ---- naive full-vocabulary head vs the subset head, same hidden states (torch worker only)
    if naive_inputs:
        full_w = backend.model.lm_head.weight.detach()
        for case, hid, mgrid in naive_inputs:
            W, groups = weights[case["task"]]
            out_hw = tuple(case["head_out_hw"])
            sub_t, nv_t = [], []
            agree = None
            for r in range(warmup + runs):
                a, ts = timer(dense_head, hid, W, mgrid, out_hw, "argmax")
                b, tn = timer(naive_full_vocab_head, hid, full_w, groups, mgrid, out_hw, "argmax")
                if r >= warmup:
                    sub_t.append(ts)
                    nv_t.append(tn)
                agree = float((a.cpu() == b.cpu()).float().mean())
            s, n = stats(sub_t), stats(nv_t)
            case["naive_head"] = {
                "subset": s, "naive": n, "ratio_p50": n["p50"] / s["p50"],
                "argmax_agreement": agree, "out_hw": list(out_hw),
                "logits_bytes": int(hid.shape[0]) * cfg.vocab_size * full_w.element_size(),
                "weight_dtype": str(full_w.dtype).removeprefix("torch.")}
        rec["memory"]["peak_rss_mb_with_naive_head"] = max_rss_mb()
    return rec


def _decode_path(backend, timer, ids, emb, rle_ids, cap, n_rounds, case, vocab) -> dict:
    """Time the released text path: the map's RLE tokens as decode steps after one prefill."""
    n_tok = len(rle_ids)
    steps = min(cap, n_tok)
    step_times = []
    for _ in range(n_rounds):
        pf = backend.prefill(ids, emb)
        cache = pf.cache
        for tok in rle_ids[:steps]:
            (_, cache), dt = timer(backend.decode, int(tok), cache)
            step_times.append(dt)
    st = stats(step_times)
    per_tok = st["mean"] or 0.0
    dense_tail = case["stages"]["dense_head"]["p50"] + case["stages"]["postprocess"]["p50"]
    shared = sum(case["stages"][s]["p50"] for s in ("preprocess", "vision_encoder", "llm_prefill"))
    gen_s = n_tok * per_tok
    return {"rle_tokens": n_tok, "decode_steps_run": steps, "rounds": n_rounds,
            "step_s": st, "tokens_per_s": (1.0 / per_tok) if per_tok else None,
            "context_start": int(ids.shape[1]),
            "extrapolated": steps < n_tok,
            "estimated_decode_s": gen_s,
            "ratio_vs_dense_head": gen_s / dense_tail if dense_tail else None,
            "ratio_end_to_end": (shared + gen_s) / (shared + dense_tail),
            "method": (f"{steps} of {n_tok} RLE tokens decoded (teacher-forced, {n_rounds} rounds); "
                       "total = tokens x mean step time" + (" (extrapolated: a lower bound, "
                                                            "attention grows with the cache)"
                                                            if steps < n_tok else ""))}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        rec = run_worker(spec)
    except Exception as e:
        rec = {"backend": spec["backend"], "status": "error", "reason": f"{type(e).__name__}: {e}",
               "traceback": traceback.format_exc(), "cases": [],
               "memory": {"peak_rss_mb_pipeline": max_rss_mb()}}
    Path(out_path).write_text(json.dumps(rec, indent=1))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    sys.exit(main())
