"""Load against a running Triton server (``densert serve`` or a standalone one): latency
percentiles and throughput per concurrency level, with ``tritonclient``.

For each level, ``concurrency`` client threads, each with its own client (HTTP or gRPC), start
together and send the requests of the level between them, one at a time each; a request's latency
is the client's wall time around ``infer`` (encode, network, queue, model, decode). Throughput is
the level's answered requests over its wall time. The server's own statistics
(``get_inference_statistics``) before and after each level give what it did: model executions
(batches), the batch sizes, mean queue and compute time per request.
"""
from __future__ import annotations

import threading
import time

import numpy as np

from densert.extras import require
from densert.machine import source_commit

from .harness import stats
from .report import SCHEMA_VERSION

PROTOCOLS = ("http", "grpc")
# `densert bench --url` and bench_serve: timed requests per concurrency level (--quick: fewer),
# warm-up requests per client, concurrent clients per level.
SERVE = {"runs": 40, "quick_runs": 8, "warmup": 2, "concurrency": (1, 2, 4, 8)}


def client_module(protocol: str):
    if protocol not in PROTOCOLS:
        raise ValueError(f"protocol {protocol!r}: expected one of {PROTOCOLS}")
    return require(f"tritonclient.{protocol}", f"densert bench --url ({protocol})")


def split_url(url: str) -> str:
    """``HOST:PORT`` (an ``http://`` prefix is dropped: tritonclient takes host:port)."""
    u = url.split("://", 1)[-1].rstrip("/")
    host, _, port = u.rpartition(":")
    if not host or not port.isdigit():
        raise ValueError(f"--url {url!r}: expected HOST:PORT, e.g. 127.0.0.1:8000")
    return u


def _as_dict(msg) -> dict:
    """A gRPC protobuf message as the HTTP client's JSON dict (same field names)."""
    if isinstance(msg, dict):
        return msg
    from google.protobuf.json_format import MessageToDict
    return MessageToDict(msg, preserving_proto_field_name=True)


def _n(v) -> int:
    return int(v or 0)


def server_counts(client, model: str) -> dict:
    """Cumulative inference / execution counts, queue and compute ns, and per-batch-size
    execution counts of ``model``."""
    st = _as_dict(client.get_inference_statistics(model))["model_stats"][0]
    s = st.get("inference_stats", {})
    return {"inferences": _n(st.get("inference_count")), "executions": _n(st.get("execution_count")),
            "queue_ns": _n(s.get("queue", {}).get("ns")),
            "compute_ns": sum(_n(s.get(k, {}).get("ns")) for k in
                              ("compute_input", "compute_infer", "compute_output")),
            "batches": {str(b["batch_size"]): _n(b.get("compute_infer", {}).get("count"))
                        for b in st.get("batch_stats", [])}}


def server_delta(before: dict, after: dict) -> dict:
    n = after["inferences"] - before["inferences"]
    e = after["executions"] - before["executions"]
    sizes = {k: v - before["batches"].get(k, 0) for k, v in after["batches"].items()}
    return {"inferences": n, "executions": e,
            "mean_batch_size": n / e if e else None,
            "batch_sizes": {k: v for k, v in sorted(sizes.items(), key=lambda kv: int(kv[0])) if v},
            "queue_ms_mean": (after["queue_ns"] - before["queue_ns"]) / n / 1e6 if n else None,
            "compute_ms_mean": (after["compute_ns"] - before["compute_ns"]) / n / 1e6 if n else None}


def server_info(client, model: str) -> dict:
    cfg = _as_dict(client.get_model_config(model))
    cfg = cfg.get("config", cfg)
    meta = _as_dict(client.get_server_metadata())
    db = cfg.get("dynamic_batching")
    return {"server_version": meta.get("version"),
            "max_batch_size": _n(cfg.get("max_batch_size")),
            "dynamic_batching": db is not None,
            "max_queue_delay_us": _n(db.get("max_queue_delay_microseconds")) if db is not None else None,
            "instances": sum(_n(g.get("count")) for g in cfg.get("instance_group", [])) or None}


