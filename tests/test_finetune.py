"""Starting from a checkpoint and what a run updates: --init keeps the checkpoint's weights and
tokenizer, LoRA (peft) trains adapters only and merges exactly, frozen parts stay as they are,
gradient checkpointing changes no gradient, NTP-M's kernel is the default vision loss, resume is
exact and never unpickles."""
import json
import os
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from densert.checkpoint.loader import load_model
from densert.resources import bundled_model_dir
from densert.training import finetune, trainer

SMALL = dict(batch=2, image_size=(64, 64), scenes=4, eval_n=0, progress=False, warmup=2, threads=1)


def _cfg(tmp, **kw):
    return trainer.TrainConfig(**{**SMALL, "out": str(tmp), "init": str(bundled_model_dir()), **kw})


def _hidden(tr_or_model, vocab, image):
    return trainer.vision_hidden(tr_or_model, vocab, image, "Estimate the depth.", True)


def test_init_keeps_the_checkpoint_weights_and_tokenizer(tmp_path):
    tr = trainer.Trainer(_cfg(tmp_path))
    ref = load_model(bundled_model_dir(), "float32")
    for (n, a), (_, b) in zip(ref.state_dict().items(), tr.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)
    assert tr.tok_json == (bundled_model_dir() / "tokenizer.json").read_text()
    with pytest.raises(ValueError, match="fresh model"):
        _cfg(tmp_path, text_layers=1)


def test_lora_trains_adapters_and_merges_exactly(tmp_path):
    pytest.importorskip("peft")
    tr = trainer.Trainer(_cfg(tmp_path, lora_rank=4, freeze=("vision",), lr=1e-2))
    trainable = {n for n, p in tr.model.named_parameters() if p.requires_grad}
    assert trainable and all(finetune.is_lora(n) or n.startswith("merger.") for n in trainable)
    assert any(".mlp.down_proj.lora_A." in n for n in trainable)
    assert not any("kv_b_proj" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in tr.model.named_parameters()}
    for _ in range(3):
        tr.train_step(tr.samples_for_step(tr.step))
    for n, p in tr.model.named_parameters():
        moved = not torch.equal(before[n], p)
        if n not in trainable:
            assert not moved, n                     # frozen: the LLM's weights, the vision tower
        elif "lora_B" in n or n.startswith("merger."):
            assert moved, n
    # the merged weights in the released names give the adapted model's hidden states
    merged = finetune.merged_state_dict(tr.model)
    ref = load_model(bundled_model_dir(), "float32")
    assert set(merged) == set(ref.state_dict())
    ref.load_state_dict(merged)
    img = tr.samples_for_step(0)[0].image
    tr.model.eval()
    torch.testing.assert_close(_hidden(ref, tr.vocab, img), _hidden(tr.model, tr.vocab, img),
                               rtol=1e-4, atol=1e-4)
    # and equal peft's own in-place merge
    for path, m in finetune.lora_modules(tr.model).items():
        m.merge()
        torch.testing.assert_close(m.base_layer.weight, merged[f"{path}.weight"], rtol=0, atol=1e-6)


def test_frozen_parts_stay_and_checkpointing_keeps_gradients(tmp_path):
    a = trainer.Trainer(_cfg(tmp_path / "a", freeze=("merger", "llm")))
    b = trainer.Trainer(_cfg(tmp_path / "b", freeze=("merger", "llm"), grad_checkpoint=True))
    assert {n.split(".")[0] for n, p in a.model.named_parameters() if p.requires_grad} == {"siglip2"}
    batch = a.samples_for_step(0)
    grads = []
    for tr in (a, b):
        bt = trainer.Batch(batch, tr.vocab.eos_id)
        loss, _, _ = tr.fwd(bt.pixel_values, bt.input_ids, bt.text_targets, bt.grids, bt.counts,
                            bt.tasks, bt.positives, bt.single, tr.masks)
        loss.backward()
        grads.append({n: p.grad for n, p in tr.model.named_parameters() if p.requires_grad})
        assert all(p.grad is None for p in tr.model.parameters() if not p.requires_grad)
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], rtol=1e-5, atol=1e-7, msg=n)


