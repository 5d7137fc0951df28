"""TensorRT build path: what runs without TensorRT (profiles, trtexec lines, the missing-TensorRT
error) always; the engine build itself only where TensorRT and a GPU exist."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.errors import EngineError
from densert.export.manifest import read_manifest
from densert.export.onnx_export import export_engine
from densert.export.tensorrt import BuildOptions, profile_shapes, trtexec_commands

HAS_TRT = importlib.util.find_spec("tensorrt") is not None
NO_TRT_REASON = "TensorRT Python bindings not installed (JetPack ships them; x86: NVIDIA's pip index)"




@pytest.fixture(scope="module")
def engine(tiny_checkpoint, tmp_path_factory):
    out = tmp_path_factory.mktemp("trt") / "eng"
    export_engine(tiny_checkpoint, out, tasks=["depth", "chat"], max_patches=1024, progress=False,
                  model=load_model(tiny_checkpoint, torch.float32))
    return out


def test_profiles_and_trtexec_lines(engine):
    m = read_manifest(engine)
    o = BuildOptions.from_manifest(m, min_patches=16, opt_patches=512, max_patches=1024, max_seq=600)
    assert o.strongly_typed and o.max_seq == 600
    v = profile_shapes(m, "vision", o)
    assert v["pixel_values"] == ([16, 768], [512, 768], [1024, 768]) and v["window_index"] == ([4], [128], [256])
    p = profile_shapes(m, "llm_prefill", o)
    assert p["image_embeds"][0][0] == 0 and p["input_ids"][2] == [1, 600]
    d = profile_shapes(m, "llm_decode", o)
    assert d["past_latent"][2][2] == 599
    lines = trtexec_commands(engine, m, o)
    assert len(lines) == 3 and all("--stronglyTyped" in ln and "--maxShapes=" in ln for ln in lines)
    with pytest.raises(EngineError, match="exceeds the export's max_patches"):
        BuildOptions.from_manifest(m, max_patches=4096)


@pytest.mark.skipif(HAS_TRT, reason="checks the message shown when TensorRT is absent")
def test_missing_tensorrt_names_the_fix(engine, capsys):
    from densert.cli import main
    assert main(["build-engine", str(engine)]) == 2
    err = capsys.readouterr().err
    assert "tensorrt" in err and "JetPack" in err and "pip install tensorrt" in err
    from densert.export.trt_backend import TrtBackend
    with pytest.raises(EngineError, match="JetPack"):
        TrtBackend(engine)


@pytest.mark.skipif(not HAS_TRT or not torch.cuda.is_available(), reason=NO_TRT_REASON + " or no CUDA GPU")
def test_build_and_verify_tensorrt(engine, tiny_checkpoint):
    from densert.export.tensorrt import build_engines
    from densert.export.trt_backend import TrtBackend
    from densert.export.verify import verify
    m = read_manifest(engine)
    build_engines(engine, m, BuildOptions.from_manifest(m, max_patches=1024, max_seq=400))
    rep = verify(engine, tiny_checkpoint, grids=((8, 8), (12, 20)), backend=TrtBackend(engine, tiny_checkpoint))
    assert rep.ok, rep.format()
