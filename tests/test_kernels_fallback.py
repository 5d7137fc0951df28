"""Routing of every kernel entry point: the torch fallback when triton is absent, and GPU
buffers (a TensorRT engine's outputs) that stay on the device through the dense head.

No GPU here, so a GPU buffer is played by ``DeviceResident``: a CPU tensor whose ``is_cuda`` is
True (the kernels' routing rule, ``densert.kernels.use_triton``) and which records every way of
reading its data on the host (.cpu(), .numpy(), .tolist(), .item(), int(), ...). Everything
computed from it is a DeviceResident too, so a host copy of the scores anywhere downstream is
seen. With triton present the device route runs the Triton tail (in the interpreter here).
"""
import os
import subprocess
import sys
import textwrap
from types import SimpleNamespace

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np
import pytest
import torch

HOST_READS = {"cpu", "numpy", "tolist", "item", "__int__", "__float__", "__bool__", "__index__",
              "__array__"}


class DeviceResident(torch.Tensor):
    reads: list = []

    @property
    def is_cuda(self):
        return True

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        to_host = name in HOST_READS or (name == "to" and any(
            str(a) == "cpu" for a in list(args[1:]) + list((kwargs or {}).values())))
        if to_host and isinstance(args[0], DeviceResident):
            cls.reads.append((name, tuple(args[0].shape)))
        return super().__torch_function__(func, types, args, kwargs)


def on_device(t):
    return t.as_subclass(DeviceResident)


@pytest.fixture
def reads():
    DeviceResident.reads = []
    return DeviceResident.reads


@pytest.fixture(params=["triton", "torch"])
def route(request, monkeypatch):
    """Both device routes: the Triton tail (interpreter) and the torch one (triton absent)."""
    from densert import kernels
    if request.param == "torch":
        monkeypatch.setattr(kernels, "triton_available", lambda: False)
    elif "triton" in sys.modules and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set")
    return request.param


