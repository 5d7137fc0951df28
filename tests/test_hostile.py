"""Hostile and awkward inputs through the CLI: every failure is one line with a non-zero exit,
no traceback, no partial result set, and every good image is still written."""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from densert.cli import main

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "scene_3.png"
DEPTH_FILES = (".depth.npy", ".depth.png", ".depth.txt", ".json")  # relative depth: no mm PNG


def _run(args, capsys):
    rc = main(args)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _one_line_error(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith(f"densert {command}: error: "), err
    assert "Traceback" not in err
    return lines[0].split("error: ", 1)[1]


def _png_header_only(path: Path, w: int, h: int) -> None:
    """A PNG that declares w x h pixels (a decompression bomb) with one tiny IDAT."""
    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr)
                     + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b""))


def _images(d: Path, n: int, hw=(48, 64)) -> list[Path]:
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        p = d / f"f{i:02d}.png"
        Image.fromarray(rng.integers(0, 256, (*hw, 3), np.uint8)).save(p)
        out.append(p)
    return out


def _complete_sets(out: Path, suffixes=DEPTH_FILES) -> set[str]:
    """Stems with every file of their set; fails on a partial set or a leftover temp file."""
    assert not [p for p in out.rglob("*") if p.name.endswith(".tmp")]
    stems = {p.name.split(".")[0] for p in out.iterdir() if p.is_file()}
    for s in stems:
        assert {p.name for p in out.glob(f"{s}.*")} == {s + x for x in suffixes}, s
    return stems


# ---------------------------------------------------------------- images
def test_bomb_first_in_a_directory_is_refused_before_the_model_loads(tiny_checkpoint, tmp_path, capsys):
    d = tmp_path / "in"
    _images(d, 1)
    _png_header_only(d / "aaa_bomb.png", 100_000, 100_000)
    out = tmp_path / "o"
    rc, _, err = _run(["depth", str(d), "--model", str(tiny_checkpoint), "--out", str(out)], capsys)
    assert rc == 1
    first = err.strip().splitlines()[0]
    assert first == (f"densert depth: error: {d / 'aaa_bomb.png'}: 100000x100000 = 10,000 MP is over "
                     "densert's limit of 100 MP (densert.image.MAX_IMAGE_PIXELS); downscale the image first")
    assert _complete_sets(out) == {"f00"} and "Traceback" not in err
    # Alone, the bomb ends the run before any model is loaded (a model whose weights are garbage
    # would otherwise fail with a checkpoint error, exit 2).
    broken = shutil.copytree(tiny_checkpoint, tmp_path / "broken")
    (broken / "model.safetensors").write_bytes(b"garbage")
    rc, _, err = _run(["depth", str(d / "aaa_bomb.png"), "--model", str(broken), "--out", str(out)], capsys)
    assert rc == 1 and "none of the 1 image(s) can be read" in err and "safetensors" not in err


def test_two_inputs_with_one_name_give_two_sets(tiny_checkpoint, tmp_path, capsys):
    a, b = _images(tmp_path / "a", 1), _images(tmp_path / "b", 1, hw=(32, 40))
    out = tmp_path / "o"
    rc, _, err = _run(["depth", str(a[0]), str(b[0]), "--model", str(tiny_checkpoint), "--out", str(out)], capsys)
    assert rc == 0, err
    assert "shares the name 'f00'" in err and "wrote results for 2 image(s)" in err
    assert np.load(out / "a" / "f00.depth.npy").shape == (48, 64)
    assert np.load(out / "b" / "f00.depth.npy").shape == (32, 40)


def test_focal_that_leaves_no_image_is_refused_before_loading(tiny_checkpoint, tmp_path, capsys):
    rc, _, err = _run(["depth", str(SAMPLE), "--model", str(tiny_checkpoint), "--focal", "1e9",
                       "--preset", "open-world", "--out", str(tmp_path / "o")], capsys)
    assert rc == 1 and "focal length 1e+09 px rescales the 320x256 image by 2e-06" in err


def test_bundled_model_declares_its_preset_and_says_it_is_a_demo(tmp_path, capsys):
    rc, _, err = _run(["depth", str(SAMPLE), "--out", str(tmp_path)], capsys)
    assert rc == 0 and "using the bundled demo model densert-tiny" in err
    side = json.loads((tmp_path / "scene_3.json").read_text())
    assert side["result"]["preset"] == "cityscapes" and side["model"]["demo"] is True
    assert (tmp_path / "scene_3.depth.mm.png").is_file()


