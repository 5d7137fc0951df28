"""``densert depth|segment|refer|detect|ground|pose|chat|dense IMAGE... | --source SRC``, and
``densert ros2``: the runtime on the command line.

The commands are the tasks of ``runtime.registry``: their flags, files and whether they take
``--source`` come from there, and one loop runs them all. Images may be files or directories
(their image files, sorted, not recursive). Every input and option is checked before the model
loads: an unreadable or oversized image (a decompression bomb) is reported in one line and
skipped, a bad option or output folder stops the run at once. The model is loaded once for all
images. Per image ``<stem>`` the command writes into ``--out`` a set of files that appears whole
or not at all (``--formats`` picks them; the JSON sidecar is always written, schema
``runtime/sidecar.schema.json``, and records the flow and options that ran):

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
  dense    --out/depth/ and --out/segment/: the depth and segment sets of each frame

Inputs that share a stem keep their relative path (or extension) in their output names; each
such rename is reported. A line per image gives its per-stage milliseconds (``--quiet``: errors
only).

``--source SRC`` (depth, segment; ``dense`` always) runs every frame of SRC (image files, a
folder, a glob, a video, a camera index, an RTSP/HTTP URL, a ROS 2 ``.mcap`` bag:
``runtime.sources``) through the one loaded model (``DensePredictor.stream``), naming each set by
the file's stem or ``frame_<index>``. A line per frame gives the per-stage milliseconds and the
running fps, and a summary closes the run (frames, fps, p50/p90 per stage, frames dropped).
``--source NAME=SRC`` given once per camera runs a camera rig through the same model (frames of
one size batched; ``runtime.stream``): each camera's sets go to ``--out/NAME/``, its lines are
labelled ``NAME/<frame>`` and each camera gets its own summary.

``densert ros2``: the node of ``runtime.ros2_node`` (needs ``densert[ros2]``).

Exit status: 0 when every image (frame) succeeded; 1 when some failed (each failure is one line
on stderr naming the file; the others are still processed; a failed one leaves no file) or a
source gave no frame; 2 for usage errors (bad option, missing model, unwritable output folder);
130 / 143 when interrupted by SIGINT / SIGTERM (finished sets are kept, the one in progress
leaves nothing).
"""
from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError, DensertError
from densert.extras import require
from densert.tasks.depth_bins import PRESETS

from .options import CRF_MODULE, CRF_PURPOSE, DenseOptions, OutputOptions, PredictorOptions
from .registry import REGISTRY, Task
from .speed import Timings


def flag_tables(tasks=REGISTRY):
    """Per command, the DenseOptions fields it exposes as flags and the OutputOptions fields (the
    rest keep their documented defaults), and the commands whose flows decode a segmentation map
    (DenseCRF on by default: its package is checked before the model loads)."""
    return ({n: t.dense_flags for n, t in tasks.items()},
            {n: t.output_flags for n, t in tasks.items()},
            tuple(n for n, t in tasks.items() if "crf" in t.dense_flags))


DENSE_FLAGS, OUTPUT_FLAGS, MAP_COMMANDS = flag_tables()

# The task calls' keyword options as flags: ``Task.options`` picks them, ``Task.option_help``
# words one for its task.
ARGUMENTS: dict[str, dict] = {
    "preset": dict(choices=tuple(PRESETS), default=None,
                   help="depth preset: the bins' range and spacing, and the prompt (default: the "
                        "one the model declares in task_defaults.json, else open-world)"),
    "focal": dict(type=float, default=None,
                  help="focal length in px (open world: image rescaled to 2000 px focal; "
                       "default: none, depth is then relative)"),
    "classes": dict(default=None, help="comma-separated class names (default: none)"),
    "background": dict(action="store_true", help="closed set with the <OTHERS> background rule"),
    "expression": dict(required=True, help='what to find, e.g. "the red cup"'),
    "prompt": dict(required=True, help="the user's question"),
    "depth": dict(action=argparse.BooleanOptionalAction, default=True,
                  help="compute the depth map"),
}


def _add_option(parser: argparse.ArgumentParser, name: str, help: str | None = None) -> None:
    spec = ARGUMENTS[name]
    parser.add_argument("--" + name.replace("_", "-"), **{**spec, "help": help or spec["help"]})


