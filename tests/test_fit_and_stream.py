"""Running a model that barely fits: ``--dtype auto``, the memory check before loading, the
streamed-layer model the parity gate uses as reference, and the checkpoint's table read
through a memory map."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from densert.checkpoint.loader import auto_dtype, check_fits, load_model
from densert.checkpoint.model_dir import read_all_headers
from densert.checkpoint.safetensors import MappedTensor
from densert.errors import CheckpointError
from densert.machine import MEMORY_ENV, cpu_computes_bf16, parse_bytes


def test_streamed_model_computes_what_the_loaded_one_does(tiny_checkpoint):
    from densert.model.vision_meta import build_vision_meta
    whole = load_model(tiny_checkpoint, "float32")
    streamed = load_model(tiny_checkpoint, "float32", streamed=True)
    # between forwards the layers hold no weights
    assert all(p.device.type == "meta" for p in streamed.model.layers[0].parameters())
    cfg = whole.config
    meta = build_vision_meta([(8, 12)], cfg.vision_config)
    px = torch.randn(96, cfg.vision_config.patch_dim, generator=torch.Generator().manual_seed(0))
    n = 96 // cfg.vision_config.merge_unit
    ids = torch.tensor([[cfg.bos_token_id, cfg.vision_start_token_id, *[cfg.image_token_id] * n,
                         cfg.vision_end_token_id, 17]])
    with torch.no_grad():
        a = whole(ids, px, meta, logits="all")
        b = streamed(ids, px, meta, logits="all")
    torch.testing.assert_close(a.logits, b.logits, rtol=0, atol=0)
    assert all(p.device.type == "meta" for p in streamed.model.layers[0].parameters())


def test_auto_dtype_follows_the_checkpoint_where_the_cpu_computes_it(tiny_checkpoint):
    want = torch.bfloat16 if cpu_computes_bf16() else torch.float32   # the test checkpoint is bf16
    assert auto_dtype(tiny_checkpoint, "cpu") == want


def test_a_model_that_does_not_fit_stops_before_loading(tiny_checkpoint, monkeypatch):
    from densert.runtime.backends import make_backend
    monkeypatch.setenv(MEMORY_ENV, "1M")
    with pytest.raises(CheckpointError,
                       match=r"needs about .* GiB at float32 .* is available \(\$DENSERT_MAX_MEMORY=1M\)"):
        make_backend("torch", tiny_checkpoint, "float32", device="cpu", max_patches=1024)


def test_fit_check_names_the_dtype_that_fits(tiny_checkpoint, monkeypatch):
    need32 = check_fits(tiny_checkpoint, "float32", max_patches=1024)
    need16 = check_fits(tiny_checkpoint, "bfloat16", max_patches=1024)
    assert need16 < need32
    # a cap between the two: float32 is refused, and the message names bfloat16
    from densert.machine import resident_bytes
    monkeypatch.setenv(MEMORY_ENV, str(resident_bytes() + (need16 + need32) // 2))
    with pytest.raises(CheckpointError, match="--dtype bfloat16 needs"):
        check_fits(tiny_checkpoint, "float32", max_patches=1024)
    assert check_fits(tiny_checkpoint, "bfloat16", max_patches=1024) == need16


def test_parse_bytes():
    assert parse_bytes("8G") == 8 << 30 and parse_bytes("512MiB") == 512 << 20 and parse_bytes("1000") == 1000


def test_mapped_table_rows_equal_the_loaded_ones(tiny_checkpoint):
    m = load_model(tiny_checkpoint, "float32")
    t = MappedTensor(read_all_headers(tiny_checkpoint)["model.embed_tokens.weight"])
    w = m.model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(t[3:9], w[3:9])
    np.testing.assert_array_equal(t[np.array([5, 1, 7])], w[[5, 1, 7]])
    np.testing.assert_array_equal(t.T[:, 2:4], w[2:4].T)
    assert t.T.shape == w.T.shape


def test_inspect_engine_dir_reports_sizes_per_part(tiny_checkpoint, tmp_path, capsys):
    from densert.cli import main
    from densert.export.onnx_export import export_engine
    m = export_engine(tiny_checkpoint, tmp_path / "e", precision="int4", tasks=["depth"], progress=False)
    assert set(m["sizes"]) == {"decoder", "heads", "table", "vision"}
    assert main(["inspect", str(tmp_path / "e")]) == 0
    out = capsys.readouterr().out
    assert "precision   int4" in out and "table" in out and "decoder" in out
