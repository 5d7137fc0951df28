"""Frame streams on the command line, and the ROS 2 node.

``densert depth|segment --source SRC [--topic T] [--show]`` and ``densert dense --source SRC
[--classes a,b] [--no-depth]`` run every frame of SRC (image files, a folder, a glob, a video,
a camera index, an RTSP/HTTP URL, a ROS 2 ``.mcap`` bag: ``runtime.sources``) through one loaded
model (``DensePredictor.stream``) and write one file set per frame into ``--out``, named by the
file's stem or ``frame_<index>``; ``dense`` writes ``--out/depth/`` and ``--out/segment/``. A
line per frame gives the per-stage milliseconds and the running fps, and a summary closes the run
(frames, fps, p50/p90 per stage, frames dropped); ``--quiet`` keeps errors only.

``densert ros2``: the node of ``runtime.ros2_node`` (needs ``densert[ros2]``).

Exit status as for images: 0 all frames written, 1 some frame failed, 2 usage, 130/143 when
interrupted (the frames done are kept).
"""
from __future__ import annotations

import argparse
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError, DensertError
from densert.tasks.depth_bins import PRESETS

from ..cli import OUTPUT_FLAGS, Terminated, _classes, _say, _sigterm_raises
from ..options import DenseOptions, OutputOptions, PredictorOptions

DENSE_FLAGS = ("alignment", "temperature", "depth_mode", "depth_upsample", "crf")


def add_source_arguments(parser: argparse.ArgumentParser, required: bool = False) -> None:
    parser.add_argument("--source", required=required, default=None,
                        help="frames to process with one loaded model: image file, folder or glob, "
                             "video file, camera index (0), rtsp:// or http:// URL, or a ROS 2 "
                             ".mcap bag; outputs are named by file stem or frame_<index>"
                             + ("" if required else " (default: none, the IMAGE arguments)"))
    parser.add_argument("--topic", default=None,
                        help="image topic of a .mcap bag (default: the bag's only image topic)")
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
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny)")
    parser.add_argument("--out", default="densert-out",
                        help="output directory (created); depth/ and segment/ inside it")
    parser.add_argument("--quiet", action="store_true", help="no per-frame lines or summary; errors only")
    add_source_arguments(parser, required=True)
    add_dataclass_arguments(parser, PredictorOptions)
    add_dataclass_arguments(parser, DenseOptions, DENSE_FLAGS)
    add_dataclass_arguments(parser, OutputOptions, ("range", "legend", "invalid"))
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="depth preset (default: the model's task_defaults.json, else "
                             "open-world); the dataset presets put the prompt before the image and "
                             "need their own prefill")
    parser.add_argument("--focal", type=float, default=None,
                        help="focal length in px (open world; default: none, relative depth)")
    parser.add_argument("--depth", action=argparse.BooleanOptionalAction, default=True,
                        help="compute the depth map")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class names to segment from the same prefill "
                             "(default: none, depth only)")
    parser.add_argument("--background", action="store_true",
                        help="closed set with the <OTHERS> background rule")


def configure_ros2(parser: argparse.ArgumentParser) -> None:
    from .. import ros2_node
    parser.add_argument("--model", default=None,
                        help="checkpoint directory (default: the bundled densert-tiny)")
    add_dataclass_arguments(parser, PredictorOptions, exclude=("max_new_tokens",))
    add_dataclass_arguments(parser, DenseOptions, ros2_node.DENSE_FLAGS)
    parser.add_argument("--preset", choices=tuple(PRESETS), default=None,
                        help="depth preset (default: the model's task_defaults.json, else open-world)")
    parser.add_argument("--focal", type=float, default=None,
                        help="focal length in px until a camera_info arrives (open world; default: "
                             "none, relative depth)")
    parser.add_argument("--depth", action=argparse.BooleanOptionalAction, default=True,
                        help="publish depth (32FC1)")
    parser.add_argument("--depth-mm", action="store_true",
                        help="also publish depth_mm (16UC1 millimetres, 0 invalid; metric depth)")
    parser.add_argument("--classes", default=None,
                        help="comma-separated class names: publish labels (mono16) from the same "
                             "prefill (default: none)")
    parser.add_argument("--background", action="store_true",
                        help="closed set with the <OTHERS> background rule")
    parser.add_argument("--labels-color", action="store_true",
                        help="also publish labels_color (rgb8 class colours)")
    parser.add_argument("--name", default=ros2_node.NODE_NAME, help="node name")
    parser.add_argument("--max-frames", type=int, default=0,
                        help="exit after this many processed frames (0: run until stopped)")
    parser.add_argument("--quiet", action="store_true", help="no per-frame log lines")
    parser.add_argument("--ros-args", nargs=argparse.REMAINDER, default=None,
                        help="ROS arguments (remaps, -p parameter overrides), as for any ROS node "
                             "(default: none)")