def _problem(gh=4, gw=5, K=7, d=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(gh * gw, d, generator=g), torch.randn(K, d, generator=g)


@pytest.mark.parametrize("mode", ["argmax", "depth", "probs"])
def test_device_route_keeps_scores_on_device(route, reads, mode, monkeypatch):
    """dense_head on a device buffer: same result as the CPU path, nothing read on the host.
    The torch device route is forced to its chunked branch (the one big maps take)."""
    import densert.kernels.dense_head as dh
    if route == "torch":
        monkeypatch.setattr(dh, "_SMALL_TAIL_BYTES", 0)
    hidden, weight = _problem()
    dv = torch.linspace(0.5, 3.0, weight.shape[0])
    ref = dh.dense_head(hidden, weight, (4, 5), (9, 11), mode, depth_values=dv)
    got = dh.dense_head(on_device(hidden), weight, (4, 5), (9, 11), mode, depth_values=dv)
    assert not reads, reads
    if mode == "probs":
        torch.testing.assert_close(got.as_subclass(torch.Tensor), ref, rtol=1e-5, atol=1e-6)
    else:
        assert torch.equal(got.as_subclass(torch.Tensor), ref)


def test_runtime_dense_reads_back_only_the_map(route, reads):
    """runtime.dense on engine output buffers: the subset GEMM and the tail run on the device
    (the weight goes there once), and only the finished maps come back to the host."""
    from densert.runtime.dense import depth_map, on_device_of, segment_labels
    from densert.runtime.options import DenseOptions
    hidden, weight = _problem(gh=4, gw=6, K=5)
    bins = torch.randn(1000, hidden.shape[1]) * 0.1
    opts = DenseOptions(crf=False)  # the tail on the device; DenseCRF runs on the host
    out_hw = (24, 36)
    ref_lab = segment_labels(hidden, weight, (4, 6), out_hw, opts, background=True)
    lab = segment_labels(on_device(hidden), weight, (4, 6), out_hw, opts, background=True)
    assert np.array_equal(lab, ref_lab)
    assert {r[1] for r in reads} <= {out_hw}, reads
    for mode in ("argmax", "expectation"):
        o = DenseOptions(depth_mode=mode)
        ref = depth_map(hidden, bins, (4, 6), out_hw, o, "nyuv2")
        got = depth_map(on_device(hidden), bins, (4, 6), out_hw, o, "nyuv2")
        np.testing.assert_allclose(got.depth, ref.depth, rtol=1e-5)
    # Maps only: the patch-grid codes and the full map, never [L, K] scores or [K, H, W] probs.
    assert all(len(s) == 2 and s[0] * s[1] <= out_hw[0] * out_hw[1] for _, s in reads), reads
    moved = on_device_of(weight, on_device(hidden))
    assert moved is weight  # same device (CPU here): no copy; on a GPU: one copy, then cached


def test_tensorrt_prefill_hands_back_the_engine_buffers(reads):
    """TrtBackend.prefill returns the engine's vision_hidden / scores output buffers themselves
    (no host copy); only the last logits, which greedy decoding reads, come to the host."""
    from densert.export.trt_backend import TrtBackend
    L, d, V, K = 6, 8, 30, 4
    image_id = 7
    be = object.__new__(TrtBackend)
    be.config = SimpleNamespace(image_token_id=image_id, hidden_size=d)
    be.table = SimpleNamespace(rows=lambda ids: np.zeros((len(ids), d), np.float32))
    be.manifest = {"graphs": {"llm": {"inputs": []}}}
    be.past_inputs, be.cache_outputs, be.float_dtype = [], [], torch.float32
    buffers = {"vision_hidden": on_device(torch.randn(L, d)),
               "pre_vision_hidden": on_device(torch.randn(1, d)),
               "last_logits": on_device(torch.randn(1, V)),
               "scores_depth": on_device(torch.randn(L, K))}
    be._run = lambda graph, feeds, profile: buffers
    ids = torch.tensor([1, 2] + [image_id] * L + [3])
    pf = be.prefill(ids, torch.randn(L, d))
    assert pf.vision_hidden.data_ptr() == buffers["vision_hidden"].data_ptr()
    assert pf.scores["depth"].data_ptr() == buffers["scores_depth"].data_ptr()
    assert pf.pre_vision_hidden.data_ptr() == buffers["pre_vision_hidden"].data_ptr()
    assert reads == [("cpu", (V,))], reads


# A None entry in sys.modules is how Python spells "not importable": `import triton` raises
# ModuleNotFoundError and importlib.util.find_spec("triton") returns None, as if uninstalled.
BLOCKED = "import sys; sys.modules['triton'] = None\n"


def test_every_entry_point_without_triton(tmp_path):
    """With triton not importable (sys.modules["triton"] = None): triton_available() is False,
    dense_head (3 modes) and ntpm_loss (forward + backward) on CUDA-routed tensors take the
    torch paths with the CPU results, no Triton module is loaded, and the AOT check says in one
    line what is missing."""
    script = BLOCKED + textwrap.dedent("""
        import sys, torch
        from densert import kernels
        from densert.kernels.dense_head import dense_head
        from densert.kernels.ntpm import ntpm_loss
        sys.path.insert(0, sys.argv[1])
        from test_kernels_fallback import on_device
        assert not kernels.triton_available()
        g = torch.Generator().manual_seed(0)
        h, w = torch.randn(12, 8, generator=g), torch.randn(5, 8, generator=g)
        dv = torch.linspace(1, 2, 5)
        for mode in ("argmax", "depth", "probs"):
            a = dense_head(h, w, (3, 4), (7, 9), mode, depth_values=dv)
            b = dense_head(on_device(h), w, (3, 4), (7, 9), mode, depth_values=dv)
            torch.testing.assert_close(b.as_subclass(torch.Tensor), a, rtol=1e-6, atol=0)
        hh = torch.randn(10, 8, generator=g, requires_grad=True)
        ww = torch.randn(40, 8, generator=g, requires_grad=True)
        pos = torch.randint(0, 40, (10, 2), generator=g)
        ref = ntpm_loss(hh, ww, pos, k=4)
        gref = torch.autograd.grad(ref, (hh, ww))
        got = ntpm_loss(on_device(hh), ww, pos, k=4)
        ggot = torch.autograd.grad(got, (hh, ww))
        assert float(got) == float(ref)
        assert all(torch.equal(x.as_subclass(torch.Tensor), y) for x, y in zip(ggot, gref))
        loaded = [m for m in sys.modules if m.startswith("densert.kernels._triton")]
        assert not loaded and sys.modules["triton"] is None, loaded
        print("ok")
    """)
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    env = dict(os.environ, TRITON_INTERPRET="0")
    r = subprocess.run([sys.executable, "-c", script, tests_dir], capture_output=True, text=True,
                       env=env, timeout=300)
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    aot = BLOCKED + "import runpy; runpy.run_module('densert.kernels.aot', run_name='__main__')"
    r = subprocess.run([sys.executable, "-c", aot], capture_output=True, text=True, env=env,
                       timeout=120)
    assert r.returncode != 0
    msg = (r.stdout + r.stderr).strip().splitlines()
    assert len(msg) == 1 and "needs triton" in msg[0], msg
