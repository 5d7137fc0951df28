"""``densert render | train | eval | ablation``: the training-side commands."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from densert.cli import add_dataclass_arguments, dataclass_kwargs, fields_of
from densert.errors import CLIError
from densert.image import BLOCK
from densert.model.config import DTYPES
from densert.options import hw_size, int_at_least
from densert.tasks import ALIGNMENTS

from .config import SCENE_KINDS, AblationConfig, TrainConfig


def _size(s: str) -> tuple[int, int]:
    """An image size the model takes whole: HxW, both sides multiples of one vision token."""
    try:
        h, w = hw_size(s)
    except ValueError as e:
        raise CLIError(f"image size: {e}") from None
    if h % BLOCK or w % BLOCK:
        raise CLIError(f"image size {s!r}: sides must be positive multiples of {BLOCK}")
    return h, w


def _fraction(s: str) -> float:
    """``eval --val-fraction``: TrainConfig's own range check on the same field."""
    import argparse
    try:
        v = float(s)
        TrainConfig(val_fraction=v)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return v


def configure(parser, command: str) -> None:
    if command == "render":
        parser.add_argument("out", help="output directory")
        parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3],
                            help="scene seeds, one scene each")
        parser.add_argument("--image-size", default="256x320", help="HxW of the scenes")
        parser.add_argument("--kind", choices=SCENE_KINDS, default="any", help="scene kind")
    elif command == "train":
        parser.add_argument("--out", required=True, help=_help(TrainConfig, "out"))
        parser.add_argument("--data", action="append", default=[], metavar="DIR",
                            help=_help(TrainConfig, "data"))
        add_dataclass_arguments(parser, TrainConfig)
        parser.add_argument("--resume", default=None,
                            help="continue the run in this directory (default: start fresh)")
        parser.add_argument("--export", default=None,
                            help="also write the final weights (LoRA merged), without trainer "
                                 "state, here (default: none)")
        parser.add_argument("--export-dtype", default="bfloat16", choices=DTYPES,
                            help="dtype of --export")
    elif command == "eval":
        parser.add_argument("--model", default=None,
                            help="checkpoint directory (default: the bundled densert-tiny)")
        parser.add_argument("--data", action="append", default=[], metavar="DIR",
                            help="score on this dataset folder instead of rendered scenes; repeat "
                                 "for more (default: rendered scenes)")
        parser.add_argument("--split", choices=["val", "train", "all"], default="val",
                            help="with --data: which images of each folder are scored")
        parser.add_argument("--val-fraction", type=_fraction,
                            default=TrainConfig.__dataclass_fields__["val_fraction"].default,
                            help=_help(TrainConfig, "val_fraction"))
        parser.add_argument("--seeds", choices=["held-out", "train"], default="held-out",
                            help="held-out: scene seeds 1e9+i (never trained on); train: seeds of "
                                 "the training stream")
        parser.add_argument("--n", type=int_at_least(1), default=64, help="scenes scored")
        parser.add_argument("--image-size", default=None,
                            help="HxW (default: the model's training size, from train_config.json; "
                                 "with --data and no train_config.json, the processor's own cap)")
        parser.add_argument("--alignment", choices=ALIGNMENTS, default=None,
                            help="default: the model's training alignment")
        parser.add_argument("--json", default=None,
                            help="also write the scores to this file (default: stdout only)")
        parser.add_argument("--threads", type=int_at_least(0), default=0,
                            help="torch threads (0: default)")
    elif command == "example-data":
        parser.add_argument("out", help="dataset folder to write")
        parser.add_argument("--n", type=int, default=12, help="images")
        parser.add_argument("--image-size", default="192x256", help="HxW of the images")
        parser.add_argument("--seed", type=int, default=0, help="first scene seed")
    elif command == "ablation":
        add_dataclass_arguments(parser, AblationConfig)
        parser.add_argument("--out", required=True,
                            help="Markdown report to write (the rows go beside it as .json)")


def _help(cls, name: str) -> str:
    return cls.__dataclass_fields__[name].metadata["help"]


