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

Each command runs in its own process (``bench_engines.run_child``: peak RSS of the process
tree, stopped past ``--rss-limit-gb``). The report records the CPU, its ISA flags and the load
average. Example (the committed ``benchmarks/results/fullscale.{json,md}``):

    python -m densert.benchmarks.bench_fullscale --work /tmp/fullscale --out benchmarks/results/fullscale
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from . import report
from .bench_engines import dir_bytes, run_child

FRAME = (480, 640)
ISA = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")


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
    ap.add_argument("--rss-limit-gb", type=float, default=22.0)
    ap.add_argument("--keep", action="store_true", help="keep the engine directories")
    a = ap.parse_args(argv)
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    ck = work / "ck"
    res: dict = {"command": "python -m densert.benchmarks.bench_fullscale " + " ".join(argv),
                 "machine": machine(), "started": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    lim = a.rss_limit_gb
    if not (ck / "config.json").is_file():
        res["checkpoint"] = cli(["make-test-checkpoint", str(ck), "--model-size", "youtu-vl-4b",
                                 "--shard-mb", "2000"], lim)
    res["checkpoint_bytes"] = dir_bytes(ck)
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
        for p in precisions:
            shutil.rmtree(work / f"engine-{p}", ignore_errors=True)
    res["finished"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    res["load_at_end"] = [round(x, 2) for x in os.getloadavg()]
    save()
    return 0


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
    out = ["# The full-size model on one 24 GB CPU machine", "",
           f"Command: `{r['command']}`", "",
           f"Machine: {m['cpu']}, {m['cores']} cores, {m['mem_gib']} GiB; ISA: {', '.join(m['isa'])}; "
           f"load average at start {m['load_at_start']}, at end {r.get('load_at_end', '-')}. "
           f"Started {r['started']}. Each row is one command in its own process (peak RSS of the process "
           "tree); one run, not a median.", "",
           f"Checkpoint: Youtu-VL-4B layout (40 decoder + 27 ViT layers, random bf16 weights), "
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
