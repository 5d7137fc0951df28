"""``densert export`` / ``densert verify`` / ``densert build-engine``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError, DensertError
from densert.image import MERGE
from densert.options import comma_list, int_at_least

from .options import VERIFY_DECODE_STEPS, VERIFY_GRIDS, BuildRequest, ExportOptions


def _grid(s: str) -> tuple[int, int]:
    """A patch grid of a synthetic image: even sides (2x2 patches merge into one token)."""
    try:
        gh, gw = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected GHxGW in patches, e.g. 12x20") from None
    if gh < MERGE or gw < MERGE or gh % MERGE or gw % MERGE:
        raise argparse.ArgumentTypeError(f"{s!r}: both sides must be positive multiples of {MERGE} "
                                         "patches (2x2 patches make one vision token), e.g. 12x20")
    return gh, gw


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "export":
        parser.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
        parser.add_argument("--out", required=True, help="engine directory to write")
        add_dataclass_arguments(parser, ExportOptions)
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    elif command == "verify":
        from densert.runtime.options import BACKENDS
        parser.intermixed = True  # the README's `verify ENGINES --model DIR IMAGES`
        parser.add_argument("engine_dir", help="engine directory written by `densert export`")
        parser.add_argument("images", nargs="*", help="images to check (default: synthetic images of "
                            "several sizes for the tensor checks, rendered scenes for the metrics)")
        parser.add_argument("--model", required=True, help="checkpoint directory the engine was exported from")
        parser.add_argument("--grids", type=_grid, nargs="+", default=None,
                            help="patch grids of the synthetic images (default: "
                                 + " ".join(f"{h}x{w}" for h, w in VERIFY_GRIDS) + ", each "
                                 "scaled down to fit the engine's image budget)")
        parser.add_argument("--decode-steps", type=int_at_least(0), default=VERIFY_DECODE_STEPS,
                            help="greedy decode steps compared (0: none, the prefill's next "
                                 "token only)")
        parser.add_argument("--backend", choices=[b for b in BACKENDS if b != "torch"],
                            default="onnxruntime", help="engine backend under test")
        parser.add_argument("--classes", type=comma_list, default=None, metavar="A,B,...",
                            help="segmentation classes of the metric gate (default: the 26 "
                                 "classes of the rendered scenes)")
        parser.add_argument("--metrics", action=argparse.BooleanOptionalAction, default=True,
                            help="also gate what users read: depth AbsRel / delta1, segmentation "
                                 "mIoU and greedy tokens through the runtime's decoding, against "
                                 "thresholds measured on the bundled model (--no-metrics: tensor "
                                 "checks only)")
    elif command == "build-engine":
        parser.add_argument("engine_dir", help="engine directory written by `densert export`")
        add_dataclass_arguments(parser, BuildRequest)
        parser.add_argument("--print-only", action="store_true", help="only print the trtexec commands")
    else:
        raise CLIError(f"densert.export.cli has no command {command!r}")


def run(args) -> int:
    if args.command == "export":
        from .onnx_export import export_engine
        try:
            opts = ExportOptions(**dataclass_kwargs(args, fields_of(ExportOptions)))
        except ValueError as e:
            raise CLIError(str(e)) from None
        out = Path(args.out)
        existed = out.exists()
        try:
            m = export_engine(args.model, args.out, opts, progress=not args.quiet)
        except (DensertError, OSError, KeyboardInterrupt):
            if not existed and out.is_dir() and not any(out.iterdir()):
                out.rmdir()  # a failed export leaves no empty --out behind
            raise
        sizes = {g: sum((Path(args.out) / f).stat().st_size for f in [i["file"], *i["external_data"]])
                 for g, i in m["graphs"].items()}
        for g, s in sizes.items():
            print(f"{g:<12} {s / 2**20:10.1f} MiB  {m['graphs'][g]['file']}")
        total = sum(p.stat().st_size for p in Path(args.out).iterdir() if p.is_file())
        sizes_txt = (f"sized for {' '.join('x'.join(map(str, s)) for s in m['image_sizes'])} px"
                     if m["image_sizes"] else f"up to {m['max_image_tokens']} image tokens")
        print(f"engine dir {args.out}: {total / 2**20:.1f} MiB, {m['precision']}, {sizes_txt}, cache "
              f"layout {m['cache_layout']}, tasks {','.join(m['tasks'])}, checkpoint "
              f"{m['checkpoint']['checkpoint_id'][:16]} (not needed to run it)")
        return 0
    if args.command == "verify":
        from .verify import verify
        def log(s: str) -> None:
            print(s, file=sys.stderr)
        after = None
        if args.metrics:   # checks --classes and the checkpoint's random-weights mark first
            from densert.training.engine_gate import metric_gate
            after = metric_gate(args.model, args.images, args.classes, log)
        backend = None
        if args.backend == "tensorrt":
            from .trt_backend import TrtBackend
            backend = TrtBackend(args.engine_dir, model_dir=args.model)
        rep = verify(args.engine_dir, args.model, images=args.images, grids=args.grids,
                     decode_steps=args.decode_steps, backend=backend, log=log, after=after)
        print(rep.format())
        return 0 if rep.ok else 1
    if args.command == "build-engine":
        from .manifest import read_manifest
        from .tensorrt import BuildOptions, build_engines, trtexec_commands
        m = read_manifest(args.engine_dir)
        opts = BuildOptions.from_manifest(m, BuildRequest(**dataclass_kwargs(args, fields_of(BuildRequest))))
        print("equivalent trtexec command lines:")
        for line in trtexec_commands(args.engine_dir, m, opts):
            print("  " + line)
        if args.print_only:
            return 0
        build_engines(args.engine_dir, m, opts)
        return 0
    raise CLIError(f"unknown command {args.command!r}")
