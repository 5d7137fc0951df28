"""Trainer: loss goes down, checkpoints round-trip through the runtime loader, resume is exact,
DDP ranks stay identical, targets and samples are what the docs say."""
import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch

from densert.tasks.prompts import CORE_TARGET_CLASSES
from densert.tasks.rle import ref_tags
from densert.text import tokens
from densert.training import trainer
from densert.training.classes import CLASS_NAMES

SMALL = dict(text_layers=1, vision_layers=1, batch=2, image_size=(64, 64), scenes=4,
             eval_n=0, progress=False, warmup=2, threads=1)


def _cfg(tmp, **kw):
    d = dict(SMALL, out=str(tmp))
    d.update(kw)
    return trainer.TrainConfig(**d)


def test_samples_follow_the_documented_chat_layout(tmp_path):
    tr = trainer.Trainer(_cfg(tmp_path, tasks=("depth", "segment", "refer"), batch=3))
    v = tr.vocab
    for s in tr.samples_for_step(0):
        text = v.decode(s.ids)
        img = text.index(tokens.VISION_START)
        if s.task == "depth":
            assert text.index("Cityscapes") < img           # prompt before the image
            assert v.decode(s.ids[s.answer_start:]) == tokens.DEPTH + tokens.EOS
        elif s.task == "segment":
            assert text.index("Segment:") > img
            ans = v.decode(s.ids[s.answer_start:])
            assert ans.startswith(tokens.REF) and ans.endswith(tokens.EOS)
            for name in ans[: -len(tokens.EOS)].replace(tokens.REF_END, "").split(tokens.REF)[1:]:
                assert name in CLASS_NAMES
        else:
            assert "Segment the core target." in text
            assert v.decode(s.ids[s.answer_start:]) == ref_tags(CORE_TARGET_CLASSES) + tokens.EOS
        assert s.ids.count(v.image_pad_id) == s.positives.shape[0] == 4


def test_family_masks_exclude_other_tasks_labels(tmp_path):
    tr = trainer.Trainer(_cfg(tmp_path))
    m, sp = tr.masks, tr.space
    fg, b1 = sp.fg_id, int(sp.depth_table[1])
    cls0 = sp.class_ids[0][0]
    assert m["segment"][cls0] and not m["segment"][fg] and not m["segment"][b1]
    assert m["depth"][b1] and not m["depth"][cls0] and not m["depth"][fg]
    assert m["refer"][fg] and not m["refer"][cls0] and not m["refer"][b1]
    assert m["segment"][tr.vocab.token_id(tokens.REF)]    # text ids stay valid negatives


def test_short_run_lowers_loss_and_roundtrips_through_loader(tmp_path):
    from densert.checkpoint.loader import load_model
    tr = trainer.Trainer(_cfg(tmp_path / "a", steps=12, lr=3e-3))
    batch = tr.samples_for_step(0)
    losses = [tr.train_step(batch)["loss"] for _ in range(12)]
    assert losses[-1] < 0.7 * losses[0], losses
    p = tr.save(str(tmp_path / "ckpt"))
    back = load_model(p, "float32")
    img = batch[0].image
    tr.model.eval()
    h1 = trainer.vision_hidden(tr.model, tr.vocab, img, "Estimate the depth.", True)
    h2 = trainer.vision_hidden(back, tokens.Vocab.from_file(p / "tokenizer.json"), img, "Estimate the depth.", True)
    torch.testing.assert_close(h1, h2, rtol=0, atol=0)
    cfg = json.loads((p / "train_config.json").read_text())
    assert cfg["text_layers"] == 1


