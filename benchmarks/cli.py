"""``densert bench``: per-stage latency, memory and roofline, backend against backend.

Each backend runs in its own worker process (``densert.benchmarks.harness``) so its peak RSS is
its own; the parent measures this CPU's GEMM / copy peaks first (workers not yet running), then
collects the workers' records, adds the analytic roofline per stage (``roofline.py``), the
ratios against the baselines, machine and library versions, and writes JSON (schema:
``benchmarks/schema.json``), Markdown and PNG plots.
"""
from __future__ import annotations

import json
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from densert.machine import source_commit
from densert.model.config import DTYPES
from densert.runtime.options import BACKENDS, device_name

from .report import SCHEMA_VERSION, machine_info
from .serve_client import SERVE, serve_report

# Tasks whose dense map `densert bench` measures against the naive and generate-as-text paths.
BENCH_TASKS = ("depth", "segment")

# The measurement plan: the default, and --quick (CI); explicit flags override either.
FULL = {"sizes": ["256x256", "480x640"], "runs": 10, "warmup": 2, "decode_cap": 32, "decode_runs": 3}
QUICK = {"sizes": ["64x64", "96x128"], "runs": 3, "warmup": 1, "decode_cap": 4, "decode_runs": 1}


def configure(parser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny)")
    parser.add_argument("--backend", nargs="+", default=list(BACKENDS), choices=BACKENDS,
                        help="backends to compare (unavailable ones are reported as skipped)")
    parser.add_argument("--task", nargs="+", default=list(BENCH_TASKS), choices=BENCH_TASKS,
                        help="tasks measured")
    parser.add_argument("--sizes", nargs="+", default=None, metavar="HxW",
                        help=f"image sizes (default: {' '.join(FULL['sizes'])}; --quick: "
                             f"{' '.join(QUICK['sizes'])})")
    parser.add_argument("--runs", type=int, default=None,
                        help=f"timed runs per case (default: {FULL['runs']})")
    parser.add_argument("--warmup", type=int, default=None,
                        help=f"untimed runs first (default: {FULL['warmup']})")
    parser.add_argument("--decode-cap", type=int, default=None,
                        help="max decode steps of the generate-everything path, the rest is "
                             f"extrapolated (default: {FULL['decode_cap']})")
    parser.add_argument("--dtype", default="float32", choices=DTYPES, help="torch weight dtype")
    parser.add_argument("--device", default="auto", type=device_name,
                        help="torch device: auto (cuda when available), cpu, cuda, cuda:N")
    parser.add_argument("--engine-dir", default=None,
                        help="engine directory for onnxruntime/tensorrt (default: exported into "
                             "the per-checkpoint cache first)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads (default: torch's)")
    parser.add_argument("--no-baselines", action="store_true", help="skip the naive full-vocab head")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write the report as JSON (default: none; schema benchmarks/schema.json)")
    parser.add_argument("--md", default=None, metavar="FILE",
                        help="write the report as Markdown (default: printed when neither --json "
                             "nor --md is given)")
    parser.add_argument("--plots", default=None, metavar="DIR",
                        help="write PNG plots here (default: none; needs densert[bench])")
    parser.add_argument("--label", default=None,
                        help="free text stored with the results, e.g. 'shared machine, 6 users' "
                             "(default: none)")
    parser.add_argument("--from-json", default=None, metavar="FILE",
                        help="re-render --md / --plots from an earlier --json report, no measuring "
                             "(default: measure)")
    parser.add_argument("--quick", action="store_true",
                        help=f"CI mode: {QUICK['sizes']}, {QUICK['runs']} runs, "
                             f"{QUICK['warmup']} warm-up, {QUICK['decode_cap']} decode steps")
    serve = parser.add_argument_group(
        "a running server (--url): latency and throughput against concurrency, with tritonclient")
    serve.add_argument("--url", default=None, metavar="HOST:PORT",
                       help="measure the Triton server there (densert serve, or a standalone "
                            "one on the --write-repo repository) instead of backends in-process; "
                            "uses the first --task and --sizes, --runs requests per level "
                            f"(default {SERVE['runs']}), --warmup requests per client first "
                            "(default: measure backends)")
    serve.add_argument("--protocol", default="http", choices=("http", "grpc"),
                       help="with --url: the server's protocol at that port")
    serve.add_argument("--concurrency", type=int, nargs="+", default=list(SERVE["concurrency"]),
                       metavar="N", help="with --url: concurrent clients per level")
    serve.add_argument("--classes", default=None,
                       help="with --url and --task segment: comma-separated classes sent with "
                            "each request (default: the benchmark's scene classes)")


