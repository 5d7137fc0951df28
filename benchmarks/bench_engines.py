"""Engines that fit the device, measured side by side in one run on this machine (ONNX Runtime, CPU):

1. ``vision``: peak resident memory and time of the vision graph at 1k and 4k image tokens,
   before (every attention layer one masked N x N softmax, as exported up to densert 0.x) and
   after windowing (padded windows + query-chunked full attention, the current export).
2. ``engines``: engine-directory size and decode tokens/s, fp32 vs int8 vs int4.
3. ``accuracy``: the parity gate (``densert verify``) per precision against the fp32 torch
   reference: dense-map agreement per task, next-token agreement, worst cosine; and the
   quantization policy's alternatives (int4 lm_head table, int4 vision tower).
4. ``frame``: ``densert depth --backend onnxruntime`` on a 3000x4000 photo at the default
   36,864-patch cap: peak resident memory of the whole process.

Every measurement runs in its own process and reports that process's peak resident memory
(``VmHWM``, read by the process itself at the end; a ``densert`` command: its ``ru_maxrss``,
taken by a small parent, since ``ru_maxrss`` starts from the memory of the process that forked
it); a measurement whose processes' resident memory passes ``--rss-limit-gb`` is stopped and
reported as such. Example (the results in
``benchmarks/results/engines.md``):

    python -m densert.benchmarks.bench_engines --model CKPT_4B_2L --out benchmarks/results/engines
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from . import report

_CHILD = "--child"


# ---------------------------------------------------------------- child side
def _rss_mib(field: str = "VmRSS") -> float:
    s = Path("/proc/self/status").read_text()
    return int(s.split(f"{field}:")[1].split()[0]) / 1024


def child_vision(engine_dir: str, grid: str, runs: int, threads: int) -> dict:
    import torch

    from densert.export.ort_backend import OrtBackend
    from densert.model.vision_meta import build_vision_meta
    gh, gw = (int(x) for x in grid.split("x"))
    base = _rss_mib()
    ob = OrtBackend(engine_dir, intra_op_threads=threads)
    del ob.sessions["llm"]
    meta = build_vision_meta([(gh, gw)], ob.config.vision_config)
    px = torch.rand(gh * gw, ob.config.vision_config.patch_dim) * 2 - 1
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        ob.encode_image(px, meta)
        times.append(time.perf_counter() - t)
    return {"median_s": statistics.median(times), "baseline_rss_mib": base, "peak_rss_mib": _rss_mib("VmHWM")}


def child_decode(engine_dir: str, steps: int, threads: int) -> dict:
    import torch

    from densert.export.ort_backend import OrtBackend
    ob = OrtBackend(engine_dir, intra_op_threads=threads)
    ids = torch.arange(32).view(1, -1) + 1000
    pf = ob.prefill(ids, None)
    logits, cache = ob.decode(int(pf.last_logits.argmax()), pf.cache)   # warm-up
    t = time.perf_counter()
    for _ in range(steps):
        logits, cache = ob.decode(int(logits.argmax()), cache)
    dt = time.perf_counter() - t
    return {"tokens_per_s": steps / dt, "peak_rss_mib": _rss_mib("VmHWM")}


def child_verify(engine_dir: str, model_dir: str, grids=None, decode_steps=None) -> dict:
    from densert.export.options import VERIFY_DECODE_STEPS, VERIFY_GRIDS
    from densert.export.verify import verify
    rep = verify(engine_dir, model_dir, grids=[tuple(g) for g in grids] if grids else VERIFY_GRIDS,
                 decode_steps=VERIFY_DECODE_STEPS if decode_steps is None else decode_steps,
                 log=lambda s: None)
    dense: dict[str, float] = {}
    for name, agree, _, _ in rep.dense:
        task = name.split("] ")[1].split(" ")[0]
        dense[task] = min(dense.get(task, 1.0), agree)
    return {"ok": rep.ok, "dense_min": dense,
            "next_token_min": min((a for _, a, _, _ in rep.agreement), default=None),
            "cosine_min": min(t.cosine for t in rep.tensors), "report": rep.format(),
            "peak_rss_mib": _rss_mib("VmHWM")}


def child_cli(argv: list[str]) -> dict:
    """``python -m densert ARGV``: exit status, seconds, peak RSS. Run from this small child (no
    torch imported), so the command's ``ru_maxrss``, which starts from the memory of the process
    that forked it, is its own."""
    t = time.perf_counter()
    p = subprocess.Popen([sys.executable, "-m", "densert", *argv], stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    return {"rc": os.waitstatus_to_exitcode(status), "seconds": time.perf_counter() - t,
            "peak_rss_mib": usage.ru_maxrss / 1024}


CHILDREN = {"vision": child_vision, "decode": child_decode, "verify": child_verify, "cli": child_cli}


# ---------------------------------------------------------------- parent side
def _tree_rss_gib(pid: int) -> float:
    """Resident memory of a process and its descendants."""
    try:
        rss = int(Path(f"/proc/{pid}/status").read_text().split("VmRSS:")[1].split()[0]) / 2**20
        kids = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except (OSError, IndexError):
        return 0.0
    return rss + sum(_tree_rss_gib(int(k)) for k in kids)


def run_child(kind: str, args: list, limit_gb: float, module: str = "densert.benchmarks.bench_engines") -> dict:
    """One measurement in a fresh process (its JSON line, with its own peak RSS); the process and
    its children are killed when their resident memory passes ``limit_gb``. ``module``: whose
    ``--child KIND`` entry runs it (a benchmark module with children of its own)."""
    cmd = [sys.executable, "-m", module, _CHILD, kind, json.dumps(args)]
    with tempfile.TemporaryFile("w+") as out:
        p = subprocess.Popen(cmd, stdout=out, stderr=subprocess.DEVNULL, start_new_session=True)
        seen = 0.0
        while p.poll() is None:
            rss = _tree_rss_gib(p.pid)
            seen = max(seen, rss)
            if rss > limit_gb:
                os.killpg(p.pid, 9)
                p.wait()
                return {"stopped": f"resident memory passed {limit_gb:g} GB", "peak_rss_mib": seen * 1024}
            time.sleep(0.2)
        out.seek(0)
        lines = [ln for ln in out.read().splitlines() if ln.startswith("{")]
    if p.returncode or not lines:
        return {"failed": f"exit {p.returncode}", "peak_rss_mib": seen * 1024}
    return json.loads(lines[-1])


def _hybrid_checkpoint(root: Path, vision_layers: int) -> Path:
    """Real-width vision tower (1152 wide, 16 heads, ``vision_layers`` layers: windowed and full
    attention) on the tiny decoder: the vision graph is what is measured, the rest stays small."""
    if (root / "hybrid" / "config.json").is_file():
        return root / "hybrid"
    import torch

    from densert.checkpoint.model_dir import write_checkpoint
    from densert.checkpoint.random_init import sized_config_and_tokenizer
    from densert.model.config import sized_config
    from densert.model.modeling import YoutuVLForConditionalGeneration
    cfg, tok = sized_config_and_tokenizer("tiny", text_layers=1)
    cfg.vision_config = sized_config("youtu-vl-4b", vision_layers=vision_layers).vision_config
    cfg.vision_config.out_hidden_size = cfg.hidden_size
    torch.manual_seed(0)
    return write_checkpoint(YoutuVLForConditionalGeneration(cfg), root / "hybrid", tok)


def _masked_forward(self, x, meta, full, budget=None):
    """The vision attention as exported before windowing: every layer one [H, N, N] softmax,
    windows as a mask (window id of each patch: its padded slot // slots per window)."""
    import torch
    n = x.shape[0]
    shape = (n, self.num_heads, self.head_dim)
    q, k, v = (p(x).view(shape).transpose(0, 1) for p in (self.q_proj, self.k_proj, self.v_proj))
    from densert.model.vision import apply_vision_rope
    q, k = apply_vision_rope(q, meta.cos, meta.sin), apply_vision_rope(k, meta.cos, meta.sin)
    s = torch.matmul(q * self.scale, k.transpose(-2, -1)).float()
    if not full:
        win = meta.window_inverse // self.slots_per_window
        s = s.masked_fill(win[:, None] != win[None, :], float("-inf"))
    o = torch.matmul(s.softmax(-1).to(v.dtype), v)
    return self.out_proj(o.transpose(0, 1).reshape(n, -1))


def export_vision_pair(ck: Path, root: Path, tokens: int) -> dict[str, Path]:
    from densert.export.onnx_export import export_engine
    from densert.model.vision import Siglip2Attention
    out = {"after": root / "after", "before": root / "before"}
    if not (out["after"] / "manifest.json").is_file():
        export_engine(ck, out["after"], tasks=["chat"], max_image_tokens=tokens, progress=False)
    orig = Siglip2Attention.forward
    Siglip2Attention.forward = _masked_forward
    try:
        if not (out["before"] / "manifest.json").is_file():
            export_engine(ck, out["before"], tasks=["chat"], max_image_tokens=tokens, progress=False)
    finally:
        Siglip2Attention.forward = orig
    return out


def _model_summary(ck: Path) -> str:
    c = json.loads((ck / "config.json").read_text())
    t, v = c.get("text_config", c), c.get("vision_config", {})
    return (f"{ck.name}: decoder {t.get('hidden_size')} wide x {t.get('num_hidden_layers')} layers, vocab "
            f"{t.get('vocab_size')}; vision {v.get('hidden_size')} wide x {v.get('num_hidden_layers')} layers")


def dir_bytes(d: Path) -> int:
    return sum(f.stat().st_size for f in Path(d).iterdir() if f.is_file())


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == [_CHILD]:
        print(json.dumps(CHILDREN[argv[1]](*json.loads(argv[2]))))
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="real-width few-layer checkpoint (densert "
                    "make-test-checkpoint OUT --model-size youtu-vl-4b --text-layers 2 --vision-layers 2)")
    ap.add_argument("--out", required=True, help="results stem: writes STEM.json and STEM.md")
    ap.add_argument("--work", default=None, help="scratch dir for engines (default: a temp dir)")
    ap.add_argument("--sections", default="vision,engines,accuracy,frame")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--decode-steps", type=int, default=16)
    ap.add_argument("--rss-limit-gb", type=float, default=10.0)
    ap.add_argument("--frame-precisions", default="fp32",
                    help="engines run on the 3000x4000 photo (minutes each on 2 cores)")
    a = ap.parse_args(argv)

    from densert.export.onnx_export import export_engine
    from densert.resources import bundled_model_dir
    work = Path(a.work or tempfile.mkdtemp(prefix="densert-bench-engines-"))
    work.mkdir(parents=True, exist_ok=True)
    sections = a.sections.split(",")
    res: dict = {"command": "python -m densert.benchmarks.bench_engines " + " ".join(argv),
                 "machine": f"{os.cpu_count()} CPU cores, {a.threads} ONNX Runtime threads",
                 "rss_limit_gb": a.rss_limit_gb, "model": _model_summary(Path(a.model))}
    lim = a.rss_limit_gb

    if "vision" in sections:
        ck = _hybrid_checkpoint(work, vision_layers=2)
        rows = []
        for tokens, grid in ((1024, "64x64"), (4096, "128x128")):
            dirs = export_vision_pair(ck, work / f"vision-{tokens}", tokens)
            for when in ("before", "after"):
                r = run_child("vision", [str(dirs[when]), grid, a.runs, a.threads], lim)
                rows.append({"image_tokens": tokens, "grid": grid, "graph": when, **r})
                print("vision", rows[-1], flush=True)
        res["vision"] = rows
        save(a.out, res)   # what is measured so far survives a stopped run

    engines = {}
    if "engines" in sections or "accuracy" in sections:
        for p in ("fp32", "int8", "int4"):
            engines[p] = work / f"engine-{p}"
            if not (engines[p] / "manifest.json").is_file():   # the budget of the frame below
                export_engine(a.model, engines[p], precision=p, max_image_tokens=9216, progress=False)
    if "engines" in sections:
        rows = []
        for p, d in engines.items():
            r = run_child("decode", [str(d), a.decode_steps, a.threads], lim)
            rows.append({"precision": p, "dir_bytes": dir_bytes(d),
                         "size_vs_fp32": dir_bytes(d) / dir_bytes(engines["fp32"]), **r})
            print("engines", rows[-1], flush=True)
        res["engines"] = rows
        save(a.out, res)   # what is measured so far survives a stopped run

    if "accuracy" in sections:
        rows = []
        bundled = bundled_model_dir()
        for p in ("fp32", "int8", "int4"):
            d = work / f"bundled-{p}"
            export_engine(bundled, d, precision=p, progress=False)
            rows.append({"model": "bundled densert-tiny", "precision": p, "policy": "default",
                         **run_child("verify", [str(d), str(bundled)], lim)})
            print("accuracy", {k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
        for name, policy in (("int4 lm_head table", {"table": "int4"}), ("int4 vision", {"vision": "int4"}),
                             ("fp32 vision", {"vision": None})):
            d = work / f"bundled-int4-{name.replace(' ', '-')}"
            export_engine(bundled, d, precision="int4", progress=False, quant_policy=policy)
            rows.append({"model": "bundled densert-tiny", "precision": "int4", "policy": name,
                         **run_child("verify", [str(d), str(bundled)], lim)})
            print("accuracy", {k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
        for p, d in engines.items():
            rows.append({"model": Path(a.model).name, "precision": p, "policy": "default",
                         **run_child("verify", [str(d), a.model], lim)})
            print("accuracy", {k: v for k, v in rows[-1].items() if k != "report"}, flush=True)
        res["accuracy"] = rows
        save(a.out, res)   # what is measured so far survives a stopped run

    if "frame" in sections:
        import numpy as np
        from PIL import Image
        img = work / "photo-3000x4000.jpg"
        rng = np.random.default_rng(0)
        low = rng.random((12, 16, 3))
        Image.fromarray((np.kron(low, np.ones((250, 250, 1))) * 255).astype(np.uint8)).save(img, quality=90)
        rows = []
        for p in a.frame_precisions.split(","):
            d = work / f"engine-{p}"
            if not (d / "manifest.json").is_file():
                export_engine(a.model, d, precision=p, max_image_tokens=9216, progress=False)
            rows.append({"precision": p, **run_child("cli", [["depth", str(img), "--backend", "onnxruntime",
                                                             "--engine-dir", str(d), "--out", str(work / "frame-out")]],
                                                           lim)})
            print("frame", rows[-1], flush=True)
        res["frame"] = rows
        save(a.out, res)   # what is measured so far survives a stopped run

    save(a.out, res)
    print(report_md(res))
    return 0


def save(stem: str, res: dict) -> None:
    report.save(res, report_md(res), stem + ".json", stem + ".md")


def report_md(r: dict) -> str:
    out = ["# Engines that fit the device", "", f"Command: `{r['command']}`", "",
           f"Machine: {r['machine']}; shared with other jobs. One run; each row in its own process.", "",
           f"Checkpoint: {r.get('model')} (random weights, made by `densert make-test-checkpoint`).", ""]
    if "vision" in r:
        out += ["## Vision graph, ONNX Runtime CPU (real-width tower: 1152 wide, 16 heads, one windowed "
                "+ one full-attention layer)", "",
                "| image tokens | graph | median s | peak RSS MiB | note |", "|---:|---|---:|---:|---|"]
        for x in r["vision"]:
            note = x.get("stopped") or x.get("failed") or ""
            med = f"{x['median_s']:.2f}" if "median_s" in x else "-"
            out.append(f"| {x['image_tokens']} | {x['graph']} | {med} | {x.get('peak_rss_mib', 0):.0f} | {note} |")
        by = {(x["image_tokens"], x["graph"]): x for x in r["vision"]}
        for t in sorted({x["image_tokens"] for x in r["vision"]}):
            b, a = by.get((t, "before"), {}), by.get((t, "after"), {})
            if "median_s" in b and "median_s" in a:
                out.append(f"\n{t} tokens: after/before time {a['median_s'] / b['median_s']:.2f}x, "
                           f"peak RSS {a['peak_rss_mib'] / b['peak_rss_mib']:.2f}x")
        out.append("")
    if "engines" in r:
        out += ["## Engine directories (real width, 2 + 2 layers)", "",
                "| precision | size MiB | vs fp32 | decode tokens/s | peak RSS MiB |", "|---|---:|---:|---:|---:|"]
        for x in r["engines"]:
            tps = f"{x['tokens_per_s']:.2f}" if "tokens_per_s" in x else x.get("failed", "-")
            out.append(f"| {x['precision']} | {x['dir_bytes'] / 2**20:.0f} | {x['size_vs_fp32']:.3f} | {tps} | "
                       f"{x.get('peak_rss_mib', 0):.0f} |")
        out.append("")
    if "accuracy" in r:
        out += ["## Parity gate against the fp32 torch reference (densert verify, default grids)", "",
                "| model | precision | policy | depth | segment | refer | next token | worst cosine | gate |",
                "|---|---|---|---:|---:|---:|---:|---:|---|"]
        for x in r["accuracy"]:
            d = x.get("dense_min", {})

            def f(k):
                return f"{d[k] * 100:.2f}%" if k in d else "-"

            nt = x.get("next_token_min")
            out.append(f"| {x['model']} | {x['precision']} | {x['policy']} | {f('depth')} | {f('segment')} | "
                       f"{f('refer')} | {'-' if nt is None else f'{nt * 100:.0f}%'} | "
                       f"{x.get('cosine_min', float('nan')):.5f} | {'PASS' if x.get('ok') else 'FAIL'} |")
        out.append("")
    if "frame" in r:
        out += ["## densert depth --backend onnxruntime, 3000x4000 photo, 36,864-patch cap", "",
                "| precision | exit | seconds | peak RSS MiB |", "|---|---:|---:|---:|"]
        for x in r["frame"]:
            out.append(f"| {x['precision']} | {x.get('rc', x.get('stopped', x.get('failed')))} | "
                       f"{x.get('seconds', 0):.1f} | {x.get('peak_rss_mib', 0):.0f} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
