"""``densert serve``: the models ``depth``, ``segment`` and ``dense`` on Triton Inference Server.

``densert serve [--models depth,segment,dense] [--instances N] [model and decoding flags]``
writes the model repository into a temporary folder and runs the ``tritonserver`` bundled in
``nvidia-pytriton`` on it, HTTP / gRPC / metrics on loopback by default, until Ctrl-C or SIGTERM.
``--write-repo DIR`` writes the repository and exits (for a standalone server); ``--repo DIR``
serves a repository written before (edited or not). Exit status: 0 stopped by a signal or written,
1 the server failed, 2 usage errors.
"""
from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
from dataclasses import asdict
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError
from densert.options import comma_list

from ..options import DenseOptions, PredictorOptions
from .contract import MODELS
from .repo import (
    DEFAULT_MAX_BATCH_SIZE,
    DEFAULT_MAX_QUEUE_DELAY_US,
    RepoSettings,
    default_threads,
)

DENSE_FLAGS = ("alignment", "temperature", "depth_mode", "depth_upsample", "crf", "fast",
               "open_set_max_boxes", "refer_short_side")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny; with an "
                             "engine backend and --engine-dir, the engine directory alone)")
    parser.add_argument("--models", type=comma_list, default=MODELS, metavar="NAMES",
                        help="comma-separated models to serve")
    parser.add_argument("--instances", type=int, default=1,
                        help="model instances per model: each a process with its own "
                             "DensePredictor (memory grows with it)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per instance (default: (CPU cores - 1) / --instances, at "
                             "least 1)")
    parser.add_argument("--dynamic-batching", action=argparse.BooleanOptionalAction, default=True,
                        help="Triton's dynamic batcher: requests that queue while an instance is "
                             "busy run as one batch")
    parser.add_argument("--max-queue-delay-us", type=int, default=DEFAULT_MAX_QUEUE_DELAY_US,
                        help="longest wait of the dynamic batcher for more requests, microseconds")
    parser.add_argument("--max-batch-size", type=int, default=DEFAULT_MAX_BATCH_SIZE,
                        help="most requests in one batch")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address the server listens on (0.0.0.0: every interface)")
    parser.add_argument("--http-port", type=int, default=8000, help="HTTP/REST port")
    parser.add_argument("--grpc-port", type=int, default=8001, help="gRPC port")
    parser.add_argument("--metrics-port", type=int, default=8002,
                        help="Prometheus metrics port (/metrics)")
    parser.add_argument("--log-file", default=None,
                        help="tritonserver's log (default: a temporary file, printed at start)")
    parser.add_argument("--startup-timeout", type=float, default=180.0,
                        help="seconds to wait for every model to load")
    parser.add_argument("--write-repo", default=None, metavar="DIR",
                        help="write the model repository into DIR and exit (default: serve)")
    parser.add_argument("--force", action="store_true",
                        help="with --write-repo: replace model folders already in DIR")
    parser.add_argument("--repo", default=None, metavar="DIR",
                        help="serve this repository (written by --write-repo) as it is; the "
                             "model, batching and instance flags are then not used "
                             "(default: write one from the flags)")
    add_dataclass_arguments(parser, PredictorOptions)
    add_dataclass_arguments(parser, DenseOptions, DENSE_FLAGS)


def repo_settings(args) -> RepoSettings:
    try:
        settings = PredictorOptions(**dataclass_kwargs(args, fields_of(PredictorOptions)))
        options = DenseOptions(**dataclass_kwargs(args, DENSE_FLAGS))
    except ValueError as e:
        raise CLIError(str(e)) from None
    s = asdict(settings)
    if s["engine_dir"] is not None:   # the server runs in another folder
        s["engine_dir"] = str(Path(s["engine_dir"]).resolve())
    model = None
    if args.model is not None:
        p = Path(args.model)
        if not (p / "config.json").is_file():
            raise CLIError(f"--model {p}: not a checkpoint directory (no config.json)")
        model = str(p.resolve())
    defaults = DenseOptions()
    changed = {k: v for k, v in asdict(options).items() if v != getattr(defaults, k)}
    threads = default_threads(args.instances) if args.threads is None else args.threads
    return RepoSettings(models=tuple(args.models), model=model, settings=s, options=changed,
                        instances=args.instances, threads=threads,
                        max_batch_size=args.max_batch_size,
                        dynamic_batching=args.dynamic_batching,
                        max_queue_delay_us=args.max_queue_delay_us)


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(args) -> int:
    from .repo import write_repository
    if args.write_repo and args.repo:
        raise CLIError("--write-repo and --repo: pick one (write a repository, or serve one)")
    if args.repo is None:
        s = repo_settings(args)
        if s.options.get("crf", True) and any(m in ("segment", "dense") for m in s.models):
            from densert.extras import require

            from ..options import CRF_MODULE, CRF_PURPOSE
            require(CRF_MODULE, CRF_PURPOSE)
    if args.write_repo:
        for d in write_repository(args.write_repo, s, force=args.force):
            _say(f"densert serve: wrote {d}")
        return 0
    from .bundled import TritonServer
    from .bundled import binary as triton_binary
    triton_binary()   # installed, before anything is written
    tmp = None
    if args.repo is not None:
        repo = Path(args.repo)
        what = f"repository {repo}"
    else:
        tmp = tempfile.mkdtemp(prefix="densert-repo-")
        repo = Path(tmp)
        write_repository(repo, s)
        batching = (f"dynamic batching (max queue delay {s.max_queue_delay_us} us, max batch "
                    f"{s.max_batch_size})" if s.dynamic_batching else "no dynamic batching")
        what = (f"models {', '.join(s.models)} on {s.settings['backend']}, {s.instances} "
                f"instance(s) each, {s.threads} torch thread(s) per instance, {batching}")
    server = TritonServer(repo, args.host, args.http_port, args.grpc_port, args.metrics_port,
                          log_file=args.log_file, startup_timeout_s=args.startup_timeout)

    def stop(signum, frame):
        raise KeyboardInterrupt
    # SIGINT too: a shell starts a background job with SIGINT ignored, and Python then leaves it so
    old = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        _say(f"densert serve: starting tritonserver: {what}; log {server.log_file}")
        with server:
            _say(f"densert serve: ready. HTTP {server.http_url}, gRPC {server.grpc_url}, metrics "
                 f"{server.metrics_url}; Ctrl-C stops")
            code = server.proc.wait()
            _say(f"densert serve: tritonserver exited ({code}); its log ends:\n"
                 f"{server.log_tail()}")
            return 1
    except KeyboardInterrupt:
        _say("densert serve: stopping")
        return 0
    finally:
        for sig, handler in old.items():
            signal.signal(sig, handler)
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
