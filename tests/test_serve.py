"""`densert serve`: the Triton model repository, the served models against `densert depth`, bad
requests, dynamic batching, and the written repository in the bundled `tritonserver`.

The server tests need `densert[serve]` plus the nvidia-pytriton wheel (docs/serving.md) and skip
without them; every server listens on 127.0.0.1 only, on free ports, and is stopped by the test.
"""
from __future__ import annotations

import importlib.util
import io
import json
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from densert.errors import OptionError
from densert.runtime.serve import contract
from densert.runtime.serve.repo import RepoSettings, config_pbtxt, write_repository

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "samples" / "scene_0.png"
HAVE_SERVER = (importlib.util.find_spec("pytriton") is not None
               and importlib.util.find_spec("tritonclient") is not None)
needs_server = pytest.mark.skipif(not HAVE_SERVER, reason="needs densert[serve] and the "
                                  "nvidia-pytriton wheel (docs/serving.md)")
# long enough that requests arriving while the instance is busy are taken as one batch
TEST_QUEUE_DELAY_US = 20000


# ---- the contract and the repository, no server


def test_request_options_checks_names_and_types():
    assert contract.request_options("depth", {"preset": "nyuv2", "focal": 500}) == \
        {"preset": "nyuv2", "focal": 500}
    assert contract.request_options("segment", {"classes": " floor, wall ,"}) == \
        {"classes": ["floor", "wall"]}
    with pytest.raises(OptionError, match="unknown parameter.*'clases'.*classes"):
        contract.request_options("segment", {"clases": "floor"})
    with pytest.raises(OptionError, match="'focal' must be a number"):
        contract.request_options("depth", {"focal": "500"})
    with pytest.raises(OptionError, match="'background' must be true or false"):
        contract.request_options("segment", {"background": 1})
    with pytest.raises(OptionError, match="names no class"):
        contract.request_options("dense", {"classes": " , "})
    with pytest.raises(OptionError, match="nothing to compute"):
        contract.request_options("dense", {"depth": False})
    # what Triton's own frontends may add is not the model's business
    assert contract.request_options("depth", {"binary_data_output": True}) == {}


def test_request_image_one_image_of_uint8():
    img = np.zeros((1, 4, 5, 3), np.uint8)
    assert contract.request_image({"image": img, "encoded": None}).shape == (4, 5, 3)
    assert contract.request_image({"encoded": np.frombuffer(b"abc", np.uint8)[None]}) == b"abc"
    with pytest.raises(OptionError, match="exactly one of the inputs image / encoded \\(none"):
        contract.request_image({"image": None, "encoded": None})
    with pytest.raises(OptionError, match="\\(both given\\)"):
        contract.request_image({"image": img, "encoded": np.zeros((1, 3), np.uint8)})
    with pytest.raises(OptionError, match="one image per request.*\\[2, 4, 5, 3\\]"):
        contract.request_image({"image": np.zeros((2, 4, 5, 3), np.uint8)})
    with pytest.raises(OptionError, match="'encoded': empty"):
        contract.request_image({"encoded": np.zeros((1, 0), np.uint8)})
    with pytest.raises(OptionError, match="expected UINT8, got float32"):
        contract.request_image({"image": img.astype(np.float32)})


def test_text_round_trip():
    s = json.dumps({"names": ["floor", "wäll"]})
    a = contract.text(s)
    assert a.dtype == np.uint8 and a.shape[0] == 1
    assert contract.read_text(a) == s


def test_config_pbtxt_and_write_repository(tmp_path):
    s = RepoSettings(models=("depth", "dense"), instances=2, threads=3, max_queue_delay_us=750,
                     settings={"backend": "torch"}, options={"fast": True})
    cfg = config_pbtxt("dense", s)
    for piece in ('name: "dense"', 'backend: "python"', "max_batch_size: 8",
                  "count: 2", "max_queue_delay_microseconds: 750",
                  '{ name: "labels" data_type: TYPE_UINT16 dims: [ -1, -1 ] }',
                  '{ name: "image" data_type: TYPE_UINT8 dims: [ -1, -1, 3 ] optional: true'):
        assert piece in cfg, piece
    assert "dynamic_batching" not in config_pbtxt("depth", RepoSettings(dynamic_batching=False))
    written = write_repository(tmp_path / "repo", s)
    assert [p.name for p in written] == ["depth", "dense"]
    assert (tmp_path / "repo" / "dense" / "1" / "model.py").read_text().count("import") >= 3
    from densert.errors import CLIError
    with pytest.raises(CLIError, match="depth, dense already there; pass --force"):
        write_repository(tmp_path / "repo", s)
    write_repository(tmp_path / "repo", s, force=True)
    # the settings reach the model as they were written
    from densert.runtime.serve.triton_model import settings_of
    text = (tmp_path / "repo" / "dense" / "config.pbtxt").read_text()
    raw = text.split('string_value: "', 1)[1].rsplit('" }', 1)[0]
    conf = settings_of({"parameters": {"densert": {"string_value":
                        raw.encode().decode("unicode_escape")}}})
    assert conf == {"task": "dense", "model": None, "settings": {"backend": "torch"},
                    "options": {"fast": True}, "threads": 3}