def test_console_line_per_image_and_quiet(tiny_checkpoint, tmp_path, capsys):
    imgs = _images(tmp_path / "in", 2)
    rc, _, err = _run(["depth", *map(str, imgs), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "o")], capsys)
    lines = [ln for ln in err.splitlines() if " depth: preprocess " in ln]
    assert rc == 0 and len(lines) == 2 and all("prefill" in ln and "total" in ln for ln in lines)
    rc, _, err = _run(["depth", *map(str, imgs), "--model", str(tiny_checkpoint), "--out", str(tmp_path / "q"),
                       "--quiet"], capsys)
    assert rc == 0 and err == ""


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only refusal")
def test_cuda_on_a_cpu_build_is_one_line(tiny_checkpoint, tmp_path, capsys):
    rc, _, err = _run(["depth", str(SAMPLE), "--model", str(tiny_checkpoint), "--device", "cuda",
                       "--out", str(tmp_path / "o")], capsys)
    assert rc == 2 and "--device cuda: CUDA is not available here" in _one_line_error(err, "depth")


# ---------------------------------------------------------------- writing
def test_disk_full_is_one_line_and_the_batch_goes_on(tiny_checkpoint, tmp_path, capsys, monkeypatch):
    from densert.runtime import writers
    imgs = _images(tmp_path / "in", 3)
    real_npy, calls = writers.npy, []

    def npy(array):
        calls.append(1)
        if len(calls) == 2:  # the second image's array: the disk fills up half way through
            def full(f):
                f.write(b"\x93NUMPY")
                raise OSError(errno.ENOSPC, "No space left on device")
            return full
        return real_npy(array)

    monkeypatch.setattr(writers, "npy", npy)
    out = tmp_path / "o"
    rc, _, err = _run(["depth", *map(str, imgs), "--model", str(tiny_checkpoint), "--out", str(out)], capsys)
    assert rc == 1 and "Traceback" not in err
    assert f"error: {imgs[1]}: disk full while writing into {out}; nothing of this image was kept" in err
    assert _complete_sets(out) == {"f00", "f02"}


def test_unwritable_out_is_one_line(tiny_checkpoint, tmp_path, capsys):
    f = tmp_path / "file"
    f.write_text("x")
    rc, _, err = _run(["depth", str(SAMPLE), "--model", str(tiny_checkpoint), "--out", str(f / "o")], capsys)
    assert rc == 2 and _one_line_error(err, "depth") == f"cannot create output directory {f / 'o'}: Not a directory"


def test_sigterm_mid_run_leaves_only_whole_sets(tiny_checkpoint, tmp_path):
    imgs = _images(tmp_path / "in", 40)
    out = tmp_path / "o"
    p = subprocess.Popen([sys.executable, "-m", "densert", "depth", str(tmp_path / "in"), "--model",
                          str(tiny_checkpoint), "--out", str(out), "--quiet"],
                         stderr=subprocess.PIPE, text=True,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.time() + 120
    while time.time() < deadline and len(list(out.glob("*.json"))) < 3:
        time.sleep(0.02)
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    assert "interrupted" in err and "Traceback" not in err
    done = _complete_sets(out)
    assert 3 <= len(done) < len(imgs)


# ---------------------------------------------------------------- checkpoints
def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for k, v in changes.items():
        tgt = cfg
        *head, last = k.split(".")
        for h in head:
            tgt = tgt[h]
        if v is None and last.startswith("-"):
            tgt.pop(last[1:])
        else:
            tgt[last] = v
    (path / "config.json").write_text(json.dumps(cfg))


def _rewrite(path, fn):
    sd = load_file(path / "model.safetensors")
    fn(sd)
    save_file(sd, path / "model.safetensors", metadata={"format": "pt"})


def _header_edit(path, fn):
    f = path / "model.safetensors"
    data = f.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    h = json.loads(data[8:8 + n])
    fn(h)
    raw = json.dumps(h).encode()
    raw += b" " * (-len(raw) % 8)
    f.write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + n:])


def _overlap(h):
    """Point one tensor at another's bytes (same size): the file's data no longer tiles."""
    a, b = "model.layers.0.input_layernorm.weight", "model.layers.0.post_attention_layernorm.weight"
    h[b]["data_offsets"] = list(h[a]["data_offsets"])


