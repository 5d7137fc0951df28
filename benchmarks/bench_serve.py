"""Throughput and latency of ``densert serve`` against concurrent clients, dynamic batching on and
off side by side, in one run (``benchmarks/results/serve.md`` / ``.json``).

    python -m densert.benchmarks.bench_serve --out benchmarks/results/serve

For each setting it writes the model repository (the bundled densert-tiny's ``depth`` model, the
settings ``densert serve`` would write), starts the bundled ``tritonserver`` on free loopback
ports, measures it with ``densert bench --url``'s client (``serve_client``) at each concurrency
level, and stops it. The two servers run one after the other on the same machine, so they share
its load: the report records the load average at the start and the end.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

from densert.options import hw_size

from .harness import synthetic_image
from .serve_client import SERVE, measure, serve_report

DEFAULTS = {"size": "64x64", "requests": SERVE["runs"], "warmup": SERVE["warmup"],
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


def one_server(dynamic_batching: bool, args, image) -> dict:
    from densert.runtime.serve.bundled import TritonServer
    from densert.runtime.serve.repo import RepoSettings, write_repository
    threads = args.threads or max(1, (os.cpu_count() or 1) // args.instances)
    s = RepoSettings(models=("depth",), instances=args.instances, threads=threads,
                     dynamic_batching=dynamic_batching)
    label = f"dynamic batching {'on' if dynamic_batching else 'off'}"
    with tempfile.TemporaryDirectory(prefix="densert-bench-serve-") as td:
        write_repository(Path(td) / "repo", s)
        http, grpc, metrics = free_ports(3)
        print(f"bench_serve: {label}: starting tritonserver", file=sys.stderr, flush=True)
        with TritonServer(Path(td) / "repo", "127.0.0.1", http, grpc, metrics) as server:
            url = server.http_url if args.protocol == "http" else server.grpc_url
            run = measure(url, args.protocol, "depth", image, None, tuple(args.concurrency),
                          args.requests, args.warmup, label=label)
    run["server"]["torch_threads_per_instance"] = threads
    for lv in run["levels"]:
        print(f"bench_serve: {label}: {lv['concurrency']} clients: "
              f"{lv['throughput_rps']:.2f} req/s, p50 {lv['latency']['p50'] * 1e3:.0f} ms, "
              f"batches {lv['server']['batch_sizes']}", file=sys.stderr, flush=True)
    return run


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
                   help="torch threads per instance (default: cores / instances)")
    p.add_argument("--protocol", choices=("http", "grpc"), default=DEFAULTS["protocol"])
    p.add_argument("--label", default=None)
    args = p.parse_args(argv)
    h, w = hw_size(args.size)
    image = synthetic_image(h, w)
    started = time.time()

    def stop(signum, frame):   # unwind, so that each server's `with` stops it
        raise KeyboardInterrupt
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    runs = [one_server(on, args, image) for on in (True, False)]
    command = "python -m densert.benchmarks.bench_serve " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    rep = serve_report(runs, command.strip(), args.label, started)
    try:
        rep["machine"]["loadavg_at_end"] = list(os.getloadavg())
    except OSError:
        pass
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