def test_write_repo_command(tmp_path):
    from densert.cli import main
    assert main(["serve", "--write-repo", str(tmp_path / "r"), "--models", "segment",
                 "--no-crf", "--fast", "--instances", "2", "--no-dynamic-batching"]) == 0
    cfg = (tmp_path / "r" / "segment" / "config.pbtxt").read_text()
    assert "count: 2" in cfg and "dynamic_batching" not in cfg
    assert '\\"fast\\": true' in cfg and '\\"crf\\": false' in cfg
    assert not (tmp_path / "r" / "depth").exists()
    assert main(["serve", "--write-repo", str(tmp_path / "r"), "--models", "nope"]) == 2


# ---- a running server


def free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


def _ready(http: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http}/v2/health/ready", timeout=2) as r:
            return r.status == 200
    except OSError:
        return False


class Served:
    """`densert serve` in a child process on free loopback ports."""

    def __init__(self, tmp: Path, *flags: str):
        self.http, self.grpc, self.metrics = free_ports(3)
        self.log = tmp / "tritonserver.log"
        self.out = open(tmp / "serve.out", "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "densert", "serve", "--http-port", str(self.http),
             "--grpc-port", str(self.grpc), "--metrics-port", str(self.metrics),
             "--log-file", str(self.log), "--threads", "1", *flags],
            stdout=self.out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 240
        while not _ready(self.http):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError("densert serve did not come up:\n" + self.output())
            time.sleep(0.5)

    def output(self) -> str:
        return Path(self.out.name).read_text(errors="replace")

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        self.out.close()
        return self.proc.returncode

    def metric(self, name: str, model: str) -> float:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=5) as r:
            for line in r.read().decode().splitlines():
                if line.startswith(name + "{") and f'model="{model}"' in line:
                    return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"no metric {name} for {model}")


def _png(rgb: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="PNG")
    return buf.getvalue()


def infer_depth(client_mod, client, image: np.ndarray | None = None, encoded: bytes | None = None,
                **params):
    if image is not None:
        t = client_mod.InferInput("image", [1, *image.shape], "UINT8")
        t.set_data_from_numpy(image[None])
    else:
        a = np.frombuffer(encoded, np.uint8)[None]
        t = client_mod.InferInput("encoded", list(a.shape), "UINT8")
        t.set_data_from_numpy(a)
    r = client.infer("depth", [t], parameters=params or None)
    return r.as_numpy("depth")[0], json.loads(contract.read_text(r.as_numpy("sidecar")))


@pytest.fixture(scope="module")
def depth_server(tmp_path_factory):
    if not HAVE_SERVER:
        pytest.skip("needs densert[serve] and the nvidia-pytriton wheel (docs/serving.md)")
    s = Served(tmp_path_factory.mktemp("serve"), "--models", "depth",
               "--max-queue-delay-us", str(TEST_QUEUE_DELAY_US))
    yield s
    code = s.stop()
    assert code == 0, s.output()
    assert not _ready(s.http), "the server still answers after densert serve stopped"


@pytest.fixture(scope="module")
def cli_depth(tmp_path_factory):
    """`densert depth` on the sample: the map the server must reproduce."""
    from densert.cli import main
    out = tmp_path_factory.mktemp("cli")
    assert main(["depth", str(SAMPLE), "--out", str(out), "--formats", "npy", "--quiet"]) == 0
    return np.load(out / f"{SAMPLE.stem}.depth.npy"), json.loads((out / f"{SAMPLE.stem}.json").read_text())