def test_resume_is_exact(tmp_path):
    straight = trainer.Trainer(_cfg(tmp_path / "s", steps=4))
    for _ in range(4):
        straight.train_step(straight.samples_for_step(straight.step))
    first = trainer.Trainer(_cfg(tmp_path / "r", steps=4))
    for _ in range(2):
        first.train_step(first.samples_for_step(first.step))
    p = first.save(str(tmp_path / "half"))
    resumed = trainer.Trainer(_cfg(tmp_path / "r", steps=4), resume=str(p))
    assert resumed.step == 2
    for _ in range(2):
        resumed.train_step(resumed.samples_for_step(resumed.step))
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_lr_schedule_warmup_then_cosine():
    cfg = trainer.TrainConfig(steps=100, warmup=10, lr=1.0, min_lr_ratio=0.1, progress=False)
    f = [trainer.lr_factor(s, cfg) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert trainer.lr_factor(100, cfg) == pytest.approx(0.1)


def test_softmax_and_bce_losses_train(tmp_path):
    for kind in ("softmax", "bce"):
        tr = trainer.Trainer(_cfg(tmp_path / kind, loss=kind, steps=3))
        r = tr.train_step(tr.samples_for_step(0))
        assert np.isfinite(r["loss"]) and r["vision"] > 0


_DDP_SCRIPT = r"""
import hashlib, json, sys, torch
from densert.training import trainer
cfg = trainer.TrainConfig(**json.loads(sys.argv[1]))
tr = trainer.Trainer(cfg, resume=sys.argv[2] or None, log=lambda s: None)
assert tr.distributed and tr.world == 2
if cfg.data:
    tr.fit()                       # evaluation, best checkpoint and save: collective under FSDP
else:
    for _ in range(2):
        tr.train_step(tr.samples_for_step(tr.step))
h = hashlib.sha256()
for n, p in tr.model.state_dict().items():
    p = p.detach()
    h.update((p.full_tensor() if hasattr(p, "full_tensor") else p).numpy().tobytes())
print("HASH", tr.rank, tr.step, h.hexdigest(), flush=True)
"""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_ranks(cfg: dict, resume: str = "") -> dict[int, tuple[int, str]]:
    port = _free_port()
    procs = []
    for rank in range(2):
        env = dict(os.environ, WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank),
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        procs.append(subprocess.Popen([sys.executable, "-c", _DDP_SCRIPT, json.dumps(cfg), resume],
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                      text=True))
    outs = [p.communicate(timeout=600) for p in procs]
    for p, (o, e) in zip(procs, outs):
        assert p.returncode == 0, e[-3000:]
    hashes = {}
    for o, _ in outs:
        for line in o.splitlines():
            if line.startswith("HASH"):
                _, r, step, hsh = line.split()
                hashes[int(r)] = (int(step), hsh)
    return hashes


@pytest.mark.slow
@pytest.mark.parametrize("fsdp", [False, True], ids=["ddp", "fsdp"])
def test_ddp_two_ranks_end_with_identical_weights(tmp_path, fsdp):
    hashes = _two_ranks(dict(SMALL, out=str(tmp_path / "ddp"), image_size=[64, 64], fsdp=fsdp))
    assert set(hashes) == {0, 1} and hashes[0] == hashes[1]


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["fsdp-full", "ddp-lora"])
def test_two_ranks_fine_tune_a_checkpoint_on_data_and_resume(tmp_path, kind):
    """--init + --data under torchrun: full fine-tuning with per-layer FSDP (evaluation, best
    checkpoint and trainer state gathered from the shards), or LoRA under DDP; then resume."""
    pytest.importorskip("pycocotools")
    from densert.resources import bundled_model_dir
    from densert.training.example_data import write_example
    write_example(tmp_path / "ds", n=4, size=(64, 96), seed=2)
    cfg = dict(SMALL, out=str(tmp_path / "run"), init=str(bundled_model_dir()),
               data=[str(tmp_path / "ds")], text_layers=None, vision_layers=None, steps=2,
               image_size=[64, 96], fsdp=kind == "fsdp-full", lora_rank=4 if kind == "ddp-lora" else 0)
    first = _two_ranks(cfg)
    assert first[0] == first[1] and first[0][0] == 2
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["best"]["step"] == 2
    again = _two_ranks(dict(cfg, steps=3), resume=str(tmp_path / "run"))
    assert again[0] == again[1] and again[0][0] == 3


def test_metrics_standard_definitions():
    from densert.training.metrics import DepthMeter, SegmentationMeter
    m = SegmentationMeter(3)
    gt = np.array([[0, 0, 1, 1], [2, 2, 255, 1]])
    pr = np.array([[0, 1, 1, 1], [2, 0, 0, 1]])
    m.update(pr, gt)
    # class 0: I=1, U=3 (gt 2 + pred 2 - 1); class 1: I=3, U=4; class 2: I=1, U=2 (ignore px dropped)
    assert m.miou() == pytest.approx((1 / 3 + 3 / 4 + 1 / 2) / 3)
    d = DepthMeter()
    d.update(np.array([1.0, 2.0, 3.0, 9.0]), np.array([1.0, 2.5, 0.0, 4.0]))
    r = d.result()
    assert r["delta1"] == pytest.approx(1 / 3)       # 2.5/2.0 = 1.25 is NOT < 1.25; 9/4 misses
    assert r["abs_rel"] == pytest.approx((0 + 0.2 + 1.25) / 3)
