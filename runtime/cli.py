"""``densert depth|segment|refer|chat IMAGE... [options]``: the runtime on files.

Images may be files or directories (their image files, sorted, not recursive). The model is
loaded once for all images. Per image ``<stem>`` the command writes into ``--out``:

  depth    <stem>.depth.npy (float32 metres), <stem>.depth.png (turbo + metre legend),
           <stem>.depth.txt (released RLE form), <stem>.json
  segment  <stem>.labels.npy (uint16), <stem>.seg.png (palette), <stem>.overlay.png,
           <stem>.seg.txt (released RLE form), <stem>.json
  refer    <stem>.mask.npy (uint8 0/1), <stem>.refer.png (overlay), <stem>.refer.txt, <stem>.json
  chat     <stem>.chat.txt, <stem>.json (and the answer on stdout); no image: prompt only

Exit status: 0 when every image succeeded; 1 when some image failed (each failure is reported
on stderr with its file name, the other images are still processed, and the failed image leaves
no output file); 2 for usage errors (bad option, missing model directory).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError
from densert.extras import require
from densert.tasks.depth_bins import OPEN_WORLD, PRESETS

from .options import DenseOptions, PredictorOptions

# DenseOptions fields each command exposes as flags (the rest keep their documented defaults).
DENSE_FLAGS = {
    "depth": ("alignment", "temperature", "depth_mode", "depth_upsample"),
    "segment": ("alignment", "temperature", "crf"),
    "refer": ("alignment", "temperature", "crf", "refer_short_side"),
    "chat": (),
}


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("images", nargs="*" if command == "chat" else "+", metavar="IMAGE",
                        help="image files or directories of images" + (
                            " (none: a text-only prompt)" if command == "chat" else ""))
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny; with an "
                             "engine backend and --engine-dir, the engine directory alone)")
    parser.add_argument("--out", default="densert-out", help="output directory (created)")
    add_dataclass_arguments(parser, PredictorOptions)
    add_dataclass_arguments(parser, DenseOptions, DENSE_FLAGS[command])
    if command == "depth":
        parser.add_argument("--preset", choices=tuple(PRESETS), default=OPEN_WORLD,
                            help="depth preset: the bins' range and spacing, and the prompt")
        parser.add_argument("--focal", type=float, default=None,
                            help="focal length in px (open world: image rescaled to 2000 px focal; "
                                 "default: none, depth is then relative)")
    if command == "segment":
        parser.add_argument("--classes", default=None,
                            help="comma-separated class names (closed set, no generation); "
                                 "default: none, the model names them (open set)")
        parser.add_argument("--background", action="store_true",
                            help="closed set with the <OTHERS> background rule")
    if command == "refer":
        parser.add_argument("--expression", required=True, help='what to segment, e.g. "the red cup"')
    if command == "chat":
        parser.add_argument("--prompt", required=True, help="the user's question")


def _options(args) -> tuple[DenseOptions, PredictorOptions]:
    try:
        return (DenseOptions(**dataclass_kwargs(args, DENSE_FLAGS[args.command])),
                PredictorOptions(**dataclass_kwargs(args, fields_of(PredictorOptions))))
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from densert.errors import ImageError
    from densert.image.decode import list_images

    from .predictor import DensePredictor

    command = args.command
    opts, settings = _options(args)
    if opts.crf:
        require("pydensecrf.densecrf", "--crf")  # before the model loads
    images = list_images(args.images)
    missing_dirs = [p for p in map(Path, args.images) if p.is_dir() and not any(
        q.parent == p for q in images)]
    for d in missing_dirs:
        print(f"densert {command}: warning: {d} holds no image files", file=sys.stderr)
    if command != "chat" and not images:
        raise CLIError("no images to process")
    pred = DensePredictor(args.model, opts, **asdict(settings))
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CLIError(f"cannot create output directory {out}: {e}") from None

    if command == "chat" and not images:
        r = pred.chat(None, args.prompt)
        print(r.text)
        return 0
    failures = written = 0
    bar = tqdm(images, desc=f"densert {command}", unit="img", disable=len(images) < 2,
               file=sys.stderr)
    for path in bar:
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                files = _process(pred, command, args, path, out)
            for w in caught:
                tqdm.write(f"densert {command}: warning: {path}: {w.message}", file=sys.stderr)
        except (ImageError, ValueError, OSError) as e:
            failures += 1
            msg = str(e) if str(path) in str(e) else f"{path}: {e}"
            tqdm.write(f"densert {command}: error: {msg}", file=sys.stderr)
            continue
        except torch.cuda.OutOfMemoryError:
            failures += 1
            tqdm.write(f"densert {command}: error: {path}: out of GPU memory; lower --max-patches",
                       file=sys.stderr)
            continue
        for f in files:
            f()
        written += 1
    print(f"densert {command}: wrote results for {written} image(s) to {out}", file=sys.stderr)
    if failures:
        print(f"densert {command}: {failures} of {len(images)} image(s) failed", file=sys.stderr)
        return 1
    return 0


def _process(pred, command, args, path: Path, out: Path):
    """Run one image; returns the writers (called only when everything was computed, so a
    failure leaves nothing behind)."""
    from . import outputs as O

    stem = out / path.stem
    meta = dict(task=command, model_dir=pred.model_dir, backend=pred.backend_name, source=path)
    opts = pred.options.to_dict()
    if command == "depth":
        r = pred.depth(path, preset=args.preset, focal=args.focal)
        valid = r.depth[r.depth > 0]
        side = O.sidecar(result=r, **meta, extra=dict(
            preset=r.preset, metric=r.metric, focal=r.focal, effective_focal=r.effective_focal,
            depth_shape=list(r.depth.shape), depth_dtype="float32", units="m",
            depth_range_m=[float(valid.min()), float(valid.max())] if valid.size else None,
            codes_grid_shape=list(r.codes_grid.shape), options=opts))
        depth_png = O.depth_png(r.depth)
        return [lambda: O.save_npy(f"{stem}.depth.npy", r.depth),
                lambda: O.save_png(f"{stem}.depth.png", depth_png),
                lambda: O.save_text(f"{stem}.depth.txt", r.text + "\n"),
                lambda: O.save_json(f"{stem}.json", side)]
    if command == "segment":
        classes = None
        if args.classes is not None:
            classes = [c.strip() for c in args.classes.split(",") if c.strip()]
            if not classes:
                raise ValueError(f"--classes {args.classes!r} names no class")
        r = pred.segment(path, classes=classes, background=True if args.background else None)
        image = _image(path, r.original_hw)
        side = O.sidecar(result=r, **meta, extra=dict(
            class_names=r.class_names, mode="closed-set" if classes else "open-set",
            labels_shape=list(r.labels.shape), labels_dtype="uint16",
            generated_text=r.generated_text, warnings=r.warnings, options=opts))
        seg, ov = O.labels_png(r.labels, r.class_names), O.overlay_png(image, r.labels, r.class_names)
        return [lambda: O.save_npy(f"{stem}.labels.npy", r.labels),
                lambda: O.save_png(f"{stem}.seg.png", seg),
                lambda: O.save_png(f"{stem}.overlay.png", ov),
                lambda: O.save_text(f"{stem}.seg.txt", r.text + "\n"),
                lambda: O.save_json(f"{stem}.json", side)]
    if command == "refer":
        r = pred.refer(path, args.expression)
        image = _image(path, r.original_hw)
        side = O.sidecar(result=r, **meta, extra=dict(
            expression=r.expression, box=r.box, crop_box=r.crop_box, polygons=r.polygons,
            foreground_pixels=int(r.mask.sum()), generated_text=r.generated_text,
            warnings=r.warnings, options=opts))
        ov = O.overlay_png(image, r.labels, r.class_names)
        return [lambda: O.save_npy(f"{stem}.mask.npy", r.mask.astype("uint8")),
                lambda: O.save_png(f"{stem}.refer.png", ov),
                lambda: O.save_text(f"{stem}.refer.txt", r.text + "\n"),
                lambda: O.save_json(f"{stem}.json", side)]
    r = pred.chat(path, args.prompt)
    side = O.sidecar(result=r, **meta, extra=dict(prompt=args.prompt, answer=r.text,
                                                  tokens=len(r.token_ids)))
    print(f"{path}: {r.text}")
    return [lambda: O.save_text(f"{stem}.chat.txt", r.text + "\n"),
            lambda: O.save_json(f"{stem}.json", side)]


def _image(path, hw):
    from densert.image.decode import load_rgb
    from densert.image.preprocess import resize_uint8
    img = load_rgb(path, min_side=min(hw))
    return img if img.shape[:2] == tuple(hw) else resize_uint8(img, hw)
