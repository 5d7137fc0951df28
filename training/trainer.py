"""NTP-M training of a Youtu-VL model on procedurally rendered scenes (method spec sec. 3).

One sample = one chat sequence (``densert.text.chat.encode_chat``) + its image:

==========  =====================================================  ================================
task        user turn                                              assistant answer (text CE)
==========  =====================================================  ================================
depth       "Please estimate the depth of this image from the      ``<depth>``
            Cityscapes dataset." BEFORE the image
segment     image, then "Segment: a, b, c, without the             ``<ref>a</ref><ref>b</ref>...``
            background class." (present classes + 0-3 absent       (the present ones, prompt order)
            distractors, shuffled)
refer       a 1.2x-padded crop around one object with its box      ``<ref><FG></ref><ref><BG></ref>``
            drawn in a random colour, then "Segment the core       (the demo's two-class contract,
            target."                                               FG first)
==========  =====================================================  ================================

Every answer ends with ``<|end_of_text|>``. Loss = CE on the answer tokens (+ eos) + the vision
loss on the image-pad positions. Vision labels, per merged cell (32x32 px), are multi-hot over
ONE label family per task: depth -> the ``<custom_b>`` ids of every bin that occurs in the cell
(preset ``cityscapes``, linear 0-80 m, bin 0 ignored); segment -> every sub-word id of every class
that occurs (names tokenised bare, as the runtime does); refer -> ``<FG>`` / ``<BG>``. The validity
set M of a token is the whole vocabulary minus the two other families (they are unlabelled for
that sample, so neither positive nor negative).

Alignment (``TrainConfig.alignment``, the runtime's ``DenseOptions.alignment``): "k" = the hidden
state at the k-th image pad scores cell k (runtime default), "k-1" = cell k is read one position
earlier (cell 0 from ``<|vision_start|>``).

Why Cityscapes for depth: the scenes reach 80 m and are rendered at ~200 px focal length, so the
open-world log preset (0.5-100 m after rescaling to a 2000 px focal) would put most outdoor depth
out of range; linear 0-80 m covers every rendered depth with 8 cm bins.
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from densert.model.vision_meta import build_vision_meta
from densert.tasks import DENSE_TASKS, classes, grounding, prompts, rle
from densert.text import tokens as T
from densert.text.chat import encode_chat, user_message

from . import data
from .classes import CLASS_NAMES, NUM_CLASSES
from .config import TrainConfig
from .data import CELL
from .losses import LabelSpace, pad_cat, vision_loss

TASKS = DENSE_TASKS
HELD_OUT_SEED_BASE = 1_000_000_000     # eval scenes; training scene seeds stay below this
STATE_FILE = "trainer_state.pt"
TRAIN_CONFIG_FILE = "train_config.json"


# ---------------------------------------------------------------------------------------------
# Model, vocabulary, label space
# ---------------------------------------------------------------------------------------------
def build_model(model_size: str, seed: int, text_layers: int | None = None,
                vision_layers: int | None = None):
    """A freshly initialised model (HF-style init, deterministic per seed) and its tokenizer."""
    from densert.checkpoint.random_init import init_kind, init_tensor, sized_config_and_tokenizer
    from densert.model.modeling import YoutuVLForConditionalGeneration
    cfg, tok_json = sized_config_and_tokenizer(model_size, text_layers, vision_layers)
    model = YoutuVLForConditionalGeneration(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(init_tensor(name, init_kind(model, name), tuple(p.shape), p.dtype, seed,
                                cfg.initializer_range))
    return model, tok_json


def label_space(vocab: T.Vocab) -> LabelSpace:
    return LabelSpace(class_ids=[classes.name_ids(vocab, n) for n in CLASS_NAMES],
                      depth_ids=[-1] + vocab.depth_bin_ids().tolist(),
                      fg_id=vocab.token_id(T.FG), bg_id=vocab.token_id(T.BG))


def family_masks(space: LabelSpace, vocab_size: int) -> dict[str, torch.Tensor]:
    """Task -> validity set M: everything except the label families the task does not label."""
    fam = {f: space.family_mask(f, vocab_size) for f in ("class", "depth", "fgbg")}
    own = {"segment": "class", "depth": "depth", "refer": "fgbg"}
    return {t: ~torch.stack([m for f, m in fam.items() if f != own[t]]).any(0) for t in TASKS}


# ---------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------
@dataclass
class Sample:
    task: str
    ids: list[int]
    answer_start: int              # first answer token index in ids (CE targets from here on)
    image: np.ndarray              # uint8 [H, W, 3] as the vision tower sees it
    labels: torch.Tensor           # [L, P] family-local labels (class idx / bin / 0-1), -1 pad
    single: torch.Tensor           # [L] one label per cell (majority class / median bin), -1 none
    gt: dict = field(default_factory=dict)


class SceneCache:
    """Training scenes rendered on first use and kept (the renderer is ~0.1 s per 256x256 scene)."""

    def __init__(self, size: tuple[int, int], n: int, seed: int):
        self.size, self.n, self.seed = size, n, seed
        self._d: dict[int, object] = {}

    def get(self, i: int):
        from .scenes import render_scene
        j = i % self.n
        if j not in self._d:
            self._d[j] = render_scene(self.seed * 1_000_003 + j, *self.size)
        return self._d[j]


def _crop_refer(scene, rng: random.Random, size: tuple[int, int]):
    """The runtime's referring crop (``densert.tasks.grounding``) of a random object, resized to
    the batch's fixed ``size``, and its fg mask; no object visible: the whole image is fg."""
    nrng = np.random.default_rng(rng.getrandbits(63))
    inst = data.pick_instance(scene, nrng)
    if inst is None:
        return scene.image, np.ones(scene.instances.shape, dtype=bool)
    crop = grounding.referring_crop(scene.image, data.instance_box(scene.instances, inst), nrng,
                                    size=size)
    return crop.image, crop.take(scene.instances == inst)


