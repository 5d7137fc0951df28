"""Hostile option values: each is refused where its option is declared (the options dataclasses),
as an ``OptionError`` naming the option, so the CLI (one line, exit 2, before any model loads),
the API and the ROS parameters give the same answer."""
from __future__ import annotations

from pathlib import Path

import pytest

from densert.cli import main
from densert.errors import DensertError, OptionError
from densert.export.options import ExportOptions
from densert.runtime.options import DenseOptions, OutputOptions, PredictorOptions

SAMPLE = Path(__file__).resolve().parents[1] / "samples" / "scene_3.png"


def _one_line(err: str, command: str) -> str:
    lines = [ln for ln in err.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith(f"densert {command}: error: "), err
    assert "Traceback" not in err
    return lines[0].split("error: ", 1)[1]


@pytest.mark.parametrize("cls, kw, words", [
    (DenseOptions, {"temperature": 0}, "temperature must be a finite number > 0"),
    (DenseOptions, {"temperature": float("nan")}, "temperature must be a finite number > 0"),
    (DenseOptions, {"crf": "no"}, "crf must be True or False"),
    (DenseOptions, {"open_set_max_boxes": 0}, "open_set_max_boxes must be an integer >= 1"),
    (DenseOptions, {"crop_jpeg_quality": 101}, "crop_jpeg_quality must be an integer >= 1 and <= 100"),
    (DenseOptions, {"alignment": "x"}, "alignment 'x' is not one of"),
    (PredictorOptions, {"max_new_tokens": -1}, "max_new_tokens must be an integer >= 1, got -1"),
    (PredictorOptions, {"max_patches": 2}, "max_patches must be an integer >= 4"),
    (PredictorOptions, {"repetition_penalty": float("inf")}, "repetition_penalty must be a finite"),
    (PredictorOptions, {"device": "gpu"}, "device 'gpu': expected auto, cpu, cuda or cuda:N"),
    (PredictorOptions, {"device": 0}, "device must be a string"),
    (OutputOptions, {"range": (-5, 10)}, "needs 0 <= MIN < MAX < inf"),
    (OutputOptions, {"range": (1, float("inf"))}, "needs 0 <= MIN < MAX < inf"),
    (ExportOptions, {"image_size": ("99999x99999",)}, "over the processor's cap of 36864"),
    (ExportOptions, {"image_size": "480x640"}, "lists"),
    (ExportOptions, {"max_image_tokens": 0}, "max_image_tokens must be an integer >= 1"),
    (ExportOptions, {"tasks": ("depth", "fly")}, "unknown tasks"),
])
def test_options_dataclasses_refuse_with_the_field_named(cls, kw, words):
    with pytest.raises(OptionError) as e:
        cls(**kw)
    assert words in str(e.value)
    assert isinstance(e.value, DensertError) and isinstance(e.value, ValueError)


def test_range_parses_from_the_dataclass_and_keeps_good_values():
    assert OutputOptions(range="0.5:20").range == (0.5, 20.0)
    assert OutputOptions(range=(0, 3)).range == (0.0, 3.0)
    assert ExportOptions(image_size=("3072x3072",)).image_sizes == [(3072, 3072)]


@pytest.mark.parametrize("flags, words", [
    # A value that begins with a minus reaches the option's check instead of argparse's
    # "expected one argument".
    (["--range", "-5:10"], "range '-5:10' needs 0 <= MIN < MAX < inf"),
    (["--range", "1:0"], "range '1:0' needs 0 <= MIN < MAX < inf"),
    (["--max-new-tokens", "-1"], "max_new_tokens must be an integer >= 1"),
    (["--temperature", "-0.5"], "temperature must be a finite number > 0"),
    # The focal is named, not the image: it is checked once, before the inputs.
    (["--focal", "-3"], "focal: the focal length must be a positive number of pixels, got -3.0"),
    (["--focal", "nan"], "focal: the focal length must be a positive number of pixels"),
    (["--focal", "500", "--preset", "nyuv2"], "--focal applies to the open-world preset only"),
])
def test_depth_flags_are_one_line_before_the_model_and_leave_no_out(flags, words, tmp_path, capsys):
    out = tmp_path / "o"
    try:
        rc = main(["depth", str(SAMPLE), "--out", str(out), *flags])
    except SystemExit as e:  # argparse's own one-line exit
        rc = e.code
    err = capsys.readouterr().err
    assert rc == 2 and words in _one_line(err, "depth")
    assert "image" not in _one_line(err, "depth").split(":")[0] and not out.exists()


def test_duplicate_classes_are_refused(tmp_path, capsys):
    rc = main(["segment", str(SAMPLE), "--classes", "floor,wall,floor", "--out", str(tmp_path / "o")])
    assert rc == 2 and "'floor' given more than once" in _one_line(capsys.readouterr().err, "segment")
    assert not (tmp_path / "o").exists()


def test_export_image_size_over_the_cap_is_refused(tmp_path, capsys):
    pytest.importorskip("onnx")
    assert main(["export", "--model", "m", "--out", str(tmp_path / "e"), "--image-size",
                 "99999x99999"]) == 2
    assert "over the processor's cap of 36864" in _one_line(capsys.readouterr().err, "export")
