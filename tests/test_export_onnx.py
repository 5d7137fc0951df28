"""ONNX export + ONNX Runtime backend + parity gate + manifest refusal (densert.export)."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.errors import EngineError
from densert.export import onnx_types, trt_rules
from densert.export.manifest import MANIFEST, load_manifest
from densert.export.onnx_export import export_engine
from densert.export.ort_backend import OrtBackend
from densert.export.verify import verify
from densert.model.generation import generate, greedy_decode
from densert.model.vision_meta import build_vision_meta
from densert.runtime.predictor import DensePredictor
from densert.tasks import DENSE_TASKS

GRIDS = ((12, 20), (18, 10), (2, 2))  # one export serves all of them




@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def engine(tiny_checkpoint, model, tmp_path_factory):
    out = tmp_path_factory.mktemp("eng") / "tiny-fp32"
    export_engine(tiny_checkpoint, out, progress=False, model=model)
    return out


def test_manifest_describes_every_graph(engine, tiny_checkpoint):
    import onnx
    m = load_manifest(engine, tiny_checkpoint)
    assert set(m["graphs"]) == {"vision", "llm"}
    assert m["precision"] == "fp32" and m["cache_layout"] == "latent" and m["exporter"]["onnx_opset"] >= 17
    v = {i["name"]: i for i in m["graphs"]["vision"]["inputs"]}
    assert v["pixel_values"]["shape"] == ["patches", 768] and v["window_index"]["shape"] == ["cells"]
    assert v["window_slots"]["shape"] == ["slots"] and v["window_inverse"]["shape"] == ["patches"]
    llm = {i["name"]: i for i in m["graphs"]["llm"]["inputs"]}
    cfg = m["config"]
    assert llm["inputs_embeds"]["shape"] == ["batch", "seq", cfg["hidden_size"]]
    assert llm["past_latent"]["shape"] == [cfg["num_hidden_layers"], "batch", "past_seq", cfg["latent_cache_dim"]]
    assert len(m["tasks"]["depth"]["groups"]) == 1000 and m["tasks"]["segment"]["labels"] == ["FG", "BG", "OTHERS"]
    assert set(m["checkpoint"]["files"]) >= {"config.json", "model.safetensors", "tokenizer.json"}
    # sized for a 1k-token frame by default
    assert m["max_image_tokens"] == 1024 and m["max_patches"] == 4096
    # the default target is onnxruntime: layers from its fused operators (the tensorrt target's
    # standard-op graphs: test_export_tensorrt.py); the attention custom op is expanded everywhere
    fused = {"vision": {"LayerNormalization", "com.microsoft::SkipLayerNormalization"},
             "llm": {"SimplifiedLayerNormalization", "com.microsoft::SkipSimplifiedLayerNormalization"}}
    for g, info in m["graphs"].items():
        ops = set(info["op_types"])
        assert {"com.microsoft::MultiHeadAttention", "com.microsoft::RotaryEmbedding"} | fused[g] <= ops, (g, ops)
        assert "CumSum" not in ops and not any(o.startswith("densert::") for o in ops)
        graph = onnx.load(str(engine / info["file"]), load_external_data=False)
        assert any("MultiHeadAttention" in p for p in trt_rules.problems(graph))


def test_parity_gate_several_sizes_one_export(engine, tiny_checkpoint, model):
    rep = verify(engine, tiny_checkpoint, grids=GRIDS, decode_steps=3, model=model, log=lambda s: None)
    assert rep.ok, rep.format()
    # every stage was checked at every size, dense maps included
    assert len([t for t in rep.tensors if "vision image_embeds" in t.name]) == len(GRIDS)
    # per size and dense task (depth, segment, refer): the map from the reference's vision output
    # and the end-to-end one
    assert len(rep.dense) == 2 * len(DENSE_TASKS) * len(GRIDS) and all(n > 0 for _, _, n, _ in rep.dense)


def test_decode_matches_torch_generator(engine, tiny_checkpoint, model):
    cfg = model.config
    ob = OrtBackend(engine, model_dir=tiny_checkpoint)
    gh, gw = 12, 20
    px = torch.randn(gh * gw, 768)
    meta = build_vision_meta([(gh, gw)], cfg.vision_config)
    ids = torch.tensor([[cfg.bos_token_id, cfg.vision_start_token_id, *[cfg.image_token_id] * (gh * gw // 4),
                         cfg.vision_end_token_id, 40, 41]])
    ref = generate(model, ids, px, meta, max_new_tokens=8, stop_ids=[])
    pre = ob.prefill(ids, ob.encode_image(px, meta))
    got, cache = greedy_decode(ob.decode, pre.last_logits, pre.cache, 8)
    assert got == ref
    assert cache.length == ids.shape[1] + len(got) - 1


def test_text_only_prefill(engine, tiny_checkpoint, model):
    ob = OrtBackend(engine, model_dir=tiny_checkpoint)
    ids = torch.tensor([[model.config.bos_token_id, 40, 41, 42]])
    p = ob.prefill(ids, None)
    with torch.no_grad():
        h, _ = model.model(model.embed(ids), None, "latent")
    assert p.vision_hidden is None and p.scores["depth"].shape == (0, 1000)
    torch.testing.assert_close(p.last_logits, model.logits(h[0, -1]), atol=1e-3, rtol=1e-4)


# ---------------------------------------------------------------- refusal of bad engine dirs
def _copy(engine, tmp_path):
    dst = tmp_path / "eng"
    shutil.copytree(engine, dst)
    return dst


def test_engine_of_another_checkpoint_is_refused(engine, tmp_path):
    from densert.checkpoint.random_init import make_test_checkpoint
    other = make_test_checkpoint(tmp_path / "other", "tiny", seed=1, dtype="bfloat16")
    with pytest.raises(EngineError,
                       match=r"was exported from checkpoint .* this checkpoint .*re-run `densert export --model"):
        OrtBackend(engine, model_dir=other)
    # a different config (more layers) names the config hash
    bigger = make_test_checkpoint(tmp_path / "bigger", "tiny", text_layers=5, seed=0, dtype="bfloat16")
    with pytest.raises(EngineError, match="with config hash [0-9a-f]{16}, this checkpoint .* has [0-9a-f]{16}"):
        OrtBackend(engine, model_dir=bigger)


def test_missing_file_is_refused(engine, tmp_path, tiny_checkpoint):
    d = _copy(engine, tmp_path)
    (d / "tokenizer.json").unlink()
    with pytest.raises(EngineError, match="is missing tokenizer.json"):
        OrtBackend(d)
    (d / "llm.onnx.data").unlink()
    with pytest.raises(EngineError, match="is missing llm.onnx.data"):
        OrtBackend(d, model_dir=tiny_checkpoint)
    (d / MANIFEST).unlink()
    with pytest.raises(EngineError, match="has no manifest.json"):
        OrtBackend(d, model_dir=tiny_checkpoint)
    with pytest.raises(EngineError, match="does not exist"):
        OrtBackend(tmp_path / "nope", model_dir=tiny_checkpoint)


def test_tampered_manifest_is_refused(engine, tmp_path, tiny_checkpoint):
    d = _copy(engine, tmp_path)
    m = json.loads((d / MANIFEST).read_text())
    m["max_patches"] = 10 ** 9
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(EngineError, match="modified after export"):
        OrtBackend(d, model_dir=tiny_checkpoint)
    (d / MANIFEST).write_text("{not json")
    with pytest.raises(EngineError, match="not valid JSON"):
        OrtBackend(d, model_dir=tiny_checkpoint)


def test_replaced_graph_file_is_refused(engine, tmp_path, tiny_checkpoint):
    d = _copy(engine, tmp_path)
    shutil.copyfile(d / "vision.onnx", d / "llm.onnx")
    with pytest.raises(EngineError, match="llm.onnx .* was replaced or damaged"):
        OrtBackend(d, model_dir=tiny_checkpoint)


def test_task_not_exported_is_refused(tiny_checkpoint, model, tmp_path):
    out = tmp_path / "depth-only"
    m = export_engine(tiny_checkpoint, out, tasks=["depth"], progress=False, model=model)
    assert set(m["graphs"]) == {"vision", "llm"}
    with pytest.raises(EngineError, match=r"exported for tasks \['depth'\], not \['segment'\]"):
        OrtBackend(out, model_dir=tiny_checkpoint, tasks=["segment"])
    # the one LLM graph decodes whatever tasks it was exported for
    ob = OrtBackend(out, model_dir=tiny_checkpoint, tasks=["depth", "chat"])
    pre = ob.prefill(torch.tensor([[1, 2, 3]]), None)
    logits, cache = ob.decode(5, pre.cache)
    assert logits.shape == (model.config.vocab_size,) and cache.length == 4


def test_too_many_patches_is_refused(tiny_checkpoint, model, tmp_path):
    out = tmp_path / "small"
    export_engine(tiny_checkpoint, out, tasks=["chat"], max_image_tokens=64, progress=False, model=model)
    ob = OrtBackend(out, model_dir=tiny_checkpoint)
    meta = build_vision_meta([(16, 20)], model.config.vision_config)
    with pytest.raises(EngineError, match="320 patches.*at most 256.*--max-image-tokens 80"):
        ob.encode_image(torch.randn(320, 768), meta)


# ---------------------------------------------------------------- variants
def test_full_cache_layout_and_external_data(tiny_checkpoint, model, tmp_path):
    out = tmp_path / "full-ext"
    m = export_engine(tiny_checkpoint, out, tasks=["chat"], cache_layout="full", progress=False, model=model)
    assert all(info["external_data"] == [info["file"] + ".data"] for info in m["graphs"].values())
    assert [o["name"] for o in m["graphs"]["llm"]["outputs"]] == [
        "vision_hidden", "pre_vision_hidden", "last_logits", "present_key", "present_value"]
    rep = verify(out, tiny_checkpoint, grids=((8, 12), (4, 4)), decode_steps=3, model=model, log=lambda s: None)
    assert rep.ok, rep.format()


def test_cli_export_and_verify(tiny_checkpoint, tmp_path, capsys):
    from densert.cli import main
    out = tmp_path / "cli-eng"
    assert main(["export", "--model", str(tiny_checkpoint), "--out", str(out), "--tasks", "depth,chat",
                 "--image-size", "480x640", "--quiet"]) == 0
    assert "sized for 480x640 px" in capsys.readouterr().out
    m = load_manifest(out)
    assert m["max_patches"] == 30 * 40 and m["grids"] == [[30, 40]] and m["max_window_slots"] == 6 * 256
    assert main(["verify", str(out), "--model", str(tiny_checkpoint), "--grids", "4x6", "--decode-steps", "2",
                 "--no-metrics"]) == 0
    assert "PASS" in capsys.readouterr().out
    assert main(["verify", str(tmp_path / "missing"), "--model", str(tiny_checkpoint)]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_from_model_exports_once_into_cache(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("DENSERT_CACHE_DIR", str(tmp_path / "cache"))
    b1 = OrtBackend.from_model(tiny_checkpoint, tasks=["chat"])
    assert "exporting to" in capsys.readouterr().err
    assert str(b1.engine_dir).startswith(str(tmp_path / "cache" / "engines"))
    b2 = OrtBackend.from_model(tiny_checkpoint, tasks=["chat"])
    assert "exporting" not in capsys.readouterr().err and b2.engine_dir == b1.engine_dir


@pytest.mark.slow
def test_youtu_vl_4b_widths_few_layers(tmp_path):
    """Real widths (vision 1152/16 heads, LLM 2560/32 heads, MLA 512+64, vocab 283386), 1+1 layers:
    external data (> 2 GiB fp32 graphs) and parity at several sizes with one export."""
    from densert.checkpoint.random_init import make_test_checkpoint
    ck = make_test_checkpoint(tmp_path / "4b", "youtu-vl-4b", text_layers=1, vision_layers=1, seed=0,
                              dtype="bfloat16")
    model = load_model(ck, torch.float32)
    out = tmp_path / "eng"
    m = export_engine(ck, out, tasks=["depth", "segment", "chat"], progress=False, model=model)
    assert m["graphs"]["llm"]["external_data"] == ["llm.onnx.data"]
    rep = verify(out, ck, grids=((16, 16), (20, 36)), decode_steps=3, model=model, log=lambda s: None)
    assert rep.ok, rep.format()


def test_depth_onnxruntime_equals_torch(engine, tiny_checkpoint):
    """The runtime's depth flow over both backends: same bin map (fp32 engine)."""
    import numpy as np
    rng = np.random.default_rng(0)
    img = (rng.random((96, 160, 3)) * 255).astype(np.uint8)
    ref = DensePredictor(tiny_checkpoint, backend="torch", max_patches=256).depth(img)
    got = DensePredictor(tiny_checkpoint, backend="onnxruntime", engine_dir=engine, max_patches=256).depth(img)
    assert got.bins.shape == ref.bins.shape == (96, 160)
    assert (got.bins == ref.bins).mean() >= 0.999


