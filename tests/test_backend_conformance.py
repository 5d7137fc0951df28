"""Every backend available here passes the same checks of the ``densert.backend.Backend`` protocol:
its declared members have the declared types and values, its stages return the declared shapes
(and the torch reference's numbers: the engines here are fp32), its head rows are the model's,
``extend`` exists where it is declared and equals a whole prefill there, and so do the batched
stages (several images in one ``encode_image``, ``prefill_batch``), equal to one call per image. TensorRT runs against
the recording fake (``fake_tensorrt``: its engines execute with ONNX Runtime); a new backend is
added to ``BACKENDS`` below."""
from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import torch

from densert.backend import Backend, HeadRows, TorchBackend
from densert.checkpoint.loader import load_model
from densert.errors import BackendError, OptionError
from densert.model.config import YoutuVLConfig
from densert.model.vision_meta import build_vision_meta
from densert.runtime import options

ROOT = Path(__file__).resolve().parents[1]
HAS_ORT = importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None
NO_ORT = "onnxruntime / onnx not installed (pip install 'densert[export]'): no engine can be exported or run"
BACKENDS = ["torch", "onnxruntime", "tensorrt"]
GRID = (8, 12)                      # patches of the test image: 96, 24 image tokens


@pytest.fixture(scope="module")
def model(tiny_checkpoint):
    return load_model(tiny_checkpoint, torch.float32)


@pytest.fixture(scope="module")
def reference(model):
    return TorchBackend(model)


def _export(tiny_checkpoint, model, out: Path, target: str) -> Path:
    from densert.export.onnx_export import export_engine
    export_engine(tiny_checkpoint, out, tasks=["depth", "chat"], max_image_tokens=64, progress=False,
                  model=model, target=target)
    return out


@pytest.fixture(scope="module")
def fake_trt():
    """The recording TensorRT module in place of ``tensorrt`` for this module's tests."""
    sys.path.insert(0, str(Path(__file__).parent))
    import fake_tensorrt
    sys.path.pop(0)
    with pytest.MonkeyPatch.context() as mp:
        mp.setitem(sys.modules, "tensorrt", fake_tensorrt.module())
        mp.setattr("densert.export.tensorrt.device_identity",
                   lambda: {"gpu": "Fake Orin", "compute_capability": "8.7"})
        yield fake_tensorrt


@pytest.fixture(scope="module")
def backends(request, tiny_checkpoint, model, reference, tmp_path_factory):
    """name -> (backend, its engine dir or None), built on first use."""
    made: dict = {}

    def get(name):
        if name in made:
            return made[name]
        if name != "torch" and not HAS_ORT:
            pytest.skip(NO_ORT)
        root = tmp_path_factory.mktemp(name)
        if name == "torch":
            made[name] = (reference, None)
        elif name == "onnxruntime":
            from densert.export.ort_backend import OrtBackend
            eng = _export(tiny_checkpoint, model, root / "eng", "onnxruntime")
            made[name] = (OrtBackend(eng, model_dir=tiny_checkpoint), eng)
        elif name == "tensorrt":
            fake = request.getfixturevalue("fake_trt")
            from densert.export.manifest import read_manifest
            from densert.export.tensorrt import BuildOptions, build_engines
            from densert.export.trt_backend import TrtBackend
            eng = _export(tiny_checkpoint, model, root / "eng", "tensorrt")
            m = read_manifest(eng)
            build_engines(eng, m, BuildOptions.from_manifest(m), log=lambda s: None)
            made[name] = (TrtBackend(eng, model_dir=tiny_checkpoint, device="cpu",
                                     streams=fake.RecordingStreams()), eng)
        else:
            raise AssertionError(f"no recipe for backend {name!r} in this test")
        return made[name]
    return get


def test_every_selectable_backend_is_checked():
    assert set(BACKENDS) == set(options.BACKENDS)


