"""End-to-end CPU latency: eager torch (``TorchBackend``) against ONNX Runtime (``OrtBackend``).

One frame = vision encode + prefill (dense outputs) [+ ``--decode-steps`` greedy decode steps],
timed as the runtime calls them, median over ``--runs`` after ``--warmup`` runs. Both backends get
the same thread count. Example:

    python -m densert.benchmarks.bench_backends --model-size tiny --grid 32x32 --threads 2
    python -m densert.benchmarks.bench_backends --model CKPT --engine-dir ENG --grid 24x32
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from densert.model.config import MODEL_SIZES


def _frame(backend, px, meta, ids, decode_steps):
    t0 = time.perf_counter()
    emb = backend.encode_image(px, meta)
    t1 = time.perf_counter()
    pf = backend.prefill(ids, emb)
    t2 = time.perf_counter()
    cache, logits = pf.cache, pf.last_logits
    for _ in range(decode_steps):
        logits, cache = backend.decode(int(torch.argmax(logits)), cache)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, (t3 - t2) / max(decode_steps, 1)


def bench(backend, px, meta, ids, runs, warmup, decode_steps):
    for _ in range(warmup):
        _frame(backend, px, meta, ids, decode_steps)
    rows = [_frame(backend, px, meta, ids, decode_steps) for _ in range(runs)]
    med = [statistics.median(c) * 1e3 for c in zip(*rows)]
    return {"vision_ms": med[0], "prefill_ms": med[1], "decode_ms_per_token": med[2],
            "frame_ms": med[0] + med[1] + med[2] * decode_steps}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint dir (default: a fresh --model-size checkpoint in a temp dir)")
    ap.add_argument("--model-size", choices=MODEL_SIZES, default="tiny", help="size of the fresh checkpoint")
    ap.add_argument("--text-layers", type=int, default=None)
    ap.add_argument("--vision-layers", type=int, default=None)
    ap.add_argument("--engine-dir", default=None, help="default: export into a temp dir")
    ap.add_argument("--grid", default="32x32", help="patch grid GHxGW (32x32 = a 512x512 image, 256 tokens)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--decode-steps", type=int, default=8)
    ap.add_argument("--json", default=None)
    a = ap.parse_args(argv)

    from densert.backend import TorchBackend
    from densert.checkpoint.loader import load_model
    from densert.export.onnx_export import export_engine
    from densert.export.ort_backend import OrtBackend
    from densert.export.verify import prompt_ids
    from densert.model.vision_meta import build_vision_meta

    torch.set_num_threads(a.threads)
    tmp = Path(tempfile.mkdtemp(prefix="densert-bench-"))
    model_dir = a.model
    if model_dir is None:
        from densert.checkpoint.random_init import make_test_checkpoint
        model_dir = make_test_checkpoint(tmp / "ckpt", a.model_size, a.text_layers, a.vision_layers, seed=0,
                                         dtype="float32")
    model = load_model(model_dir, torch.float32)
    engine_dir = a.engine_dir
    if engine_dir is None:
        engine_dir = tmp / "engine"
        t = time.perf_counter()
        export_engine(model_dir, engine_dir, model=model, progress=False)
        export_s = time.perf_counter() - t
    else:
        export_s = None
    gh, gw = (int(x) for x in a.grid.lower().split("x"))
    cfg = model.config
    meta = build_vision_meta([(gh, gw)], cfg.vision_config)
    px = torch.rand(gh * gw, cfg.vision_config.patch_dim) * 2 - 1
    ids = prompt_ids(cfg, gh * gw // cfg.vision_config.merge_unit)
    results = {}
    with torch.inference_mode():
        results["torch"] = bench(TorchBackend(model), px, meta, ids, a.runs, a.warmup, a.decode_steps)
    ort = OrtBackend(engine_dir, model_dir=model_dir, intra_op_threads=a.threads)
    results["onnxruntime"] = bench(ort, px, meta, ids, a.runs, a.warmup, a.decode_steps)
    info = {"model": str(model_dir), "model_size": a.model_size if a.model is None else None, "grid": [gh, gw],
            "image_tokens": gh * gw // 4, "prompt_tokens": int(ids.shape[1]), "threads": a.threads,
            "decode_steps": a.decode_steps, "runs": a.runs, "export_s": export_s,
            "providers": ort.providers, "torch": torch.__version__, "results": results}
    print(f"{'backend':<14}{'vision ms':>11}{'prefill ms':>12}{'decode ms/tok':>15}{'frame ms':>11}")
    for k, r in results.items():
        print(f"{k:<14}{r['vision_ms']:>11.1f}{r['prefill_ms']:>12.1f}{r['decode_ms_per_token']:>15.2f}{r['frame_ms']:>11.1f}")
    sp = results["torch"]["frame_ms"] / results["onnxruntime"]["frame_ms"]
    print(f"onnxruntime end-to-end speed-up over eager torch: {sp:.2f}x "
          f"({gh}x{gw} patches, {ids.shape[1]} prompt tokens, {a.decode_steps} decode steps, {a.threads} threads)")
    if a.json:
        Path(a.json).write_text(json.dumps(info, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
