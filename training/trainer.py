"""NTP-M training of a Youtu-VL model (method spec sec. 3): rendered scenes and datasets on disk,
from scratch or from a checkpoint, fully or through LoRA adapters, on one process or under
torchrun (DDP, or FSDP for full fine-tuning).

Samples (``training.samples``): one chat sequence + its image; loss = CE on the answer tokens
(+ eos) + the vision loss (NTP-M by default, ``densert.kernels.ntpm.ntpm_loss``) on the
image-pad positions, summed over tokens and divided by the number of labelled tokens.

Alignment (``TrainConfig.alignment``, the runtime's ``DenseOptions.alignment``): "k" = the hidden
state at the k-th image pad scores cell k (runtime default), "k-1" = cell k is read one position
earlier (cell 0 from ``<|vision_start|>``).

Rendered scenes use the Cityscapes depth preset by default: the scenes reach 80 m and are rendered
at ~200 px focal length, so the open-world log preset (0.5-100 m after rescaling to a 2000 px
focal) would put most outdoor depth out of range; linear 0-80 m covers every rendered depth with
8 cm bins. Datasets on disk name their preset in meta.json.

A checkpoint directory (``out``, written by ``save``) is the released layout (LoRA deltas merged)
plus ``train_config.json`` and the trainer state in safetensors + JSON (``training.state``); with
``--data``, ``eval.json`` / ``eval.md`` hold every evaluation and ``out/best`` the best weights.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densert.errors import CheckpointError, DatasetError
from densert.image import PATCH
from densert.model.vision_meta import build_vision_meta
from densert.tasks import DENSE_TASKS, prompts
from densert.text import tokens
from densert.text.chat import encode_chat, user_message

from . import finetune
from . import state as train_state
from .classes import CLASS_NAMES, NUM_CLASSES
from .config import TrainConfig
from .data import CELL
from .losses import pad_cat, vision_loss
from .samples import Batch, SceneCache, family_masks, label_space, pixel_patches, scene_sample, user_sample

TASKS = DENSE_TASKS
HELD_OUT_SEED_BASE = 1_000_000_000     # eval scenes; training scene seeds stay below this
TRAIN_CONFIG_FILE = "train_config.json"
EVAL_JSON, EVAL_MD, BEST_DIR = "eval.json", "eval.md", "best"
# Options that decide which parameters exist and where the frozen ones come from: a resumed run
# must be started with the same ones.
SHAPING = ("init", "model_size", "text_layers", "vision_layers", "lora_rank", "lora_alpha", "freeze")


def _plain(key: str, v):
    if key == "init" and v:
        return str(Path(v).resolve())
    return list(v) if isinstance(v, (list, tuple)) else v


def patch_cap(image_size: tuple[int, int]) -> int:
    """16x16 patches of an HxW image: the processor's cap for images of --data."""
    return (image_size[0] // PATCH) * (image_size[1] // PATCH)


# ---------------------------------------------------------------------------------------------
# The training forward: one module so DDP/FSDP see the whole computation
# ---------------------------------------------------------------------------------------------
class TrainForward(nn.Module):
    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.vl = model
        self.cfg = cfg

    def forward(self, pixel_values, input_ids, text_targets, grids, counts, tasks, positives, single,
                masks):
        vl, cfg = self.vl, self.cfg
        meta = build_vision_meta(grids, vl.config.vision_config).to(pixel_values.device)
        emb = vl.embed(input_ids, vl.encode_image(pixel_values, meta))
        h, _ = vl.model(emb, None, "full", use_cache=False)
        weight = vl.lm_head.weight
        # Text: CE on answer tokens, computed only at the positions that have a target.
        sel = text_targets >= 0
        logits = vl.lm_head(h[sel]).float()
        text = F.cross_entropy(logits, text_targets[sel])
        # Vision: hidden states that score each cell, sample-major, counts[b] rows per sample.
        is_img = input_ids == vl.config.image_token_id
        if cfg.alignment == "k-1":
            is_img = torch.roll(is_img, -1, dims=1)
        hv = torch.split(h[is_img], counts)
        total, n_tok = hv[0].new_zeros((), dtype=torch.float32), 0
        src = single if cfg.loss == "softmax" else positives
        for task in TASKS:
            rows = [b for b, t in enumerate(tasks) if t == task]
            if not rows:
                continue
            hsel = torch.cat([hv[b] for b in rows])
            pos = pad_cat([src[b] for b in rows]).to(h.device)
            n_tok += int((pos >= 0).any(1).sum())
            total = total + vision_loss(cfg.loss, hsel, weight, pos, None, masks[task].to(h.device),
                                        k=cfg.k)
        vis = total / max(1, n_tok)
        loss = cfg.text_weight * text + cfg.vision_weight * vis
        return loss, text.detach(), vis.detach()


# ---------------------------------------------------------------------------------------------
# Distributed helpers
# ---------------------------------------------------------------------------------------------
def dist_info() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def maybe_init_distributed() -> bool:
    """Initialise from torchrun's environment (gloo on CPU, nccl on CUDA). True if distributed."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return dist.is_initialized()
    dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return True


# ---------------------------------------------------------------------------------------------
# Trainer
# ---------------------------------------------------------------------------------------------
def lr_factor(step: int, cfg: TrainConfig, time_frac: float = 0.0) -> float:
    """Linear warmup, then cosine from 1 to ``min_lr_ratio`` at ``cfg.steps``.

    ``time_frac`` (elapsed / ``max_minutes``) lets a wall-clock-limited run still anneal: the
    cosine follows whichever of the step count and the clock is further along. On a shared
    machine the step rate varies several-fold, so a pure step schedule would stop mid-decay."""
    if step < cfg.warmup:
        return (step + 1) / cfg.warmup
    t = min(1.0, max((step - cfg.warmup) / max(1, cfg.steps - cfg.warmup), time_frac))
    return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, device: str | None = None,
                 log=print):
        from .userdata import open_datasets
        self.cfg = cfg
        self.log = log
        self.distributed = maybe_init_distributed()
        self.rank, self.world = dist_info()
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if self.device.type == "cuda" and self.distributed:
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        np.random.seed(cfg.seed)
        # Datasets first: a broken folder fails before any weights are read.
        self.datasets = open_datasets(cfg.data, cfg.val_fraction)
        self.model, self.tok_json = finetune.build_model(cfg)
        finetune.prepare(self.model, cfg)
        self.step = 0
        state = self._load_resume(resume) if resume else None
        self.model.to(self.device).train()
        self.vocab = tokens.Vocab.from_str(self.tok_json)
        self.space = label_space(self.vocab)
        self.spaces = [label_space(self.vocab, ds.class_names) if ds.class_names else self.space
                       for ds in self.datasets]
        self.masks = family_masks([self.space, *self.spaces], len(self.vocab))
        self.train_items = [(i, it) for i, ds in enumerate(self.datasets)
                            for it in ds.items("train", cfg.tasks)]
        if self.datasets and not self.train_items:
            raise DatasetError(f"--data: no training images for tasks {list(cfg.tasks)} in "
                               f"{[str(d.root) for d in self.datasets]} (everything is in the "
                               "validation split, or no folder has these annotations)")
        self.fwd = TrainForward(self.model, cfg)
        self.wrapped = self._wrap(self.fwd)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW([{"params": [p for _, p in trainable if p.dim() >= 2],
                                       "weight_decay": cfg.weight_decay},
                                      {"params": [p for _, p in trainable if p.dim() < 2],
                                       "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(0.9, 0.95))
        self.time_frac = 0.0
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg, self.time_frac))
        self.history: list[dict] = []
        self.evals: list[dict] = []
        self.best: dict | None = None
        if state is not None:
            self._set_optimizer_state(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            train_state.set_rng_state(state["rng"])
            self.evals, self.best = state.get("evals", []), state.get("best")
        self.scenes = SceneCache(cfg.image_size, cfg.scenes, cfg.seed)

    # -- setup --
    def _wrap(self, module):
        if not self.distributed:
            return module
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            # Layer by layer, so only the running (and the prefetched) layer is ever unsharded.
            for layer in [*self.model.siglip2.vision_model.encoder.layers, *self.model.model.layers]:
                fully_shard(layer)
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _load_resume(self, path: str) -> dict:
        """Weights from the released files in ``path`` (a LoRA run: the adapters from the trainer
        state, the frozen base from ``--init`` as rebuilt above) and the trainer state."""
        from densert.checkpoint.loader import load_model
        p = Path(path)
        state, extra = train_state.load_state(p)   # refuses a pickle-only directory before reading weights
        was = state["config"]
        differ = [f"{k}: {was.get(k)!r} there, {getattr(self.cfg, k)!r} now" for k in SHAPING
                  if _plain(k, was.get(k)) != _plain(k, getattr(self.cfg, k))]
        if differ:
            raise CheckpointError(f"--resume {p}: the run was started with other model options "
                                  f"({'; '.join(differ)}); pass the same ones")
        saved = load_model(p, "float32").state_dict()
        own = self.model.state_dict()
        new = {}
        for name in own:
            if finetune.is_lora(name):
                new[name] = extra[f"lora.{name}"]
            elif ".base_layer." not in name:
                new[name] = saved[name]
        self.model.load_state_dict(new, strict=False)
        self.tok_json = (p / "tokenizer.json").read_text()
        self.step = int(state["step"])
        return state

    def _fsdp(self) -> bool:
        return self.distributed and self.cfg.fsdp

    def _optimizer_state(self) -> dict:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict
            return get_optimizer_state_dict(self.fwd, self.opt, options=StateDictOptions(
                full_state_dict=True, cpu_offload=True))
        return self.opt.state_dict()

    def _set_optimizer_state(self, osd: dict) -> None:
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
            set_optimizer_state_dict(self.fwd, self.opt, osd,
                                     options=StateDictOptions(full_state_dict=True))
        else:
            self.opt.load_state_dict(osd)

    # -- data --
    def samples_for_step(self, step: int) -> list:
        """Deterministic in (seed, step, rank): resume replays the same stream."""
        cfg = self.cfg
        out = []
        for j in range(cfg.batch):
            g = (step * self.world + self.rank) * cfg.batch + j
            rng = random.Random(cfg.seed * 7919 + g)
            if self.train_items and (cfg.scene_ratio == 0 or rng.random() >= cfg.scene_ratio):
                i, item = self.train_items[rng.randrange(len(self.train_items))]
                out.append(user_sample(item, self.datasets[i], self.vocab, self.spaces[i],
                                       patch_cap(cfg.image_size), rng))
            else:
                task = cfg.tasks[g % len(cfg.tasks)]
                scene = self.scenes.get(rng.randrange(cfg.scenes))
                out.append(scene_sample(task, scene, self.vocab, self.space, cfg.image_size,
                                        cfg.depth_preset, rng))
        return out

    def train_step(self, samples: list) -> dict:
        b = Batch(samples, self.vocab.eos_id)
        dev = self.device
        ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")
        with ac:
            loss, text, vis = self.wrapped(b.pixel_values.to(dev), b.input_ids.to(dev),
                                           b.text_targets.to(dev), b.grids, b.counts, b.tasks,
                                           b.positives, b.single, self.masks)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_([p for p in self.model.parameters() if p.requires_grad],
                                            self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "text": float(text),
                "vision": float(vis), "grad_norm": float(gn), "lr": self.sched.get_last_lr()[0]}

    def memory_estimate(self):
        from .memory import estimate_memory
        b = Batch(self.samples_for_step(self.step), self.vocab.eos_id)
        with torch.random.fork_rng(devices=[]):   # building the traced copy draws random inits
            return estimate_memory(self.model.config, self.cfg, b, self.world, self.device.type)

    def fit(self) -> dict:
        cfg = self.cfg
        est = None
        if self.rank == 0:
            est = self.memory_estimate()
            how = ", ".join([f"LoRA r={cfg.lora_rank}" if cfg.lora_rank else "full fine-tuning"]
                            + ([f"frozen: {','.join(cfg.freeze)}"] if cfg.freeze else [])
                            + (["gradient checkpointing"] if cfg.grad_checkpoint else []))
            for line in est.lines(f"batch {cfg.batch}, images up to {cfg.image_size[0]}x"
                                  f"{cfg.image_size[1]}, {cfg.precision}, {how}"):
                self.log(line)
        t0 = time.time()
        bar = None
        if cfg.progress and self.rank == 0:
            from tqdm import tqdm
            bar = tqdm(total=cfg.steps, initial=self.step, dynamic_ncols=True)
        last = {}
        stop_reason = "steps"
        while self.step < cfg.steps:
            ts = time.time()
            last = self.train_step(self.samples_for_step(self.step))
            last["samples_per_s"] = cfg.batch * self.world / max(1e-9, time.time() - ts)
            self.history.append(last)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{last['loss']:.3f}", text=f"{last['text']:.3f}",
                                vis=f"{last['vision']:.3f}", sps=f"{last['samples_per_s']:.1f}")
            if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.steps:
                self._eval_and_log()
            if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                self.save(cfg.out)
            if cfg.max_minutes:
                tf = torch.tensor([min(1.0, (time.time() - t0) / 60 / cfg.max_minutes)],
                                  dtype=torch.float64)
                if self.distributed:
                    # Ranks must share the schedule and the stop: their wall clocks differ.
                    import torch.distributed as dist
                    dist.all_reduce(tf, op=dist.ReduceOp.MAX)
                self.time_frac = float(tf)
            want_stop = bool(cfg.max_minutes and self.time_frac >= 1.0)
            if want_stop:
                stop_reason = "max_minutes"
                break
        if bar is not None:
            bar.close()
        minutes = (time.time() - t0) / 60
        scores = self._eval_and_log() if (cfg.eval_n or self.datasets) else {}
        self.save(cfg.out)
        summary = {"steps_done": self.step, "stop": stop_reason, "train_minutes": minutes,
                   "last": last, "eval": scores, "best": self.best,
                   "memory_estimate": est.to_dict() if est else None}
        if self.rank == 0:
            Path(cfg.out, "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    # -- evaluation, best checkpoint --
    def _eval_and_log(self) -> dict:
        if not self.datasets:
            if self.rank != 0:
                return {}
            self.model.eval()
            scores = evaluate(self.model, self.vocab, n=self.cfg.eval_n, cfg=self.cfg)
            self.model.train()
            self.log(f"[step {self.step}] eval: " + json.dumps(
                {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()}))
            return scores
        from .validation import evaluate_datasets, markdown
        weights = finetune.Weights(self.model.config, self.full_state_dict())   # collective (FSDP)
        if self.rank != 0:
            return {}
        model = self.model
        if self._fsdp():
            from densert.model.modeling import YoutuVLForConditionalGeneration
            model = YoutuVLForConditionalGeneration(self.model.config)
            model.load_state_dict(weights.state_dict())
        res = evaluate_datasets(model, self.vocab, self.datasets, patch_cap(self.cfg.image_size),
                                self.cfg.alignment, tasks=self.cfg.tasks)
        self.model.train()
        res["step"] = self.step
        self.evals.append(res)
        better = not math.isnan(res["score"]) and (self.best is None or res["score"] > self.best["score"])
        if better:
            self.best = {"step": self.step, "score": res["score"]}
            self._write_weights(weights, Path(self.cfg.out, BEST_DIR))
            Path(self.cfg.out, BEST_DIR, EVAL_JSON).write_text(json.dumps(res, indent=1) + "\n")
        out = Path(self.cfg.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / EVAL_JSON).write_text(json.dumps({"evals": self.evals, "best": self.best}, indent=1) + "\n")
        md = markdown(res, f"step {self.step}") + (f"\nbest: step {self.best['step']}, score "
                                                  f"{self.best['score']:.3f} ({BEST_DIR}/)\n"
                                                  if self.best else "")
        (out / EVAL_MD).write_text(md)
        self.log(md)
        return res

    # -- checkpoints --
    def full_state_dict(self) -> dict:
        """The weights in the released names (LoRA merged), gathered to rank 0 under FSDP."""
        if self._fsdp():
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(self.fwd, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
            return {k[len("vl."):]: v for k, v in sd.items()}
        return finetune.merged_state_dict(self.model)

    def _write_weights(self, weights, out: Path, dtype: str | None = None) -> Path:
        from densert.checkpoint.model_dir import write_checkpoint
        p = write_checkpoint(weights, out, self.tok_json, dtype=dtype or self.cfg.save_dtype,
                             overwrite=True)
        (p / TRAIN_CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        return p

    def save(self, out: str) -> Path | None:
        weights = finetune.Weights(self.model.config, self.full_state_dict())
        osd = self._optimizer_state()                # both collective under FSDP
        if self.rank != 0:
            return None
        p = self._write_weights(weights, Path(out))
        lora = {f"lora.{n}": t for n, t in self.model.state_dict().items() if finetune.is_lora(n)}
        train_state.save_state(p, {"step": self.step, "optimizer": osd, "scheduler": self.sched.state_dict(),
                         "rng": train_state.rng_state(), "config": self.cfg.to_dict(), "evals": self.evals,
                         "best": self.best}, lora)
        return p

    def export(self, out: str, dtype: str) -> Path | None:
        """The final weights (LoRA merged) in the released layout, without trainer state."""
        weights = finetune.Weights(self.model.config, self.full_state_dict())
        return self._write_weights(weights, Path(out), dtype) if self.rank == 0 else None


# ---------------------------------------------------------------------------------------------
# Evaluation: dense decoding of held-out scenes, exactly as the runtime decodes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def vision_hidden(model, vocab: tokens.Vocab, image: np.ndarray, prompt: str, image_first: bool,
                  alignment: str = "k") -> torch.Tensor:
    H, W = image.shape[:2]
    n_img = (H // CELL) * (W // CELL)
    ids = encode_chat(vocab, [user_message(prompt, image_first)], [n_img])
    p = next(model.parameters())
    meta = build_vision_meta([(H // 16, W // 16)], model.config.vision_config)
    emb = model.embed(ids.to(p.device), model.encode_image(pixel_patches(image).to(p.device, p.dtype),
                                                          meta.to(p.device)))
    h, _ = model.model(emb, None, "latent")
    pos = (ids[0] == model.config.image_token_id).nonzero().flatten()
    if alignment == "k-1":
        pos = pos - 1
    return h[0, pos.to(h.device)].float()


@torch.no_grad()
def evaluate(model, vocab: tokens.Vocab, n: int = 16, cfg: TrainConfig | None = None,
             seed_base: int = HELD_OUT_SEED_BASE, tasks: tuple[str, ...] = ("depth", "segment"),
             image_size: tuple[int, int] | None = None, depth_preset: str | None = None,
             alignment: str | None = None) -> dict:
    """Depth delta1 / AbsRel and segmentation mIoU on ``n`` held-out scenes (seeds seed_base+i).

    Segmentation is closed-set over all classes of ``training.classes`` (argmax over every class,
    not only the ones present: the strict reading), plus ``miou_present`` where the candidates are
    the classes present in the scene (what a prompt listing them gives the runtime)."""
    from densert.kernels.dense_head import subset_weight
    from densert.runtime.dense import depth_map, segment_labels
    from densert.runtime.options import DenseOptions

    from .metrics import DepthMeter, SegmentationMeter
    from .scenes import render_scene
    cfg = cfg or TrainConfig()
    size = tuple(image_size or cfg.image_size)
    preset = depth_preset or cfg.depth_preset
    align = alignment or cfg.alignment
    # The alignment is applied when reading hidden states; the scores are the raw argmax maps
    # (no DenseCRF), as every published score of the bundled model was measured.
    opts = DenseOptions(alignment="k", crf=False)
    space = label_space(vocab)
    weight = model.lm_head.weight.float()
    cls_w = subset_weight(weight, space.class_ids)
    bin_w = weight[vocab.depth_bin_ids().to(weight.device)]
    seg, seg_p, dep = SegmentationMeter(NUM_CLASSES), SegmentationMeter(NUM_CLASSES), DepthMeter()
    grid = (size[0] // CELL, size[1] // CELL)
    t0 = time.time()
    for i in range(n):
        sc = render_scene(seed_base + i, *size)
        if "depth" in tasks:
            p = prompts.depth(preset)
            h = vision_hidden(model, vocab, sc.image, p.text, p.image_first, align)
            dm = depth_map(h, bin_w, grid, size, opts, preset, fx=None)
            dep.update(dm.depth, sc.depth)
        if "segment" in tasks:
            present = sorted(set(np.unique(sc.labels).tolist()))
            p = prompts.semantic([CLASS_NAMES[c] for c in present])
            h = vision_hidden(model, vocab, sc.image, p.text, p.image_first, align)
            seg.update(segment_labels(h, cls_w, grid, size, opts), sc.labels)
            sub = segment_labels(h, cls_w[present], grid, size, opts)
            seg_p.update(np.asarray(present)[sub], sc.labels)
    out: dict = {"n": n, "seed_base": seed_base, "image_size": list(size), "depth_preset": preset,
                 "alignment": align}
    if "depth" in tasks:
        d = dep.result()
        out.update({"delta1": d["delta1"], "abs_rel": d["abs_rel"], "rmse": d["rmse"]})
    if "segment" in tasks:
        out.update({"miou": seg.miou(), "miou_present": seg_p.miou()})
    out["eval_seconds"] = time.time() - t0
    return out