def test_onnx_type_table_is_onnx_s():
    """export/onnx_types.py writes graphs without importing onnx: its codes and names are onnx's."""
    import onnx
    for code, name in onnx_types.NAMES.items():
        onnx_name = onnx.TensorProto.DataType.Name(code)       # FLOAT, FLOAT16, INT4, ...
        assert getattr(onnx_types, onnx_name) == code
        assert name == {"float": "float32"}.get(onnx_name.lower(), onnx_name.lower()), (code, name)
    for name, code in onnx_types.ONNX_TYPES.items():
        assert onnx_types.NAMES[code] == name
    assert {onnx_types.float_type(p) for p in ("fp32", "fp16")} == set(onnx_types.FLOAT_FORMATS)
    assert all(onnx_types.FLOAT_FORMATS[onnx_types.float_type(p)] == p for p in ("fp32", "fp16"))


def test_fp16_export_keeps_fp32_islands_and_passes_gate(tiny_checkpoint, model, tmp_path):
    import onnx
    out = tmp_path / "fp16"
    m = export_engine(tiny_checkpoint, out, precision="fp16", tasks=["depth", "chat"], progress=False, model=model)
    assert m["io_float_dtype"] == "float16" and next(model.parameters()).dtype == torch.float32
    g = onnx.load(str(out / "vision.onnx"), load_external_data=False)
    hidden = model.config.vision_config.hidden_size
    # The model widens LayerNorm weights (and inputs) to fp32: the folded weights stay fp32.
    f32 = [n for n in g.graph.initializer if n.data_type == onnx.TensorProto.FLOAT and list(n.dims) == [hidden]]
    f16 = [n for n in g.graph.initializer if n.data_type == onnx.TensorProto.FLOAT16 and len(n.dims) == 2]
    assert f32 and f16, "LayerNorm weights stay fp32 while the Linear weights are fp16"
    rep = verify(out, tiny_checkpoint, grids=((8, 12),), decode_steps=2, model=model, log=lambda s: None)
    assert rep.ok, rep.format()


def test_unused_vision_input_is_kept(tmp_path):
    """One vision layer = all full attention: the window slots are unused but stay inputs."""
    from densert.checkpoint.random_init import make_test_checkpoint
    ck = make_test_checkpoint(tmp_path / "ck", "tiny", text_layers=1, vision_layers=1, seed=0, dtype="bfloat16")
    m = export_engine(ck, tmp_path / "eng", tasks=["chat"], progress=False)
    assert [i["name"] for i in m["graphs"]["vision"]["inputs"]][5:7] == ["window_slots", "window_inverse"]
    rep = verify(tmp_path / "eng", ck, grids=((8, 8),), decode_steps=2, log=lambda s: None)
    assert rep.ok, rep.format()
