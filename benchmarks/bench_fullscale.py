"""The real model's size, measured in one run on this machine: the full Youtu-VL-4B layout
(40 decoder + 27 ViT layers, 10 GB of bf16 safetensors, random weights from
``densert make-test-checkpoint --model-size youtu-vl-4b``), side by side:

1. ``export``: ``densert export --precision P --image-size 480x640`` per precision: seconds,
   peak resident memory of the process, and the engine directory's size per part (decoder,
   table, vision, heads) as its manifest reports it;
2. ``frame``: one 480x640 ``densert depth`` frame per runtime (torch fp32 / bf16 / auto, ONNX
   Runtime per exported precision): peak resident memory of the whole command, its load time
   and per-stage milliseconds from the sidecar JSON;
3. ``verify``: ``densert verify`` of the int4 and int8 directories on one 480x640 grid (the
   reference streams its layers): seconds, peak memory, PASS/FAIL, and the worst cosine and
   dense-map agreement it printed.
4. ``blocks``: the int4 block size against accuracy, on the bundled trained model (random
   weights say little about accuracy): dense-map agreement with the fp32 reference (worst
   image of ``densert verify``'s defaults), worst cosine, directory size, per block size.
5. ``speed``: per stage (vision, prefill, dense head) milliseconds of one 480x640 depth frame,
   median of ``--speed-frames`` frames after a warm-up one, per ONNX Runtime engine
   (``--speed-precisions``, exported when missing) beside torch fp32 and bf16, at equal thread
   counts (``--threads``: torch's and ONNX Runtime's intra-op threads). Each quantized engine
   shares one process with torch bf16, frames alternating, so the ratio to bf16 (the median of
   the per-frame ratios) holds on a shared, loaded machine; the fp32 runtimes (~9 GB each) run
   alone. The load average is recorded before and after each process. Then, per runtime, the
   milliseconds of a greedy decode step after a 330-token prompt (a frame's length). An engine
   named ``int4-nbits`` is the int4 export with ``--ort-matmul nbits``.

Each command runs in its own process (``bench_engines.run_child``: peak RSS of the process
tree, stopped past ``--rss-limit-gb``). The report records the CPU, its ISA flags and the load
average. Example (the committed ``benchmarks/results/fullscale.{json,md}``):

    python -m densert.benchmarks.bench_fullscale --work /tmp/fullscale --out benchmarks/results/fullscale

and the fused ONNX Runtime engines' speed (``benchmarks/results/fused_ort.{json,md}``; 27 ViT + 12
decoder layers, ~13 min on 2 quiet cores with the engines exported, ``--keep`` keeps them):

    python -m densert.benchmarks.bench_fullscale --work /tmp/fused --out benchmarks/results/fused_ort \
        --sections speed --text-layers 12 --rss-limit-gb 12 --keep
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import report
from .bench_engines import _CHILD, _rss_mib, dir_bytes, run_child

FRAME = (480, 640)
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
STAGES = ("vision", "prefill", "dense_head")
DECODE_PROMPT, DECODE_STEPS = 330, 8      # decode timing: a frame-long prompt, then greedy steps
# The must-show of the fused engines (issue 22): int4 model time <= 0.6x, vision <= 0.7x the
# faster torch dtype (bf16 on a CPU with native bf16).
TARGETS = {"int4": {"model": 0.6, "vision": 0.7}}


def machine() -> dict:
    from densert.machine import cpu_flags, cpu_model
    mem = Path("/proc/meminfo").read_text().split("MemTotal:")[1].split()[0]
    return {"cpu": cpu_model(), "cores": os.cpu_count(), "isa": [f for f in ISA if f in cpu_flags()],
            "mem_gib": round(int(mem) / 2**20, 1), "load_at_start": [round(x, 2) for x in os.getloadavg()]}


def cli(argv: list[str], limit: float) -> dict:
    print("$ densert " + " ".join(argv), flush=True)
    r = run_child("cli", [argv], limit)
    r["command"] = "densert " + " ".join(argv)
    print("  ", {k: v for k, v in r.items() if k != "command"}, flush=True)
    return r


def frame_image(work: Path) -> Path:
    from PIL import Image

    from .harness import synthetic_image
    p = work / f"frame_{FRAME[0]}x{FRAME[1]}.png"
    if not p.is_file():
        Image.fromarray(synthetic_image(*FRAME)).save(p)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", required=True, help="scratch folder: the checkpoint (made when absent, "
                    "10 GB) and the engine directories (~40 GB for all four precisions)")
    ap.add_argument("--out", required=True, help="results stem: writes STEM.json and STEM.md")
    ap.add_argument("--precisions", default="int4,int8,fp16,fp32")
    ap.add_argument("--sections", default="blocks,export,frame,verify")
    ap.add_argument("--torch-dtypes", default="float32,bfloat16,auto")
    ap.add_argument("--verify-precisions", default="int4,int8",
                    help="engines verified (fp16 / fp32 engines are for GPUs: their ONNX Runtime CPU "
                         "session alone holds ~21 GB, so beside the reference they do not fit 24 GB)")
    ap.add_argument("--text-layers", type=int, help="decoder layers of the checkpoint (default: the "
                    "model's 40); with --vision-layers the checkpoint is work/ck-<V>v<T>t")
    ap.add_argument("--vision-layers", type=int, help="ViT layers of the checkpoint (default: 27)")
    ap.add_argument("--speed-precisions", default="int4,int8,fp32",
                    help="engines timed by --sections speed (fp16 is the GPU's engine: on this CPU its "
                         "matmuls run at fp32 speed)")
    ap.add_argument("--speed-frames", type=int, default=3, help="frames per runtime (after a warm-up)")
    ap.add_argument("--threads", type=int, default=os.cpu_count(),
                    help="intra-op threads of torch and ONNX Runtime in the speed section")
    ap.add_argument("--rss-limit-gb", type=float, default=22.0)
    ap.add_argument("--keep", action="store_true", help="keep the engine directories")
    if argv[:1] == [_CHILD]:
        print(json.dumps(CHILDREN[argv[1]](*json.loads(argv[2]))))
        return 0
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    layers = [] if a.text_layers is None and a.vision_layers is None else \
        ["--vision-layers", str(a.vision_layers or 27), "--text-layers", str(a.text_layers or 40)]
    ck = work / ("ck" if not layers else f"ck-{layers[1]}v{layers[3]}t")
    res: dict = {"command": "python -m densert.benchmarks.bench_fullscale " + " ".join(argv),
                 "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lim = a.rss_limit_gb
    if not (ck / "config.json").is_file():
        res["checkpoint"] = cli(["make-test-checkpoint", str(ck), "--model-size", "youtu-vl-4b",
                                 "--shard-mb", "2000", *layers], lim)
    res["checkpoint_bytes"] = dir_bytes(ck)
    cfg = json.loads((ck / "config.json").read_text())
    res["layers"] = {"vision": cfg["vision_config"]["num_hidden_layers"], "decoder": cfg["num_hidden_layers"]}
    precisions = a.precisions.split(",")
    sections = a.sections.split(",")
    img = frame_image(work)
    res["export"], res["frame"], res["verify"] = [], [], []

    def save():
        report.save(res, report_md(res), a.out + ".json", a.out + ".md")

    if "blocks" in sections:
        res["blocks"] = int4_blocks(work / "blocks")
        save()

    for p in precisions:
        eng = work / f"engine-{p}"
        if "export" in sections:
            import shutil
            shutil.rmtree(eng, ignore_errors=True)
            r = cli(["export", "--model", str(ck), "--out", str(eng), "--precision", p,
                     "--image-size", f"{FRAME[0]}x{FRAME[1]}", "--quiet"], lim)
            if (eng / "manifest.json").is_file():
                m = json.loads((eng / "manifest.json").read_text())
                r["dir_bytes"], r["sizes"] = dir_bytes(eng), m.get("sizes", {})
            res["export"].append({"precision": p, **r})
            save()
    runs = [("torch", d, ["--model", str(ck), *([] if d == "auto" else ["--dtype", d])])
            for d in a.torch_dtypes.split(",") if d]
    runs += [("onnxruntime", p, ["--backend", "onnxruntime", "--engine-dir", str(work / f"engine-{p}")])
             for p in precisions if (work / f"engine-{p}" / "manifest.json").is_file()]
    if "frame" in sections:
        for backend, what, flags in runs:
            out = work / f"depth-{backend}-{what}"
            r = cli(["depth", str(img), "--out", str(out), "--max-patches", str(FRAME[0] * FRAME[1] // 256),
                     "--quiet", *flags], lim)
            side = out / f"{img.stem}.json"
            if side.is_file():
                s = json.loads(side.read_text())
                r.update(timings_ms=s["timings_ms"], load_s=s.get("load_s"), dtype=s.get("dtype"))
            res["frame"].append({"backend": backend, "precision": what, **r})
            save()
    if "speed" in sections:
        res["speed"] = speed(work, ck, img, a.speed_precisions.split(","), a.speed_frames, a.threads, lim, save)
        save()
    if "verify" in sections:
        for p in a.verify_precisions.split(","):
            eng = work / f"engine-{p}"
            if not (eng / "manifest.json").is_file():
                continue
            # densert verify's own function in a child process: its verdict, numbers and peak RSS
            grid = [FRAME[0] // 16, FRAME[1] // 16]
            print(f"$ densert verify {eng} --model {ck} --grids {grid[0]}x{grid[1]} --decode-steps 2", flush=True)
            r = run_child("verify", [str(eng), str(ck), [grid], 2], lim)
            print("  ", {k: v for k, v in r.items() if k != "report"}, flush=True)
            res["verify"].append({"precision": p, **r})
            save()
    if not a.keep:
        import shutil
        for p in {*precisions, *(a.speed_precisions.split(",") if "speed" in sections else ())}:
            shutil.rmtree(work / f"engine-{p}", ignore_errors=True)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    return 0


def speed(work: Path, ck: Path, img: Path, precisions: list[str], frames: int, threads: int, lim: float,
          save) -> dict:
    """Section 5: engines exported when missing (or from another checkpoint), then one process
    per row group of the table."""
    out: dict = {"threads": threads, "frames": frames, "export": [], "runs": []}
    engines = {}
    for p in precisions:
        eng = work / f"engine-{p}"
        m = eng / "manifest.json"
        if not m.is_file() or json.loads(m.read_text())["checkpoint"]["path"] != str(ck.resolve()):
            import shutil
            shutil.rmtree(eng, ignore_errors=True)
            prec, _, matmul = p.partition("-")     # int4-nbits: --ort-matmul nbits
            r = cli(["export", "--model", str(ck), "--out", str(eng), "--precision", prec,
                     *(["--ort-matmul", matmul] if matmul else []),
                     "--image-size", f"{FRAME[0]}x{FRAME[1]}", "--quiet"], lim)
            out["export"].append({"precision": p, **r})
        if m.is_file():
            man = json.loads(m.read_text())
            ops = set().union(*(g["op_types"] for g in man["graphs"].values()))
            engines[p] = {"label": f"onnxruntime {p}", "backend": "onnxruntime", "engine_dir": str(eng),
                          "target": man.get("target"), "ops": sorted(ops)}
    bf16 = {"label": "torch bf16", "backend": "torch", "model": str(ck), "dtype": "bfloat16"}
    groups = [[bf16, engines[p]] for p in precisions if p in engines and p not in ("fp32", "fp16")]
    # (each group: one process; bf16 beside each quantized engine, the ~9 GB fp32 runtimes alone)
    groups += [[{"label": "torch fp32", "backend": "torch", "model": str(ck), "dtype": "float32"}]]
    groups += [[engines[p]] for p in ("fp32", "fp16") if p in engines]
    for specs in groups:
        print("speed:", " + ".join(x["label"] for x in specs), flush=True)
        load = [round(x, 2) for x in os.getloadavg()]
        r = run_child("frames", [specs, str(img), frames, threads], lim, module="densert.benchmarks.bench_fullscale")
        r.update(load_before=load, load_after=[round(x, 2) for x in os.getloadavg()])
        print("  ", {k: v for k, v in r.items() if k != "rounds"}, flush=True)
        out["runs"].append({"labels": [x["label"] for x in specs], **r})
        save()
    out["engines"] = engines
    return out


def child_frames(specs: list[dict], image: str, frames: int, threads: int) -> dict:
    """One process: every runtime of ``specs`` loaded, then ``frames`` + 1 rounds of one depth
    frame each, in turn (the first round warms up and is not counted)."""
    os.environ["DENSERT_ORT_THREADS"] = str(threads)
    import statistics

    import numpy as np
    import torch
    from PIL import Image

    from densert.runtime.predictor import DensePredictor
    torch.set_num_threads(threads)
    img = np.asarray(Image.open(image).convert("RGB"))
    preds = []
    for s in specs:
        t = time.perf_counter()
        if s["backend"] == "torch":
            p = DensePredictor(s["model"], backend="torch", dtype=s["dtype"])
        else:
            p = DensePredictor(None, backend="onnxruntime", engine_dir=s["engine_dir"])
        preds.append((s["label"], p, time.perf_counter() - t))
    rounds: dict[str, list[dict]] = {label: [] for label, _, _ in preds}
    for _ in range(frames + 1):
        for label, p, _ in preds:
            t = p.depth(img).timings
            ms = {k: t.get(k, 0.0) * 1000 for k in STAGES}
            rounds[label].append({**ms, "model": sum(ms.values())})
    decode = {}
    for label, p, _ in preds:     # ms per generated token after a prompt as long as the frame's
        be = p.backend
        pf = be.prefill(torch.arange(DECODE_PROMPT).view(1, -1) % 500 + 10, None)   # plain text ids
        logits, cache = be.decode(int(pf.last_logits.argmax()), pf.cache)     # a warm-up step
        t = time.perf_counter()
        for _ in range(DECODE_STEPS):
            logits, cache = be.decode(int(logits.argmax()), cache)
        decode[label] = (time.perf_counter() - t) / DECODE_STEPS * 1000
    out = {"load_s": {label: round(s, 1) for label, _, s in preds}, "rounds": rounds, "median_ms": {},
           "decode_ms_per_token": decode,
           "ratio_to_first": {}, "peak_rss_mib": _rss_mib("VmHWM"), "torch_threads": torch.get_num_threads()}
    ref = preds[0][0]
    for label, rs in rounds.items():
        rs = rs[1:]
        out["median_ms"][label] = {k: statistics.median(x[k] for x in rs) for k in (*STAGES, "model")}
        if label != ref:
            out["ratio_to_first"][label] = {k: statistics.median(x[k] / y[k] for x, y in zip(rs, rounds[ref][1:]))
                                            for k in ("vision", "prefill", "model")}
    return out


CHILDREN = {"frames": child_frames}


def int4_blocks(work: Path) -> list[dict]:
    from densert.export.onnx_export import export_engine
    from densert.export.verify import verify
    from densert.resources import bundled_model_dir
    bundled = bundled_model_dir()
    rows = []
    for block in (32, 64, 128):
        eng = work / f"int4-b{block}"
        export_engine(bundled, eng, precision="int4", int4_block=block, progress=False)
        rep = verify(eng, bundled, log=lambda s: None)
        dense: dict[str, float] = {}
        for name, agree, _, _ in rep.dense:
            if name.endswith("end-to-end"):
                task = name.split("] ")[1].split(" ")[0]
                dense[task] = min(dense.get(task, 1.0), agree)
        rows.append({"block": block, "ok": rep.ok, "dense_end_to_end_min": dense,
                     "cosine_min": min(t.cosine for t in rep.tensors), "dir_bytes": dir_bytes(eng)})
        print("blocks", rows[-1], flush=True)
    return rows


def speed_md(sp: dict) -> list[str]:
    out = [f"## Speed: one 480x640 depth frame, per stage (median of {sp['frames']} frames after a warm-up; "
           f"{sp['threads']} intra-op threads for torch and ONNX Runtime)", "",
           "Each quantized engine ran in one process with torch bf16, frames alternating: its ratio is the "
           "median of the per-frame ratios to the bf16 frame beside it. The fp32 runtimes ran alone "
           "(ratios to the median of all bf16 frames of the run).", "",
           "| runtime | vision ms | prefill ms | dense head ms | model ms | vision / bf16 | prefill / bf16 | "
           "model / bf16 | target | decode ms / token | load avg (1 min) before, after | peak RSS GiB |",
           "|---|---:|---:|---:|---:|---:|---:|---:|---|---:|---|---:|"]
    bf16 = [x["median_ms"]["torch bf16"] for x in sp["runs"] if "torch bf16" in x.get("median_ms", {})]
    bf16_med = {k: sorted(b[k] for b in bf16)[len(bf16) // 2] for k in ("vision", "prefill", "model")} if bf16 else {}
    fmt = lambda z: f"{z:,.0f}" if z is not None else "-"  # noqa: E731
    for run in sp["runs"]:
        if "median_ms" not in run:
            out.append(f"| {' + '.join(run['labels'])} | {_status(run)} | | | | | | | | | | |")
            continue
        for label, m in run["median_ms"].items():
            rat = run.get("ratio_to_first", {}).get(label)
            if rat is None and label != "torch bf16" and bf16_med:
                rat = {k: m[k] / bf16_med[k] for k in bf16_med}
            prec = label.split()[-1]
            tgt = TARGETS.get(prec) if label.startswith("onnxruntime") else None
            verdict = "-"
            if tgt and rat:
                met = all(rat[k] <= v for k, v in tgt.items())
                verdict = ("met" if met else "missed") + " (" + ", ".join(f"{k} <= {v}" for k, v in tgt.items()) + ")"
            r3 = [f"{rat[k]:.3f}" if rat else "-" for k in ("vision", "prefill", "model")]
            out.append(f"| {label} | {fmt(m['vision'])} | {fmt(m['prefill'])} | {fmt(m['dense_head'])} | "
                       f"{fmt(m['model'])} | {' | '.join(r3)} | {verdict} | "
                       f"{fmt(run.get('decode_ms_per_token', {}).get(label))} | {run['load_before'][0]}, "
                       f"{run['load_after'][0]} | {_gib(run.get('peak_rss_mib', 0) * 2**20)} |")
    out.append("")
    eng = sp.get("engines", {})
    if eng:
        fused = ("LayerNormalization", "SimplifiedLayerNormalization")
        out += ["Engines (`densert export --image-size 480x640`, target onnxruntime), their fused operators: "
                + "; ".join(f"{p}: {', '.join(o for o in e['ops'] if o.startswith('com.microsoft::') or o in fused)}"
                            for p, e in eng.items()), ""]
    return out


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if b is not None else "-"


def _status(r: dict) -> str:
    if "stopped" in r:
        return r["stopped"]
    if "failed" in r:
        return r["failed"]
    return "ok" if r.get("rc") == 0 else f"exit {r.get('rc')}"


def report_md(r: dict) -> str:
    m = r["machine"]
    lay = r.get("layers", {"vision": 27, "decoder": 40})
    out = ["# The full-size model on one 24 GB CPU machine" if lay["decoder"] == 40 else
           f"# Real width, {lay['vision']} ViT + {lay['decoder']} decoder layers, on one CPU machine", "",
           f"Command: `{r['command']}`", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; ISA: {', '.join(m['isa'])}; "
           f"load average at start {m['load_at_start']}, at end {r.get('load_at_end', '-')}. "
           f"Started {r['started']}." + (" Each row of the export, frame and verify tables is one command in "
                                         "its own process (peak RSS of the process tree); one run, not a median."
                                         if any(r.get(k) for k in ("export", "frame", "verify")) else ""), "",
           f"Checkpoint: Youtu-VL-4B widths ({lay['decoder']} decoder + {lay['vision']} ViT layers, random bf16 "
           "weights), "
           f"{r['checkpoint_bytes'] / 1e9:.2f} GB on disk.", ""]
    if r.get("blocks"):
        out += ["## int4 block size, on the bundled trained model (`densert verify` defaults: 3 images)", "",
                "| block | gate | depth agreement | segment | refer | worst cosine | dir MB |",
                "|---:|---|---:|---:|---:|---:|---:|"]
        for x in r["blocks"]:
            d = x["dense_end_to_end_min"]
            pct = lambda k: f"{d[k] * 100:.2f}%" if k in d else "-"  # noqa: E731
            out.append(f"| {x['block']} | {'PASS' if x['ok'] else 'FAIL'} | {pct('depth')} | {pct('segment')} | "
                       f"{pct('refer')} | {x['cosine_min']:.4f} | {x['dir_bytes'] / 1e6:.2f} |")
        out.append("")
    if r.get("export"):
        out += ["## Export (`densert export --image-size 480x640`)", "",
                "| precision | status | seconds | peak RSS GiB | engine dir GB (GiB) | decoder GB | table GB | "
                "vision GB | heads GB |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["export"]:
            s = x.get("sizes", {})
            gb = lambda k: f"{s[k] / 1e9:.3f}" if k in s else "-"  # noqa: E731
            d = x.get("dir_bytes")
            out.append(f"| {x['precision']} | {_status(x)} | {x.get('seconds', 0):.0f} | "
                       f"{_gib(x.get('peak_rss_mib', 0) * 2**20)} | "
                       f"{f'{d / 1e9:.3f} ({d / 2**30:.3f})' if d else '-'} | {gb('decoder')} | "
                       f"{gb('table')} | {gb('vision')} | {gb('heads')} |")
        out.append("")
    if r.get("frame"):
        out += ["## One 480x640 depth frame (`densert depth IMG --max-patches 1200`)", "",
                "| backend | weights | status | peak RSS GiB | wall s | load s | vision ms | prefill ms | "
                "dense head ms | model ms |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
        for x in r["frame"]:
            t = x.get("timings_ms", {})
            get = lambda *ks: next((t[k] for k in ks if k in t), None)  # noqa: E731
            v, pf, dh = get("vision", "vision_encoder"), get("prefill", "llm_prefill"), get("dense_head")
            model = sum(z for z in (v, pf, dh) if z is not None) if t else None
            fmt = lambda z: f"{z:,.0f}" if z is not None else "-"  # noqa: E731
            what = x["precision"] + (f" -> {x['dtype']}" if x["backend"] == "torch" and x.get("dtype") else "")
            out.append(f"| {x['backend']} | {what} | {_status(x)} | {_gib(x.get('peak_rss_mib', 0) * 2**20)} | "
                       f"{x.get('seconds', 0):.0f} | {fmt(x.get('load_s'))} | {fmt(v)} | {fmt(pf)} | "
                       f"{fmt(dh)} | {fmt(model)} |")
        out.append("")
    if r.get("speed"):
        out += speed_md(r["speed"])
    if r.get("verify"):
        out += ["## Parity gate (`densert verify --grids 30x40 --decode-steps 2`, streamed fp32 reference)", "",
                "| precision | verdict | peak RSS GiB | worst cosine | depth agreement | segment | refer |",
                "|---|---|---:|---:|---:|---:|---:|"]
        for x in r["verify"]:
            d = x.get("dense_min", {})
            pct = lambda k: f"{d[k] * 100:.1f}%" if k in d else "-"  # noqa: E731
            verdict = ("PASS" if x["ok"] else "FAIL") if "ok" in x else _status(x)
            cos = f"{x['cosine_min']:.3f}" if "cosine_min" in x else "-"
            out.append(f"| {x['precision']} | {verdict} | {_gib(x.get('peak_rss_mib', 0) * 2**20)} | {cos} | "
                       f"{pct('depth')} | {pct('segment')} | {pct('refer')} |")
        if any(not x.get("ok", True) for x in r["verify"]):
            out += ["", "The checkpoint has random weights: the gate's thresholds were measured on a 2-layer "
                    "random checkpoint and the bundled trained model, and through 40 layers of HF-init noise "
                    "(no margins anywhere) the quantization error compounds. The verdict is reported as "
                    "given; full reports in the JSON."]
        out.append("")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