def run(args) -> int:
    if args.command == "ros2":
        from .. import ros2_node
        return ros2_node.spin(args)
    from ..filesets import no_empty_out
    with no_empty_out(args.out):
        return run_source(args)


def _options(args, task: str) -> tuple[DenseOptions, PredictorOptions, OutputOptions]:
    from ..cli import DENSE_FLAGS as TASK_FLAGS
    dense_flags = DENSE_FLAGS if task == "dense" else TASK_FLAGS[task]
    out_flags = ("range", "legend", "invalid") if task == "dense" else OUTPUT_FLAGS[task]
    try:
        out = OutputOptions(**dataclass_kwargs(args, out_flags))
        for t in (("depth", "segment") if task == "dense" else (task,)):
            out.formats_for(t)
        return (DenseOptions(**dataclass_kwargs(args, dense_flags)),
                PredictorOptions(**dataclass_kwargs(args, fields_of(PredictorOptions))), out)
    except ValueError as e:
        raise CLIError(str(e)) from None


class _Window:
    """``--show``: an OpenCV window, checked before the model loads."""

    def __init__(self, title: str):
        import os

        from densert.extras import require
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


def _is_cuda_oom(e: BaseException) -> bool:
    oom = getattr(sys.modules.get("torch"), "cuda", None)
    return oom is not None and isinstance(e, oom.OutOfMemoryError)