@needs_server
def test_depth_over_http_and_grpc_equals_densert_depth(depth_server, cli_depth):
    import tritonclient.grpc as grpcclient
    import tritonclient.http as httpclient

    from densert.image.decode import load_rgb
    want, want_side = cli_depth
    with httpclient.InferenceServerClient(f"127.0.0.1:{depth_server.http}") as c:
        got, side = infer_depth(httpclient, c, encoded=SAMPLE.read_bytes())
    assert got.dtype == np.float32 and got.shape == want.shape
    np.testing.assert_array_equal(got, want)
    assert side["result"] == want_side["result"] and side["flow"] == want_side["flow"]
    g = grpcclient.InferenceServerClient(f"127.0.0.1:{depth_server.grpc}")
    try:
        # the preset densert depth used, now as a request parameter
        got, side = infer_depth(grpcclient, g, image=load_rgb(SAMPLE),
                                preset=want_side["result"]["preset"])
    finally:
        g.close()
    np.testing.assert_array_equal(got, want)
    assert side["task"] == "depth" and side["result"] == want_side["result"]
    from densert.runtime.results import validate_sidecar
    validate_sidecar(side)


@needs_server
def test_bad_requests_get_errors_naming_the_problem_and_the_server_keeps_serving(depth_server):
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException
    img = np.full((48, 64, 3), 120, np.uint8)
    with httpclient.InferenceServerClient(f"127.0.0.1:{depth_server.http}") as c:
        def error_of(inputs, **params) -> str:
            with pytest.raises(InferenceServerException) as e:
                c.infer("depth", inputs, parameters=params or None)
            return str(e.value)

        bad = httpclient.InferInput("encoded", [1, 12], "UINT8")
        bad.set_data_from_numpy(np.frombuffer(b"not an image", np.uint8)[None])
        assert "<bytes>" in error_of([bad])
        f32 = httpclient.InferInput("image", [1, 48, 64, 3], "FP32")
        f32.set_data_from_numpy(img[None].astype(np.float32))
        msg = error_of([f32])
        assert "image" in msg and "FP32" in msg and "UINT8" in msg
        rank = httpclient.InferInput("image", [1, 48, 64], "UINT8")
        rank.set_data_from_numpy(img[None, :, :, 0])
        assert "image" in error_of([rank]) and "shape" in error_of([rank])
        good = httpclient.InferInput("image", [1, 48, 64, 3], "UINT8")
        good.set_data_from_numpy(img[None])
        assert "unknown depth preset 'bogus'" in error_of([good], preset="bogus")
        assert "unknown parameter(s) 'classes'" in error_of([good], classes="floor")
        assert "0 inputs" in error_of([])   # Triton's own check
        depth, _ = infer_depth(httpclient, c, image=img)
    assert depth.shape == (48, 64) and np.isfinite(depth).all()


def _concurrent(server, image: np.ndarray, clients: int, per_client: int):
    """``clients`` threads, each with its own HTTP client, ``per_client`` requests each -> the
    maps, the (inference, execution) count deltas of the server's metrics."""
    import tritonclient.http as httpclient
    before = (server.metric("nv_inference_count", "depth"),
              server.metric("nv_inference_exec_count", "depth"))
    maps, errors = [], []
    start = threading.Barrier(clients)

    def client():
        try:
            with httpclient.InferenceServerClient(f"127.0.0.1:{server.http}") as c:
                start.wait()
                for _ in range(per_client):
                    maps.append(infer_depth(httpclient, c, image=image)[0])
        except Exception as e:   # reported below, with the others
            errors.append(e)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(300)
    assert not errors, errors
    after = (server.metric("nv_inference_count", "depth"),
             server.metric("nv_inference_exec_count", "depth"))
    return maps, after[0] - before[0], after[1] - before[1]


def _check_concurrent(server, clients, per_client):
    from densert.benchmarks.harness import synthetic_image
    from densert.runtime.predictor import DensePredictor
    image = synthetic_image(64, 64)
    want = DensePredictor().depth(image).depth
    maps, inferences, executions = _concurrent(server, image, clients, per_client)
    assert len(maps) == clients * per_client
    for m in maps:
        np.testing.assert_array_equal(m, want)
    assert inferences == clients * per_client
    # fewer model executions than requests: some batches held more than one request
    assert executions < inferences, (inferences, executions)


@needs_server
def test_four_clients_forty_requests_batched(depth_server):
    _check_concurrent(depth_server, clients=4, per_client=10)


