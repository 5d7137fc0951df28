"""densert[gpu]: the ONNX Runtime execution provider choice, the one-line fallback to CPU, and
which tensors stay on the device. This machine has no GPU: the provider list and the CUDA checks
are mocked where a GPU would answer, and the fallback runs for real (CPU onnxruntime, and the
CLI asked for CUDA)."""
from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import onnxruntime
import pytest
import torch

from densert.errors import EngineError
from densert.export import ort_backend
from densert.export.ort_backend import CPU_EP, CUDA_EP, OrtBackend, pick_providers

CPU_WHEEL = ["AzureExecutionProvider", CPU_EP]
GPU_WHEEL = ["TensorrtExecutionProvider", CUDA_EP, CPU_EP]


@pytest.fixture
def machine(monkeypatch):
    """set(providers=..., gpus=..., lib_error=..., shadowed=...): what onnxruntime lists, how
    many GPUs the driver sees (None: no driver), the CUDA provider library's load error, and
    whether onnxruntime-gpu is installed under the CPU wheel's files. Returns the calls made."""
    calls = []

    def set_(providers, gpus=None, lib_error=None, shadowed=False):
        monkeypatch.setattr(onnxruntime, "get_available_providers", lambda: list(providers))

        def count():
            calls.append("count")
            return (0, "no NVIDIA driver (libcuda.so.1 not found), so no GPU here") if gpus is None \
                else (gpus, None)
        monkeypatch.setattr(ort_backend, "cuda_device_count", count)
        monkeypatch.setattr(ort_backend, "cuda_provider_load_error", lambda: lib_error)
        monkeypatch.setattr(ort_backend, "gpu_wheel_shadowed", lambda: (
            "onnxruntime-gpu 1.31.1 is installed but the CPU wheel's files replaced its module"
            if shadowed else None))
        return calls
    return set_


# ---------------------------------------------------------------- provider choice
def test_gpu_wheel_with_a_gpu_takes_cuda_not_tensorrt(machine):
    machine(GPU_WHEEL, gpus=1)
    p = pick_providers(None, "auto")
    assert p.names == [CUDA_EP, CPU_EP] and p.device == "cuda" and p.device_id == 0
    assert p.options[0]["device_id"] == 0 and p.fallback is None
    assert pick_providers(None, "cuda").names == [CUDA_EP, CPU_EP]


def test_cuda_index_reaches_the_provider(machine):
    machine(GPU_WHEEL, gpus=2)
    p = pick_providers(None, "cuda:1")
    assert p.device_id == 1 and p.options[0]["device_id"] == 1 and p.fallback is None
    p = pick_providers(None, "cuda:2")
    assert p.names == [CPU_EP] and "cuda:2 asked for but 2 GPU(s) are visible" in p.fallback


def test_cpu_wheel_says_nothing_unless_cuda_was_asked_for(machine):
    calls = machine(CPU_WHEEL)
    for dev in ("auto", "cpu", None):
        p = pick_providers(None, dev)
        assert p.names == [CPU_EP] and p.device == "cpu" and p.fallback is None, dev
    p = pick_providers(None, "cuda")
    assert p.names == [CPU_EP] and p.device == "cpu"
    assert "(--device cuda)" in p.fallback and "CPU build" in p.fallback and "densert[gpu]" in p.fallback
    assert calls == []  # no driver probing without a CUDA provider to run


def test_device_cpu_never_probes_the_gpu(machine):
    calls = machine(GPU_WHEEL, gpus=1)
    p = pick_providers(None, "cpu")
    assert p.names == [CPU_EP] and p.fallback is None and calls == []


@pytest.mark.parametrize("gpus, lib_error, reason", [
    (None, None, "no NVIDIA driver (libcuda.so.1 not found)"),
    (1, "its CUDA provider library does not load (libcublasLt.so.13: cannot open shared object "
        "file: No such file or directory)", "libcublasLt.so.13"),
])
@pytest.mark.parametrize("device, asked", [("auto", "--device auto, onnxruntime-gpu installed"),
                                           ("cuda", "--device cuda")])