@pytest.mark.parametrize("name", BACKENDS)
def test_declared_members(name, backends, tiny_checkpoint):
    be, eng = backends(name)
    assert isinstance(be, Backend)
    assert be.name == name and isinstance(be.config, YoutuVLConfig)
    assert isinstance(be.device, str) and torch.device(be.device).type in ("cpu", "cuda")
    assert isinstance(be.dtype, torch.dtype) and be.dtype.is_floating_point
    assert isinstance(be.supports_extend, bool)
    assert isinstance(be.supports_image_batch, bool) and isinstance(be.supports_prefill_batch, bool)
    assert all(isinstance(p, str) for p in be.providers)
    assert be.provenance() == {"backend": name, "device": be.device, "dtype": be.precision}
    if eng is None:
        assert be.precision == str(be.dtype).removeprefix("torch.") and be.max_patches is None
        assert be.engine_source() is None
    else:
        from densert.export.manifest import checkpoint_identity, read_manifest
        m = read_manifest(eng)
        assert be.precision == m["precision"] == "fp32" and be.dtype == torch.float32
        assert be.max_patches == m["max_patches"] == 64 * 4
        src = be.engine_source()
        assert src["dir"] == str(eng)
        assert src["checkpoint_id"] == checkpoint_identity(tiny_checkpoint)["checkpoint_id"]
    assert (len(be.providers) > 0) == (name == "onnxruntime")


@pytest.mark.parametrize("name", BACKENDS)
def test_head_rows_are_the_models(name, backends, model):
    be, _ = backends(name)
    head = be.head_weight()
    V, d = model.config.vocab_size, model.config.hidden_size
    assert isinstance(head, HeadRows) and tuple(head.shape) == (V, d) and head.dim() == 2
    ids = torch.tensor([0, 7, V - 1])
    rows = head.index_select(0, ids)
    assert tuple(rows.shape) == (3, d)
    torch.testing.assert_close(rows.float(), model.lm_head.weight[ids].float(), atol=0, rtol=0)


def _prompt(cfg, n_pads: int) -> torch.Tensor:
    return torch.tensor([[cfg.bos_token_id, 40, 41, cfg.vision_start_token_id, *[cfg.image_token_id] * n_pads,
                          cfg.vision_end_token_id, 42]])