def test_ntpm_kernel_is_the_default_vision_loss(tmp_path, monkeypatch):
    """Item 5: the default run's vision loss goes through densert.kernels.ntpm.ntpm_loss (it
    streams the vocabulary in chunks; its own tests hold its memory), never through the dense
    [L, V] path of the baselines."""
    from densert.kernels import ntpm
    from densert.training import losses
    assert trainer.TrainConfig().loss == "ntpm"
    calls = []
    real = ntpm.ntpm_loss
    monkeypatch.setattr(ntpm, "ntpm_loss", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    monkeypatch.setattr(losses, "_dense", lambda *a, **k: pytest.fail("dense [L, V] logits formed"))
    tr = trainer.Trainer(_cfg(tmp_path, batch=3, tasks=("depth", "segment", "refer")))
    samples = tr.samples_for_step(0)
    tr.train_step(samples)
    assert sorted(c[0] for c in calls) == sorted(s.num_image_tokens for s in samples)


def test_trainer_state_round_trip(tmp_path):
    from densert.training import state
    st = {"step": 3, "optimizer": {"state": {0: {"step": torch.tensor(2.0), "m": torch.ones(2, 3)}},
                                   "param_groups": [{"betas": (0.9, 0.95), "params": [0], "x": None}]},
          "rng": state.rng_state(), "tensor_named_dict": {"tensor": 1}}
    state.save_state(tmp_path, st, {"lora.a": torch.arange(4.0)})
    back, extra = state.load_state(tmp_path)
    assert back["step"] == 3 and back["optimizer"]["param_groups"][0]["betas"] == (0.9, 0.95)
    assert back["optimizer"]["state"][0]["step"].shape == () and back["tensor_named_dict"] == {"tensor": 1}
    torch.testing.assert_close(back["optimizer"]["state"][0]["m"], torch.ones(2, 3))
    torch.testing.assert_close(extra["lora.a"], torch.arange(4.0))
    import random
    random.random()
    state.set_rng_state(back["rng"])                              # restores every generator
    assert back["rng"]["python"] == random.getstate()


class _Payload:
    """Unpickling this calls Path.touch(marker): code run by the loader."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def _malicious_dir(tmp_path, marker) -> Path:
    d = tmp_path / "from-someone-else"
    shutil.copytree(bundled_model_dir(), d)
    with open(d / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": 1, "x": _Payload(marker)}, f)
    return d


def test_resume_refuses_a_pickle_and_runs_nothing(tmp_path, capsys):
    from densert.cli import main
    marker = tmp_path / "pwned"
    d = _malicious_dir(tmp_path, marker)
    with open(d / "trainer_state.pt", "rb") as f:               # the payload is live...
        pickle.load(f)
    assert marker.exists()
    marker.unlink()
    code = main(["train", "--out", str(tmp_path / "run"), "--resume", str(d), "--steps", "1",
                 "--init", str(bundled_model_dir()), "--threads", "1", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "never unpickles" in err, err
    assert not marker.exists()                                # ...and nothing of it ran
    # Nothing in the training package can unpickle: no torch.load, no pickle.
    src = Path(trainer.__file__).parent
    for p in src.glob("*.py"):
        text = p.read_text()
        assert "torch.load(" not in text and "import pickle" not in text, p


def test_resume_beside_a_pickle_ignores_it_and_is_exact(tmp_path):
    pytest.importorskip("peft")
    kw = dict(steps=4, lora_rank=4, tasks=("segment", "depth"))
    straight = trainer.Trainer(_cfg(tmp_path / "s", **kw))
    for _ in range(4):
        straight.train_step(straight.samples_for_step(straight.step))
    first = trainer.Trainer(_cfg(tmp_path / "r", **kw))
    for _ in range(2):
        first.train_step(first.samples_for_step(first.step))
    p = first.save(str(tmp_path / "half"))
    assert (p / "trainer_state.json").is_file() and not (p / "trainer_state.pt").exists()
    marker = tmp_path / "pwned"
    with open(p / "trainer_state.pt", "wb") as f:
        pickle.dump(_Payload(marker), f)
    resumed = trainer.Trainer(_cfg(tmp_path / "r", **kw), resume=str(p))
    assert resumed.step == 2 and not marker.exists()
    for _ in range(2):
        resumed.train_step(resumed.samples_for_step(resumed.step))
    for (n, a), (_, b) in zip(straight.model.state_dict().items(), resumed.model.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=n)


def test_mixed_image_sizes_share_a_batch(tmp_path):
    """Rendered scenes at the training size and dataset images at their own aspect in one step."""
    pytest.importorskip("pycocotools")
    from densert.training.example_data import write_example
    write_example(tmp_path / "ds", n=4, size=(64, 160), seed=1)
    tr = trainer.Trainer(_cfg(tmp_path / "run", data=(str(tmp_path / "ds"),), scene_ratio=0.5, batch=6,
                         image_size=(96, 96)))
    samples = tr.samples_for_step(0)
    assert len({s.image.shape for s in samples}) > 1
    b = trainer.Batch(samples, tr.vocab.eos_id)
    assert b.pixel_values.shape[0] == 4 * sum(b.counts)
    r = tr.train_step(samples)
    assert torch.isfinite(torch.tensor(r["loss"]))
    json.dumps(r)


@pytest.mark.skipif(os.environ.get("WORLD_SIZE") not in (None, "1"), reason="single process")
def test_lora_with_fsdp_is_refused(tmp_path):
    with pytest.raises(ValueError, match="FSDP is for full fine-tuning"):
        _cfg(tmp_path, lora_rank=4, fsdp=True)


def test_fit_prints_the_estimate_scores_the_split_and_keeps_the_best(tmp_path):
    """A short run on a dataset folder: the memory estimate comes first, every evaluation goes to
    eval.json / eval.md, the best weights to OUT/best, the state to safetensors + JSON."""
    pytest.importorskip("pycocotools")
    from densert.training.example_data import write_example
    write_example(tmp_path / "ds", n=4, size=(64, 96), seed=5)
    logs = []
    tr = trainer.Trainer(_cfg(tmp_path / "run", data=(str(tmp_path / "ds"),), steps=2, eval_every=1,
                         image_size=(64, 96), tasks=("depth", "segment")), log=logs.append)
    summary = tr.fit()
    assert logs[0].startswith("estimated memory per rank") and "peak" in logs[5]
    ev = json.loads((tmp_path / "run" / "eval.json").read_text())
    assert [e["step"] for e in ev["evals"]] == [1, 2]
    row = ev["evals"][-1]["datasets"][0]
    assert set(row) >= {"depth", "segment"} and "refer" not in row      # the trained tasks only
    assert set(row["segment"]["iou"]) == {"floor", "wall", "ceiling", "furniture", "clutter"}
    assert "| ds | val | depth |" in (tmp_path / "run" / "eval.md").read_text()
    assert ev["best"]["step"] in (1, 2) and summary["best"] == ev["best"]
    assert json.loads((tmp_path / "run" / "best" / "eval.json").read_text())["step"] == ev["best"]["step"]
    assert (tmp_path / "run" / "trainer_state.safetensors").is_file()
    assert summary["memory_estimate"]["peak"] > summary["memory_estimate"]["weights"]


def test_resume_with_other_model_options_is_refused(tmp_path):
    pytest.importorskip("peft")
    from densert.errors import CheckpointError
    tr = trainer.Trainer(_cfg(tmp_path / "a", lora_rank=4))
    p = tr.save(str(tmp_path / "ck"))
    with pytest.raises(CheckpointError, match="lora_rank: 4 there, 0 now"):
        trainer.Trainer(_cfg(tmp_path / "b"), resume=str(p))
