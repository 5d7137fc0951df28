"""TensorRT path: what runs without TensorRT (profiles, trtexec lines, the TensorRT 10.3 graph
rules, the missing-TensorRT error) always; the build and the runtime bindings against a fake
TensorRT module that records its calls and runs the graphs with ONNX Runtime
(``fake_tensorrt``); a real build only where TensorRT and a GPU exist."""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.errors import EngineError
from densert.export import trt_rules
from densert.export.manifest import read_manifest
from densert.export.onnx_export import export_engine
from densert.export.tensorrt import BuildOptions, profile_shapes, trtexec_commands
from densert.model.vision_meta import build_vision_meta

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT_REASON = "TensorRT Python bindings not installed (JetPack ships them; x86: NVIDIA's pip index)"


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "eng"
    export_engine(tiny_checkpoint, out, tasks=["depth", "chat"], max_image_tokens=256, progress=False,
                  model=model, target="tensorrt")
    return out


def test_profiles_and_trtexec_lines(engine):
    m = read_manifest(engine)
    o = BuildOptions.from_manifest(m, min_patches=16, opt_patches=512, max_patches=1024, max_seq=600)
    assert o.max_seq == 600 and not o.tf32
    (v,) = profile_shapes(m, "vision", o)
    assert v["pixel_values"] == ([16, 768], [512, 768], [1024, 768]) and v["window_index"] == ([4], [128], [256])
    # window slots: one window at least; the worst aspect ratio (1 x 256 cells: 32 windows) at most
    assert v["window_slots"][0] == [256] and v["window_slots"][2] == [32 * 256]
    prefill, decode = profile_shapes(m, "llm", o)
    assert prefill["image_positions"][0] == [0] and prefill["inputs_embeds"][2][1] == 600
    assert prefill["past_latent"][2][2] == 0                      # prefill: no past
    assert decode["inputs_embeds"][2][1] == 1 and decode["image_positions"][2] == [0]
    assert decode["past_latent"][2][2] == 599
    lines = trtexec_commands(engine, m, o)
    assert len(lines) == 2
    assert all("--stronglyTyped" in ln and "--noTF32" in ln and "--fp16" not in ln for ln in lines)
    llm_line = next(ln for ln in lines if "llm.onnx" in ln)
    L = m["config"]["num_hidden_layers"]
    assert f"past_latent:{L}x1x0x" in llm_line and f"past_latent:{L}x1x599x" in llm_line  # spans both
    with pytest.raises(EngineError, match="exceeds the export's 1024"):
        BuildOptions.from_manifest(m, max_patches=4096)


