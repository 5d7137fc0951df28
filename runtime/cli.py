"""``densert depth|segment|refer|detect|ground|pose|chat IMAGE... [options]``: the runtime on files.

Images may be files or directories (their image files, sorted, not recursive). Every input and
option is checked before the model loads: an unreadable or oversized image (a decompression bomb)
is reported in one line and skipped, a bad option or output folder stops the run at once. The model
is loaded once for all images. Per image ``<stem>`` the command writes into ``--out`` a set of
files that appears whole or not at all (``--formats`` picks them; the JSON sidecar is always
written, schema ``runtime/sidecar.schema.json``, and records the flow and options that ran):

  depth    <stem>.depth.npy (float32), .depth.png (turbo, pixel-aligned), .depth.mm.png (uint16
           millimetres, metric depth only), .depth.txt (released RLE), [.depth.tiff], .json
  segment  <stem>.labels.npy (uint16), .labels.png (indexed, palette = class colours),
           .overlay.png, .seg.txt (released RLE), .coco.json (COCO RLE per class), .json
  refer    <stem>.mask.npy (uint8 0/1), .refer.png (overlay), .refer.txt, .coco.json, .json
  detect   <stem>.detect.png (boxes drawn), .detect.txt (the answer, original-pixel coordinates),
           .coco.json (COCO boxes), .json (labelled boxes)
  ground   <stem>.ground.png, .ground.txt, .json (the box)
  pose     <stem>.pose.png (skeletons), .pose.txt, .coco.json (COCO keypoints over the 16 MPII
           joints), .json (persons: box, keypoints with visibility)
  chat     <stem>.chat.txt, .json (and the answer on stdout); no image: prompt only

Inputs that share a stem keep their relative path (or extension) in their output names; each
such rename is reported. A line per image gives its per-stage milliseconds (``--quiet``: errors
only).

Exit status: 0 when every image succeeded; 1 when some image failed (each failure is one line on
stderr naming the file; the other images are still processed; a failed image leaves no file);
2 for usage errors (bad option, missing model, unwritable output folder); 130 / 143 when
interrupted by SIGINT / SIGTERM (finished sets are kept, the one in progress leaves nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError, DensertError
from densert.extras import require
from densert.tasks.depth_bins import PRESETS

from .options import CRF_MODULE, CRF_PURPOSE, DenseOptions, OutputOptions, PredictorOptions

# DenseOptions fields each command exposes as flags (the rest keep their documented defaults).
DENSE_FLAGS = {
    "depth": ("alignment", "temperature", "depth_mode", "depth_upsample"),
    "segment": ("alignment", "temperature", "crf", "fast", "open_set_max_boxes",
                "refer_short_side"),
    "refer": ("alignment", "temperature", "crf", "refer_short_side"),
    "detect": (),
    "ground": (),
    "pose": (),
    "chat": (),
}
# OutputOptions fields per command.
OUTPUT_FLAGS = {
    "depth": ("formats", "range", "legend", "invalid"),
    "segment": ("formats",),
    "refer": ("formats",),
    "detect": ("formats",),
    "ground": ("formats",),
    "pose": ("formats",),
    "chat": (),
}
# Commands whose flows decode a segmentation map (DenseCRF on by default).
MAP_COMMANDS = ("segment", "refer")


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    parser.add_argument("images", nargs="*" if command in ("chat", "depth", "segment") else "+",
                        metavar="IMAGE", help="image files or directories of images" + (
                            " (none: a text-only prompt)" if command == "chat" else "") + (
                            " (or --source)" if command in ("depth", "segment") else ""))
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny; with an "
                             "engine backend and --engine-dir, the engine directory alone)")
    parser.add_argument("--out", default="densert-out", help="output directory (created)")
    parser.add_argument("--quiet", action="store_true",
                        help="no progress bar or per-image lines; errors only")
    if command in ("depth", "segment"):
        from .onboard.cli import add_source_arguments
        add_source_arguments(parser)
    add_dataclass_arguments(parser, PredictorOptions)
    add_dataclass_arguments(parser, DenseOptions, DENSE_FLAGS[command])
    add_dataclass_arguments(parser, OutputOptions, OUTPUT_FLAGS[command])
    if command == "depth":
        parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                            help="depth preset: the bins' range and spacing, and the prompt "
                                 "(default: the one the model declares in task_defaults.json, "
                                 "else open-world)")
        parser.add_argument("--focal", type=float, default=None,
                            help="focal length in px (open world: image rescaled to 2000 px focal; "
                                 "default: none, depth is then relative)")
    if command == "segment":
        parser.add_argument("--classes", default=None,
                            help="comma-separated class names (closed set: the model names the "
                                 "ones present, the map scores those); default: none, the model "
                                 "names them (open set)")
        parser.add_argument("--background", action="store_true",
                            help="closed set with a background class: the prompt omits \"without "
                                 "the background class\", the <OTHERS> rule applies where the "
                                 "model names <OTHERS> (always, with --fast)")
    if command == "detect":
        parser.add_argument("--classes", default=None,
                            help="comma-separated categories to detect (the open set's detection "
                                 "prompt); default: none, every object")
    if command in ("refer", "ground"):
        parser.add_argument("--expression", required=True,
                            help='what to find, e.g. "the red cup"')
    if command == "chat":
        parser.add_argument("--prompt", required=True, help="the user's question")


def _options(args) -> tuple[DenseOptions, PredictorOptions, OutputOptions]:
    try:
        out = OutputOptions(**dataclass_kwargs(args, OUTPUT_FLAGS[args.command]))
        out.formats_for(args.command)
        return (DenseOptions(**dataclass_kwargs(args, DENSE_FLAGS[args.command])),
                PredictorOptions(**dataclass_kwargs(args, fields_of(PredictorOptions))), out)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _classes(args) -> list[str] | None:
    if getattr(args, "classes", None) is None:
        return None
    classes = [c.strip() for c in args.classes.split(",") if c.strip()]
    if not classes:
        raise CLIError(f"--classes {args.classes!r} names no class")
    from .predictor import class_names
    return class_names(classes, "--classes")


class Terminated(BaseException):
    """SIGTERM, raised where the process is so that every ``finally`` (temporary files) runs."""


@contextlib.contextmanager
def _sigterm_raises():
    def handler(signum, frame):
        raise Terminated()
    try:
        old = signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread: leave SIGTERM alone
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def _say(msg: str, quiet: bool = False) -> None:
    if not quiet:
        from tqdm import tqdm
        tqdm.write(msg, file=sys.stderr)



def _check_inputs(args, inputs: list[tuple[Path, str]], preset: str | None, settings
                  ) -> list[tuple[Path, str]]:
    """Each input's header (exists, an image, within MAX_IMAGE_PIXELS) and the request for it
    (a focal rescale that leaves an image), before any model loads. Failures: one line each."""
    from densert.errors import ImageError
    from densert.image.decode import probe

    from .predictor import depth_scale
    good = []
    for p, stem in inputs:
        try:
            hw = probe(p)
            if args.command == "depth":
                depth_scale(preset, args.focal, hw, settings.upscale)
        except (ImageError, ValueError) as e:
            msg = str(e) if str(p) in str(e) else f"{p}: {e}"
            print(f"densert {args.command}: error: {msg}", file=sys.stderr)
            continue
        good.append((p, stem))
    return good


def run(args) -> int:
    from .filesets import no_empty_out
    with no_empty_out(args.out):
        return _run(args)


def _run(args) -> int:
    from densert.checkpoint.model_dir import read_task_defaults
    from densert.image.decode import list_images

    from . import filesets as O

    command = args.command
    if getattr(args, "source", None) is not None:
        from .onboard.cli import run_source
        return run_source(args)
    if command in ("depth", "segment") and not args.images:
        raise CLIError("no input: give IMAGE arguments or --source")
    opts, settings, out_opts = _options(args)
    classes = _classes(args)
    if command in MAP_COMMANDS and opts.crf:  # before the model loads
        require(CRF_MODULE, CRF_PURPOSE)
    from .predictor import runtime_dir
    model_dir = runtime_dir(args.model, settings.backend, settings.engine_dir)
    preset = None
    if command == "depth":
        from densert.tasks.depth_bins import OPEN_WORLD
        preset = args.preset or read_task_defaults(model_dir).get("depth", {}).get("preset") or OPEN_WORLD
        from .predictor import depth_scale
        depth_scale(preset, args.focal, None, settings.upscale)  # the flag itself, before any image
    out = O.check_writable(args.out)
    paths = list_images(args.images)
    for d in (p for p in map(Path, args.images) if p.is_dir() and not any(q.parent == p for q in paths)):
        print(f"densert {command}: warning: {d} holds no image files", file=sys.stderr)
    if command != "chat" and not paths:
        raise CLIError("no images to process")
    stems, notes = O.output_stems(paths)
    for n in notes:
        _say(f"densert {command}: note: {n}", args.quiet)
    good = _check_inputs(args, list(zip(paths, stems)), preset, settings)
    failures = len(paths) - len(good)
    if paths and not good:
        print(f"densert {command}: none of the {len(paths)} image(s) can be read; nothing to do",
              file=sys.stderr)
        return 1

    from .predictor import DensePredictor
    pred = DensePredictor(model_dir, opts, **asdict(settings))
    if pred.is_demo_model:
        _say(f"densert {command}: note: using the bundled demo model densert-tiny (small, trained "
             "on rendered scenes; its maps of real photos mean little): pass --model DIR with a "
             "Youtu-VL checkpoint for real results", args.quiet)
    if command == "chat" and not paths:
        r = pred.chat(None, args.prompt)
        print(r.text)
        return 0

    from tqdm import tqdm
    written = 0
    try:
        with _sigterm_raises():
            bar = tqdm(good, desc=f"densert {command}", unit="img", file=sys.stderr,
                       disable=args.quiet or len(good) < 2, leave=False)
            for path, stem in bar:
                ok = _one(pred, args, path, stem, out, out_opts, preset, classes)
                written += ok
                failures += not ok
    except (KeyboardInterrupt, Terminated) as e:
        code = 143 if isinstance(e, Terminated) else 130
        print(f"densert {command}: interrupted; {written} image(s) written to {out}, the image in "
              "progress left nothing behind", file=sys.stderr)
        return code
    _say(f"densert {command}: wrote results for {written} image(s) to {out}", args.quiet)
    if failures:
        print(f"densert {command}: {failures} of {len(paths)} image(s) failed", file=sys.stderr)
        return 1
    return 0


def _one(pred, args, path: Path, stem: str, out: Path, out_opts: OutputOptions, preset,
         classes) -> bool:
    """Run one image and write its set; a failure is one line and leaves no file."""
    import torch

    from . import filesets as O
    command = args.command
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            if command == "depth":
                r = pred.depth(path, preset=preset, focal=args.focal)
            elif command == "segment":
                r = pred.segment(path, classes=classes, background=True if args.background else None)
            elif command == "refer":
                r = pred.refer(path, args.expression)
            elif command == "detect":
                r = pred.detect(path, classes=classes)
            elif command == "ground":
                r = pred.ground(path, args.expression)
            elif command == "pose":
                r = pred.pose(path)
            else:
                r = pred.chat(path, args.prompt)
                print(f"{path}: {r.text}")
            O.write_set(out, r.artifacts(stem, out_opts))
        for w in caught:
            _say(f"densert {command}: warning: {path}: {w.message}")
    except (DensertError, ValueError, OSError) as e:
        msg = str(e) if str(path) in str(e) else f"{path}: {e}"
        _say(f"densert {command}: error: {msg}")
        return False
    except torch.cuda.OutOfMemoryError:
        _say(f"densert {command}: error: {path}: out of GPU memory; lower --max-patches")
        return False
    _say(r.print_line(str(path)), args.quiet)
    return True