def run(args) -> int:
    return {"render": _render, "train": _train, "eval": _eval, "ablation": _ablation,
            "example-data": _example_data}[args.command](args)


def _render(args) -> int:
    from .scenes import write_samples
    h, w = _size(args.image_size)
    for p in write_samples(args.out, args.seeds, h, w, args.kind):
        print(p)
    return 0


def _train(args) -> int:
    from .trainer import Trainer
    try:
        # --out and --data are flags of their own (above) with the fields' names
        cfg = TrainConfig(**dataclass_kwargs(args, fields_of(TrainConfig)))
    except ValueError as e:
        raise CLIError(str(e)) from None
    if cfg.init:
        from densert.checkpoint.model_dir import check_checkpoint_dir
        check_checkpoint_dir(cfg.init)
    tr = Trainer(cfg, resume=args.resume, log=lambda s: print(s, file=sys.stderr, flush=True))
    summary = tr.fit()
    if args.export:
        p = tr.export(args.export, args.export_dtype)   # collective under FSDP
        if p is not None:
            Path(p, "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
            print(f"exported {p}", file=sys.stderr)
    if tr.rank == 0:
        print(json.dumps(summary, indent=1))
    if tr.distributed:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


def _eval(args) -> int:
    import torch

    from densert.checkpoint.loader import load_model
    from densert.resources import bundled_model_dir
    from densert.text import tokens

    from .trainer import HELD_OUT_SEED_BASE, evaluate, patch_cap
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else bundled_model_dir()
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path}: not a checkpoint directory (no config.json)")
    tc = Path(path, "train_config.json")
    trained = tc.is_file()
    cfg = TrainConfig.from_dict(json.loads(tc.read_text())) if trained else TrainConfig()
    if args.data:
        from densert.image import DEFAULT_MAX_PATCHES

        from .userdata import open_datasets
        from .validation import evaluate_datasets, markdown
        datasets = open_datasets(args.data, args.val_fraction)   # checked before loading weights
        size = _size(args.image_size) if args.image_size else (cfg.image_size if trained else None)
        model = load_model(path, "float32")
        vocab = tokens.Vocab.from_file(path / "tokenizer.json")
        scores = evaluate_datasets(model, vocab, datasets,
                                   patch_cap(size) if size else DEFAULT_MAX_PATCHES,
                                   args.alignment or cfg.alignment, args.split)
        report = markdown(scores, f"{path} on {', '.join(d.name for d in datasets)}")
        print(report, file=sys.stderr)
    else:
        model = load_model(path, "float32")
        vocab = tokens.Vocab.from_file(path / "tokenizer.json")
        base = HELD_OUT_SEED_BASE if args.seeds == "held-out" else cfg.seed * 1_000_003
        scores = evaluate(model, vocab, n=args.n, cfg=cfg, seed_base=base,
                          image_size=_size(args.image_size) if args.image_size else None,
                          alignment=args.alignment)
        scores["seeds"] = args.seeds
        report = None
    scores["model"] = str(path)
    text = json.dumps(scores, indent=1)
    print(text)
    if args.json:
        try:
            Path(args.json).write_text(text + "\n")
            if report is not None:
                Path(args.json).with_suffix(".md").write_text(report)
        except OSError as e:
            raise CLIError(f"cannot write --json {args.json}: {e.strerror}") from None
    return 0


def _example_data(args) -> int:
    from .example_data import write_example
    if args.n < 2:
        raise CLIError("--n must be at least 2 (one training and one validation image)")
    h, w = _size(args.image_size)
    print(write_example(args.out, args.n, (h, w), args.seed))
    return 0


def _ablation(args) -> int:
    from .ablation import run_ablation
    try:
        a = AblationConfig(**dataclass_kwargs(args, fields_of(AblationConfig)))
    except ValueError as e:
        raise CLIError(str(e)) from None
    print(run_ablation(a, args.out, "densert " + shlex.join(sys.argv[1:])))
    return 0
