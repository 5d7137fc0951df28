"""Test checkpoints, writing, strict loading, corrupt-checkpoint errors and ``densert inspect``."""
from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file, save_file

import densert
from densert.checkpoint.loader import load_model
from densert.checkpoint.model_dir import INDEX_FILE, write_checkpoint
from densert.checkpoint.random_init import make_test_checkpoint
from densert.cli import main as cli_main
from densert.errors import CheckpointError
from densert.model.vision_meta import build_vision_meta, num_image_tokens


@pytest.fixture
def ckpt(tiny_checkpoint, tmp_path):
    """A private copy of the shared tiny checkpoint, free to break."""
    return shutil.copytree(tiny_checkpoint, tmp_path / "ckpt")


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    cfg.update(changes)
    (path / "config.json").write_text(json.dumps(cfg))


def _inspect_rc(path, capsys) -> tuple[int, str]:
    rc = cli_main(["inspect", str(path)])
    cap = capsys.readouterr()
    return rc, cap.out + cap.err


# ---------------------------------------------------------------- round trips
def test_tiny_round_trip_and_forward(tiny_checkpoint):
    m = densert.load_model(tiny_checkpoint)           # the lazy re-export
    assert not m.training
    disk = load_file(tiny_checkpoint / "model.safetensors")   # the reference reader
    sd = m.state_dict()
    assert "lm_head.weight" not in disk and m.lm_head.weight is m.model.embed_tokens.weight
    assert set(disk) == set(sd) - {"lm_head.weight"}
    for k, v in disk.items():
        assert v.dtype == torch.bfloat16
        assert sd[k].dtype == torch.float32 and torch.equal(sd[k], v.float()), k

    cfg = m.config
    grid = (4, 6)
    meta = build_vision_meta([grid], cfg.vision_config)
    n_img = num_image_tokens(*grid, cfg.vision_config)
    pixels = torch.randn(grid[0] * grid[1], cfg.vision_config.patch_dim,
                         generator=torch.Generator().manual_seed(0))
    ids = torch.tensor([[cfg.bos_token_id, cfg.vision_start_token_id] + [cfg.image_token_id] * n_img
                        + [cfg.vision_end_token_id, 5, 6]])
    out = m(ids, pixels, meta, logits="all")
    assert out.logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(out.logits).all()
    # HF-style init: std 0.02 normals for matrices, ones for norms, zeros for biases.
    emb = sd["model.embed_tokens.weight"]
    assert abs(emb.std().item() - 0.02) < 1e-3 and abs(emb.mean().item()) < 1e-3
    assert torch.equal(sd["model.norm.weight"], torch.ones(cfg.hidden_size))
    assert not sd["merger.mlp.0.bias"].any()


