"""A ``densert bench`` JSON report: its schema check, Markdown tables and PNG plots (matplotlib,
Agg)."""
from __future__ import annotations

import json
import os
import platform
from importlib import resources
from pathlib import Path

from densert.extras import require
from densert.machine import cpu_model

SCHEMA_VERSION = 1

STAGE_ORDER = ("preprocess", "vision_encoder", "llm_prefill", "dense_head", "postprocess")
ROOF_STAGES = ("vision_encoder", "llm_prefill", "dense_head")


def save(rep: dict, md: str, json_path: str | None, md_path: str | None) -> None:
    """A benchmark's report: JSON where asked, the Markdown to its file or to stdout."""
    if json_path:
        Path(json_path).write_text(json.dumps(rep, indent=1) + "\n")
    if md_path:
        Path(md_path).write_text(md)
    else:
        print(md)


def machine_info() -> dict:
    import numpy
    import torch
    cpu = cpu_model()
    ram = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                ram = int(line.split()[1]) / 2**20
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    libs = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__}
    for mod in ("onnxruntime", "onnx", "tensorrt", "matplotlib", "triton"):
        try:
            libs[mod] = __import__(mod).__version__
        except Exception:
            libs[mod] = None
    from densert import __version__
    libs["densert"] = __version__
    try:
        load = list(os.getloadavg())
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(),
            "affinity_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
            "ram_gb": ram, "gpu": gpu, "cuda": torch.version.cuda if gpu else None,
            "platform": platform.platform(), "torch_threads": torch.get_num_threads(),
            "loadavg_at_start": load, "libraries": libs}


def schema() -> dict:
    """``benchmarks/schema.json`` (JSON Schema draft 2020-12), from the installed package."""
    return json.loads((resources.files("densert.benchmarks") / "schema.json").read_text())


def validate(report: dict) -> None:
    """Raise ValueError listing every way ``report`` breaks the schema (empty: valid)."""
    jsonschema = require("jsonschema", "validating a bench report")
    v = jsonschema.Draft202012Validator(schema())
    errors = sorted(v.iter_errors(report), key=lambda e: list(e.absolute_path))
    if errors:
        raise ValueError("bench report does not match benchmarks/schema.json: " + "; ".join(
            f"{'/'.join(map(str, e.absolute_path)) or '$'}: {e.message}" for e in errors[:10]))


def _ms(x) -> str:
    if x is None:
        return "-"
    v = x * 1e3
    return f"{v:.3g}" if v < 100 else f"{v:.0f}"


def _x(x) -> str:
    return "-" if x is None else (f"{x:.3g}x" if x < 100 else f"{x:.0f}x")


def _machine_line(m: dict) -> str:
    return (f"Machine: {m['cpu']}, {m['cores']} cores ({m['affinity_cores']} usable), "
            f"{(m['ram_gb'] or 0):.0f} GB RAM, GPU: {m['gpu'] or 'none'}; load average at start "
            f"{m['loadavg_at_start']}"
            + (f", at end {m['loadavg_at_end']}" if m.get("loadavg_at_end") else "")
            + f"; torch threads {m['torch_threads']}.  ")


def _num(x, fmt: str = ".1f") -> str:
    return "-" if x is None else format(x, fmt)


def _batches(sizes: dict) -> str:
    return ", ".join(f"{k}x{v}" for k, v in sizes.items()) or "-"