def run_source(args) -> int:
    """``--source`` of depth / segment, and ``densert dense``."""
    from densert.checkpoint.model_dir import read_task_defaults

    from .. import filesets as O
    from ..sources import ImageFiles, open_source
    from ..speed import SpeedReport

    command = args.command
    if getattr(args, "images", None):
        raise CLIError("give either IMAGE arguments or --source, not both")
    task = command
    opts, settings, out_opts = _options(args, task)
    classes = _classes(args)
    if task == "dense" and not args.depth and not classes:
        raise CLIError("nothing to compute: --no-depth and no --classes")
    if opts.crf and (classes or task == "segment"):  # before the model loads
        from densert.extras import require

        from ..options import CRF_MODULE, CRF_PURPOSE
        require(CRF_MODULE, CRF_PURPOSE)
    from ..predictor import depth_scale, runtime_dir
    model_dir = runtime_dir(args.model, settings.backend, settings.engine_dir)
    preset = None
    want_depth = task == "depth" or (task == "dense" and args.depth)
    if want_depth:
        from densert.tasks.depth_bins import OPEN_WORLD
        preset = args.preset or read_task_defaults(model_dir).get("depth", {}).get("preset") or OPEN_WORLD
        try:
            depth_scale(preset, args.focal, None, settings.upscale)
        except ValueError as e:
            raise CLIError(str(e)) from None
    out = O.check_writable(args.out)
    window = _Window(f"densert {command}") if args.show else None
    source = open_source(args.source, args.topic)
    if isinstance(source, ImageFiles):
        source.names, notes = O.output_stems(source.paths)
        for n in notes:
            _say(f"densert {command}: note: {n}", args.quiet)
    dirs = {}
    if task == "dense":
        dirs = {t: O.check_writable(out / t) for t in (("depth",) if args.depth else ())
                + (("segment",) if classes else ())}

    from ..predictor import DensePredictor, Timings
    pred = DensePredictor(model_dir, opts, **asdict(settings))
    if pred.is_demo_model:
        _say(f"densert {command}: note: using the bundled demo model densert-tiny (its maps of real "
             "photos mean little): pass --model DIR with a Youtu-VL checkpoint for real results",
             args.quiet)
    if task == "dense" and want_depth and classes and preset is not None:
        from densert.tasks import prompts
        if not prompts.depth(preset).image_first:
            _say(f"densert dense: note: the {preset} depth prompt precedes the image, so depth "
                 "runs its own prefill (the image is still encoded once); the open-world preset "
                 "shares one prefill with segmentation", args.quiet)
    bg = True if getattr(args, "background", False) else None
    if task == "depth":
        task_options = {"preset": preset, "focal": args.focal}
    elif task == "segment":
        task_options = {"classes": classes, "background": bg}
    else:
        task_options = {"preset": preset, "focal": args.focal, "classes": classes,
                        "background": bg, "depth": args.depth}
    _say(f"densert {command}: {source.description} -> {out}", args.quiet)
    report = SpeedReport(f"densert {command}", total=len(source))
    written = failures = 0
    items = pred.stream(source, task=task, drop=args.drop, **task_options)
    try:
        with _sigterm_raises(), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            for item in items:
                name = item.frame.name
                label = str(item.frame.image) if isinstance(item.frame.image, Path) else name
                if item.error is not None:
                    failures += 1
                    report.add(item.timings, item.dropped, failed=True)
                    e = item.error
                    if _is_cuda_oom(e):  # one frame too big for the GPU: say how, go on
                        e = ValueError("out of GPU memory; lower --max-patches")
                    elif not isinstance(e, (DensertError, ValueError, OSError)):
                        raise e
                    msg = str(e) if label in str(e) else f"{label}: {e}"
                    _say(f"densert {command}: error: {msg}")
                    continue
                timings = dict(item.timings)
                tm = Timings()
                try:
                    with tm.stage("write"):
                        if task == "dense":
                            r = item.result
                            if r.depth is not None:
                                O.write_set(dirs["depth"], r.depth.artifacts(name, out_opts))
                            if r.segmentation is not None:
                                O.write_set(dirs["segment"], r.segmentation.artifacts(name, out_opts))
                        else:
                            O.write_set(out, item.result.artifacts(name, out_opts))
                except (DensertError, OSError) as e:
                    failures += 1
                    report.add(timings, item.dropped, failed=True)
                    _say(f"densert {command}: error: {label}: {e}")
                    continue
                timings.update(tm)
                written += 1
                report.add(timings, item.dropped, item.latency)
                for w in caught:
                    _say(f"densert {command}: warning: {label}: {w.message}", args.quiet)
                caught.clear()
                hw = (item.result.results[0] if task == "dense" else item.result).original_hw
                _say(report.line(item.frame.index, label, hw, task, timings, item.dropped), args.quiet)
                if window is not None:
                    pics = [r.plot() for r in (item.result.results if task == "dense" else [item.result])]
                    if not window.show(pics):
                        break
    except (KeyboardInterrupt, Terminated) as e:
        items.close()
        code = 143 if isinstance(e, Terminated) else 130
        print(f"densert {command}: interrupted; {written} frame(s) written to {out}", file=sys.stderr)
        _say(report.summary(), args.quiet)
        return code
    finally:
        if window is not None:
            window.close()
    items.close()
    _say(report.summary(), args.quiet)
    _say(f"densert {command}: wrote results for {written} frame(s) to {out}", args.quiet)
    if failures:
        print(f"densert {command}: {failures} frame(s) failed", file=sys.stderr)
        return 1
    if written == 0:
        print(f"densert {command}: {source.description} gave no frame", file=sys.stderr)
        return 1
    return 0
