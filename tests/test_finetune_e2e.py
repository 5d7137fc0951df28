"""The issue's must-show, end to end through the CLI: a dataset folder in every documented format,
the bundled model fine-tuned on it with --init (LoRA and full), its validation scores better than
the starting model's, and the exported merged checkpoint scoring what the run scored and loading in
`densert depth`, `inspect` and `export`. Slow (about a minute per run on 2 shared CPU cores); prints the table:

    .venv/bin/python -m pytest -m slow tests/test_finetune_e2e.py -s
"""
import json

import pytest

from densert.cli import main
from densert.resources import bundled_model_dir

pytest.importorskip("peft")
pytest.importorskip("pycocotools")

SIZE = "128x160"
COMMON = ["--batch", "4", "--image-size", SIZE, "--threads", "1", "--no-progress", "--warmup", "5",
          "--eval-every", "0", "--export-dtype", "float32"]
RUNS = {"lora": ["--lora-rank", "16", "--lora-alpha", "32", "--lr", "2e-3", "--steps", "90"],
        "full": ["--lr", "1e-3", "--steps", "60"]}


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    from densert.training.example_data import write_example
    root = tmp_path_factory.mktemp("e2e") / "warehouse"
    write_example(root, n=16, size=(96, 128), seed=0)
    return root


@pytest.fixture(scope="module")
def base(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("base") / "base.json"
    assert main(["eval", "--model", str(bundled_model_dir()), "--data", str(dataset), "--image-size",
                 SIZE, "--threads", "1", "--json", str(out)]) == 0
    return json.loads(out.read_text())


def _headline(scores: dict) -> dict:
    r = scores["datasets"][0]
    return {"delta1": r["depth"]["delta1"], "abs_rel": r["depth"]["abs_rel"],
            "miou": r["segment"]["miou"], "ciou": r["refer"]["ciou"],
            "ciou_gt_box": r["refer"]["ciou_gt_box"], "score": scores["score"]}


@pytest.mark.slow
@pytest.mark.parametrize("run", list(RUNS))
def test_finetune_improves_validation_and_exports_a_loadable_checkpoint(run, dataset, base, tmp_path):
    out, exp = tmp_path / "run", tmp_path / "export"
    assert main(["train", "--out", str(out), "--init", str(bundled_model_dir()), "--data",
                 str(dataset), "--export", str(exp), *COMMON, *RUNS[run]]) == 0
    summary = json.loads((out / "train_summary.json").read_text())
    before, after = _headline(base), _headline(summary["eval"])
    print(f"\n{run}: " + ", ".join(f"{k} {before[k]:.3f} -> {after[k]:.3f}" for k in before))
    print((out / "eval.md").read_text())
    assert after["delta1"] > before["delta1"] + 0.05 and after["abs_rel"] < before["abs_rel"]
    assert after["miou"] > before["miou"] + 0.05
    assert after["ciou_gt_box"] > before["ciou_gt_box"] + 0.05
    assert after["score"] > before["score"]
    assert (out / "best" / "model.safetensors").is_file() and summary["best"]["step"] == summary["steps_done"]
    # the merged export scores what the run scored, and every command loads it
    exp_json = tmp_path / "export.json"
    assert main(["eval", "--model", str(exp), "--data", str(dataset), "--threads", "1",
                 "--json", str(exp_json)]) == 0
    again = _headline(json.loads(exp_json.read_text()))
    for k in after:
        assert again[k] == pytest.approx(after[k], abs=0.02), k
    image = sorted((dataset / "images").iterdir())[-1]
    assert main(["depth", str(image), "--model", str(exp), "--preset", "nyuv2", "--out",
                 str(tmp_path / "depth")]) == 0
    assert (tmp_path / "depth" / f"{image.stem}.depth.npy").is_file()
    assert main(["inspect", str(exp)]) == 0
    assert main(["export", "--model", str(exp), "--out", str(tmp_path / "engines")]) == 0
    assert (tmp_path / "engines" / "manifest.json").is_file()
