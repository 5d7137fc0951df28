"""The gate of ``densert verify`` in the units users read: an engine against the fp32 torch
reference through the runtime's own task calls, with the thresholds of ``export.verify.GATES``.

Both backends run ``DensePredictor`` (its preprocessing, prompts, dense head and greedy decoding)
on the given images, else on ``GATE_SCENES`` (rendered scenes). Per image:

- depth (engines exported with ``depth``): the map in metres with the checkpoint's default
  preset (``densert depth``) -> AbsRel = mean |d_e - d_r| / d_r and delta1 = share with
  max(d_e / d_r, d_r / d_e) < 1.25, over the pixels where the reference depth is valid
  (``training.metrics.depth_errors``);
- segmentation (engines with ``segment``): the closed-set label map over ``classes`` (default
  the scenes' 26 classes; ``DenseOptions(fast=True, crf=False)``: every class scored in one
  prefill, the bilinear argmax) -> mIoU of the engine's map against the reference's over the
  classes present in either;
- greedy tokens (every engine): the first ``GATE_TOKENS`` tokens of ``gate_prompts``
  (``densert chat`` decoding: the checkpoint's repetition penalty, stop at EOS) -> the share of
  positions where both hold the same token, a sequence that stopped earlier counting as
  different at the positions it lacks.

The report's verdict compares the mean over the images with ``GATES``. A checkpoint that
``densert make-test-checkpoint`` marked as random weights, and whose engine was exported from
exactly those weights, is shown the numbers without being judged by them.

It lives here, above ``export`` and ``runtime`` (docs/architecture.md), because it needs the
predictor and the scene renderer; ``export.verify`` takes it as its ``after`` step.
"""
from __future__ import annotations

import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np

# Greedy tokens compared per prompt: a few answers' worth of the trained prompts' formats
# (``<ref>name</ref>`` lists, ``<ref><FG></ref>``), and short enough to keep verify quick.
GATE_TOKENS = 16
# The images of the gate when none are given, rendered by training.scenes.render_scene: the four
# shipped samples (samples/, seeds 0 3 4 6) and the first four held-out eval scenes
# (training.trainer.HELD_OUT_SEED_BASE + 0..3), at the samples' 256x320.
GATE_SCENES = (0, 3, 4, 6, 1_000_000_000, 1_000_000_001, 1_000_000_002, 1_000_000_003)
GATE_SCENE_HW = (256, 320)


def gate_images(images: Sequence[str] = ()) -> list[tuple[str, object]]:
    """(label, image) pairs of the gate: the given image files, else ``GATE_SCENES``."""
    if images:
        return [(Path(p).name, str(p)) for p in images]
    from .scenes import render_scene
    out = []
    for seed in GATE_SCENES:
        sc = render_scene(seed, *GATE_SCENE_HW)
        out.append((f"scene {seed} ({sc.kind})", sc.image))
    return out


def gate_prompts(classes: Sequence[str]) -> list[tuple[str, str]]:
    """(name, text) of the generating prompts whose greedy tokens are compared: segmentation's
    naming pass (closed set over ``classes``) and the referring flow's second pass."""
    from densert.tasks import prompts
    return [("segment naming", prompts.semantic(list(classes)).text),
            ("core target", prompts.core_target().text)]


def label_miou(got: np.ndarray, ref: np.ndarray, n_classes: int) -> float:
    """mIoU of label map ``got`` against ``ref`` over the classes present in either."""
    from .metrics import SegmentationMeter
    meter = SegmentationMeter(n_classes, ignore_label=-1)
    meter.update(got, ref)
    return meter.miou()


def token_agreement(ref: Sequence[int], got: Sequence[int], n: int = GATE_TOKENS) -> float:
    """Share of the first ``n`` positions where both greedy sequences hold the same token; a
    sequence that stopped earlier differs at the positions it lacks."""
    a, b = list(ref)[:n], list(got)[:n]
    total = max(len(a), len(b))
    return sum(x == y for x, y in zip(a, b)) / total if total else 1.0