def add_source_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--source", required=required, default=None, action="append",
                        metavar="[NAME=]SRC",
                        help="frames to process with one loaded model: image file, folder or glob, "
                             "video file, camera index (0), rtsp:// or http:// URL, or a ROS 2 "
                             ".mcap bag; outputs are named by file stem or frame_<index>. Several "
                             "cameras: --source NAME=SRC once per camera, outputs in --out/NAME/"
                             + ("" if required else " (default: none, the IMAGE arguments)"))
    parser.add_argument("--topic", default=None, action="append", metavar="[NAME=]TOPIC",
                        help="image topic of a .mcap bag (default: the bag's only image topic); "
                             "with several cameras NAME=TOPIC for each camera's bag")
    parser.add_argument("--show", action="store_true",
                        help="show each result in a window (needs a display and OpenCV with GUI "
                             "support); q or Esc stops")
    parser.add_argument("--drop", action=argparse.BooleanOptionalAction, default=None,
                        help="latest-frame policy: skip frames the model has no time for "
                             "(default: on for cameras and streams, off for files, videos and bags)")


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "ros2":
        configure_ros2(parser)
        return
    task = REGISTRY[command]
    if task.images:
        parser.add_argument("images", nargs="*" if task.streams or task.text_only else "+",
                            metavar="IMAGE", help="image files or directories of images" + (
                                " (none: a text-only prompt)" if task.text_only else "") + (
                                " (or --source)" if task.streams else ""))
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny; with an "
                             "engine backend and --engine-dir, the engine directory alone)")
    parser.add_argument("--out", default="densert-out", help="output directory (created)" + (
        f"; {' and '.join(p + '/' for p in task.parts)} inside it" if task.parts else ""))
    shown = ["progress bar", "per-image lines"] if task.images else []
    shown += ["per-frame lines", "summary"] if task.streams else []
    parser.add_argument("--quiet", action="store_true",
                        help=f"errors only: no {', '.join(shown[:-1])} or {shown[-1]}")
    if task.streams:
        add_source_arguments(parser, required=not task.images)
    add_dataclass_arguments(parser, PredictorOptions)
    add_dataclass_arguments(parser, DenseOptions, task.dense_flags)
    add_dataclass_arguments(parser, OutputOptions, task.output_flags)
    for name in task.options:
        _add_option(parser, name, task.option_help.get(name))


def configure_ros2(parser: argparse.ArgumentParser) -> None:
    from . import ros2_node
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny)")
    add_dataclass_arguments(parser, PredictorOptions, exclude=("max_new_tokens",))
    add_dataclass_arguments(parser, DenseOptions, ros2_node.DENSE_FLAGS)
    _add_option(parser, "preset", "depth preset (default: the model's task_defaults.json, else "
                                  "open-world)")
    _add_option(parser, "focal", "focal length in px until a camera_info arrives (open world; "
                                 "default: none, relative depth)")
    _add_option(parser, "depth", "publish depth (32FC1)")
    parser.add_argument("--depth-mm", action="store_true",
                        help="also publish depth_mm (16UC1 millimetres, 0 invalid; metric depth)")
    _add_option(parser, "classes", "comma-separated class names: publish labels (mono16) from the "
                                   "same prefill (default: none)")
    _add_option(parser, "background")
    parser.add_argument("--labels-color", action="store_true",
                        help="also publish labels_color (rgb8 class colours)")
    parser.add_argument("--cameras", default=None, metavar="NAME,NAME",
                        help="several cameras through the one model: NAME/image and "
                             "NAME/camera_info in, NAME/depth ... out for each (default: none, "
                             "the topics image, camera_info, depth ...)")
    parser.add_argument("--name", default=ros2_node.NODE_NAME, help="node name")
    parser.add_argument("--max-frames", type=int, default=0,
                        help="exit after this many processed frames, of every camera with "
                             "--cameras (0: run until stopped)")
    parser.add_argument("--quiet", action="store_true", help="no per-frame log lines")
    parser.add_argument("--ros-args", nargs=argparse.REMAINDER, default=None,
                        help="ROS arguments (remaps, -p parameter overrides), as for any ROS node "
                             "(default: none)")