def _resolve_model(arg):
    from densert.errors import CLIError
    if arg is None:
        from densert.resources import bundled_model_dir
        return bundled_model_dir()
    p = Path(arg)
    if not (p / "config.json").is_file() or not (p / "tokenizer.json").is_file():
        raise CLIError(f"{p}: not a checkpoint directory (needs config.json and tokenizer.json)")
    return p.resolve()


def command_line(args, model) -> str:
    """The canonical command that reproduces this run (rebuilt from the parsed arguments)."""
    parts = ["densert", "bench", "--model", str(model), "--backend", *args.backend,
             "--task", *args.task]
    if args.quick:
        parts.append("--quick")
    for flag in ("sizes", "runs", "warmup", "decode_cap", "device", "engine_dir", "threads",
                 "json", "md", "plots", "label"):
        v = getattr(args, flag)
        if v is not None:
            parts += [f"--{flag.replace('_', '-')}", *(map(str, v) if isinstance(v, list) else [str(v)])]
    if args.dtype != "float32":
        parts += ["--dtype", args.dtype]
    if args.no_baselines:
        parts.append("--no-baselines")
    return " ".join(shlex.quote(p) for p in parts)


def _run_worker(spec: dict) -> dict:
    with tempfile.TemporaryDirectory(prefix="densert-bench-") as td:
        sp, op = Path(td) / "spec.json", Path(td) / "out.json"
        sp.write_text(json.dumps(spec))
        proc = subprocess.run([sys.executable, "-m", "densert.benchmarks.harness", str(sp), str(op)],
                              capture_output=True, text=True)
        if op.is_file():
            rec = json.loads(op.read_text())
        else:
            rec = {"backend": spec["backend"], "status": "error", "cases": [], "memory": {},
                   "reason": f"worker exited {proc.returncode}: {proc.stderr.strip()[-2000:]}"}
        if proc.returncode != 0 and rec.get("status") == "ok":
            rec.update(status="error", reason=f"worker exited {proc.returncode}")
        return rec


def add_roofline(report: dict, cfg) -> None:
    from . import roofline
    cpu = report["this_cpu_peaks"]
    b_cpu = 4 if report["settings"]["dtype"] == "float32" else 2
    for be in report["backends"]:
        for c in be["cases"]:
            req = roofline.Request(grid=tuple(c["grid"]), window_seqlens=c["window_seqlens"],
                            prompt_tokens=c["prompt_tokens"], num_classes=c["num_classes"],
                            out_hw=tuple(c["head_out_hw"]))
            costs = roofline.stage_costs(cfg, req, roofline.DEVICE_BYTES_PER_VALUE)
            cpu_costs = roofline.stage_costs(cfg, req, b_cpu)
            c["roofline"] = {
                "costs_fp16": costs,
                "devices_s": {dev: {s: v["seconds"] for s, v in st.items()}
                              for dev, st in roofline.device_bounds(cfg, req).items()},
                "this_cpu_s": {s: roofline.bound_seconds(v, cpu["flops"], cpu["bandwidth"])["seconds"]
                               for s, v in cpu_costs.items()},
            }