class Load:
    """Requests of one model with one image and its parameters."""

    def __init__(self, url: str, protocol: str, model: str, image: np.ndarray,
                 params: dict | None = None):
        self.url, self.protocol, self.model = split_url(url), protocol, model
        self.mod = client_module(protocol)
        self.image, self.params = image, params or None

    def client(self):
        return self.mod.InferenceServerClient(self.url)

    def infer(self, client):
        t = self.mod.InferInput("image", [1, *self.image.shape], "UINT8")
        t.set_data_from_numpy(self.image[None])
        return client.infer(self.model, [t], parameters=self.params)

    def _clients(self, n: int, per_client: list[int]) -> tuple[list[float], list[str], float]:
        lat: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()
        start = threading.Barrier(n + 1)
        clients = [self.client() for _ in range(n)]

        def work(c, k):
            start.wait()
            for _ in range(k):
                t0 = time.perf_counter()
                try:
                    self.infer(c)
                except Exception as e:   # counted and reported, the level goes on
                    with lock:
                        errors.append(str(e).splitlines()[0][:300])
                    continue
                with lock:
                    lat.append(time.perf_counter() - t0)
        threads = [threading.Thread(target=work, args=(c, k), daemon=True)
                   for c, k in zip(clients, per_client)]
        for t in threads:
            t.start()
        start.wait()
        t0 = time.perf_counter()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        for c in clients:
            c.close()
        return lat, errors, wall

    def level(self, concurrency: int, requests: int) -> dict:
        """``requests`` (at least one per client) spread over ``concurrency`` clients."""
        requests = max(requests, concurrency)
        per = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
        probe = self.client()
        before = server_counts(probe, self.model)
        lat, errors, wall = self._clients(concurrency, per)
        after = server_counts(probe, self.model)
        probe.close()
        return {"concurrency": concurrency, "requests": requests, "answered": len(lat),
                "errors": len(errors), "first_error": errors[0] if errors else None,
                "wall_s": wall, "throughput_rps": len(lat) / wall if wall > 0 else None,
                "latency": stats(lat), "server": server_delta(before, after)}

    def warmup(self, concurrency: int, per_client: int) -> None:
        """Untimed requests from ``concurrency`` clients at once, so every instance has run."""
        if per_client > 0:
            _, errors, _ = self._clients(concurrency, [per_client] * concurrency)
            if errors:
                raise RuntimeError(f"warm-up requests to {self.model} at {self.url} failed: "
                                   f"{errors[0]}")


def describe(load: Load) -> dict:
    """The server's settings for ``load.model`` (which must be ready)."""
    c = load.client()
    try:
        if not c.is_model_ready(load.model):
            raise RuntimeError(f"model {load.model!r} is not ready at {load.url} ({load.protocol})")
        return server_info(c, load.model)
    finally:
        c.close()


def run_record(load: Load, info: dict, levels: list[dict], warmup: int,
               label: str | None = None) -> dict:
    return {"label": label, "url": load.url, "protocol": load.protocol, "model": load.model,
            "image_hw": list(load.image.shape[:2]), "params": load.params or {}, "server": info,
            "warmup_per_client": warmup, "levels": levels}


def measure(url: str, protocol: str, model: str, image: np.ndarray, params: dict | None,
            concurrency=SERVE["concurrency"], requests: int = 40, warmup: int = 2,
            label: str | None = None) -> dict:
    """One run: the server's settings, then one record per concurrency level."""
    load = Load(url, protocol, model, image, params)
    info = describe(load)
    load.warmup(max(concurrency), warmup)
    levels = [load.level(n, requests) for n in concurrency]
    return run_record(load, info, levels, warmup, label)


def serve_report(runs: list[dict], command: str, label: str | None, started: float,
                 machine: dict) -> dict:
    """A ``densert bench`` report (``kind: serve``) over one or more server runs; ``machine``:
    ``machine_info()`` taken before measuring (its load average is the one at the start), the
    load average now is added as ``loadavg_at_end``."""
    import os
    try:
        machine = {**machine, "loadavg_at_end": list(os.getloadavg())}
    except OSError:
        pass
    return {"schema_version": SCHEMA_VERSION, "kind": "serve", "command": command,
            "label": label, "started_unix": started, "git_commit": source_commit(),
            "machine": machine, "serve": runs, "wall_s": time.time() - started}
