"""Hostile engine directories and export targets: a damaged manifest, a file rewritten in place
with its mtime put back, an ``export --out`` that cannot become an engine directory and
``verify`` arguments without meaning are each one clear error (exit 2 on the CLI), before work."""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import pytest

from densert.cli import main
from densert.errors import DensertError, EngineError
from densert.export import manifest
from densert.resources import bundled_model_dir


def _one_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith(f"densert {command}: error: "), err
    assert "Traceback" not in err
    return lines[0].split("error: ", 1)[1]


def _manifest(d: Path, **drop_or_set) -> Path:
    """A manifest with a valid integrity hash (as a hand-edit that recomputes it would have)."""
    m = {"format": manifest.FORMAT, "format_version": manifest.FORMAT_VERSION, "precision": "fp32",
         "cache_layout": "latent", "io_float_dtype": "float32", "max_patches": 64,
         "max_window_slots": 4, "grids": [], "tasks": {}, "files": {}, "tied_table": {},
         "checkpoint": {"config_sha256": "a", "checkpoint_id": "b", "files": {}},
         "graphs": {g: {"file": f"{g}.onnx", "external_data": [], "inputs": [], "outputs": [],
                        "sha256": {}} for g in ("vision", "llm")}}
    for k, v in drop_or_set.items():
        if v is None:
            m.pop(k)
        else:
            m[k] = v
    d.mkdir(parents=True, exist_ok=True)
    for g in ("vision", "llm"):
        (d / f"{g}.onnx").write_bytes(b"x")
    manifest.write_manifest(d, m)
    return d


@pytest.mark.parametrize("change, words", [
    ({"graphs": None}, "'graphs' is missing, expected a JSON object"),
    ({"graphs": {"vision": {}}}, "no graph 'llm' in 'graphs'"),
    ({"max_patches": "64"}, "'max_patches' is a str, expected a JSON integer"),
    ({"checkpoint": {"path": "x"}}, "checkpoint.'config_sha256' is missing"),
])
def test_a_manifest_missing_fields_is_refused(change, words, tmp_path):
    d = _manifest(tmp_path / "eng", **change)
    with pytest.raises(EngineError, match=words.replace("(", r"\(")):
        manifest.read_manifest(d)


def test_a_manifest_without_graphs_through_the_predictor(tmp_path):
    pytest.importorskip("onnxruntime")
    from densert.runtime.predictor import DensePredictor
    d = _manifest(tmp_path / "eng", graphs=None)
    for f in ("config.json", "tokenizer.json"):
        (d / f).write_bytes((bundled_model_dir() / f).read_bytes())
    with pytest.raises(EngineError, match="'graphs' is missing"):
        DensePredictor(backend="onnxruntime", engine_dir=str(d))


def test_hash_cache_sees_a_rewrite_with_the_mtime_put_back(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"a" * 4096)
    before = manifest.file_sha256(f)
    st = f.stat()
    time.sleep(0.05)  # the kernel's change-time clock ticks coarsely
    with open(f, "r+b") as fh:  # same size, in place
        fh.seek(2000)
        fh.write(b"b")
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size
    after = manifest.file_sha256(f)
    assert after != before
    manifest._memo.clear()  # the on-disk table agrees
    assert manifest.file_sha256(f) == after