@pytest.mark.parametrize("name", BACKENDS)
def test_stages_shapes_and_numbers(name, backends, reference):
    be, _ = backends(name)
    cfg = be.config
    d, V = cfg.hidden_size, cfg.vocab_size
    gh, gw = GRID
    px = torch.randn(gh * gw, 768, generator=torch.Generator().manual_seed(0))
    meta = build_vision_meta([GRID], cfg.vision_config)
    emb = be.encode_image(px, meta)
    assert tuple(emb.shape) == (gh * gw // 4, d)
    ref_emb = reference.encode_image(px, meta)
    torch.testing.assert_close(emb.float().cpu(), ref_emb, atol=1e-4, rtol=1e-4)

    ids = _prompt(cfg, gh * gw // 4)
    got, want = be.prefill(ids, ref_emb), reference.prefill(ids, ref_emb)
    assert tuple(got.vision_hidden.shape) == (gh * gw // 4, d)
    assert tuple(got.pre_vision_hidden.shape) == (d,) and tuple(got.last_logits.shape) == (V,)
    for a, b in ((got.vision_hidden, want.vision_hidden), (got.pre_vision_hidden, want.pre_vision_hidden),
                 (got.last_logits, want.last_logits)):
        torch.testing.assert_close(a.float().cpu(), b, atol=1e-4, rtol=1e-4)
    T = ids.shape[1]
    before = be.cache_tensors(got.cache)
    assert len(before) > 0 and all(t.shape[2] == T for t in before)   # [L, 1, T, ...]

    tok = int(want.last_logits.argmax())
    logits, cache = be.decode(tok, got.cache)
    ref_logits, _ = reference.decode(tok, want.cache)
    assert tuple(logits.shape) == (V,)
    torch.testing.assert_close(logits.float().cpu(), ref_logits, atol=1e-4, rtol=1e-4)
    assert all(t.shape[2] == T + 1 for t in be.cache_tensors(cache))


@pytest.mark.parametrize("name", BACKENDS)
def test_extend_only_where_declared_and_equal_to_a_whole_prefill(name, backends):
    be, _ = backends(name)
    cfg = be.config
    emb = torch.randn(6, cfg.hidden_size, generator=torch.Generator().manual_seed(1))
    ids = _prompt(cfg, 6)
    prefix, rest = ids[:, :3], ids[:, 3:]
    if not be.supports_extend:
        with pytest.raises(BackendError, match="no extend stage"):
            be.extend((), rest, emb)
        return
    past = tuple(t.clone() for t in be.cache_tensors(be.prefill(prefix, None).cache))
    kept = [t.clone() for t in past]
    part, whole = be.extend(past, rest, emb), be.prefill(ids, emb)
    for a, b in ((part.vision_hidden, whole.vision_hidden), (part.pre_vision_hidden, whole.pre_vision_hidden),
                 (part.last_logits, whole.last_logits)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(kept, past))   # the prefix is only read


@pytest.mark.parametrize("name", BACKENDS)
def test_batched_stages_only_where_declared_and_equal_to_one_call_each(name, backends):
    """fp32 throughout: each image's rows go through the same operations as in its own call
    (the torch tower attends per image); only the GEMMs see more rows, which may change the
    summation order of the library's blocking, so 1e-5 (a few fp32 ulps of these magnitudes)."""
    be, _ = backends(name)
    cfg = be.config
    gen = torch.Generator().manual_seed(2)
    grids = [GRID, GRID, GRID]
    n = GRID[0] * GRID[1]
    px = [torch.randn(n, 768, generator=gen) for _ in grids]
    if be.supports_image_batch:
        packed = be.encode_image(torch.cat(px), build_vision_meta(grids, cfg.vision_config))
        one = [be.encode_image(p, build_vision_meta([GRID], cfg.vision_config)) for p in px]
        torch.testing.assert_close(packed.float().cpu(), torch.cat(one).float().cpu(), atol=1e-5, rtol=1e-5)
    m = 6
    ids = _prompt(cfg, m)
    emb = torch.randn(len(grids) * m, cfg.hidden_size, generator=gen)
    batch = ids.expand(len(grids), -1)
    if not be.supports_prefill_batch:
        with pytest.raises(BackendError, match="no prefill_batch stage"):
            be.prefill_batch(batch, emb)
        return
    got = be.prefill_batch(batch, emb)
    assert len(got) == len(grids) and all(r.cache is None for r in got)
    for i, r in enumerate(got):
        want = be.prefill(ids, emb[i * m:(i + 1) * m])
        for a, b in ((r.vision_hidden, want.vision_hidden), (r.pre_vision_hidden, want.pre_vision_hidden),
                     (r.last_logits, want.last_logits)):
            torch.testing.assert_close(a.float().cpu(), b.float().cpu(), atol=1e-5, rtol=1e-5)
    if be.supports_extend:   # a kept prefix continued by every row, as extend continues it
        prefix, rest = ids[:, :3], ids[:, 3:]
        past = tuple(t.clone() for t in be.cache_tensors(be.prefill(prefix, None).cache))
        for i, r in enumerate(be.prefill_batch(rest.expand(len(grids), -1), emb, past=past)):
            want = be.extend(past, rest, emb[i * m:(i + 1) * m])
            torch.testing.assert_close(r.vision_hidden, want.vision_hidden, atol=1e-5, rtol=1e-5)
    uneven = torch.cat([ids, torch.where(ids == cfg.image_token_id, 40, ids)])
    with pytest.raises(BackendError, match="same number of image pads"):
        be.prefill_batch(uneven, emb[:m])


def test_predictor_refuses_an_object_that_is_no_backend(tiny_checkpoint):
    from densert.runtime.predictor import DensePredictor
    from densert.text.tokens import Vocab

    class Partial:       # the three stages, but none of the declared members
        name = "torch"

        def encode_image(self, pixel_values, meta): ...

        def prefill(self, input_ids, image_embeds): ...

        def decode(self, token_id, cache): ...

    with pytest.raises(OptionError, match="must implement densert.backend.Backend.*got Partial"):
        DensePredictor.from_backend(Partial(), Vocab.from_file(tiny_checkpoint))


def test_missing_engine_backend_is_a_clear_error(monkeypatch, tiny_checkpoint):
    from densert.runtime.backends import make_backend
    monkeypatch.setitem(sys.modules, "densert.export.ort_backend", None)   # as if not installed
    with pytest.raises(BackendError, match="backend 'onnxruntime' is not available in this install.*"
                                           "use --backend torch"):
        make_backend("onnxruntime", tiny_checkpoint)


def test_runtime_and_benchmarks_read_only_declared_members():
    """No probing of a backend's attributes: what the runtime asks is declared on ``Backend``."""
    probe = re.compile(r"\b(getattr|hasattr)\(\s*(self\.)?(backend|be|engine|eng)\b")
    found = [f"{p.relative_to(ROOT)}:{i}" for d in ("runtime", "benchmarks") for p in (ROOT / d).rglob("*.py")
             for i, line in enumerate(p.read_text().splitlines(), 1) if probe.search(line)]
    assert found == []
    sample = 'x = getattr(self.backend, "extend", None)'
    assert probe.search(sample)   # the pattern sees the probing it forbids
