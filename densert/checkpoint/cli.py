"""``densert make-test-checkpoint`` and ``densert inspect``: the checkpoint commands."""
from __future__ import annotations

import json

from densert.errors import CLIError
from densert.model.config import DTYPES, MODEL_SIZES


def configure(parser, command: str) -> None:
    if command == "make-test-checkpoint":
        parser.add_argument("out", help="output directory (must be empty unless --force)")
        parser.add_argument("--model-size", choices=MODEL_SIZES, default="tiny",
                            help="the released widths (youtu-vl-4b) or the same architecture small")
        parser.add_argument("--text-layers", type=int, default=None,
                            help="LLM layer count (default: the model size's)")
        parser.add_argument("--vision-layers", type=int, default=None,
                            help="ViT layer count (default: the model size's)")
        parser.add_argument("--seed", type=int, default=0, help="init seed")
        parser.add_argument("--dtype", choices=DTYPES, default="bfloat16", help="dtype on disk")
        parser.add_argument("--shard-mb", type=float, default=None,
                            help="split weights into shards of at most this many MB plus an "
                                 "index.json (default: one model.safetensors)")
        parser.add_argument("--force", action="store_true", help="write into a non-empty directory")
    else:
        parser.add_argument("model_dir", help="checkpoint directory, or an engine directory (densert export)")
        parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args) -> int:
    if args.command == "inspect":
        from .inspect import format_text, summarize
        s = summarize(args.model_dir)
        print(json.dumps(s, indent=2) if args.json else format_text(s))
        return 0
    from .random_init import make_test_checkpoint
    for flag in ("text_layers", "vision_layers"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise CLIError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    shard = None if args.shard_mb is None else int(args.shard_mb * 2**20)
    out = make_test_checkpoint(args.out, args.model_size, args.text_layers, args.vision_layers,
                               args.seed, args.dtype, shard, overwrite=args.force, progress=True)
    print(f"wrote {args.model_size} test checkpoint to {out}")
    return 0