def serve_markdown(rep: dict) -> str:
    """A ``kind: serve`` report: per run the server's settings and one row per concurrency level;
    with several runs, a side-by-side table of throughput and latency."""
    L = ["# densert bench --url: a Triton server under load", ""]
    if rep.get("label"):
        L += [f"**{rep['label']}**", ""]
    m = rep["machine"]
    L += ["Command:", "", "```", rep["command"], "```", "", _machine_line(m),
          "Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v) + ".  ",
          "Latency: the client's wall time around one request (encode, network, queue, model, "
          "decode), p50 / p90 / p99 in ms; throughput: answered requests over the level's wall "
          "time. From the server's statistics: batches (batch size x model executions), queue and "
          "compute ms per request (Triton charges a batch's compute time to each of its "
          "requests).", ""]
    runs = rep["serve"]
    for run in runs:
        sv = run["server"]
        batching = (f"dynamic batching on (max queue delay {sv['max_queue_delay_us']} us)"
                    if sv["dynamic_batching"] else "dynamic batching off")
        h, w = run["image_hw"]
        L += [f"## {run.get('label') or run['model']}", "",
              f"Model `{run['model']}` at `{run['url']}` ({run['protocol']}), Triton "
              f"{sv.get('server_version')}, {sv.get('instances')} instance(s), max batch "
              f"{sv['max_batch_size']}, {batching}; image {h}x{w}, parameters "
              f"{json.dumps(run.get('params') or {})}; {run.get('warmup_per_client', 0)} warm-up "
              "request(s) per client first.", "",
              "| clients | requests | errors | throughput (req/s) | p50 | p90 | p99 | mean batch | "
              "batches | queue ms | compute ms |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for lv in run["levels"]:
            st, lat = lv["server"], lv["latency"]
            mb = st["mean_batch_size"]
            L.append(f"| {lv['concurrency']} | {lv['requests']} | {lv['errors']} | "
                     f"{(lv['throughput_rps'] or 0):.2f} | {_ms(lat['p50'])} | {_ms(lat['p90'])} | "
                     f"{_ms(lat['p99'])} | {_num(mb, '.2f')} | "
                     f"{_batches(st['batch_sizes'])} | "
                     f"{_num(st.get('queue_ms_mean'))} | {_num(st.get('compute_ms_mean'))} |")
        errs = [lv["first_error"] for lv in run["levels"] if lv.get("first_error")]
        if errs:
            L += ["", f"First error: `{errs[0]}`"]
        L.append("")
    if len(runs) > 1:
        names = [r.get("label") or r["model"] for r in runs]
        L += ["## Side by side", "",
              "| clients | " + " | ".join(f"{n}: req/s | {n}: p50 / p99 ms" for n in names) + " |",
              "|---|" + "---|---|" * len(runs)]
        by = [{lv["concurrency"]: lv for lv in r["levels"]} for r in runs]
        for c in sorted({c for b in by for c in b}):
            cells = []
            for b in by:
                lv = b.get(c)
                cells += (["-", "-"] if lv is None else
                          [f"{(lv['throughput_rps'] or 0):.2f}",
                           f"{_ms(lv['latency']['p50'])} / {_ms(lv['latency']['p99'])}"])
            L.append(f"| {c} | " + " | ".join(cells) + " |")
        L.append("")
    return "\n".join(L) + "\n"


def markdown(rep: dict) -> str:
    if rep.get("kind") == "serve":
        return serve_markdown(rep)
    m = rep["machine"]
    cpu = rep["this_cpu_peaks"]
    L = [f"# densert bench: {rep['model']['name']}", ""]
    if rep.get("label"):
        L += [f"**{rep['label']}**", ""]
    L += ["Command:", "", "```", rep["command"], "```", "",
          _machine_line(m),
          "Libraries: " + ", ".join(f"{k} {v}" for k, v in m["libraries"].items() if v) + ".  ",
          f"Model: `{rep['model']['dir']}` (hidden {rep['model']['hidden_size']}, "
          f"{rep['model']['text_layers']} text layers, {rep['model']['vision_layers']} vision layers, "
          f"vocab {rep['model']['vocab_size']}), dtype {rep['settings']['dtype']}.  ",
          f"Runs: {rep['settings']['warmup']} warm-up + {rep['settings']['runs']} timed per case; "
          "latencies are p50 / p90 / p99 in ms.  ",
          f"This CPU, measured (not a datasheet): GEMM {cpu['flops'] / 1e9:.1f} GFLOP/s "
          f"({cpu['gemm']}), copy {cpu['bandwidth'] / 1e9:.1f} GB/s ({cpu['copy']}).", ""]

    skipped = [b for b in rep["backends"] if b["status"] != "ok"]
    if skipped:
        L += ["| backend | status | reason |", "|---|---|---|"]
        L += [f"| {b['backend']} | {b['status']} | {str(b.get('reason')).splitlines()[0][:200]} |"
              for b in skipped]
        L.append("")

    ok = [b for b in rep["backends"] if b["status"] == "ok"]
    # ---- stage latency table
    L += ["## Per-stage latency (ms, p50 / p90 / p99)", "",
          "| backend | task | size | tokens (img/prompt) | " + " | ".join(STAGE_ORDER)
          + " | end-to-end | decode tok/s |",
          "|---|---|---|---|" + "---|" * (len(STAGE_ORDER) + 2)]
    for b in ok:
        for c in b["cases"]:
            cells = [f"{_ms(c['stages'][s]['p50'])} / {_ms(c['stages'][s]['p90'])} / "
                     f"{_ms(c['stages'][s]['p99'])}" for s in STAGE_ORDER]
            e = c["end_to_end"]
            tps = c["generate_path"]["tokens_per_s"]
            L.append(f"| {b['backend']} | {c['task']} | {c['size']} | {c['image_tokens']}/"
                     f"{c['prompt_tokens']} | " + " | ".join(cells)
                     + f" | {_ms(e['p50'])} / {_ms(e['p90'])} / {_ms(e['p99'])} | "
                     + ("-" if tps is None else f"{tps:.3g}") + " |")
    L.append("")

    # ---- roofline beside measured
    devs = list(rep["devices"])
    L += ["## Roofline: measured p50 vs analytic lower bound (ms)", "",
          "Lower bound = max(FLOPs / peak, bytes / bandwidth) per stage (`benchmarks/roofline.py`); "
          "devices at FP16 with the vendors' peaks (sources in the JSON report, `devices`), "
          "this CPU at the benchmark dtype "
          "with the measured peaks above. `x bound` = measured / this-CPU bound; on a shared, loaded "
          "machine the measured peak is itself noisy, so x bound < 1 can occur.", "",
          "| backend | task | size | stage | GFLOP | MB | measured | this CPU bound | x bound | "
          + " | ".join(devs) + " |",
          "|---|---|---|---|---|---|---|---|---|" + "---|" * len(devs)]
    for b in ok:
        for c in b["cases"]:
            rf = c["roofline"]
            for s in ROOF_STAGES + ("decode_step",):
                meas = (c["generate_path"]["step_s"]["p50"] if s == "decode_step"
                        else c["stages"][s]["p50"])
                cb = rf["this_cpu_s"][s]
                L.append(f"| {b['backend']} | {c['task']} | {c['size']} | {s} | "
                         f"{rf['costs_fp16'][s]['flops'] / 1e9:.3g} | "
                         f"{rf['costs_fp16'][s]['bytes'] / 2**20:.3g} | {_ms(meas)} | {_ms(cb)} | "
                         f"{_x(meas / cb if meas and cb else None)} | "
                         + " | ".join(_ms(rf["devices_s"][d][s]) for d in devs) + " |")
    L += ["", "GFLOP / MB columns are the FP16 counts; decode_step is one token at the prompt's "
          "cache length.", ""]

    # ---- baselines
    L += ["## Baselines (ratios > 1: the baseline is slower)", "",
          "| task | size | image tokens | subset head p50 | naive full-vocab head p50 | naive / subset | "
          "argmax agreement | full logits MB |", "|---|---|---|---|---|---|---|---|"]
    for b in ok:
        for c in b["cases"]:
            nh = c.get("naive_head")
            if nh:
                L.append(f"| {c['task']} | {c['size']} | {c['image_tokens']} | {_ms(nh['subset']['p50'])} | "
                         f"{_ms(nh['naive']['p50'])} | {_x(nh['ratio_p50'])} | "
                         f"{nh['argmax_agreement']:.4f} | {nh['logits_bytes'] / 2**20:.4g} |")
    L += ["", "Naive head: full-vocabulary logits at every vision token, gather + mean per group, "
          "materialised upsample, argmax (`kernels.dense_head.naive_full_vocab_head`), on the same "
          "hidden states and output size as the subset head.", ""]
    L += ["| backend | task | size | RLE tokens | steps run | step p50 ms | tok/s | est. decode s | "
          "generate / dense head | generate / dense end-to-end |",
          "|---|---|---|---|---|---|---|---|---|---|"]
    for b in ok:
        for c in b["cases"]:
            g = c["generate_path"]
            L.append(f"| {b['backend']} | {c['task']} | {c['size']} | {g['rle_tokens']} | "
                     f"{g['decode_steps_run']}{'*' if g['extrapolated'] else ''} | "
                     f"{_ms(g['step_s']['p50'])} | "
                     f"{'-' if g['tokens_per_s'] is None else format(g['tokens_per_s'], '.3g')} | "
                     f"{g['estimated_decode_s']:.3g} | {_x(g['ratio_vs_dense_head'])} | "
                     f"{_x(g['ratio_end_to_end'])} |")
    L += ["", "Generate-everything path: the released model writes the map as `<mask>(v,n),...` "
          "RLE text (depth on the H/16 x W/16 grid, segmentation at full resolution). Its tokens "
          "(this checkpoint's tokenizer, on the map this run produced) are fed through "
          "`backend.decode` one per step after the same prefill. `*` = capped: the total is "
          "extrapolated with the mean measured step time, a lower bound since attention grows "
          "with the cache.", ""]
    others = [b for b in ok if b["backend"] != "torch"]
    if others:
        L += ["| backend | task | size | " + " | ".join(STAGE_ORDER) + " | end-to-end |",
              "|---|---|---|" + "---|" * (len(STAGE_ORDER) + 1)]
        for b in others:
            for c in b["cases"]:
                v = c.get("vs_torch_p50")
                if v:
                    L.append(f"| {b['backend']} vs torch | {c['task']} | {c['size']} | "
                             + " | ".join(_x(v.get(s)) for s in STAGE_ORDER)
                             + f" | {_x(v['end_to_end'])} |")
        L += ["", "Backend / eager torch, p50 over p50 (< 1: faster than torch).", ""]

    # ---- memory
    L += ["## Memory (each backend in its own process; MB)", "",
          "| backend | device | setup s | RSS after imports | after setup | peak, pipeline | "
          "peak, with naive head | CUDA max allocated |", "|---|---|---|---|---|---|---|---|"]
    for b in ok:
        mm = b["memory"]

        def f(k):
            return "-" if mm.get(k) is None else f"{mm[k]:.0f}"

        L.append(f"| {b['backend']} | {b.get('device')} | {b.get('setup_s', 0):.1f} | "
                 f"{f('rss_mb_after_imports')} | {f('rss_mb_after_setup')} | {f('peak_rss_mb_pipeline')} | "
                 f"{f('peak_rss_mb_with_naive_head')} | {f('cuda_max_allocated_mb')} |")
    inproc = [b["backend"] for b in ok if b["backend"] != "torch" and "prepare_s" not in b]
    L += ["", "RSS = high-water mark (`VmHWM`) of the backend's worker process; the pipeline "
          "snapshot is taken before the naive-head baseline runs. Setup = loading the model / opening "
          "the engine; an engine missing from the cache is exported first in a separate process "
          "(`peak_rss_mb_prepare_process` in the JSON), not counted here."
          + (f" **This report predates that split: for {', '.join(inproc)} the setup time and the "
             "RSS columns include the ONNX export done inside the worker, so they overstate the "
             "runtime's memory.**" if inproc else ""), ""]
    return "\n".join(L) + "\n"


def plots(rep: dict, out_dir, prefix: str | None = None) -> list[Path]:
    """``<prefix>_latency_vs_size.png`` and ``<prefix>_stages.png`` (prefix: bench_<model>)."""
    matplotlib = require("matplotlib", "bench plots (--plots)")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if rep.get("kind") == "serve":
        return [_serve_plot(plt, rep, out, prefix or "bench_serve")]
    tag = rep["model"]["name"]
    prefix = prefix or f"bench_{tag}"
    ok = [b for b in rep["backends"] if b["status"] == "ok"]
    files = []
    # latency vs image size (end-to-end p50, p10-p90 band not stored: error bars p50..p90)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for b in ok:
        for task in sorted({c["task"] for c in b["cases"]}):
            cs = sorted((c for c in b["cases"] if c["task"] == task), key=lambda c: c["image_tokens"])
            x = [c["image_tokens"] for c in cs]
            y = [c["end_to_end"]["p50"] * 1e3 for c in cs]
            hi = [(c["end_to_end"]["p90"] - c["end_to_end"]["p50"]) * 1e3 for c in cs]
            ax.errorbar(x, y, yerr=[[0] * len(hi), hi], marker="o", capsize=3,
                        label=f"{b['backend']} {task}")
    ax.set_xlabel("image tokens (merged 32x32 px cells)")
    ax.set_ylabel("end-to-end latency, ms (p50, bar to p90)")
    ax.set_title(f"latency vs image size: {tag}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / f"{prefix}_latency_vs_size.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    # stacked stage breakdown
    labels, rows = [], []
    for b in ok:
        for c in b["cases"]:
            labels.append(f"{b['backend']}\n{c['task']}\n{c['size']}")
            rows.append([c["stages"][s]["p50"] * 1e3 for s in STAGE_ORDER])
    fig, ax = plt.subplots(figsize=(max(6.4, 0.9 * len(labels) + 2), 4.6))
    bottom = [0.0] * len(labels)
    for i, s in enumerate(STAGE_ORDER):
        vals = [r[i] for r in rows]
        ax.bar(range(len(labels)), vals, bottom=bottom, label=s)
        bottom = [a + v for a, v in zip(bottom, vals)]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels(labels, fontsize=7)
    ax.set_ylabel("ms (p50 per stage)")
    ax.set_title(f"stage breakdown: {tag}")
    ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / f"{prefix}_stages.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    files.append(p)
    return files


def _serve_plot(plt, rep: dict, out: Path, prefix: str) -> Path:
    """Throughput and p50 latency against concurrent clients, one line per run."""
    fig, (a, b) = plt.subplots(1, 2, figsize=(9.6, 4.0))
    for run in rep["serve"]:
        x = [lv["concurrency"] for lv in run["levels"]]
        name = run.get("label") or run["model"]
        a.plot(x, [lv["throughput_rps"] or 0 for lv in run["levels"]], marker="o", label=name)
        b.plot(x, [(lv["latency"]["p50"] or 0) * 1e3 for lv in run["levels"]], marker="o", label=name)
    a.set_xlabel("concurrent clients")
    a.set_ylabel("requests / s")
    b.set_xlabel("concurrent clients")
    b.set_ylabel("latency p50, ms")
    for ax in (a, b):
        ax.set_xscale("log", base=2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    p = out / f"{prefix}_throughput_latency.png"
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