def test_gpu_wheel_without_a_usable_gpu_falls_back_with_the_reason(machine, gpus, lib_error, reason,
                                                                   device, asked):
    machine(GPU_WHEEL, gpus=gpus, lib_error=lib_error)
    p = pick_providers(None, device)
    assert p.names == [CPU_EP] and p.device == "cpu"
    assert p.fallback.startswith(f"densert: onnxruntime: {CUDA_EP} asked for ({asked}) is not usable: ")
    assert reason in p.fallback and p.fallback.endswith(f"running on {CPU_EP}")
    assert "\n" not in p.fallback


def test_shadowed_gpu_wheel_is_named(machine):
    machine(CPU_WHEEL, shadowed=True)
    p = pick_providers(None, "auto")
    assert p.names == [CPU_EP] and "CPU wheel's files replaced its module" in p.fallback


def test_explicit_providers_are_taken_as_given(machine):
    machine(GPU_WHEEL, gpus=None)
    p = pick_providers(["TensorrtExecutionProvider", CUDA_EP, CPU_EP], "cuda:1")
    assert p.names == ["TensorrtExecutionProvider", CUDA_EP, CPU_EP] and p.device == "cuda"
    assert p.options == [{"device_id": 1}, {"device_id": 1}, {}] and p.fallback is None
    machine(CPU_WHEEL)
    with pytest.raises(EngineError, match=r"\['CUDAExecutionProvider'\] are not available.*densert\[gpu\]"):
        pick_providers([CUDA_EP, CPU_EP])


def test_fallback_line_is_one_line():
    line = ort_backend.fallback_line("cuda:0", "first\nsecond   third")
    assert line.count("\n") == 0 and "first second third" in line and "(--device cuda:0)" in line


# ---------------------------------------------------------------- the CUDA checks themselves
class _FakeDriver:
    def __init__(self, init_rc=0, count=1):
        self.init_rc, self.count = init_rc, count

    def cuInit(self, flags):
        return self.init_rc

    def cuDeviceGetCount(self, ref):
        ref._obj.value = self.count
        return 0


@pytest.mark.parametrize("driver, want", [
    (OSError("libcuda.so.1: cannot open shared object file"), (0, "libcuda.so.1 not found")),
    (_FakeDriver(init_rc=100), (0, "CUDA_ERROR_NO_DEVICE")),
    (_FakeDriver(init_rc=3), (0, "cuInit error 3")),
    (_FakeDriver(count=0), (0, "0 devices")),
    (_FakeDriver(count=2), (2, None)),
])
def test_cuda_device_count_reads_the_driver(monkeypatch, driver, want):
    def cdll(name, *a, **k):
        assert name == "libcuda.so.1"
        if isinstance(driver, Exception):
            raise driver
        return driver
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    n, why = ort_backend.cuda_device_count()
    assert n == want[0]
    assert (why is None) if want[1] is None else (want[1] in why)


def test_cuda_device_count_here_is_consistent():
    n, why = ort_backend.cuda_device_count()
    assert (n > 0) == (why is None)
    if not torch.cuda.is_available():
        assert n == 0 or torch.version.cuda is None  # a GPU torch cannot see: a CPU build of torch


def test_provider_library_error_names_the_missing_library(monkeypatch):
    loaded = []

    def cdll(path, *a, **k):
        loaded.append(path)
        if "providers_cuda" in path:
            raise OSError("libcublasLt.so.13: cannot open shared object file: No such file or directory")
        return object()
    monkeypatch.setattr(ctypes, "CDLL", cdll)
    monkeypatch.setattr(onnxruntime, "preload_dlls", lambda *a, **k: print("Failed to load x"),
                        raising=False)
    why = ort_backend.cuda_provider_load_error()
    assert "libcublasLt.so.13" in why and "cuDNN 9" in why
    assert [p.rsplit("/", 1)[-1] for p in loaded] == ["libonnxruntime_providers_shared.so",
                                                     "libonnxruntime_providers_cuda.so"]
    monkeypatch.setattr(ctypes, "CDLL", lambda path, *a, **k: object())
    assert ort_backend.cuda_provider_load_error() is None