def test_export_out_is_checked_before_work(tmp_path):
    ck = bundled_model_dir()
    (tmp_path / "file").write_text("x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "old.onnx").write_text("x")
    ro = tmp_path / "ro"
    ro.mkdir()
    cases = {"": "--out is empty", str(tmp_path / "file"): "is an existing file",
             str(ck): "is the checkpoint directory itself",
             str(tmp_path / "full"): "is not empty; choose a new folder, or pass --force",
             str(tmp_path / "file" / "sub"): "is a file, so the folder cannot be created",
             "/proc/densert-nope": "cannot write in /proc"}
    for out, words in cases.items():
        with pytest.raises(EngineError, match=words):
            manifest.check_out_dir(out, ck)
    assert manifest.check_out_dir(tmp_path / "full", ck, force=True) == tmp_path / "full"
    assert manifest.check_out_dir(tmp_path / "new" / "eng", ck) == tmp_path / "new" / "eng"
    assert not (tmp_path / "new").exists()  # the check creates nothing


def test_export_cli_refuses_out_and_leaves_the_checkpoint_alone(tmp_path, capsys):
    pytest.importorskip("onnx")
    import shutil
    ck = shutil.copytree(bundled_model_dir(), tmp_path / "ck")
    before = sorted(p.name for p in ck.iterdir())
    for out in (str(ck), str(ck / "config.json"), ""):
        assert main(["export", "--model", str(ck), "--out", out]) == 2
        _one_line(capsys.readouterr().err, "export")
    assert sorted(p.name for p in ck.iterdir()) == before


def _verify_args(argv):
    from densert.cli import new_parser
    from densert.export.cli import configure
    p = new_parser("densert verify", "")
    configure(p, "verify")
    return p.parse_args(argv)


def test_verify_takes_the_readme_syntax_and_refuses_meaningless_values(capsys):
    a = _verify_args(["ENG", "--model", "CK", "a.png", "b.png"])
    assert (a.engine_dir, a.model, a.images) == ("ENG", "CK", ["a.png", "b.png"])
    assert a.grids is None
    for argv, words in ((["--grids", "0x0"], "both sides must be positive multiples of 2"),
                        (["--grids", "3x4"], "both sides must be positive multiples of 2"),
                        (["--decode-steps", "-5"], "-5 is below 0")):
        with pytest.raises(SystemExit) as e:
            _verify_args(["ENG", "--model", "CK", *argv])
        assert e.value.code == 2 and words in _one_line(capsys.readouterr().err, "verify")


def test_verify_default_grids_fit_the_engine_budget():
    from densert.export.options import VERIFY_GRIDS
    from densert.export.verify import default_grids
    assert default_grids({"max_patches": 36864, "grids": []}) == list(VERIFY_GRIDS)
    small = default_grids({"max_patches": 64, "grids": []})
    assert small and all(gh * gw <= 64 and gh % 2 == 0 and gw % 2 == 0 for gh, gw in small)
    assert default_grids({"max_patches": 64, "grids": [[8, 8]]}) == [(8, 8)]


def test_verify_refuses_grids_over_the_budget_and_negative_steps(tmp_path):
    from densert.export.verify import verify

    class Eng:
        manifest = {"precision": "fp32", "max_patches": 64, "grids": []}
    with pytest.raises(EngineError, match="--grids 12x20: over the engine's image budget of 64"):
        verify("E", "CK", grids=[(12, 20)], backend=Eng())
    with pytest.raises(DensertError, match="decode_steps must be an integer >= 0, got -5"):
        verify("E", "CK", decode_steps=-5, backend=Eng())


def test_manifest_written_by_export_passes_the_field_check(tmp_path):
    """The field list matches what ``densert export`` writes (the bundled model, a small engine)."""
    pytest.importorskip("onnx")
    from densert.export.onnx_export import export_engine
    eng = tmp_path / "eng"
    m = export_engine(bundled_model_dir(), eng, tasks=["chat"], image_size=("128x128",),
                      progress=False)
    assert manifest.read_manifest(eng)["graphs"].keys() == m["graphs"].keys()
    assert json.loads((eng / manifest.MANIFEST).read_text())["grids"] == [[8, 8]]
    # verify's own defaults fit this engine (they used to be bigger than its budget)
    from densert.export.verify import verify
    logs = []
    rep = verify(eng, bundled_model_dir(), decode_steps=1, log=logs.append)
    assert rep.ok and logs == ["verify: synthetic 128x128 (grid 8x8 patches, 16 image tokens)"]
    with pytest.raises(EngineError, match="is not empty"):
        export_engine(bundled_model_dir(), eng, tasks=["chat"], progress=False)


def test_argparse_type_errors_keep_the_option_message():
    from densert.cli import _type_error_says_why
    from densert.runtime.options import depth_range
    with pytest.raises(argparse.ArgumentTypeError, match="needs 0 <= MIN < MAX"):
        _type_error_says_why(depth_range)("3:1")
