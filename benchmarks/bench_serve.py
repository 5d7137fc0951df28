"""Throughput and latency of ``densert serve`` against concurrent clients, dynamic batching on and
off side by side, in one run (``benchmarks/results/serve.md`` / ``.json``).

    python -m densert.benchmarks.bench_serve --out benchmarks/results/serve

For each setting it writes the model repository (the bundled densert-tiny's ``depth`` model, the
settings ``densert serve`` would write) and starts the bundled ``tritonserver`` on free loopback
ports; both run at once, and each concurrency level is measured on one, then the other (the order
alternating), with ``densert bench --url``'s client (``serve_client``), so that a shared machine's
drifting load weighs on both alike. The report records the load average at the start and the
end.
"""
from __future__ import annotations

import argparse
import json
import shlex
import signal
import socket
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

from densert.options import hw_size

from .harness import synthetic_image
from .report import machine_info
from .serve_client import SERVE, Load, describe, run_record, serve_report

DEFAULTS = {"size": "256x256", "requests": SERVE["runs"], "warmup": SERVE["warmup"],
            "concurrency": list(SERVE["concurrency"]), "instances": 1, "threads": None,
            "protocol": "http"}


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def measure_side_by_side(args, image) -> list[dict]:
    """Both servers up at once; each concurrency level runs on one then the other (the order
    alternating from level to level), so a machine whose load drifts weighs on both alike."""
    from densert.runtime.serve.bundled import TritonServer
    from densert.runtime.serve.repo import (
        RepoSettings,
        default_threads,
        write_repository,
    )
    threads = args.threads or default_threads(args.instances)
    with tempfile.TemporaryDirectory(prefix="densert-bench-serve-") as td, ExitStack() as stack:
        loads, infos = {}, {}
        for on in (True, False):
            label = f"dynamic batching {'on' if on else 'off'}"
            repo = Path(td) / ("batching" if on else "no-batching")
            write_repository(repo, RepoSettings(models=("depth",), instances=args.instances,
                                                threads=threads, dynamic_batching=on))
            http, grpc, metrics = free_ports(3)
            print(f"bench_serve: {label}: starting tritonserver", file=sys.stderr, flush=True)
            server = stack.enter_context(TritonServer(repo, "127.0.0.1", http, grpc, metrics))
            url = server.http_url if args.protocol == "http" else server.grpc_url
            loads[label] = Load(url, args.protocol, "depth", image)
            infos[label] = describe(loads[label])
            infos[label]["torch_threads_per_instance"] = threads
        for load in loads.values():
            load.warmup(max(args.concurrency), args.warmup)
        levels = {label: [] for label in loads}
        for i, n in enumerate(args.concurrency):
            for label in (list(loads) if i % 2 == 0 else list(loads)[::-1]):
                lv = loads[label].level(n, args.requests)
                levels[label].append(lv)
                print(f"bench_serve: {label}: {n} clients: {lv['throughput_rps']:.2f} req/s, "
                      f"p50 {lv['latency']['p50'] * 1e3:.0f} ms, batches "
                      f"{lv['server']['batch_sizes']}", file=sys.stderr, flush=True)
        return [run_record(loads[label], infos[label], levels[label], args.warmup, label)
                for label in loads]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m densert.benchmarks.bench_serve",
                                description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, metavar="STEM",
                   help="write STEM.json and STEM.md (default: Markdown to stdout)")
    p.add_argument("--size", default=DEFAULTS["size"], help="image HxW")
    p.add_argument("--requests", type=int, default=DEFAULTS["requests"],
                   help="timed requests per concurrency level")
    p.add_argument("--warmup", type=int, default=DEFAULTS["warmup"],
                   help="untimed requests per client first")
    p.add_argument("--concurrency", type=int, nargs="+", default=DEFAULTS["concurrency"])
    p.add_argument("--instances", type=int, default=DEFAULTS["instances"])
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per instance (default: densert serve's)")
    p.add_argument("--protocol", choices=("http", "grpc"), default=DEFAULTS["protocol"])
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    h, w = hw_size(args.size)
    image = synthetic_image(h, w)
    started = time.time()
    machine = machine_info()

    def stop(signum, frame):   # unwind, so that each server's `with` stops it
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    runs = measure_side_by_side(args, image)
    command = "python -m densert.benchmarks.bench_serve " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rep = serve_report(runs, command.strip(), args.label, started, machine)
    from . import report
    report.validate(rep)
    md = report.markdown(rep)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(rep, indent=1) + "\n")
        out.with_suffix(".md").write_text(md)
    else:
        print(md)
    return 0 if all(lv["errors"] == 0 for r in runs for lv in r["levels"]) else 1


if __name__ == "__main__":
    sys.exit(main())