# ---------------------------------------------------------------- what stays on the device
class _Val:
    """An OrtValue stand-in: where it lives and its host copy."""

    def __init__(self, arr, device="cpu"):
        self.arr, self.device = arr, device

    def device_name(self):
        return self.device

    def numpy(self):
        return self.arr


def _fake_backend(torch_device, d=8, V=20, L=6, image_id=7):
    be = object.__new__(OrtBackend)
    be.config = SimpleNamespace(image_token_id=image_id, hidden_size=d)
    be.table = SimpleNamespace(rows=lambda ids: np.asarray(ids, np.float32)[:, None].repeat(d, 1))
    be.manifest = {"graphs": {"llm": {"inputs": [{"name": "past_latent", "shape": [2, 1, "past", 4]}]}}}
    be.past_inputs, be.cache_outputs = ["past_latent"], ["present_latent"]
    be.float_dtype = np.float32
    be._io = {"llm": {"out": ["vision_hidden", "pre_vision_hidden", "last_logits", "scores_depth",
                              "present_latent"]},
              "vision": {"out": ["image_embeds"]}}
    be._device, be._device_id = "cuda", 0
    be._torch_device = torch_device
    be.max_patches, be.engine_dir = 10_000, "ENG"
    calls = []

    def run(graph, feeds, keep_on_device=()):
        calls.append((graph, feeds, list(keep_on_device)))
        T = int(feeds["inputs_embeds"].shape[1]) if graph == "llm" else 0
        if graph == "vision":
            return {"image_embeds": _Val(np.ones((L, d), np.float32))}
        return {"vision_hidden": _Val(np.zeros((L, d), np.float32)),
                "pre_vision_hidden": _Val(np.zeros((1, d), np.float32)),
                "last_logits": _Val(np.arange(V, dtype=np.float32)[None]),
                "scores_depth": _Val(np.zeros((L, 3), np.float32)),
                "present_latent": _Val(np.zeros((2, 1, T, 4), np.float32), "cuda")}
    be._run = run
    return be, calls


@pytest.mark.parametrize("torch_device", [torch.device("cpu"), None])
def test_prefill_keeps_cache_and_dense_outputs_on_the_device(torch_device):
    """With a torch device (torch sees the GPU) the prompt is assembled there and the dense
    head's inputs stay on the device; without one only the KV cache does. The last logits always
    come to the host."""
    L, d, image_id = 6, 8, 7
    be, calls = _fake_backend(torch_device, d=d, L=L, image_id=image_id)
    ids = torch.tensor([1, 2] + [image_id] * L + [3])
    embeds = torch.randn(L, d)
    pf = be.prefill(ids, embeds)
    graph, feeds, keep = calls[-1]
    dense = ["vision_hidden", "pre_vision_hidden", "scores_depth"]
    assert keep == ["present_latent", *(dense if torch_device is not None else [])]
    emb = feeds["inputs_embeds"]
    assert isinstance(emb, torch.Tensor if torch_device is not None else np.ndarray)
    want, pos = ort_backend.prompt_embeddings(be.table, ids, embeds, be.config)  # the host assembly
    assert np.array_equal(np.asarray(emb)[0], want) and list(pos) == list(range(2, 2 + L))
    assert pf.cache.values[0].device_name() == "cuda" and pf.cache.length == len(ids)
    assert pf.last_logits.shape == (20,) and pf.scores["depth"].shape == (L, 3)
    # decode feeds the device cache back and keeps the new one there
    be.decode(5, pf.cache)
    graph, feeds, keep = calls[-1]
    assert feeds["past_latent"] is pf.cache.values[0] and keep == ["present_latent"]


@pytest.mark.parametrize("torch_device", [torch.device("cpu"), None])
def test_image_embeddings_stay_on_the_device_for_prefill(torch_device, monkeypatch):
    be, calls = _fake_backend(torch_device)
    monkeypatch.setattr(ort_backend, "vision_feeds", lambda px, meta: {"pixel_values": px})
    be.encode_image(torch.zeros(24, 768), meta=None)
    assert calls[-1][2] == (["image_embeds"] if torch_device is not None else [])


def test_host_outputs_convert_through_numpy():
    v = onnxruntime.OrtValue.ortvalue_from_numpy(np.arange(6, dtype=np.float32).reshape(2, 3))
    t = OrtBackend._t(v)
    assert t.device.type == "cpu" and t.tolist() == [[0, 1, 2], [3, 4, 5]]