def add_ratios(report: dict) -> None:
    """Each backend against eager torch, stage by stage and end to end (p50 / p50)."""
    ref = next((b for b in report["backends"] if b["backend"] == "torch" and b["status"] == "ok"), None)
    if ref is None:
        return
    ref_cases = {(c["task"], c["size"]): c for c in ref["cases"]}
    for be in report["backends"]:
        if be is ref or be["status"] != "ok":
            continue
        for c in be["cases"]:
            r = ref_cases.get((c["task"], c["size"]))
            if r is None:
                continue
            out = {s: c["stages"][s]["p50"] / r["stages"][s]["p50"]
                   for s in c["stages"] if r["stages"][s]["p50"]}
            out["end_to_end"] = c["end_to_end"]["p50"] / r["end_to_end"]["p50"]
            c["vs_torch_p50"] = out


def run(args) -> int:
    from densert.errors import CLIError
    from densert.model.config import YoutuVLConfig
    from densert.options import hw_size

    from . import roofline

    if args.from_json:
        from . import report as rep
        try:
            report = json.loads(Path(args.from_json).read_text())
        except (OSError, ValueError) as e:
            raise CLIError(f"{args.from_json}: cannot read a bench report ({e})") from None
        if args.md:
            Path(args.md).write_text(rep.markdown(report))
        if args.plots:
            rep.plots(report, args.plots, Path(args.from_json).stem)
        if not args.md:
            print(rep.markdown(report))
        return 0
    if args.url:
        return run_url(args)
    model = _resolve_model(args.model)
    q = QUICK if args.quick else FULL
    sizes = args.sizes or q["sizes"]
    for s in sizes:
        try:
            hw_size(s)
        except ValueError as e:
            raise CLIError(str(e)) from None
    runs = q["runs"] if args.runs is None else args.runs
    warmup = q["warmup"] if args.warmup is None else args.warmup
    cap = q["decode_cap"] if args.decode_cap is None else args.decode_cap
    if runs < 1 or warmup < 0 or cap < 1:
        raise CLIError("--runs and --decode-cap must be >= 1, --warmup >= 0")
    cfg = YoutuVLConfig.from_json_file(model / "config.json")
    started = time.time()
    machine = machine_info()
    print(f"densert bench: measuring this CPU's GEMM / copy peaks ({machine['cpu']})", file=sys.stderr)
    cpu = roofline.measure_cpu_peaks(args.dtype if args.dtype == "float32" else "bfloat16",
                              **({"gemm_n": 512, "copy_mb": 64, "repeats": 5} if args.quick else {}))
    report = {
        "schema_version": SCHEMA_VERSION,
        "command": command_line(args, model),
        "label": args.label,
        "started_unix": started,
        "git_commit": source_commit(),
        "machine": machine,
        "model": {"dir": str(model), "name": model.name, "vocab_size": cfg.vocab_size,
                  "hidden_size": cfg.hidden_size, "text_layers": cfg.num_hidden_layers,
                  "vision_layers": cfg.vision_config.num_hidden_layers,
                  "vision_hidden_size": cfg.vision_config.hidden_size},
        "settings": {"backends": args.backend, "tasks": args.task, "sizes": sizes, "runs": runs,
                     "warmup": warmup, "decode_cap": cap, "dtype": args.dtype, "quick": args.quick,
                     "device": args.device, "threads": args.threads},
        "this_cpu_peaks": cpu,
        "devices": {k: {"name": d.name, "flops": d.flops, "bandwidth": d.bandwidth, "source": d.source}
                    for k, d in roofline.DEVICES.items()},
        "backends": [],
    }
    for name in args.backend:
        print(f"densert bench: backend {name} ...", file=sys.stderr)
        spec = {"backend": name, "model": str(model), "dtype": args.dtype, "device": args.device,
                "engine_dir": args.engine_dir, "tasks": args.task, "sizes": sizes, "runs": runs,
                "warmup": warmup, "decode_cap": cap, "decode_runs": q["decode_runs"],
                "threads": args.threads,
                "baselines": not args.no_baselines}
        prep = None
        if name != "torch" and args.engine_dir is None:
            # Build / export the engine in a throw-away process first, so the measuring worker's
            # RSS high-water mark is the runtime's, not the exporter's.
            prep = _run_worker({**spec, "prepare_only": True})
        if prep is not None and prep["status"] != "ok":
            rec = prep
        else:
            rec = _run_worker(spec)
            if prep is not None:
                rec["prepare_s"] = prep.get("setup_s")
                rec["memory"]["peak_rss_mb_prepare_process"] = prep["memory"].get("rss_mb_after_setup")
        if rec["status"] != "ok":
            print(f"densert bench: backend {name} {rec['status']}: {rec.get('reason')}", file=sys.stderr)
        report["backends"].append(rec)
    report["wall_s"] = time.time() - started
    add_roofline(report, cfg)
    add_ratios(report)
    from . import report as rep
    rep.validate(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    md = rep.markdown(report)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    if args.plots:
        rep.plots(report, args.plots, Path(args.json).stem if args.json else None)
    if not (args.json or args.md):
        print(md)
    ok = any(b["status"] == "ok" for b in report["backends"])
    errors = [b for b in report["backends"] if b["status"] == "error"]
    for b in errors:
        print(f"densert bench: backend {b['backend']} failed: {b.get('reason')}\n"
              f"{b.get('traceback', '')}", file=sys.stderr)
    return 0 if ok and not errors else 1


def url_command_line(args) -> str:
    parts = ["densert", "bench", "--url", args.url, "--protocol", args.protocol,
             "--task", args.task[0], "--sizes", (args.sizes or FULL["sizes"])[0],
             "--concurrency", *map(str, args.concurrency)]
    for flag in ("runs", "warmup", "classes", "json", "md", "label"):
        v = getattr(args, flag)
        if v is not None:
            parts += [f"--{flag}", str(v)]
    if args.quick:
        parts.append("--quick")
    return " ".join(shlex.quote(p) for p in parts)


def url_image_and_params(args) -> tuple:
    from densert.options import hw_size

    from .harness import SEG_CLASSES, synthetic_image
    h, w = hw_size((args.sizes or FULL["sizes"])[0])
    params = None
    if args.task[0] == "segment":
        params = {"classes": args.classes or ",".join(SEG_CLASSES)}
    return synthetic_image(h, w), params


def run_url(args) -> int:
    from densert.errors import CLIError

    from . import report as rep
    from .serve_client import measure, split_url
    try:
        split_url(args.url)
    except ValueError as e:
        raise CLIError(str(e)) from None
    runs = args.runs if args.runs is not None else (SERVE["quick_runs"] if args.quick else SERVE["runs"])
    warmup = SERVE["warmup"] if args.warmup is None else args.warmup
    if runs < 1 or warmup < 0 or any(c < 1 for c in args.concurrency):
        raise CLIError("--runs and --concurrency must be >= 1, --warmup >= 0")
    started = time.time()
    machine = machine_info()
    image, params = url_image_and_params(args)
    try:
        run = measure(args.url, args.protocol, args.task[0], image, params,
                      concurrency=tuple(args.concurrency), requests=runs, warmup=warmup,
                      label=args.label)
    except Exception as e:   # no server, no model, refused requests: one line
        raise CLIError(f"--url {args.url}: {str(e).splitlines()[0]}") from None
    report = serve_report([run], url_command_line(args), args.label, started, machine)
    rep.validate(report)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=1) + "\n")
    md = rep.markdown(report)
    if args.md:
        Path(args.md).parent.mkdir(parents=True, exist_ok=True)
        Path(args.md).write_text(md)
    if not (args.json or args.md):
        print(md)
    return 0 if all(lv["errors"] == 0 for lv in run["levels"]) else 1