def test_graphs_keep_tensorrt_10_3_rules(engine):
    """Both graphs parse under the oldest supported TensorRT's op/dtype rules; the checker itself
    catches what would not (CumSum, custom ops, INT8 blocks, a dequantized activation)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper
    m = read_manifest(engine)
    for info in m["graphs"].values():
        assert trt_rules.problems(onnx.load(str(engine / info["file"]), load_external_data=False)) == []
    x = helper.make_tensor_value_info("x", TensorProto.INT32, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 4])
    w = numpy_helper.from_array(np.ones((4, 4), np.int8), "w")
    s = numpy_helper.from_array(np.ones((1, 4), np.float32), "s")
    nodes = [helper.make_node("CumSum", ["x", "ax"], ["c"]),
             helper.make_node("Foo", ["c"], ["d"], domain="custom"),
             helper.make_node("DequantizeLinear", ["w", "s"], ["wd"], axis=0, block_size=4),
             helper.make_node("Relu", ["wd"], ["y"])]
    ax = numpy_helper.from_array(np.array(0, np.int32), "ax")
    bad = helper.make_model(helper.make_graph(nodes, "g", [x], [y], [w, s, ax]))
    text = " | ".join(trt_rules.problems(bad))
    assert "CumSum" in text and "10.8" in text and "custom op custom::Foo" in text
    assert "INT8 weights take per-tensor or per-channel scales" in text and "not a MatMul" in text


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_missing_tensorrt_names_the_fix(engine, capsys):
    from densert.cli import main
    assert main(["build-engine", str(engine)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "JetPack" in err and "pip install tensorrt" in err
    from densert.export.trt_backend import TrtBackend
    with pytest.raises(EngineError, match="JetPack"):
        TrtBackend(engine)


# ---------------------------------------------------------------- against the recording fake
@pytest.fixture
def fake_trt(monkeypatch):
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    import fake_tensorrt
    sys.path.pop(0)
    fake_tensorrt.CALLS.clear()
    monkeypatch.setitem(sys.modules, "tensorrt", fake_tensorrt.module())
    monkeypatch.setattr("densert.export.tensorrt.device_identity",
                        lambda: {"gpu": "Fake Orin", "compute_capability": "8.7"})
    return fake_tensorrt


def test_build_is_strongly_typed_without_tf32_and_reports_context_memory(engine, tmp_path, fake_trt):
    from densert.export.tensorrt import build_engines
    d = tmp_path / "eng"
    shutil.copytree(engine, d)
    m = read_manifest(d)
    log = []
    build_engines(d, m, BuildOptions.from_manifest(m), log=log.append)
    calls = fake_trt.CALLS
    strongly = 1 << fake_trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED
    assert [c for c in calls if c[0] == "create_network"] == [("create_network", strongly)] * 2
    assert ("set_flag", "FP16") not in calls and ("clear_flag", "TF32") in calls
    builds = sorted((c for c in calls if c[0] == "build"), key=lambda c: c[2])
    assert builds == [("build", [], 1), ("build", [], 2)]          # vision: 1 profile; llm: prefill + decode
    side = json.loads((d / "llm.engine.json").read_text())
    assert side["context_memory_bytes"] == [1 << 20, 2 << 20]
    assert any("device memory per execution context: prefill 1 MiB, decode 2 MiB" in ln for ln in log)


def _trt_backend(d, fake_trt):
    from densert.export.trt_backend import TrtBackend
    return TrtBackend(d, device="cpu", streams=fake_trt.RecordingStreams())


@pytest.mark.parametrize("built_by", ["densert", "trtexec"])
def test_runtime_bindings_text_only_and_image_prompts(engine, tmp_path, fake_trt, model, built_by):
    """The TensorRT backend's calls, recorded: no null address for empty tensors (text-only
    prompt: no image rows; prefill: empty past), every enqueue between the stream waits,
    decode on the decode profile; and its numbers equal the torch model's."""
    from densert.backend import TorchBackend
    from densert.export.tensorrt import build_engines
    d = tmp_path / "eng"
    shutil.copytree(engine, d)
    m = read_manifest(d)
    build_engines(d, m, BuildOptions.from_manifest(m), log=lambda s: None)
    if built_by == "trtexec":   # no sidecar, one profile per engine (what the printed lines build)
        from densert.export.tensorrt import merged_profile
        for g in m["graphs"]:
            (d / f"{g}.engine.json").unlink()
            spec = json.loads((d / f"{g}.engine").read_text())
            spec["profiles"] = [merged_profile(spec["profiles"])]
            (d / f"{g}.engine").write_text(json.dumps(spec))
    be = _trt_backend(d, fake_trt)
    ref = TorchBackend(model)
    cfg = model.config
    fake_trt.CALLS.clear()
    ids = torch.tensor([[cfg.bos_token_id, 40, 41, 42]])
    got, want = be.prefill(ids, None), ref.prefill(ids, None)
    assert got.vision_hidden is None
    torch.testing.assert_close(got.last_logits, want.last_logits, atol=1e-4, rtol=1e-4)
    logits, cache = be.decode(int(got.last_logits.argmax()), got.cache)
    ref_logits, _ = ref.decode(int(got.last_logits.argmax()), want.cache)
    torch.testing.assert_close(logits, ref_logits, atol=1e-4, rtol=1e-4)
    calls = fake_trt.CALLS
    assert all(c[2] for c in calls if c[0] == "set_tensor_address"), "a null address was bound"
    empties = {c[1] for c in calls if c[0] == "set_input_shape" and 0 in c[2]}
    assert {"image_positions", "past_latent"} <= empties
    enq = [i for i, c in enumerate(calls) if c[0] == "execute_async_v3"]
    assert len(enq) == 2 and all(calls[i][1] == fake_trt.RecordingStreams.handle and calls[i][2] == [] for i in enq)
    for i in enq:
        before = [c for c in calls[:i] if c[0] == "stream"][-1]
        after = [c for c in calls[i:] if c[0] == "stream"][0]
        assert "waits for the caller" in before[1] and "synchronize" in after[1]
    # decode ran on the decode profile (densert's two-profile engine) or the one trtexec profile
    decode_profile = [c[3] for c in calls if c[0] == "set_input_shape" and c[1] == "inputs_embeds"][-1]
    assert decode_profile == (1 if built_by == "densert" else 0)
    # an image prompt end to end
    gh, gw = 8, 12
    px = torch.randn(gh * gw, 768)
    meta = build_vision_meta([(gh, gw)], cfg.vision_config)
    emb = be.encode_image(px, meta)
    torch.testing.assert_close(emb, ref.encode_image(px, meta), atol=1e-4, rtol=1e-4)
    ids = torch.tensor([[cfg.bos_token_id, cfg.vision_start_token_id, *[cfg.image_token_id] * 24,
                         cfg.vision_end_token_id, 40]])
    p = be.prefill(ids, emb)
    torch.testing.assert_close(p.vision_hidden, ref.prefill(ids, emb).vision_hidden, atol=1e-4, rtol=1e-4)