# ---------------------------------------------------------------- real runs, CUDA asked for
@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    from densert.export.onnx_export import export_engine
    out = tmp_path_factory.mktemp("ortgpu") / "eng"
    export_engine(tiny_checkpoint, out, progress=False, tasks=["depth"])
    return out


def _fallback_lines(err: str) -> list[str]:
    return [line for line in err.splitlines() if "running on CPUExecutionProvider" in line]


@pytest.mark.skipif(CUDA_EP in onnxruntime.get_available_providers() and ort_backend.cuda_unusable() is None,
                    reason="a usable CUDA provider here: nothing falls back")
def test_backend_asked_for_cuda_runs_on_cpu_after_one_line(engine, tiny_checkpoint, capfd):
    be = OrtBackend(engine, model_dir=tiny_checkpoint, device="cuda")
    err = capfd.readouterr().err
    assert len(err.splitlines()) == 1 and len(_fallback_lines(err)) == 1, err
    assert be.providers == [CPU_EP] and be._device == "cpu" and be._torch_device is None
    assert all(s.get_providers() == [CPU_EP] for s in be.sessions.values())
    OrtBackend(engine, model_dir=tiny_checkpoint, device="cpu")
    assert capfd.readouterr().err == ""


def test_session_that_did_not_start_cuda_is_said_once(engine, tiny_checkpoint, monkeypatch, capfd):
    """The checks passed (mocked) but ONNX Runtime started the session on CPU: one line, and
    every graph on CPU."""
    monkeypatch.setattr(ort_backend, "pick_providers", lambda req, dev: ort_backend.Providers(
        [CUDA_EP, CPU_EP], [{"device_id": 0}, {}], "cuda", 0))
    made = []
    real = ort_backend.make_session

    def make(path, providers, **kw):
        made.append(list(providers))
        return real(path, [CPU_EP], quantized=kw["quantized"])
    monkeypatch.setattr(ort_backend, "make_session", make)
    be = OrtBackend(engine, model_dir=tiny_checkpoint, device="cuda")
    err = capfd.readouterr().err
    assert len(_fallback_lines(err)) == 1 and "did not start CUDAExecutionProvider" in err, err
    assert made == [[CUDA_EP, CPU_EP], [CPU_EP]] and be._device == "cpu" and be.providers == [CPU_EP]


def test_cli_depth_asked_for_cuda_falls_back_to_cpu(engine, tmp_path, machine, capsys):
    """`densert depth --backend onnxruntime` with CUDA asked for and not usable: exit 0, the
    fallback said in one line naming why, and the same map as the CPU run."""
    from PIL import Image

    from densert.cli import main
    img = tmp_path / "frame.png"
    Image.fromarray((np.random.default_rng(0).random((64, 96, 3)) * 255).astype(np.uint8)).save(img)
    common = [str(img), "--backend", "onnxruntime", "--engine-dir", str(engine), "--quiet"]
    assert main(["depth", *common, "--device", "cpu", "--out", str(tmp_path / "cpu")]) == 0
    assert capsys.readouterr().err == ""
    runs = {"cpu-wheel": dict(providers=CPU_WHEEL),
            "no-driver": dict(providers=GPU_WHEEL, gpus=None),
            "no-libs": dict(providers=GPU_WHEEL, gpus=1, lib_error="its CUDA provider library does "
                            "not load (libcudnn.so.9: cannot open shared object file)")}
    reasons = {"cpu-wheel": "CPU build", "no-driver": "no NVIDIA driver", "no-libs": "libcudnn.so.9"}
    for name, state in runs.items():
        machine(**state)
        assert main(["depth", *common, "--device", "cuda", "--out", str(tmp_path / name)]) == 0
        err = capsys.readouterr().err
        lines = _fallback_lines(err)
        assert len(lines) == 1 and reasons[name] in lines[0] and err.strip() == lines[0], err
        assert np.array_equal(np.load(tmp_path / name / "frame.depth.npy"),
                              np.load(tmp_path / "cpu" / "frame.depth.npy"))
