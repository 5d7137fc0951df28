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
from pathlib import Path

from densert.cli import CLIError

from . import outputs as O

TASKS = ("depth", "segment", "refer", "chat")


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    from .dense import ALIGNMENTS, DEPTH_MODES, DEPTH_UPSAMPLES
    from .backends import BACKENDS
    from .preprocess import DEFAULT_MAX_PATCHES
    from .prompts import DEPTH_PRESETS
    parser.add_argument("images", nargs="*" if command == "chat" else "+", metavar="IMAGE",
                        help="image files or directories of images")
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny)")
    parser.add_argument("--backend", choices=BACKENDS, default="torch")
    parser.add_argument("--engine-dir", default=None, help="engine directory (onnxruntime/tensorrt)")
    parser.add_argument("--dtype", default="float32", help="torch dtype (float32, bfloat16, float16)")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available)")
    parser.add_argument("--out", default="densert-out", help="output directory (created)")
    parser.add_argument("--max-patches", type=int, default=DEFAULT_MAX_PATCHES,
                        help="processor patch cap (16x16 patches; default %(default)s)")
    parser.add_argument("--upscale", type=int, default=1, choices=(1, 2, 3, 4),
                        help="upscale factor before the size search (paper: x2-x4 for small images)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--alignment", choices=ALIGNMENTS, default="k",
                        help="hidden state that scores merged cell k (default: k)")
    parser.add_argument("--temperature", type=float, default=0.2,
                        help="softmax temperature (CRF unary, depth expectation)")
    if command in ("segment", "refer"):
        parser.add_argument("--crf", action="store_true", help="DenseCRF refinement")
    if command == "depth":
        parser.add_argument("--preset", choices=DEPTH_PRESETS, default="open-world")
        parser.add_argument("--focal", type=float, default=None,
                            help="focal length in px (open world: image rescaled to 2000 px focal; "
                                 "without it depth is relative)")
        parser.add_argument("--depth-mode", choices=DEPTH_MODES, default="argmax")
        parser.add_argument("--depth-upsample", choices=DEPTH_UPSAMPLES, default="patch")
    if command == "segment":
        parser.add_argument("--classes", default=None,
                            help="comma-separated class names (closed set, no generation); "
                                 "omit to let the model name them (open set)")
        parser.add_argument("--background", action="store_true",
                            help="closed set with the <OTHERS> background rule")
    if command == "refer":
        parser.add_argument("--expression", required=True, help='what to segment, e.g. "the red cup"')
        parser.add_argument("--refer-short-side", type=int, default=1280,
                            help="short side of the refinement crop (default %(default)s)")
    if command == "chat":
        parser.add_argument("--prompt", required=True)


def _options(args):
    from .dense import DenseOptions
    kw = dict(temperature=args.temperature, alignment=args.alignment,
              crf=getattr(args, "crf", False))
    if args.command == "depth":
        kw.update(depth_mode=args.depth_mode, depth_upsample=args.depth_upsample)
    if args.command == "refer":
        kw.update(refer_short_side=args.refer_short_side)
    try:
        return DenseOptions(**kw)
    except ValueError as e:
        raise CLIError(str(e)) from None


def run(args) -> int:
    import torch
    from tqdm import tqdm

    from .backends import BackendError
    from .image_io import ImageError, list_images
    from .predictor import DensePredictor, ModelDirError

    command = args.command
    opts = _options(args)
    if args.max_patches < 4:
        raise CLIError(f"--max-patches {args.max_patches} is below 4 (one merged token)")
    images = list_images(args.images)
    missing_dirs = [p for p in map(Path, args.images) if p.is_dir() and not any(
        q.parent == p for q in images)]
    for d in missing_dirs:
        print(f"densert {command}: warning: {d} holds no image files", file=sys.stderr)
    if command != "chat" and not images:
        raise CLIError("no images to process")
    try:
        pred = DensePredictor(args.model, backend=args.backend, dtype=args.dtype, options=opts,
                              engine_dir=args.engine_dir, max_patches=args.max_patches,
                              upscale=args.upscale, max_new_tokens=args.max_new_tokens,
                              device=args.device)
    except (ModelDirError, BackendError) as e:
        raise CLIError(str(e)) from None
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
    from .image_io import load_rgb
    from .preprocess import resize_uint8
    img = load_rgb(path, min_side=min(hw))
    return img if img.shape[:2] == tuple(hw) else resize_uint8(img, hw)