def test_load_dtypes(tiny_checkpoint):
    m = load_model(tiny_checkpoint, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    m16 = load_model(tiny_checkpoint, dtype="float16")
    assert {p.dtype for p in m16.parameters()} == {torch.float16}
    with pytest.raises(CheckpointError, match=r"dtype 'int8' is not supported"):
        load_model(tiny_checkpoint, dtype="int8")


def test_make_is_deterministic_per_seed(tmp_path, tiny_checkpoint):
    again = make_test_checkpoint(tmp_path / "a", "tiny", seed=0)
    other = make_test_checkpoint(tmp_path / "b", "tiny", seed=1)
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes(), name
    assert (other / "model.safetensors").read_bytes() != (again / "model.safetensors").read_bytes()


def test_write_checkpoint_sharded_round_trip(tiny_checkpoint, tmp_path):
    m = load_model(tiny_checkpoint)
    with torch.no_grad():   # an untied head and fp32 values that bf16 could not hold
        m.lm_head.weight = torch.nn.Parameter(m.model.embed_tokens.weight * 1.001 + 1e-5)
    m.config.tie_word_embeddings = False
    tok = (tiny_checkpoint / "tokenizer.json").read_text()
    out = write_checkpoint(m, tmp_path / "sharded", tok, dtype="float32", max_shard_bytes=3_000_000)
    index = json.loads((out / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 5 and not (out / "model.safetensors").exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(p.numel() * 4 for p in m.state_dict().values())
    assert "lm_head.weight" in index["weight_map"]
    for s in shards:
        part = load_file(out / s)   # readable by the reference implementation
        # A tensor larger than the limit gets a shard of its own (as HF does).
        assert len(part) == 1 or sum(t.numel() * 4 for t in part.values()) <= 3_000_000
    m2 = load_model(out)
    assert m2.lm_head.weight is not m2.model.embed_tokens.weight
    a, b = m.state_dict(), m2.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    for f in ("tokenizer_config.json", "special_tokens_map.json", "chat_template.json",
              "generation_config.json", "preprocessor_config.json"):
        json.loads((out / f).read_text())


def test_write_checkpoint_rejects_mismatched_tokenizer(tiny_checkpoint, tmp_path):
    m = load_model(tiny_checkpoint)
    m.config.image_token_id += 1
    with pytest.raises(CheckpointError, match=r"token ids disagree.*'image_token_id': \(\d+, \d+\)"):
        write_checkpoint(m, tmp_path / "x", tiny_checkpoint / "tokenizer.json")


def test_cli_make_refuses_non_empty_dir(tmp_path, capsys):
    out = tmp_path / "c"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert cli_main(["make-test-checkpoint", str(out), "--text-layers", "1", "--vision-layers", "1"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert cli_main(["make-test-checkpoint", str(out), "--text-layers", "1", "--vision-layers", "1",
                     "--dtype", "float32", "--force", "--shard-mb", "4"]) == 0
    m = load_model(out)
    assert m.config.num_hidden_layers == 1 and m.config.vision_config.num_hidden_layers == 1
    assert m.config.vision_config.fullatt_block_indexes == [0]
    assert (out / INDEX_FILE).is_file()


# ---------------------------------------------------------------- tied head, ignored keys
def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def test_ignored_keys_and_equal_tied_head_are_accepted(ckpt, capsys):
    def add(sd):
        sd["siglip2.vision_model.embeddings.position_embedding.weight"] = torch.zeros(16, 192)
        sd["siglip2.vision_model.embeddings.position_ids"] = torch.arange(16)[None]
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    _rewrite(ckpt, add)
    m = load_model(ckpt)
    assert m.lm_head.weight is m.model.embed_tokens.weight
    rc, out = _inspect_rc(ckpt, capsys)
    assert rc == 0 and "position_ids" in out and "also stored on disk" in out


def test_tied_head_that_differs_is_an_error(ckpt, capsys):
    _rewrite(ckpt, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"] + 1))
    with pytest.raises(CheckpointError, match="tie_word_embeddings=true but lm_head.weight differs"):
        load_model(ckpt)


def test_untied_without_head_is_missing(ckpt):
    _edit_config(ckpt, tie_word_embeddings=False)
    with pytest.raises(CheckpointError, match=r"missing 1 tensor\(s\): lm_head.weight"):
        load_model(ckpt)


# ---------------------------------------------------------------- broken checkpoints
def test_path_errors(tmp_path, capsys):
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        load_model(tmp_path / "nope")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="not a directory"):
        load_model(f)
    with pytest.raises(CheckpointError, match=r"not a checkpoint directory \(no config.json\)"):
        load_model(tmp_path)
    for p in (tmp_path / "nope", f, tmp_path):
        rc, out = _inspect_rc(p, capsys)
        assert rc == 2 and "error" in out


def test_config_errors(ckpt):
    _edit_config(ckpt, model_type="llama")
    with pytest.raises(CheckpointError, match=r"config.json.*model_type is 'llama', expected 'youtu_vl'"):
        load_model(ckpt)
    (ckpt / "config.json").write_text('{"model_type": "youtu_vl",')
    with pytest.raises(CheckpointError, match=r"config.json: not valid JSON"):
        load_model(ckpt)


def test_missing_unexpected_and_shape_mismatch_listed_together(ckpt):
    def break_(sd):
        sd["model.layers.0.mlp.gate_proj.weightt"] = sd.pop("model.layers.0.mlp.gate_proj.weight")
        del sd["model.norm.weight"]
        sd["merger.ln_q.weight"] = torch.ones(7)
        sd["model.layers.1.mlp.up_proj.weight"] = sd["model.layers.1.mlp.up_proj.weight"][:10]
    _rewrite(ckpt, break_)
    with pytest.raises(CheckpointError) as e:
        load_model(ckpt)
    msg = str(e.value)
    assert "missing 2 tensor(s): model.layers.0.mlp.gate_proj.weight, model.norm.weight" in msg
    assert "unexpected 1 tensor(s): model.layers.0.mlp.gate_proj.weightt" in msg
    assert "merger.ln_q.weight: checkpoint [7] vs model [192]" in msg
    assert "model.layers.1.mlp.up_proj.weight: checkpoint [10, 256] vs model [768, 256]" in msg


def test_config_shape_mismatch(ckpt, capsys):
    _edit_config(ckpt, intermediate_size=512)
    with pytest.raises(CheckpointError, match=r"12 shape mismatch\(es\).*gate_proj.weight: checkpoint "
                                              r"\[768, 256\] vs model \[512, 256\]"):
        load_model(ckpt)
    assert _inspect_rc(ckpt, capsys)[0] == 2


def test_unsupported_dtype_on_disk(ckpt):
    _rewrite(ckpt, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(256, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"unsupported dtype.*model.norm.weight \(I32\)"):
        load_model(ckpt)


def test_header_garbage(ckpt, capsys):
    p = ckpt / "model.safetensors"
    data = bytearray(p.read_bytes())
    data[8:40] = b"\xff" * 32
    p.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model.safetensors: safetensors header is not valid JSON"):
        load_model(ckpt)
    p.write_bytes(struct.pack("<Q", 10**12) + b"{}")
    with pytest.raises(CheckpointError, match=r"header length field says 1000000000000 bytes"):
        load_model(ckpt)
    p.write_bytes(b"abc")
    with pytest.raises(CheckpointError, match=r"3 bytes, too short"):
        load_model(ckpt)
    rc, out = _inspect_rc(ckpt, capsys)
    assert rc == 2 and "too short" in out


def test_truncated_file(ckpt, capsys):
    p = ckpt / "model.safetensors"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match=r"model.safetensors: truncated: tensor '.*' needs data "
                                              r"bytes up to \d+ but the file holds only \d+"):
        load_model(ckpt)
    rc, out = _inspect_rc(ckpt, capsys)
    assert rc == 2 and "truncated" in out


def test_index_naming_missing_shard(tmp_path, capsys):
    out = make_test_checkpoint(tmp_path / "s", "tiny", text_layers=1, vision_layers=1,
                               max_shard_bytes=2_000_000)
    index = json.loads((out / INDEX_FILE).read_text())
    last = sorted(set(index["weight_map"].values()))[-1]
    (out / last).unlink()
    with pytest.raises(CheckpointError, match=rf"names shard\(s\) that do not exist.*{last}"):
        load_model(out)
    rc, err = _inspect_rc(out, capsys)
    assert rc == 2 and last in err
    (out / INDEX_FILE).write_text("{")
    with pytest.raises(CheckpointError, match=r"model.safetensors.index.json: not valid JSON"):
        load_model(out)


def test_no_weights(ckpt):
    (ckpt / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no weights \(model.safetensors"):
        load_model(ckpt)


# ---------------------------------------------------------------- inspect
def test_inspect_json(tiny_checkpoint, capsys):
    assert cli_main(["inspect", str(tiny_checkpoint), "--json"]) == 0
    s = json.loads(capsys.readouterr().out)
    m = load_model(tiny_checkpoint)
    by_part = m.num_parameters_by_part()
    assert s["parameters"] == {"siglip2": by_part["siglip2"], "merger": by_part["merger"],
                               "model": by_part["model"], "lm_head": 0}
    assert s["tied_lm_head"] is True and s["dtypes_on_disk"] == {"BF16": s["parameters_total"]}
    assert s["config_token_ids"]["image_token_id"] == m.config.image_token_id
    tok = s["tokenizer"]
    assert tok["special_ids"]["<|image_pad|>"] == m.config.image_token_id
    assert tok["depth_bins"]["last"] - tok["depth_bins"]["first"] == 999
    assert tok["depth_bins"]["contiguous"]


# ---------------------------------------------------------------- full width (slow)
@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads VmHWM from /proc")
def test_youtu_width_two_layers_loads_within_memory_budget(tmp_path):
    """Real widths (embed 283386 x 2560) with 2+2 layers: ~1.9 GB bf16 on disk.

    Loading runs in a fresh process; the peak is VmHWM of that process (ru_maxrss would inherit
    the parent's peak across fork+exec on Linux). The budget is 1.3x the weights on disk plus the
    RSS of the process before loading (python + torch + densert).
    """
    out = make_test_checkpoint(tmp_path / "big", "youtu-vl-4b", text_layers=2, vision_layers=2)
    code = textwrap.dedent(f"""
        import json, os, time, torch
        import densert.checkpoint.loader, densert.model.modeling
        def hwm():
            for line in open("/proc/self/status"):
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
        base = hwm()
        t = time.time()
        m = densert.load_model({str(out)!r}, dtype="bfloat16")
        load_s = time.time() - t
        peak = hwm()
        c = m.config
        ids = torch.tensor([[c.bos_token_id, 11, 12, 13, c.eos_token_id]])
        with torch.no_grad():
            lg = m(ids, logits="last").logits
        print(json.dumps({{"base": base, "peak": peak, "load_s": load_s,
                          "file": os.path.getsize({str(out / "model.safetensors")!r}),
                          "shape": list(lg.shape), "finite": bool(torch.isfinite(lg).all())}}))
    """)
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    res = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\nfile {res['file'] / 2**20:.0f} MiB, RSS before {res['base'] / 2**20:.0f} MiB, "
          f"peak {res['peak'] / 2**20:.0f} MiB, load {res['load_s']:.1f} s")
    assert res["shape"] == [1, 1, 283386] and res["finite"]
    assert res["peak"] - res["base"] <= 1.3 * res["file"] + 64 * 2**20
