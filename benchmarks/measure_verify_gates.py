"""The thresholds of ``densert verify``'s gate in the units users read (``export.verify.GATES``),
measured on the trained bundled densert-tiny.

For each precision (fp32, fp16, int8, int4) the bundled model is exported with ``densert export``
defaults and ``densert verify``'s metric gate (``training.engine_gate``) runs on its default
images (``GATE_SCENES``: eight
rendered scenes, 256x320): per image the engine's depth map in metres (AbsRel, delta1), its
closed-set label map (mIoU) and its first ``GATE_TOKENS`` greedy tokens of two generating prompts,
each against the fp32 torch reference through the same runtime calls. The gate compares the mean
over the images with a threshold; this script sets each threshold from the measured mean with a
margin (``threshold``): the error (AbsRel, or 1 - the agreement) allowed is twice the error
measured, never less than ``ERROR_FLOOR`` (room for a different CPU or ONNX Runtime build to
flip a few near-tie pixels or one greedy answer of the sixteen), rounded outward to 0.001.

A last row exports int4 again and reverses the order of its depth-bin head rows
(``corrupt_depth_rows``: the rows the runtime's depth head reads, kept exact beside the int4
table): the tensor checks still pass (the graph's own task scores do not read those rows), and
the metric gate has to fail it.

    python -m densert.benchmarks.measure_verify_gates --out benchmarks/results/verify_gates

writes ``verify_gates.json`` (every per-image number, the means, the thresholds) and
``verify_gates.md``. ``tests/test_verify_gates.py`` checks that ``export.verify.GATES`` equals
the thresholds in the JSON and that they follow from its means by ``threshold``.
"""
from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
import tempfile
import time
from pathlib import Path

from . import report

PRECISIONS = ("fp32", "fp16", "int8", "int4")
MARGIN = 2.0
ERROR_FLOOR = {"abs_rel": 0.005, "delta1": 0.005, "miou": 0.01, "tokens": 0.0625}


def error(metric: str, value: float) -> float:
    from densert.export.verify import GATE_AT_MOST
    return value if metric in GATE_AT_MOST else 1.0 - value


def threshold(metric: str, measured_mean: float) -> float:
    """The gate for ``metric`` from its measured mean (module docstring)."""
    from densert.export.verify import GATE_AT_MOST
    e = max(MARGIN * error(metric, measured_mean), ERROR_FLOOR[metric])
    e = math.ceil(round(e * 1000, 6)) / 1000
    return e if metric in GATE_AT_MOST else max(0.0, round(1.0 - e, 3))


def corrupt_depth_rows(engine_dir: str | Path) -> int:
    """Reverse the depth-bin rows among the engine's exact head rows (``tied_table.head_rows``
    of a quantized engine) and record the file's new sha256 in the manifest, as an exporter
    that wrote them in the wrong order would. Returns the number of rows moved."""
    import numpy as np

    from densert.export.manifest import read_manifest, write_manifest
    from densert.text.tokens import Vocab
    d = Path(engine_dir)
    m = read_manifest(d)
    head = m["tied_table"].get("head_rows")
    if head is None:
        raise ValueError(f"{d}: {m['precision']} engine has no exact head rows (only quantized "
                         "tables keep them); corrupt an int8 or int4 engine")
    depth_ids = set(Vocab.from_file(d).depth_bin_ids().tolist())
    pos = [k for k, i in enumerate(head["ids"]) if i in depth_ids]
    path = d / m["tied_table"]["file"]
    rows = np.memmap(path, dtype=np.float32, mode="r+", offset=head["offset"],
                     shape=tuple(head["shape"]))
    rows[pos] = rows[pos[::-1]].copy()
    rows.flush()
    del rows
    for info in m["graphs"].values():
        if path.name in info.get("sha256", {}):
            info["sha256"][path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    m.pop("integrity", None)
    write_manifest(d, m)
    return len(pos)


def measure(engine_dir: Path, model_dir: Path, model) -> dict:
    from densert.training.engine_gate import verify_engine
    t = time.perf_counter()
    # One small grid and one decode step: the tensor checks are not what is measured here.
    rep = verify_engine(engine_dir, model_dir, grids=((8, 8),), decode_steps=1, model=model,
                        log=lambda s: print(s, file=sys.stderr, flush=True))
    per_image = [{"image": label.strip("[]"), **vals} for label, vals in rep.metrics]
    keys = [k for k in per_image[0] if k != "image"]
    return {"tensors_ok": rep.tensors_ok, "per_image": per_image, "mean": rep.metric_means,
            "worst": {k: max((r[k] for r in per_image), key=lambda v: error(k, v)) for k in keys},
            "notes": rep.metric_notes, "seconds": round(time.perf_counter() - t, 1)}


def passes(mean: dict[str, float], gates: dict[str, float]) -> bool:
    from densert.export.verify import GATE_AT_MOST
    return all(v <= gates[k] if k in GATE_AT_MOST else v >= gates[k] for k, v in mean.items())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/verify_gates",
                    help="output stem: STEM.json and STEM.md")
    ap.add_argument("--work", default=None, help="where the engines go (default: a temporary folder)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    a = ap.parse_args(argv)
    import onnxruntime
    import torch

    from densert.checkpoint.loader import load_model
    from densert.export.onnx_export import export_engine
    from densert.machine import cpu_model, source_commit
    from densert.resources import bundled_model_dir
    from densert.training.engine_gate import GATE_SCENE_HW, GATE_SCENES, GATE_TOKENS
    if a.threads:
        torch.set_num_threads(a.threads)
    ck = bundled_model_dir()
    model = load_model(ck, torch.float32)
    work = Path(a.work or tempfile.mkdtemp(prefix="verify-gates-"))
    res: dict = {
        "command": "python -m densert.benchmarks.measure_verify_gates " + " ".join(argv or sys.argv[1:]),
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                    "loadavg_at_start": list(os.getloadavg()), "torch": torch.__version__,
                    "onnxruntime": onnxruntime.__version__},
        "commit": source_commit(), "model": "densert/assets/densert-tiny (bundled, trained)",
        "images": [f"render_scene({s}, {GATE_SCENE_HW[0]}, {GATE_SCENE_HW[1]})" for s in GATE_SCENES],
        "gate_tokens": GATE_TOKENS, "margin": MARGIN, "error_floor": ERROR_FLOOR,
        "precisions": {}, "thresholds": {},
    }
    for p in PRECISIONS:
        d = work / p
        if not (d / "manifest.json").is_file():
            export_engine(ck, d, precision=p, progress=False, model=model)
        res["precisions"][p] = measure(d, ck, model)
        res["thresholds"][p] = {k: threshold(k, v) for k, v in res["precisions"][p]["mean"].items()}
        print(p, res["precisions"][p]["mean"], flush=True)
    bad = work / "int4-reversed-depth-rows"
    if not (bad / "manifest.json").is_file():
        export_engine(ck, bad, precision="int4", progress=False, model=model)
        corrupt_depth_rows(bad)
    c = res["corrupted_int4"] = measure(bad, ck, model)
    c["gate_ok"] = passes(c["mean"], res["thresholds"]["int4"])
    report.save(res, report_md(res), a.out + ".json", a.out + ".md")
    print(report_md(res))
    return 0


