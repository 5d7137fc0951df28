"""The engine directory alone: tokenizer, config and the tied table travel with the graphs, the
runtime needs no checkpoint; weight-only quantized engines and their gate; no telemetry."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.export import quantize
from densert.export.onnx_export import export_engine
from densert.export.ort_backend import OrtBackend
from densert.export.verify import verify
from densert.resources import bundled_model_dir


def _image(path: Path, h=96, w=160, seed=0) -> Path:
    from PIL import Image
    rng = np.random.default_rng(seed)
    low = rng.random((4, 6, 3))
    img = np.kron(low, np.ones((h // 4, w // 6 + 1, 1)))[:h, :w]
    Image.fromarray((img * 255).astype(np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def moved(tiny_checkpoint, tmp_path_factory):
    """(engine dir, where the checkpoint went): exported, then the checkpoint moved away."""
    root = tmp_path_factory.mktemp("alone")
    ck = shutil.copytree(tiny_checkpoint, root / "ck")
    export_engine(ck, root / "eng", progress=False)
    gone = shutil.move(str(ck), str(root / "archive" / "ck"))
    assert not ck.exists()
    return root / "eng", Path(gone)


def test_depth_segment_chat_run_from_the_engine_dir_alone(moved, tmp_path):
    from densert.cli import main
    from densert.runtime.predictor import DensePredictor
    eng, ck = moved
    img = _image(tmp_path / "frame.png")
    # a random-weights model names no class before the release's 4096-token cap: keep it short
    common = ["--backend", "onnxruntime", "--engine-dir", str(eng), "--max-new-tokens", "16"]
    assert main(["depth", str(img), *common, "--out", str(tmp_path / "d")]) == 0
    assert main(["segment", str(img), *common, "--classes", "cat,dog", "--out", str(tmp_path / "s")]) == 0
    assert main(["chat", "--prompt", "hello", *common]) == 0
    assert (tmp_path / "d" / "frame.depth.npy").is_file() and (tmp_path / "s" / "frame.labels.npy").is_file()
    # provenance without the checkpoint: the engine dir, and the checkpoint its manifest names
    import jsonschema

    from densert.runtime.results import sidecar_schema
    side = json.loads((tmp_path / "d" / "frame.json").read_text())
    jsonschema.validate(side, sidecar_schema())
    assert side["model"]["path"] == str(eng) and side["model"]["exported_from"] == str((eng.parent / "ck").resolve())
    # the same maps as the torch reference on the (moved) checkpoint
    got = np.load(tmp_path / "d" / "frame.depth.npy")
    ref = DensePredictor(ck, backend="torch", dtype="float32").depth(img)
    assert (got == ref.depth).mean() >= 0.999
    seg = DensePredictor(eng, backend="onnxruntime", engine_dir=str(eng), max_new_tokens=16).segment(
        img, classes=["cat", "dog"])
    seg_ref = DensePredictor(ck, backend="torch", dtype="float32", max_new_tokens=16).segment(
        img, classes=["cat", "dog"])
    assert (seg.labels == seg_ref.labels).mean() >= 0.999


def test_text_only_prompt_on_every_backend(moved):
    """A prompt without an image: no image rows, an empty past; torch and onnxruntime agree
    (TensorRT: tests/test_export_tensorrt.py records its bindings for the same prompt)."""
    from densert.runtime.predictor import DensePredictor
    eng, ck = moved
    a = DensePredictor(ck, backend="torch").chat(None, "what is depth?", max_new_tokens=8)
    b = DensePredictor(None, backend="onnxruntime", engine_dir=str(eng)).chat(None, "what is depth?",
                                                                             max_new_tokens=8)
    assert a.token_ids == b.token_ids and len(a.token_ids) > 0


def test_engine_budget_caps_the_image(moved, tmp_path):
    """An engine exported for small frames takes a bigger photo scaled to fit its budget."""
    from densert.runtime.predictor import DensePredictor
    eng, ck = moved
    small = tmp_path / "small"
    export_engine(ck, small, tasks=["depth"], max_image_tokens=24, progress=False)
    p = DensePredictor(None, backend="onnxruntime", engine_dir=str(small))
    r = p.depth(_image(tmp_path / "big.png", 480, 640))
    assert r.depth.shape == (480, 640) and r.resized_hw[0] * r.resized_hw[1] <= 24 * 32 * 32


def test_tied_table_stored_once_and_read_back(moved):
    import onnx
    eng, ck = moved
    ob = OrtBackend(eng)
    V, d = ob.config.vocab_size, ob.config.hidden_size
    shapes = {g: [tuple(t.dims) for t in onnx.load(str(eng / f"{g}.onnx"), load_external_data=False).graph.initializer]
              for g in ("vision", "llm")}
    assert shapes["llm"].count((V, d)) == 1 and (d, V) not in shapes["llm"]
    assert (V, d) not in shapes["vision"]
    model = load_model(ck, torch.float32)
    ids = torch.tensor([0, 5, V - 1, 1234 % V])
    torch.testing.assert_close(ob.head_weight().index_select(0, ids), model.lm_head.weight[ids], atol=0, rtol=0)


@pytest.fixture(scope="module")
def bundled_engines(tmp_path_factory):
    root = tmp_path_factory.mktemp("quant")
    ck = bundled_model_dir()
    model = load_model(ck, torch.float32)
    engines = {p: (root / p, export_engine(ck, root / p, precision=p, progress=False, model=model,
                                           tasks=["depth", "segment"]))
               for p in ("int8", "int4")}
    engines["int4-tensorrt"] = (root / "int4-trt", export_engine(
        ck, root / "int4-trt", precision="int4", progress=False, model=model, tasks=["depth", "segment"],
        target="tensorrt"))
    engines["int4-nbits"] = (root / "int4-nbits", export_engine(
        ck, root / "int4-nbits", precision="int4", progress=False, model=model, tasks=["depth", "segment"],
        ort_matmul="nbits"))
    return ck, model, engines


@pytest.mark.parametrize("precision", ["int4", "int4-nbits", pytest.param("int8", marks=pytest.mark.slow)])
def test_quantized_engines_pass_their_gate(bundled_engines, precision):
    """Quantized engines of the bundled (trained) model against the fp32 torch reference, with
    the documented thresholds of export.verify.THRESHOLDS (all verify grids: ``-m slow``)."""
    ck, model, engines = bundled_engines
    grids = ((12, 20),) if precision == "int4" else ((8, 8), (12, 20), (34, 18))
    rep = verify(engines[precision][0], ck, grids=grids, decode_steps=3, model=model, log=lambda s: None)
    assert rep.ok, rep.format()
    assert rep.precision == precision.split("-")[0] and rep.dense and rep.agreement


def test_thresholds_are_enforced(bundled_engines, monkeypatch, capsys):
    """The gate is per precision and binding: the int4 engine judged by the fp32 row fails, and
    ``densert verify`` exits 1 with FAIL."""
    from densert.cli import main
    from densert.export.verify import THRESHOLDS
    ck, model, engines = bundled_engines
    monkeypatch.setitem(THRESHOLDS, "int4", THRESHOLDS["fp32"])
    assert main(["verify", str(engines["int4"][0]), "--model", str(ck), "--grids", "12x20",
                 "--decode-steps", "2", "--no-metrics"]) == 1
    out = capsys.readouterr().out
    assert out.rstrip().endswith("FAIL") and "cosine >= 0.99999" in out


def test_quantized_graph_formats_and_sizes(bundled_engines):
    import onnx
    from onnx import helper
    ck, model, engines = bundled_engines
    size = {p: sum(f.stat().st_size for f in d.iterdir()) for p, (d, _) in engines.items()}
    assert size["int4"] < size["int8"]     # the real-width ratios to fp32: test_export_realwidth.py
    for p in ("int8", "int4", "int4-tensorrt", "int4-nbits"):
        d, m = engines[p]
        fmt, nbits = m["precision"], p in ("int4", "int4-nbits")   # the onnxruntime int4 table: MatMulNBits
        assert m["tied_table"]["format"] == fmt and m["tied_table"]["layout"] == ("nbits" if nbits else "dv")
        # the task rows the dense heads read stay exact beside a quantized table; the other rows
        # come back as the graph dequantizes them
        from densert.export.tied_table import TiedTable
        ids = m["tied_table"]["head_rows"]["ids"]
        assert set(ids) >= {i for g in m["tasks"]["depth"]["groups"] for i in g}
        tt = TiedTable(d, m["tied_table"], model.config.vocab_size, model.config.hidden_size)
        w = model.lm_head.weight.detach().float().numpy()
        np.testing.assert_array_equal(tt.rows(ids[:5]), w[ids[:5]])
        other = [i for i in (0, 7, 100) if i not in ids]
        np.testing.assert_array_equal(
            tt.rows(other), quantize.fake_quantize(w[other].T, fmt, m["tied_table"]["block"] or 1).T)
        for g in ("llm", "vision"):
            graph = onnx.load(str(d / f"{g}.onnx"), load_external_data=False).graph
            inits = {t.name: t for t in graph.initializer}
            made_by = {o: n for n in graph.node for o in n.output}
            dqs = [n for n in graph.node if n.op_type == "DequantizeLinear"]
            nb = [n for n in graph.node if n.op_type == "MatMulNBits"]
            gemms = [n for n in graph.node if n.op_type == "DynamicQuantizeMatMul"]
            if p == "int4-tensorrt":
                assert dqs and not gemms and not nb, f"{p} {g}: weights not as DequantizeLinear -> MatMul"
            elif p == "int4-nbits":    # --ort-matmul nbits: every int4 weight a MatMulNBits
                assert nb and not gemms, f"{p} {g}: weights not as MatMulNBits"
            else:
                # the onnxruntime target: Linears as int8 GEMMs; int4 ones stored int4 per output
                # column and widened to int8 by a Cast (folded once at load); the tied table
                # (llm) as MatMulNBits (int4) or DequantizeLinear (int8)
                assert gemms, f"{p} {g}: no int8 GEMMs"
                for n in gemms:
                    w = n.input[1]
                    if fmt == "int4":
                        cast = made_by[w]
                        to = helper.get_attribute_value(cast.attribute[0])
                        assert cast.op_type == "Cast" and to == onnx.TensorProto.INT8
                        w = cast.input[0]
                    q, sc = inits[w], inits[n.input[2]]
                    assert q.data_type == (onnx.TensorProto.INT4 if fmt == "int4" else onnx.TensorProto.INT8)
                    assert list(sc.dims) == [q.dims[1]] and sc.data_type == onnx.TensorProto.FLOAT
                assert g == "vision" or (nb if fmt == "int4" else dqs), f"{p} {g}: the table is not quantized"
            kinds = {inits[n.input[0]].data_type for n in dqs}
            want = onnx.TensorProto.INT4 if p == "int4-tensorrt" else onnx.TensorProto.INT8
            # batched (3-D) weights and K no block tiles stay int8
            assert kinds <= {want, onnx.TensorProto.INT8} and (not dqs or want in kinds), (p, g, kinds)
            for n in dqs:
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                q = inits[n.input[0]]
                if q.data_type == onnx.TensorProto.INT4:
                    k = q.dims[0]
                    assert attrs["axis"] == 0 and attrs["block_size"] == quantize.int4_block_for(k, m["int4_block"])
                    assert n.input[1].endswith("_f32")    # fp16 scales, widened by a Cast
                else:
                    assert attrs["axis"] == len(q.dims) - 1 and not attrs.get("block_size")
            for n in nb:
                attrs = {a.name: helper.get_attribute_value(a) for a in n.attribute}
                assert n.domain == "com.microsoft" and attrs["bits"] == 4
                assert attrs["block_size"] == quantize.int4_block_for(attrs["K"], m["int4_block"])
                assert list(inits[n.input[1]].dims) == [attrs["N"], attrs["K"] // attrs["block_size"],
                                                        attrs["block_size"] // 2]
    # only the tensorrt target is for TensorRT
    from densert.export import trt_rules
    trt_graph = onnx.load(str(engines["int4-tensorrt"][0] / "llm.onnx"), load_external_data=False)
    assert trt_rules.problems(trt_graph) == []
    ort_graph = onnx.load(str(engines["int4"][0] / "llm.onnx"), load_external_data=False)
    assert any("MatMulNBits" in p for p in trt_rules.problems(ort_graph))


def test_tensorrt_target_engines_pass_their_gate(bundled_engines):
    ck, model, engines = bundled_engines
    rep = verify(engines["int4-tensorrt"][0], ck, grids=((12, 20),), decode_steps=2, model=model,
                 log=lambda s: None)
    assert rep.ok, rep.format()


def test_quantizers_round_trip():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((64, 40)).astype(np.float32)
    q, s = quantize.quantize_int8(w)
    assert q.dtype == np.int8 and np.abs(q).max() == 127 and s.shape == (40,)
    assert np.abs(quantize.dequantize(q, s, "int8") - w).max() <= s.max() / 2 + 1e-7
    q4, s4 = quantize.quantize_int4(w, 16)
    assert q4.min() >= -8 and q4.max() <= 7 and s4.shape == (4, 40)
    err = np.abs(quantize.dequantize(q4, s4, "int4") - w).reshape(4, 16, 40)
    assert (err <= s4[:, None, :] / 2 + 1e-6).all()
    assert np.array_equal(quantize.unpack_int4(quantize.pack_int4(q4), q4.size), q4.reshape(-1))
    # what the engine stores is a fixed point: quantizing it again changes nothing
    once = quantize.fake_quantize(w, "int4", 16)
    np.testing.assert_array_equal(quantize.fake_quantize(once, "int4", 16), once)


def test_no_telemetry_and_one_session_factory(moved, monkeypatch):
    """ONNX Runtime's telemetry is on by default: every session densert creates comes from
    make_session, which turns it off first."""
    import onnxruntime as ort
    eng, _ = moved
    calls = []
    monkeypatch.setattr(ort, "disable_telemetry_events", lambda: calls.append("off"))
    OrtBackend(eng)
    assert calls == ["off", "off"]            # vision + llm sessions
    repo = Path(__import__("densert").__file__).resolve().parents[1]
    users = sorted(str(p.relative_to(repo)) for top in ("densert", "export", "runtime", "benchmarks", "training")
                   for p in (repo / top).rglob("*.py") if "InferenceSession(" in p.read_text())
    assert users == ["export/ort_backend.py"]