# ---------------------------------------------------------------- checks before the model loads
def _options(args, task: Task) -> tuple[DenseOptions, PredictorOptions, OutputOptions]:
    try:
        out = OutputOptions(**dataclass_kwargs(args, task.output_flags))
        for t in task.parts or (task.name,):
            out.formats_for(t)
        return (DenseOptions(**dataclass_kwargs(args, task.dense_flags)),
                PredictorOptions(**dataclass_kwargs(args, fields_of(PredictorOptions))), out)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _classes(text: str | None) -> list[str] | None:
    if text is None:
        return None
    classes = [c.strip() for c in text.split(",") if c.strip()]
    if not classes:
        raise CLIError(f"--classes {text!r} names no class")
    from .predictor import class_names
    return class_names(classes, "--classes")


def _call_options(args, task: Task) -> dict:
    """The task call's keyword options from its flags; None leaves the call's default."""
    call = {name: getattr(args, name) for name in task.options}
    if "classes" in call:
        call["classes"] = _classes(call["classes"])
    if "background" in call:  # unset: the flow decides (segment: where the model names <OTHERS>)
        call["background"] = True if call["background"] else None
    return call


def _parts(task: Task, call: dict) -> tuple[str, ...]:
    """The tasks whose sets a run writes: its own, or the parts of a combined task it asks for
    (dense: depth unless --no-depth, segment with --classes)."""
    if not task.parts:
        return (task.name,)
    asked = {"depth": call.get("depth", True), "segment": bool(call.get("classes"))}
    return tuple(p for p in task.parts if asked[p])


def _check_inputs(command: str, inputs: list[tuple[Path, str]], call: dict, upscale: int
                  ) -> list[tuple[Path, str]]:
    """Each input's header (exists, an image, within MAX_IMAGE_PIXELS) and the request for it
    (a focal rescale that leaves an image), before any model loads. Failures: one line each,
    ``densert <command>: error: ...``."""
    from densert.errors import ImageError
    from densert.image.decode import probe

    from .predictor import depth_scale
    good = []
    for p, stem in inputs:
        try:
            hw = probe(p)
            if "focal" in call:
                depth_scale(call["preset"], call["focal"], hw, upscale)
        except (ImageError, ValueError) as e:
            msg = str(e) if str(p) in str(e) else f"{p}: {e}"
            print(f"{command}: error: {msg}", file=sys.stderr)
            continue
        good.append((p, stem))
    return good


# ---------------------------------------------------------------- console and signals
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


def _error_line(e: BaseException, label: str) -> str:
    """What a failed input's line says; an error that is not about the input is raised."""
    oom = getattr(sys.modules.get("torch"), "cuda", None)
    if oom is not None and isinstance(e, oom.OutOfMemoryError):  # one input too big for the GPU
        return f"{label}: out of GPU memory; lower --max-patches"
    if not isinstance(e, (DensertError, ValueError, OSError)):
        raise e
    return str(e) if label in str(e) else f"{label}: {e}"


class _Window:
    """``--show``: an OpenCV window, checked before the model loads."""

    def __init__(self, title: str):
        import os
        if sys.platform.startswith("linux") and not (os.environ.get("DISPLAY")
                                                     or os.environ.get("WAYLAND_DISPLAY")):
            raise CLIError("--show needs a display (DISPLAY / WAYLAND_DISPLAY is not set); write "
                           "files with --out instead")
        self.cv2 = require("cv2", "--show")
        self.title = title
        try:
            self.cv2.namedWindow(title, self.cv2.WINDOW_NORMAL)
        except self.cv2.error:
            raise CLIError("--show: this OpenCV has no GUI support (opencv-python-headless); "
                           "pip install opencv-python for windows") from None

    def show(self, pictures) -> bool:
        """False when the user closed the stream (q / Esc)."""
        import numpy as np
        pics = [np.asarray(p.convert("RGB")) for p in pictures]
        h = min(p.shape[0] for p in pics)
        row = np.concatenate([p[:h] for p in pics], axis=1)
        self.cv2.imshow(self.title, self.cv2.cvtColor(row, self.cv2.COLOR_RGB2BGR))
        return (self.cv2.waitKey(1) & 0xFF) not in (ord("q"), 27)

    def close(self):
        self.cv2.destroyWindow(self.title)


# ---------------------------------------------------------------- the run
def run(args) -> int:
    if args.command == "ros2":
        from . import ros2_node
        return ros2_node.spin(args)
    from .filesets import no_empty_out
    with no_empty_out(args.out):
        return _run(args)