def test_runtime_refuses_shapes_outside_the_profile(engine, tmp_path, fake_trt):
    from densert.export.tensorrt import build_engines
    d = tmp_path / "eng"
    shutil.copytree(engine, d)
    m = read_manifest(d)
    build_engines(d, m, BuildOptions.from_manifest(m, max_seq=8), log=lambda s: None)
    be = _trt_backend(d, fake_trt)
    with pytest.raises(EngineError, match="inputs_embeds.* axis 1 is 9, the engine's prefill profile takes 1..8"):
        be.prefill(torch.tensor([[1] * 9]), None)


def test_engine_of_another_export_is_refused(engine, tmp_path, fake_trt):
    """A trtexec engine (no sidecar) whose I/O is not the manifest's: refused with the reason."""
    from densert.export.tensorrt import build_engines
    d = tmp_path / "eng"
    shutil.copytree(engine, d)
    m = read_manifest(d)
    build_engines(d, m, BuildOptions.from_manifest(m), log=lambda s: None)
    (d / "vision.engine.json").unlink()
    shutil.copyfile(d / "llm.engine", d / "vision.engine")
    with pytest.raises(EngineError, match="vision.engine: the engine's inputs .* not the manifest's"):
        _trt_backend(d, fake_trt)


@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(), reason=NO_TRT_REASON + " or no CUDA GPU")
def test_build_and_verify_tensorrt(engine, tiny_checkpoint):
    from densert.export.tensorrt import build_engines
    from densert.export.trt_backend import TrtBackend
    from densert.export.verify import verify
    m = read_manifest(engine)
    build_engines(engine, m, BuildOptions.from_manifest(m, max_seq=400))
    rep = verify(engine, tiny_checkpoint, grids=((8, 8), (12, 20)), backend=TrtBackend(engine, tiny_checkpoint))
    assert rep.ok, rep.format()


def test_build_engine_refuses_an_onnxruntime_target(engine):
    """An onnxruntime-target directory (int4 as MatMulNBits) is refused before TensorRT is
    touched, naming the export flag that makes a TensorRT one."""
    from densert.errors import EngineError
    from densert.export.tensorrt import build_engines
    m = {**read_manifest(engine), "target": "onnxruntime"}
    with pytest.raises(EngineError, match="--target tensorrt"):
        build_engines(engine, m, BuildOptions.from_manifest(m))