def _fmt(k: str, v: float) -> str:
    return f"{v:.4f}" if k == "abs_rel" else f"{v * 100:.2f}%"


def report_md(r: dict) -> str:
    names = {"abs_rel": "depth AbsRel", "delta1": "depth delta1", "miou": "seg. mIoU",
             "tokens": "greedy tokens"}
    keys = list(names)
    m = r["machine"]
    out = ["# Thresholds of the metric gate of `densert verify`", "",
           f"Command: `{r['command']}` (commit {r['commit']}).", "",
           (f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} "
            f"threads), ONNX Runtime {m['onnxruntime']} (CPU); load average at start "
            f"{', '.join(f'{x:.1f}' for x in m['loadavg_at_start'])} (shared machine; the "
            "numbers are deterministic, only the time depends on it)."), "",
           (f"Model: {r['model']}; each engine exported with `densert export` defaults. "
            f"Reference: torch fp32 on the CPU. Images: {', '.join(r['images'])} "
            "(`training.engine_gate.GATE_SCENES`). Greedy tokens: the first "
            f"{r['gate_tokens']} of the segment-naming and core-target prompts."), "",
           "## Mean over the images and the thresholds set from it", "",
           f"Margin: allowed error = max({r['margin']:g} x measured error, floor), rounded outward "
           "to 0.001; error = AbsRel, or 1 - delta1 / mIoU / token agreement; floors "
           + ", ".join(f"{names[k]} {v:g}" for k, v in r["error_floor"].items()) + ".", "",
           "| precision | " + " | ".join(names[k] for k in keys) + " | worst image (AbsRel / delta1 / "
           "mIoU / tokens) | tensor checks | seconds |",
           "|---|" + "---:|" * len(keys) + "---|---|---:|"]
    for p, x in r["precisions"].items():
        th = r["thresholds"][p]
        cells = [f"{_fmt(k, x['mean'][k])} (gate {'<=' if k == 'abs_rel' else '>='} "
                 f"{_fmt(k, th[k])})" if k in x["mean"] else "-" for k in keys]
        worst = " / ".join(_fmt(k, x["worst"][k]) for k in keys if k in x["worst"])
        out.append(f"| {p} | " + " | ".join(cells) + f" | {worst} | "
                   f"{'pass' if x['tensors_ok'] else 'FAIL'} | {x['seconds']:.0f} |")
    c = r["corrupted_int4"]
    out += ["", "## A corrupted int4 engine", "",
            "int4 export with its depth-bin head rows reversed (`corrupt_depth_rows`), judged by the "
            "int4 gate: tensor checks " + ("pass" if c["tensors_ok"] else "FAIL") + ", verdict "
            + ("PASS" if c["gate_ok"] else "FAIL") + ".", "",
            "| " + " | ".join(names[k] for k in keys) + " |", "|" + "---:|" * len(keys),
            "| " + " | ".join(_fmt(k, c["mean"][k]) if k in c["mean"] else "-" for k in keys) + " |",
            "", "## Per image", "", "| precision | image | " + " | ".join(names[k] for k in keys) + " |",
            "|---|---|" + "---:|" * len(keys)]
    for p, x in [*r["precisions"].items(), ("int4, depth rows reversed", c)]:
        for row in x["per_image"]:
            out.append(f"| {p} | {row['image']} | "
                       + " | ".join(_fmt(k, row[k]) if k in row else "-" for k in keys) + " |")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    raise SystemExit(main())