def _image_items(pred, task: Task, inputs, call: dict):
    """The task's call on each image in turn, as the stream's items (an image is read by its
    own call; a failure is an item with ``error``)."""
    from .sources import Frame
    from .stream import StreamItem
    method = getattr(pred, task.method)
    options = {k: v for k, v in call.items() if v is not None}
    for i, (path, stem) in enumerate(inputs):
        frame = Frame(i, path, stem)
        t0 = time.perf_counter()
        try:
            r = method(path, **options)
        except Exception as e:  # reported by the loop, which stops on what it cannot name
            yield StreamItem(frame, None, {}, 0, time.perf_counter() - t0, error=e)
            continue
        yield StreamItem(frame, r, dict(r.timings), 0, time.perf_counter() - t0)


def _run(args) -> int:
    from densert.checkpoint.model_dir import read_task_defaults
    from densert.tasks.depth_bins import default_preset

    from . import filesets
    from .predictor import DEMO_MODEL_NOTICE, DensePredictor, depth_scale, runtime_dir
    from .sources import camera_sources, open_source

    task = REGISTRY[args.command]
    command = f"densert {task.name}"
    quiet = args.quiet
    source = getattr(args, "source", None)
    images = getattr(args, "images", None) or []
    if source is not None and images:
        raise CLIError("give either IMAGE arguments or --source, not both")
    if source is None and not images and not task.text_only:
        raise CLIError("no input: give IMAGE arguments or --source")
    opts, settings, out_opts = _options(args, task)
    call = _call_options(args, task)
    parts = _parts(task, call)
    if not parts:
        raise CLIError("nothing to compute: --no-depth and no --classes")
    if opts.crf and any(p in MAP_COMMANDS for p in parts):  # before the model loads
        require(CRF_MODULE, CRF_PURPOSE)
    model_dir = runtime_dir(args.model, settings.backend, settings.engine_dir)
    if any("preset" in REGISTRY[p].options for p in parts):
        call["preset"] = call["preset"] or default_preset(read_task_defaults(model_dir))
        try:  # the flags themselves, before any image
            depth_scale(call["preset"], call["focal"], None, settings.upscale)
        except ValueError as e:
            raise CLIError(str(e)) from None
    out = filesets.check_writable(args.out)
    rig = camera_sources(source) if source is not None else None
    cameras = list(rig) if rig else [None]
    # camera (None: one source) -> part -> its output folder
    dirs = {c: {p: filesets.check_writable(out / (c or "") / (p if task.parts else ""))
                for p in (parts if task.parts else (task.name,))} for c in cameras}

    windows = {}
    if source is not None:
        from .sources import ImageFiles
        from .speed import SpeedReport
        unit = "frame"
        if args.show:
            windows = {c: _Window(command if c is None else f"{command} {c}") for c in cameras}
        topics = camera_topics(args.topic, cameras)
        specs = rig or {None: source[0]}
        frames = {c: open_source(specs[c], topics[c]) for c in cameras}
        reports = {}
        for c, f in frames.items():
            if isinstance(f, ImageFiles):
                f.names, notes = filesets.output_stems(f.paths)
                for n in notes:
                    _say(f"{command}: note: {c + ': ' if c else ''}{n}", quiet)
            reports[c] = SpeedReport(command if c is None else f"{command} {c}", total=len(f))
        failures = 0
    else:
        from densert.image.decode import list_images
        unit, reports = "image", None
        paths = list_images(images)
        for d in (p for p in map(Path, images) if p.is_dir() and not any(q.parent == p for q in paths)):
            print(f"{command}: warning: {d} holds no image files", file=sys.stderr)
        if not paths and not task.text_only:
            raise CLIError("no images to process")
        stems, notes = filesets.output_stems(paths)
        for n in notes:
            _say(f"{command}: note: {n}", quiet)
        good = _check_inputs(command, list(zip(paths, stems)), call, settings.upscale)
        failures = len(paths) - len(good)
        if paths and not good:
            print(f"{command}: none of the {len(paths)} image(s) can be read; nothing to do",
                  file=sys.stderr)
            return 1

    pred = DensePredictor(model_dir, opts, **asdict(settings))
    if pred.is_demo_model:
        _say(f"{command}: note: {DEMO_MODEL_NOTICE}", quiet)
    if len(parts) > 1:
        from densert.tasks import prompts
        if not prompts.depth(call["preset"]).image_first:
            _say(f"{command}: note: the {call['preset']} depth prompt precedes the image, so "
                 "depth runs its own prefill (the image is still encoded once); the open-world "
                 "preset shares one prefill with segmentation", quiet)
    if source is None and not paths:  # a prompt alone
        print(getattr(pred, task.method)(None, **{k: v for k, v in call.items() if v is not None}).text)
        return 0

    if source is not None:
        for c, f in frames.items():
            _say(f"{command}: {c + ': ' if c else ''}{f.description} -> {out / (c or '')}", quiet)
        items = pred.stream(frames if rig else frames[None], task=task.name, drop=args.drop, **call)
    else:
        from tqdm import tqdm
        bar = tqdm(good, desc=command, unit="img", file=sys.stderr,
                   disable=quiet or len(good) < 2, leave=False)
        items = _image_items(pred, task, bar, call)
    written = 0
    try:
        with _sigterm_raises(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for item in items:
                name = item.frame.name
                label = str(item.frame.image) if isinstance(item.frame.image, Path) else name
                if item.camera is not None:
                    label = f"{item.camera}/{label}"
                report = reports[item.camera] if reports is not None else None
                timings, error = dict(item.timings), item.error
                if error is None:
                    results = item.result.results if task.parts else [item.result]
                    tm = Timings()
                    try:
                        with tm.stage("write"):
                            for r in results:
                                filesets.write_set(dirs[item.camera][r.task], r.artifacts(name, out_opts))
                    except (DensertError, OSError) as e:
                        error = e
                    timings.update(tm)
                warned = [] if error is not None else list(caught)
                caught.clear()
                if error is not None:
                    failures += 1
                    if report is not None:
                        report.add(item.timings, item.dropped, failed=True)
                    _say(f"{command}: error: {_error_line(error, label)}")
                    continue
                written += 1
                for w in warned:
                    _say(f"{command}: warning: {label}: {w.message}", quiet)
                if task.stdout:
                    print(f"{label}: {item.result.text}")
                if report is None:
                    _say(item.result.print_line(label), quiet)
                else:
                    report.add(timings, item.dropped, item.latency)
                    _say(report.line(item.frame.index, label, results[0].original_hw, task.name,
                                     timings, item.dropped), quiet)
                window = windows.get(item.camera)
                if window is not None and not window.show([r.plot() for r in results]):
                    break
    except (KeyboardInterrupt, Terminated) as e:
        items.close()
        print(f"{command}: interrupted; {written} {unit}(s) written to {out}, the {unit} in "
              "progress left nothing behind", file=sys.stderr)
        for report in (reports or {}).values():
            _say(report.summary(), quiet)
        return 143 if isinstance(e, Terminated) else 130
    finally:
        for window in windows.values():
            window.close()
    items.close()
    for report in (reports or {}).values():
        _say(report.summary(), quiet)
    _say(f"{command}: wrote results for {written} {unit}(s) to {out}", quiet)
    if failures:
        of = f" of {len(paths)}" if source is None else ""
        print(f"{command}: {failures}{of} {unit}(s) failed", file=sys.stderr)
        return 1
    if source is not None and written == 0:
        what = " and ".join(f.description for f in frames.values())
        print(f"{command}: {what} gave no frame", file=sys.stderr)
        return 1
    return 0


def camera_topics(topics: list[str] | None, cameras: list[str | None]) -> dict:
    """``--topic`` per camera: one plain TOPIC for every bag, or NAME=TOPIC per camera."""
    if not topics:
        return dict.fromkeys(cameras)
    if cameras == [None]:
        if len(topics) > 1:
            raise CLIError("--topic given more than once for one --source")
        return {None: topics[0]}
    if len(topics) == 1 and "=" not in topics[0]:
        return dict.fromkeys(cameras, topics[0])
    out = dict.fromkeys(cameras)
    for t in topics:
        name, sep, topic = t.partition("=")
        if not sep or name not in out:
            raise CLIError(f"--topic {t!r}: with several cameras give NAME=TOPIC, NAME one of "
                           f"{', '.join(cameras)}")
        out[name] = topic
    return out