def image_metrics(eng_pred, ref_pred, image, tasks: Sequence[str], classes: Sequence[str]
                  ) -> dict[str, float]:
    """One image through the runtime's task calls on both predictors -> {metric: value}."""
    from .metrics import depth_errors
    out: dict[str, float] = {}
    if "depth" in tasks:
        d_ref, d_eng = ref_pred.depth(image).depth, eng_pred.depth(image).depth
        e = depth_errors(d_eng, d_ref)
        if e is not None:   # a reference map without a valid pixel has nothing to compare
            out["abs_rel"], out["delta1"] = e["abs_rel"], e["delta1"]
    if "segment" in tasks:
        s_ref = ref_pred.segment(image, classes=list(classes))
        s_eng = eng_pred.segment(image, classes=list(classes))
        out["miou"] = label_miou(s_eng.labels, s_ref.labels, len(classes))
    agree = [token_agreement(ref_pred.chat(image, text, max_new_tokens=GATE_TOKENS).token_ids,
                             eng_pred.chat(image, text, max_new_tokens=GATE_TOKENS).token_ids)
             for _, text in gate_prompts(classes)]
    out["tokens"] = sum(agree) / len(agree)
    return out


def metric_gate(model_dir: str | Path, images: Sequence[str] = (),
                classes: Sequence[str] | None = None, log=print):
    """The ``after`` step of ``export.verify.verify`` that measures the gate into its report.
    Checks its arguments and reads the random-weights mark now, before any model runs."""
    from densert.checkpoint.random_init import read_random_mark
    from densert.errors import OptionError
    from densert.runtime.predictor import class_names
    if classes is None:
        from .classes import CLASS_NAMES
        classes = list(CLASS_NAMES)
    else:
        classes = class_names(classes)
        if not classes:
            raise OptionError("verify: classes is empty; give at least one class name, or none "
                              "for the scenes' classes")
    mark = read_random_mark(model_dir)

    def after(rep, eng, ref, m: dict) -> None:
        from densert.runtime.options import DenseOptions
        from densert.runtime.predictor import DensePredictor
        from densert.text.tokens import Vocab
        # The engine was checked against model_dir's files when it was opened, so the hashes
        # its manifest recorded are those of the weights at hand.
        weights = {n: h for n, h in m["checkpoint"]["files"].items() if n.endswith(".safetensors")}
        rep.random_weights = bool(mark and mark.describes(weights))
        if mark and not rep.random_weights:
            rep.metric_notes.append(f"{mark.path.name} does not describe the weights this engine "
                                    "was exported from, so they are judged as trained")
        vocab = Vocab.from_file(model_dir)
        opts = DenseOptions(fast=True, crf=False)
        kw = {"model_dir": model_dir, "max_patches": int(m["max_patches"])}
        eng_pred = DensePredictor.from_backend(eng, vocab, opts, **kw)
        ref_pred = DensePredictor.from_backend(ref, vocab, opts, **kw)
        tasks = [t for t in ("depth", "segment") if t in m["tasks"]]
        if "depth" in tasks:
            rep.metric_notes.append(f"depth preset {ref_pred.default_depth_preset}")
        if "segment" in tasks:
            rep.metric_notes.append(f"segmentation one-prefill over {len(classes)} classes, no CRF")
        rep.metric_notes.append(f"first {GATE_TOKENS} greedy tokens of "
                                + " / ".join(name for name, _ in gate_prompts(classes)))
        for label, image in gate_images(images):
            log(f"verify: metrics on {label}")
            with warnings.catch_warnings():   # the flows' notes (no class named, ...) are not results here
                warnings.simplefilter("ignore")
                rep.metrics.append((f"[{label}]", image_metrics(eng_pred, ref_pred, image, tasks,
                                                                classes)))
    return after


def verify_engine(engine_dir: str | Path, model_dir: str | Path, images: Sequence[str] = (),
                  classes: Sequence[str] | None = None, log=print, **verify_options):
    """``densert verify`` with its metric gate: ``export.verify.verify`` (tensor checks; its
    ``verify_options``: grids, decode_steps, model, backend) followed by ``metric_gate``."""
    from densert.export.verify import verify
    after = metric_gate(model_dir, images, classes, log)
    return verify(engine_dir, model_dir, images=images, log=log, after=after, **verify_options)