BROKEN = {  # name -> (how to break a copy of the tiny checkpoint)
    "model_type": lambda p: _edit_config(p, model_type="llama"),
    "config_json": lambda p: (p / "config.json").write_text('{"model_type": "youtu_vl",'),
    "no_vision_config": lambda p: _edit_config(p, **{"-vision_config": None}),
    "zero_heads": lambda p: _edit_config(p, num_attention_heads=0),
    "string_size": lambda p: _edit_config(p, hidden_size="256"),
    "huge_layers": lambda p: _edit_config(p, num_hidden_layers=10**9),
    "zero_patch": lambda p: _edit_config(p, **{"vision_config.patch_size": 0}),
    "vision_zero_heads": lambda p: _edit_config(p, **{"vision_config.num_attention_heads": 0}),
    "nan_eps": lambda p: _edit_config(p, rms_norm_eps=float("nan")),
    "bool_string": lambda p: _edit_config(p, tie_word_embeddings="yes"),
    "zero_vocab": lambda p: _edit_config(p, vocab_size=0),
    "token_out_of_vocab": lambda p: _edit_config(p, image_token_id=10**6),
    "odd_window": lambda p: _edit_config(p, **{"vision_config.window_size": 100}),
    "fullatt_out_of_range": lambda p: _edit_config(p, **{"vision_config.fullatt_block_indexes": [9]}),
    "unknown_act": lambda p: _edit_config(p, hidden_act="swish7"),
    "rope_scaling": lambda p: _edit_config(p, rope_scaling={"type": "yarn"}),
    "shape_mismatch_by_config": lambda p: _edit_config(p, intermediate_size=512),
    "missing_tensor": lambda p: _rewrite(p, lambda sd: sd.pop("model.norm.weight")),
    "unexpected_tensor": lambda p: _rewrite(p, lambda sd: sd.__setitem__("model.extra", torch.ones(2))),
    "shape_mismatch": lambda p: _rewrite(p, lambda sd: sd.__setitem__("merger.ln_q.weight", torch.ones(7))),
    "int_dtype": lambda p: _rewrite(
        p, lambda sd: sd.__setitem__("model.norm.weight", torch.ones(256, dtype=torch.int32))),
    "header_garbage": lambda p: (p / "model.safetensors").write_bytes(
        (p / "model.safetensors").read_bytes()[:8] + b"\xff" * 64),
    "header_length": lambda p: (p / "model.safetensors").write_bytes(struct.pack("<Q", 10**12) + b"{}"),
    "too_short": lambda p: (p / "model.safetensors").write_bytes(b"abc"),
    "truncated": lambda p: (p / "model.safetensors").write_bytes((p / "model.safetensors").read_bytes()[:-1000]),
    "overlapping_offsets": lambda p: _header_edit(p, _overlap),
    "no_weights": lambda p: (p / "model.safetensors").unlink(),
    "no_config": lambda p: (p / "config.json").unlink(),
    "bad_index": lambda p: (p / "model.safetensors.index.json").write_text('{"weight_map": {"a": "nope.safetensors"}}'),
    "bad_tokenizer": lambda p: (p / "tokenizer.json").write_text("{not json"),
}


@pytest.mark.parametrize("case", sorted(BROKEN))
def test_broken_checkpoints_fail_the_same_way_everywhere(case, tiny_checkpoint, tmp_path, capsys):
    ck = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    BROKEN[case](ck)
    rc_i, _, err_i = _run(["inspect", str(ck)], capsys)
    rc_d, _, err_d = _run(["depth", str(SAMPLE), "--model", str(ck), "--out", str(tmp_path / "o")], capsys)
    assert rc_i == 2 and rc_d == 2
    assert _one_line_error(err_d, "depth") == _one_line_error(err_i, "inspect")
    assert not list((tmp_path / "o").glob("*")) if (tmp_path / "o").exists() else True


@pytest.mark.parametrize("case", ["nan", "inf", "tied_head_differs"])
def test_weights_broken_in_value_fail_at_load(case, tiny_checkpoint, tmp_path, capsys):
    ck = shutil.copytree(tiny_checkpoint, tmp_path / "ck")
    if case == "tied_head_differs":
        _rewrite(ck, lambda sd: sd.__setitem__("lm_head.weight", sd["model.embed_tokens.weight"] + 1))
        want = "tie_word_embeddings=true but lm_head.weight differs"
    else:
        def poison(sd):
            w = sd["model.layers.1.mlp.down_proj.weight"].clone()
            w[3, 4] = float(case)
            sd["model.layers.1.mlp.down_proj.weight"] = w
        _rewrite(ck, poison)
        want = "tensor 'model.layers.1.mlp.down_proj.weight' holds 1 non-finite value(s) (NaN/Inf)"
    rc, _, err = _run(["segment", str(SAMPLE), "--classes", "floor", "--model", str(ck), "--out",
                       str(tmp_path / "o")], capsys)
    assert rc == 2 and want in _one_line_error(err, "segment")