@needs_server
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bench_url_report(depth_server, tmp_path, protocol):
    from densert.benchmarks import report
    from densert.cli import main
    port = depth_server.http if protocol == "http" else depth_server.grpc
    j, md = tmp_path / "serve.json", tmp_path / "serve.md"
    assert main(["bench", "--url", f"127.0.0.1:{port}", "--protocol", protocol, "--task", "depth",
                 "--sizes", "32x48", "--runs", "3", "--warmup", "1", "--concurrency", "1", "2",
                 "--json", str(j), "--md", str(md)]) == 0
    rep = json.loads(j.read_text())
    report.validate(rep)
    run, = rep["serve"]
    assert run["server"]["dynamic_batching"] is True
    assert run["server"]["max_queue_delay_us"] == TEST_QUEUE_DELAY_US
    assert [lv["concurrency"] for lv in run["levels"]] == [1, 2]
    for lv in run["levels"]:
        assert lv["errors"] == 0 and lv["answered"] == lv["requests"] == 3
        assert lv["server"]["inferences"] == 3 and lv["latency"]["p50"] > 0
    assert "| 2 | 3 | 0 |" in md.read_text()
    assert main(["bench", "--from-json", str(j), "--md", str(tmp_path / "again.md")]) == 0
    assert (tmp_path / "again.md").read_text() == md.read_text()
    # nothing listening there: one line, exit 2
    assert main(["bench", "--url", f"127.0.0.1:{free_ports(1)[0]}", "--runs", "1"]) == 2


@needs_server
def test_written_repository_in_the_bundled_tritonserver(tmp_path, depth_server):
    """The repository `--write-repo` writes, served by the bundled binary started by hand (its
    own command line, as docs/serving.md shows), answers as `densert serve` does."""
    import tritonclient.http as httpclient

    from densert.cli import main
    from densert.runtime.serve import bundled
    repo = tmp_path / "repo"
    assert main(["serve", "--write-repo", str(repo), "--models", "depth", "--threads", "1"]) == 0
    http, grpc, metrics = free_ports(3)
    cmd = bundled.command(repo, bundled.backend_dir(tmp_path), "127.0.0.1", http, grpc, metrics)
    log = open(tmp_path / "tritonserver.log", "wb")
    proc = subprocess.Popen(cmd, env=bundled.environment(), stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 240
        while not _ready(http):
            assert proc.poll() is None and time.monotonic() < deadline, \
                (tmp_path / "tritonserver.log").read_text()
            time.sleep(0.5)
        image = np.asarray(np.random.default_rng(0).integers(0, 255, (40, 72, 3)), np.uint8)
        with httpclient.InferenceServerClient(f"127.0.0.1:{http}") as c:
            got, side = infer_depth(httpclient, c, encoded=_png(image))
        with httpclient.InferenceServerClient(f"127.0.0.1:{depth_server.http}") as c:
            want, want_side = infer_depth(httpclient, c, image=image)
        np.testing.assert_array_equal(got, want)
        assert side["result"] == want_side["result"]
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(60)
        log.close()
    assert proc.returncode == 0


@needs_server
@pytest.mark.slow
def test_segment_and_dense_models(tmp_path):
    """The segment and dense models against the predictor's own calls (one-prefill flows)."""
    import tritonclient.http as httpclient

    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    image = np.asarray(np.random.default_rng(1).integers(0, 255, (64, 96, 3)), np.uint8)
    pred = DensePredictor(None, DenseOptions(fast=True, crf=False))
    seg = pred.segment(image, classes=["floor", "wall"])
    dense = pred.dense(image, classes=["floor", "wall"])
    s = Served(tmp_path, "--models", "segment,dense", "--fast", "--no-crf")
    try:
        with httpclient.InferenceServerClient(f"127.0.0.1:{s.http}") as c:
            t = httpclient.InferInput("image", [1, 64, 96, 3], "UINT8")
            t.set_data_from_numpy(image[None])
            r = c.infer("segment", [t], parameters={"classes": "floor,wall"})
            np.testing.assert_array_equal(r.as_numpy("labels")[0], seg.labels)
            assert json.loads(contract.read_text(r.as_numpy("class_names"))) == seg.class_names
            r = c.infer("dense", [t], parameters={"classes": "floor,wall"})
            np.testing.assert_array_equal(r.as_numpy("labels")[0], dense.segmentation.labels)
            np.testing.assert_array_equal(r.as_numpy("depth")[0], dense.depth.depth)
            side = json.loads(contract.read_text(r.as_numpy("sidecar")))
            assert side["prefills"] == dense.prefills and side["segmentation"]["task"] == "segment"
            r = c.infer("dense", [t], parameters={"depth": True})
            assert r.as_numpy("labels") is None and r.as_numpy("depth").shape == (1, 64, 96)
    finally:
        assert s.stop() == 0, s.output()