def chat_ids(vocab: T.Vocab, prompt: str, image_first: bool, n_img: int, answer: str | None
             ) -> tuple[list[int], int]:
    ids = encode_chat(vocab, [user_message(prompt, image_first)], [n_img])[0].tolist()
    start = len(ids)
    if answer is not None:
        ids += vocab.encode(answer) + [vocab.eos_id]
    return ids, start


def make_sample(task: str, scene, vocab: T.Vocab, cfg: TrainConfig, rng: random.Random,
                augment: bool = True) -> Sample:
    H, W = cfg.image_size
    n_img = (H // CELL) * (W // CELL)
    image, labels, depth = scene.image, scene.labels, scene.depth
    if augment and task != "depth" and rng.random() < 0.5:   # no flip for depth (paper sec. 3)
        image, labels = image[:, ::-1], labels[:, ::-1]
        scene = _Flipped(scene)
    if task == "depth":
        p = prompts.depth(cfg.depth_preset)
        ids, start = chat_ids(vocab, p.text, p.image_first, n_img, T.DEPTH)
        t = data.depth_targets(depth, cfg.depth_preset)
        # The softmax baseline's single label is the cell's median bin (-1 where none).
        lab, single = t.indices, torch.where(t.median > 0, t.median, -1)
        return Sample(task, ids, start, np.ascontiguousarray(image), lab, single,
                      {"depth": depth, "fx": scene.intrinsics.fx})
    if task == "segment":
        present = sorted(set(np.unique(labels).tolist()) & set(range(NUM_CLASSES)))
        absent = [c for c in range(NUM_CLASSES) if c not in present]
        asked = present + rng.sample(absent, min(len(absent), rng.randint(0, 3)))
        rng.shuffle(asked)
        p = prompts.semantic([CLASS_NAMES[c] for c in asked])
        answer = rle.ref_tags(CLASS_NAMES[c] for c in asked if c in present)
        ids, start = chat_ids(vocab, p.text, p.image_first, n_img, answer)
        t = data.segmentation_targets(labels, NUM_CLASSES)
        lab, single = t.indices, t.majority
        return Sample(task, ids, start, np.ascontiguousarray(image), lab, single,
                      {"labels": np.ascontiguousarray(labels)})
    crop, fg = _crop_refer(scene, rng, (H, W))
    p = prompts.core_target()
    ids, start = chat_ids(vocab, p.text, p.image_first, n_img,
                          rle.ref_tags(prompts.CORE_TARGET_CLASSES))
    t = data.fgbg_targets(fg)
    lab, single = t.indices, t.majority
    return Sample("refer", ids, start, np.ascontiguousarray(crop), lab, single, {"fg": fg})


class _Flipped:
    def __init__(self, s):
        self.image, self.labels = s.image[:, ::-1], s.labels[:, ::-1]
        self.instances, self.depth, self.intrinsics = s.instances[:, ::-1], s.depth[:, ::-1], s.intrinsics


def pixel_patches(image: np.ndarray) -> torch.Tensor:
    from densert.image.preprocess import normalize, patchify
    return patchify(normalize(np.ascontiguousarray(image)))


# ---------------------------------------------------------------------------------------------
# The training forward: one module so DDP/FSDP see the whole computation
# ---------------------------------------------------------------------------------------------
class Batch:
    def __init__(self, samples: list[Sample], space: LabelSpace, masks: dict, pad_id: int,
                 image_size: tuple[int, int]):
        H, W = image_size
        self.grids = [(H // 16, W // 16)] * len(samples)
        self.pixel_values = torch.cat([pixel_patches(s.image) for s in samples])
        Tm = max(len(s.ids) for s in samples)
        ids = torch.full((len(samples), Tm), pad_id, dtype=torch.long)
        tgt = torch.full((len(samples), Tm), -100, dtype=torch.long)
        for b, s in enumerate(samples):
            ids[b, : len(s.ids)] = torch.tensor(s.ids)
            # position t predicts token t+1: answer tokens are predicted from start-1 .. end-2
            tgt[b, s.answer_start - 1: len(s.ids) - 1] = torch.tensor(s.ids[s.answer_start:])
        self.input_ids, self.text_targets = ids, tgt
        self.tasks = [s.task for s in samples]
        pos, single = [], []
        for s in samples:
            if s.task == "depth":
                pos.append(space.depth_positives(s.labels))
                single.append(space.depth_positives(s.single[:, None]))
            elif s.task == "segment":
                pos.append(space.class_positives(s.labels))
                single.append(space.class_positives(s.single[:, None]))
            else:
                pos.append(space.fgbg_positives(s.labels))
                single.append(space.fgbg_positives(s.single[:, None]))
        self.positives = [p for p in pos]
        self.single = single
        self.masks = masks


class TrainForward(nn.Module):
    def __init__(self, model, cfg: TrainConfig):
        super().__init__()
        self.vl = model
        self.cfg = cfg

    def forward(self, pixel_values, input_ids, text_targets, grids, tasks, positives, single, masks):
        vl, cfg = self.vl, self.cfg
        meta = build_vision_meta(grids, vl.config.vision_config).to(pixel_values.device)
        emb = vl.embed(input_ids, vl.encode_image(pixel_values, meta))
        h, _ = vl.model(emb, None, "full")
        weight = vl.lm_head.weight
        # Text: CE on answer tokens, computed only at the positions that have a target.
        sel = text_targets >= 0
        logits = vl.lm_head(h[sel]).float()
        text = F.cross_entropy(logits, text_targets[sel])
        # Vision: hidden states that score each cell.
        is_img = input_ids == vl.config.image_token_id
        if cfg.alignment == "k-1":
            is_img = torch.roll(is_img, -1, dims=1)
        hv = h[is_img]                                       # [B*L, d], sample-major
        L = hv.shape[0] // len(tasks)
        total, n_tok = hv.new_zeros((), dtype=torch.float32), 0
        kind = cfg.loss
        for task in TASKS:
            rows = [b for b, t in enumerate(tasks) if t == task]
            if not rows:
                continue
            hsel = torch.cat([hv[b * L:(b + 1) * L] for b in rows])
            src = single if kind == "softmax" else positives
            pos = pad_cat([src[b] for b in rows]).to(h.device)
            n_tok += int((pos >= 0).any(1).sum())
            total = total + vision_loss(kind, hsel, weight, pos, None, masks[task].to(h.device),
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


def _rng_state() -> dict:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}


def _set_rng_state(s: dict) -> None:
    random.setstate(s["python"])
    np.random.set_state(s["numpy"])
    torch.set_rng_state(s["torch"])


class Trainer:
    def __init__(self, cfg: TrainConfig, resume: str | None = None, device: str | None = None,
                 log=print):
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
        self.model, self.tok_json = build_model(cfg.model_size, cfg.seed, cfg.text_layers,
                                                 cfg.vision_layers)
        self.step = 0
        state = None
        if resume:
            state = self._load_resume(resume)
        self.model.to(self.device).train()
        self.vocab = T.Vocab.from_str(self.tok_json)
        self.space = label_space(self.vocab)
        self.masks = family_masks(self.space, len(self.vocab))
        self.fwd = TrainForward(self.model, cfg)
        self.wrapped = self._wrap(self.fwd)
        decay = [p for n, p in self.model.named_parameters() if p.dim() >= 2]
        no_decay = [p for n, p in self.model.named_parameters() if p.dim() < 2]
        self.opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                                      {"params": no_decay, "weight_decay": 0.0}],
                                     lr=cfg.lr, betas=(0.9, 0.95))
        self.time_frac = 0.0
        self.sched = torch.optim.lr_scheduler.LambdaLR(
            self.opt, lambda s: lr_factor(s, cfg, self.time_frac))
        if state is not None:
            self.opt.load_state_dict(state["optimizer"])
            self.sched.load_state_dict(state["scheduler"])
            _set_rng_state(state["rng"])
        self.scenes = SceneCache(cfg.image_size, cfg.scenes, cfg.seed)
        self.history: list[dict] = []

    # -- setup --
    def _wrap(self, module):
        if not self.distributed:
            return module
        if self.cfg.fsdp:
            from torch.distributed.fsdp import fully_shard
            return fully_shard(module)
        from torch.nn.parallel import DistributedDataParallel as DDP
        return DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None)

    def _load_resume(self, path: str) -> dict:
        from densert.checkpoint.loader import load_model
        p = Path(path)
        if not (p / STATE_FILE).is_file():
            raise FileNotFoundError(f"{p}: no {STATE_FILE}; not a training checkpoint to resume from")
        loaded = load_model(p, "float32")
        self.model.load_state_dict(loaded.state_dict())
        self.tok_json = (p / "tokenizer.json").read_text()
        state = torch.load(p / STATE_FILE, weights_only=False)
        self.step = int(state["step"])
        return state

    # -- data --
    def samples_for_step(self, step: int) -> list[Sample]:
        """Deterministic in (seed, step, rank): resume replays the same stream."""
        cfg = self.cfg
        out = []
        for j in range(cfg.batch):
            g = (step * self.world + self.rank) * cfg.batch + j
            rng = random.Random(cfg.seed * 7919 + g)
            task = cfg.tasks[g % len(cfg.tasks)]
            out.append(make_sample(task, self.scenes.get(rng.randrange(cfg.scenes)), self.vocab, cfg, rng))
        return out

    def train_step(self, samples: list[Sample]) -> dict:
        b = Batch(samples, self.space, self.masks, self.vocab.eos_id, self.cfg.image_size)
        dev = self.device
        ac = torch.autocast(dev.type, dtype=torch.bfloat16, enabled=self.cfg.precision == "bf16")
        with ac:
            loss, text, vis = self.wrapped(b.pixel_values.to(dev), b.input_ids.to(dev),
                                           b.text_targets.to(dev), b.grids, b.tasks,
                                           b.positives, b.single, b.masks)
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.cfg.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        return {"step": self.step, "loss": float(loss.detach()), "text": float(text),
                "vision": float(vis), "grad_norm": float(gn), "lr": self.sched.get_last_lr()[0]}

    def fit(self) -> dict:
        cfg = self.cfg
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
        self.save(cfg.out)
        scores = self._eval_and_log() if cfg.eval_n else {}
        summary = {"steps_done": self.step, "stop": stop_reason, "train_minutes": minutes,
                   "last": last, "eval": scores}
        if self.rank == 0:
            Path(cfg.out, "train_summary.json").write_text(json.dumps(summary, indent=1) + "\n")
        return summary

    def _eval_and_log(self) -> dict:
        if self.rank != 0:
            return {}
        self.model.eval()
        scores = evaluate(self.model, self.vocab, n=self.cfg.eval_n, cfg=self.cfg)
        self.model.train()
        self.log(f"[step {self.step}] eval: " + json.dumps({k: round(v, 4) if isinstance(v, float) else v
                                                            for k, v in scores.items()}))
        return scores

    def full_state_dict(self) -> dict:
        if self.distributed and self.cfg.fsdp:
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
            sd = get_model_state_dict(self.fwd, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
            return {k[len("vl."):]: v for k, v in sd.items()}
        return self.model.state_dict()

    def save(self, out: str) -> Path | None:
        from densert.checkpoint.files import write_checkpoint
        sd = self.full_state_dict()
        if self.rank != 0:
            return None
        model = self.model
        if self.distributed and self.cfg.fsdp:
            from densert.model.modeling import YoutuVLForConditionalGeneration
            model = YoutuVLForConditionalGeneration(self.model.config)
            model.load_state_dict(sd)
        p = write_checkpoint(model, out, self.tok_json, dtype=self.cfg.save_dtype, overwrite=True)
        torch.save({"step": self.step, "optimizer": self.opt.state_dict(),
                    "scheduler": self.sched.state_dict(), "rng": _rng_state(),
                    "config": self.cfg.to_dict()}, p / STATE_FILE)
        (p / TRAIN_CONFIG_FILE).write_text(json.dumps(self.cfg.to_dict(), indent=1) + "\n")
        return p


# ---------------------------------------------------------------------------------------------
# Evaluation: dense decoding of held-out scenes, exactly as the runtime decodes
# ---------------------------------------------------------------------------------------------
@torch.no_grad()
def vision_hidden(model, vocab: T.Vocab, image: np.ndarray, prompt: str, image_first: bool,
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
def evaluate(model, vocab: T.Vocab, n: int = 16, cfg: TrainConfig | None = None,
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
