"""Scores on datasets on disk, through the runtime's own task flows (``DensePredictor``), so a score
is what ``densert depth / segment / refer`` give on those images (method spec sec. 5 metrics):

* depth: delta1, AbsRel, RMSE at the ground truth's resolution, with each image's preset and
  focal length from meta.json;
* segment: closed set over every class of classes.txt (argmax over all of them, not only the ones
  present), IoU per class accumulated over the split, mIoU over classes seen;
* refer: cIoU of the full flow (grounding answer -> box -> crop -> core target), and cIoU with the
  ground-truth box in place of the grounding answer (the crop pass alone, the part NTP-M trains);
  ``boxes_parsed`` counts grounding answers that held a box.

``score`` (the best checkpoint's criterion) is the mean of delta1, mIoU and cIoU over the
datasets' tasks. Results are JSON (``to_json``) and a short Markdown table (``markdown``).
"""
from __future__ import annotations

import math
import time
import warnings

import numpy as np
import torch

from densert.tasks.depth_bins import get_preset
from densert.text import tokens

from .metrics import CIoUMeter, DepthMeter, SegmentationMeter
from .userdata import UserData, mask_box

HEADLINE = {"depth": "delta1", "segment": "miou", "refer": "ciou"}
# Grounding answers are short (<box> + 4 coordinates); an untrained model that never stops is
# cut here instead of at the runtime's 256 tokens.
EVAL_MAX_NEW_TOKENS = 32


def predictor_for(model, vocab: tokens.Vocab, cap: int, alignment: str):
    """A ``DensePredictor`` over an in-memory torch model (puts it in eval mode)."""
    from densert.backend import TorchBackend
    from densert.runtime.options import DenseOptions
    from densert.runtime.predictor import DensePredictor
    return DensePredictor.from_backend(TorchBackend(model), vocab, DenseOptions(alignment=alignment),
                                       max_patches=cap, max_new_tokens=EVAL_MAX_NEW_TOKENS)


@torch.no_grad()
def core_target_mask(pred, image: np.ndarray, box) -> np.ndarray:
    """The referring crop pass for a known box: the runtime's own second half of
    ``DensePredictor.refer`` (crop, JPEG as the demo sends it, "Segment the core target.", FG pasted
    back, DenseCRF with the crop's pixels when on), with the same options and box colour."""
    from densert.runtime.speed import Timings
    rng = np.random.default_rng(pred.options.seed)
    return pred._core_target(image, box, rng, Timings())[0]


def evaluate_dataset(pred, ds: UserData, split: str = "val", tasks=("depth", "segment", "refer")
                     ) -> dict:
    items = ds.items(split, tasks)
    out: dict = {"name": ds.name, "path": str(ds.root), "split": split}
    t0 = time.time()
    dep, seg = DepthMeter(), (SegmentationMeter(len(ds.class_names), ds.ignore_index)
                              if ds.class_names else None)
    full, gt_box = CIoUMeter(), CIoUMeter()
    n = {"depth": 0, "segment": 0, "refer": 0}
    parsed = 0
    for it in items:
        image = ds.image(it.stem)
        n[it.task] += 1
        if it.task == "depth":
            preset, focal = ds.depth_setting(it.stem)
            open_world = get_preset(preset).focal is not None
            r = pred.depth(image, preset=preset, focal=focal if open_world else None)
            dep.update(r.depth, ds.depth_map(it.stem))
        elif it.task == "segment":
            r = pred.segment(image, classes=ds.class_names)
            seg.update(r.labels.astype(np.int64), ds.label_map(it.stem))
        else:
            mask = ds.expression_mask(it.expr)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # "no box in the grounding answer": counted below
                r = pred.refer(image, ds.expressions[it.expr].text)
            parsed += r.box is not None
            full.update(r.mask, mask)
            gt_box.update(core_target_mask(pred, image, mask_box(mask)), mask)
    if n["depth"]:
        d = dep.result()
        out["depth"] = {"images": n["depth"], "delta1": d["delta1"], "abs_rel": d["abs_rel"],
                        "rmse": d["rmse"]}
    if n["segment"]:
        iou = seg.per_class_iou()
        out["segment"] = {"images": n["segment"], "miou": seg.miou(),
                          "iou": {c: (None if math.isnan(v) else float(v))
                                  for c, v in zip(ds.class_names, iou)}}
    if n["refer"]:
        out["refer"] = {"expressions": n["refer"], "ciou": full.ciou(), "ciou_gt_box": gt_box.ciou(),
                        "boxes_parsed": parsed}
    out["eval_seconds"] = time.time() - t0
    return out


def evaluate_datasets(model, vocab: tokens.Vocab, datasets: list[UserData], cap: int, alignment: str,
                      split: str = "val", tasks=("depth", "segment", "refer")) -> dict:
    pred = predictor_for(model, vocab, cap, alignment)
    rows = [evaluate_dataset(pred, ds, split, tasks) for ds in datasets]
    return {"split": split, "max_patches": cap, "alignment": alignment, "datasets": rows,
            "score": score(rows)}


def score(rows: list[dict]) -> float:
    vals = [r[t][k] for r in rows for t, k in HEADLINE.items() if t in r]
    vals = [v for v in vals if v is not None and not math.isnan(v)]
    return float(np.mean(vals)) if vals else float("nan")


def _f(v, digits: int = 3) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def markdown(result: dict, title: str | None = None) -> str:
    lines = [f"### {title}", ""] if title else []
    lines += ["| dataset | split | task | n | delta1 | AbsRel | RMSE (m) | mIoU | cIoU | "
              "cIoU (gt box) |", "|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    per_class = []
    for r in result["datasets"]:
        pre = f"| {r['name']} | {r['split']} "
        if "depth" in r:
            d = r["depth"]
            lines.append(pre + f"| depth | {d['images']} | {_f(d['delta1'])} | {_f(d['abs_rel'])} | "
                         f"{_f(d['rmse'], 2)} | | | |")
        if "segment" in r:
            s = r["segment"]
            lines.append(pre + f"| segment | {s['images']} | | | | {_f(s['miou'])} | | |")
            per_class.append(f"- {r['name']} IoU per class: " + ", ".join(
                f"{c} {_f(v)}" if v is not None else f"{c} -" for c, v in s["iou"].items()))
        if "refer" in r:
            f = r["refer"]
            lines.append(pre + f"| refer | {f['expressions']} | | | | | {_f(f['ciou'])} | "
                         f"{_f(f['ciou_gt_box'])} |")
    lines += ["", f"score (mean of delta1, mIoU, cIoU): {_f(result['score'])}"]
    if per_class:
        lines += [""] + per_class
    return "\n".join(lines) + "\n"
