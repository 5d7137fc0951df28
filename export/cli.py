"""``densert export`` / ``densert verify`` / ``densert build-engine``."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import CLIError


def _grid(s: str) -> tuple[int, int]:
    try:
        gh, gw = (int(x) for x in s.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r}: expected GHxGW in patches, e.g. 12x20") from None
    return gh, gw


def configure(parser: argparse.ArgumentParser, command: str) -> None:
    if command == "export":
        from .onnx_export import DEFAULT_MAX_PATCHES
        parser.add_argument("--model", required=True, help="checkpoint directory (config.json + *.safetensors)")
        parser.add_argument("--out", required=True, help="engine directory to write")
        parser.add_argument("--precision", choices=["fp32", "fp16"], default="fp32")
        parser.add_argument("--max-patches", type=int, default=DEFAULT_MAX_PATCHES,
                            help="largest image (16x16 patches) the engine accepts; recorded in the manifest "
                                 "and used as the TensorRT profile maximum")
        parser.add_argument("--tasks", default="depth,segment,chat",
                            help="comma list of depth, segment, chat (chat adds llm_decode.onnx)")
        parser.add_argument("--cache-layout", choices=["latent", "full"], default="latent")
        parser.add_argument("--quiet", action="store_true", help="no progress bar")
    elif command == "verify":
        parser.add_argument("engine_dir")
        parser.add_argument("images", nargs="*", help="images to check (default: synthetic images of several sizes)")
        parser.add_argument("--model", required=True, help="checkpoint directory the engine was exported from")
        parser.add_argument("--grids", type=_grid, nargs="+", default=None,
                            help="patch grids of the synthetic images, e.g. 8x8 12x20 34x18")
        parser.add_argument("--decode-steps", type=int, default=6)
        parser.add_argument("--backend", choices=["onnxruntime", "tensorrt"], default="onnxruntime")
    elif command == "build-engine":
        parser.add_argument("engine_dir")
        parser.add_argument("--fp16", action="store_true", help="allow fp16 tactics (with an fp32 ONNX export; "
                                                                "an fp16 export is built strongly typed)")
        parser.add_argument("--min-patches", type=int, default=4)
        parser.add_argument("--opt-patches", type=int, default=1024)
        parser.add_argument("--max-patches", type=int, default=None, help="default: the manifest's max_patches")
        parser.add_argument("--max-seq", type=int, default=None,
                            help="longest prompt + generated tokens (default: max image tokens + 512)")
        parser.add_argument("--opt-seq", type=int, default=None)
        parser.add_argument("--workspace-gb", type=float, default=4.0)
        parser.add_argument("--timing-cache", default=None, help="default: ENGINE_DIR/timing.cache")
        parser.add_argument("--print-only", action="store_true", help="only print the trtexec commands")
    else:
        raise CLIError(f"densert.export.cli has no command {command!r}")


def run(args) -> int:
    if args.command == "export":
        from .onnx_export import export_engine
        tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
        m = export_engine(args.model, args.out, precision=args.precision, max_patches=args.max_patches,
                          tasks=tasks, cache_layout=args.cache_layout, progress=not args.quiet)
        sizes = {g: sum((Path(args.out) / f).stat().st_size for f in [i["file"], *i["external_data"]])
                 for g, i in m["graphs"].items()}
        for g, s in sizes.items():
            print(f"{g:<12} {s / 2**20:10.1f} MiB  {m['graphs'][g]['file']}")
        print(f"engine dir {args.out}: {m['precision']}, cache layout {m['cache_layout']}, tasks "
              f"{','.join(m['tasks'])}, checkpoint {m['checkpoint']['checkpoint_id'][:16]}")
        return 0
    if args.command == "verify":
        from .verify import DEFAULT_GRIDS, verify
        backend = None
        if args.backend == "tensorrt":
            from .trt_backend import TrtBackend
            backend = TrtBackend(args.engine_dir, model_dir=args.model)
        rep = verify(args.engine_dir, args.model, images=args.images, grids=args.grids or DEFAULT_GRIDS,
                     decode_steps=args.decode_steps, backend=backend,
                     log=lambda s: print(s, file=sys.stderr))
        print(rep.format())
        return 0 if rep.ok else 1
    if args.command == "build-engine":
        from .tensorrt import BuildOptions, build_engines, trtexec_commands
        from .manifest import read_manifest
        m = read_manifest(args.engine_dir)
        opts = BuildOptions.from_manifest(m, fp16=args.fp16, min_patches=args.min_patches,
                                          opt_patches=args.opt_patches, max_patches=args.max_patches,
                                          max_seq=args.max_seq, opt_seq=args.opt_seq,
                                          workspace_gb=args.workspace_gb, timing_cache=args.timing_cache)
        print("equivalent trtexec command lines:")
        for line in trtexec_commands(args.engine_dir, m, opts):
            print("  " + line)
        if args.print_only:
            return 0
        build_engines(args.engine_dir, m, opts)
        return 0
    raise CLIError(f"unknown command {args.command!r}")
