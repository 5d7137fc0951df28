"""``densert render | train | eval | ablation``: the training-side commands."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from densert.cli import CLIError

DEFAULT_MODEL = Path(__file__).resolve().parents[1] / "densert" / "assets" / "densert-tiny"


def _size(s: str) -> tuple[int, int]:
    try:
        h, w = (int(v) for v in s.lower().split("x"))
    except ValueError:
        raise CLIError(f"image size {s!r}: expected HxW, e.g. 256x256") from None
    if h <= 0 or w <= 0 or h % 32 or w % 32:
        raise CLIError(f"image size {s!r}: sides must be positive multiples of 32")
    return h, w


def configure(parser, command: str) -> None:
    if command == "render":
        parser.add_argument("out", help="output directory")
        parser.add_argument("--n", type=int, default=4, help="number of scenes")
        parser.add_argument("--seed-base", type=int, default=0, help="first scene seed")
        parser.add_argument("--image-size", default="256x320", help="HxW (default 256x320)")
        parser.add_argument("--kind", choices=["any", "indoor", "outdoor"], default="any")
    elif command == "train":
        from .losses import LOSSES
        parser.add_argument("--out", required=True, help="checkpoint directory (HF layout + trainer state)")
        parser.add_argument("--preset", default="tiny")
        parser.add_argument("--steps", type=int, default=1000)
        parser.add_argument("--batch", type=int, default=8)
        parser.add_argument("--image-size", default="256x256")
        parser.add_argument("--tasks", default="depth,segment,refer")
        parser.add_argument("--loss", choices=LOSSES, default="ntpm")
        parser.add_argument("--k", type=int, default=32, help="NTP-M relevant negatives per token")
        parser.add_argument("--lr", type=float, default=1e-3)
        parser.add_argument("--warmup", type=int, default=50)
        parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--scenes", type=int, default=1000, help="distinct training scenes")
        parser.add_argument("--alignment", choices=["k", "k-1"], default="k")
        parser.add_argument("--eval-every", type=int, default=0)
        parser.add_argument("--eval-n", type=int, default=16)
        parser.add_argument("--save-every", type=int, default=0)
        parser.add_argument("--resume", default=None, help="checkpoint directory written by train")
        parser.add_argument("--max-minutes", type=float, default=0.0)
        parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = default)")
        parser.add_argument("--fsdp", action="store_true", help="FSDP instead of DDP under torchrun")
        parser.add_argument("--export", default=None,
                            help="also write the final weights (no trainer state) here")
        parser.add_argument("--export-dtype", default="bfloat16", choices=["float32", "bfloat16"])
        parser.add_argument("--no-progress", action="store_true")
    elif command == "eval":
        parser.add_argument("--model", default=str(DEFAULT_MODEL))
        parser.add_argument("--seeds", choices=["held-out", "train"], default="held-out",
                            help="held-out: scene seeds 1e9+i (never trained on); train: seeds of "
                                 "the training stream")
        parser.add_argument("--n", type=int, default=64)
        parser.add_argument("--image-size", default=None, help="default: the model's training size")
        parser.add_argument("--alignment", choices=["k", "k-1"], default=None)
        parser.add_argument("--json", default=None, help="write the scores here (default: "
                                                         "<model>/eval_<seeds>.json)")
        parser.add_argument("--threads", type=int, default=0)
    elif command == "ablation":
        from .ablation import configure as ab_configure
        ab_configure(parser)


def run(args) -> int:
    return {"render": _render, "train": _train, "eval": _eval, "ablation": _ablation}[args.command](args)


def _render(args) -> int:
    from .scenes import write_samples
    if args.n <= 0:
        raise CLIError("--n must be positive")
    h, w = _size(args.image_size)
    for p in write_samples(args.out, range(args.seed_base, args.seed_base + args.n), h, w, args.kind):
        print(p)
    return 0


def _train(args) -> int:
    import torch
    from .trainer import TrainConfig, Trainer
    try:
        cfg = TrainConfig(out=args.out, preset=args.preset, steps=args.steps, batch=args.batch,
                          image_size=_size(args.image_size),
                          tasks=tuple(t.strip() for t in args.tasks.split(",") if t.strip()),
                          loss=args.loss, k=args.k, lr=args.lr, warmup=args.warmup,
                          precision=args.precision, seed=args.seed, scenes=args.scenes,
                          alignment=args.alignment, eval_every=args.eval_every, eval_n=args.eval_n,
                          save_every=args.save_every, max_minutes=args.max_minutes,
                          fsdp=args.fsdp, threads=args.threads, progress=not args.no_progress)
    except ValueError as e:
        raise CLIError(str(e)) from None
    if args.resume and not Path(args.resume, "trainer_state.pt").is_file():
        raise CLIError(f"--resume {args.resume}: no trainer_state.pt there")
    tr = Trainer(cfg, resume=args.resume, log=lambda s: print(s, file=sys.stderr, flush=True))
    summary = tr.fit()
    if args.export and tr.rank == 0:
        from densert.checkpoint import write_checkpoint
        p = write_checkpoint(tr.model, args.export, tr.tok_json, dtype=args.export_dtype, overwrite=True)
        Path(p, "train_config.json").write_text(json.dumps(cfg.to_dict(), indent=1) + "\n")
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
    from densert import tokens as T
    from densert.loader import load_model
    from .trainer import HELD_OUT_SEED_BASE, TrainConfig, evaluate
    if args.threads:
        torch.set_num_threads(args.threads)
    path = Path(args.model)
    if not (path / "config.json").is_file():
        raise CLIError(f"--model {path}: not a checkpoint directory (no config.json)")
    tc = Path(path, "train_config.json")
    cfg = TrainConfig.from_dict(json.loads(tc.read_text())) if tc.is_file() else TrainConfig()
    model = load_model(path, "float32")
    vocab = T.Vocab.from_file(path / "tokenizer.json")
    base = HELD_OUT_SEED_BASE if args.seeds == "held-out" else cfg.seed * 1_000_003
    scores = evaluate(model, vocab, n=args.n, cfg=cfg, seed_base=base,
                      image_size=_size(args.image_size) if args.image_size else None,
                      alignment=args.alignment)
    scores["model"] = str(path)
    scores["seeds"] = args.seeds
    text = json.dumps(scores, indent=1)
    print(text)
    out = Path(args.json) if args.json else path / f"eval_{args.seeds}.json"
    try:
        out.write_text(text + "\n")
    except OSError as e:
        print(f"densert eval: could not write {out}: {e}", file=sys.stderr)
    return 0


def _ablation(args) -> int:
    from .ablation import run as ab_run
    return ab_run(args)
