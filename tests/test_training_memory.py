"""Memory you can plan with: the estimate printed before training holds against the measured peak
of a small CPU run (within 25%), for each parameter-efficient option."""
import pytest
import torch

from densert.resources import bundled_model_dir
from densert.training import trainer
from densert.training.memory import LiveTensorMeter

TOLERANCE = 0.25


def test_meter_follows_storages_not_python_names():
    m = LiveTensorMeter()
    with m:
        a = torch.zeros(2**18)                    # 1 MiB
        b = torch.zeros(2**19)                    # 2 MiB
        v = b[:10].view(2, 5)                     # a view: no new storage
        del a
        c = torch.ones(2**18, requires_grad=True)
        y = (c * 3).exp()                          # exp saves its 1 MiB output for the backward
        del v
        assert m.current == (2 + 1 + 1) * 2**20   # b, c, y
        z = y.sum()
        del y                                      # still held by the graph
        assert m.current >= (2 + 1 + 1) * 2**20
        z.backward()
    assert m.peak >= 4 * 2**20 and m.peak <= 6 * 2**20
    assert c.grad is not None and b.numel() == 2**19


def _measure(tmp_path, steps=3, **kw):
    cfg = trainer.TrainConfig(out=str(tmp_path), init=str(bundled_model_dir()), batch=4,
                         image_size=(128, 128), scenes=4, eval_n=0, progress=False, warmup=1,
                         threads=1, **kw)
    tr = trainer.Trainer(cfg)
    samples = [tr.samples_for_step(i) for i in range(steps)]
    est = tr.memory_estimate()
    meter = LiveTensorMeter()
    meter.track(list(tr.model.parameters()), list(tr.model.buffers()))
    with meter:
        for s in samples:
            tr.train_step(s)
    return est, meter.peak


CASES = {
    "full": {},
    "lora": dict(lora_rank=8),
    "lora-frozen-vision-ckpt": dict(lora_rank=8, freeze=("vision",), grad_checkpoint=True),
    "grad-checkpoint": dict(grad_checkpoint=True),
    "bf16": dict(precision="bf16"),
    "frozen-merger-llm": dict(freeze=("merger", "llm")),
}


@pytest.mark.parametrize("case", [pytest.param(c, marks=() if c == "full" else pytest.mark.slow)
                                  for c in CASES])
def test_estimate_holds_against_the_measured_peak(tmp_path, case):
    if CASES[case].get("lora_rank"):
        pytest.importorskip("peft")
    est, peak = _measure(tmp_path, **CASES[case])
    ratio = est.peak / peak
    print(f"{case}: estimate {est.peak / 2**20:.1f} MiB, measured {peak / 2**20:.1f} MiB, "
          f"ratio {ratio:.3f}")
    assert abs(ratio - 1) <= TOLERANCE, (est.to_dict(), peak)
    assert est.peak == est.weights + est.gradients + est.optimizer + max(est.activations,
                                                                         est.optimizer_scratch)


def test_options_shrink_the_estimate_where_they_should(tmp_path):
    """Without running a step: LoRA shrinks gradients and optimizer states, checkpointing the
    activations, and the estimate of a 4B-wide model is computed without allocating it."""
    pytest.importorskip("peft")
    cfgs = {k: trainer.TrainConfig(out=str(tmp_path), init=str(bundled_model_dir()), batch=4,
                              image_size=(128, 128), scenes=4, eval_n=0, progress=False, threads=1, **kw)
            for k, kw in CASES.items() if k in ("full", "lora", "grad-checkpoint")}
    tr = trainer.Trainer(cfgs["full"])
    from densert.training.memory import estimate_memory
    from densert.training.samples import Batch
    b = Batch(tr.samples_for_step(0), tr.vocab.eos_id)
    e = {k: estimate_memory(tr.model.config, c, b) for k, c in cfgs.items()}
    assert e["lora"].optimizer < e["full"].optimizer / 2 and e["lora"].weights > e["full"].weights
    assert e["grad-checkpoint"].activations < e["full"].activations
    from densert.checkpoint.random_init import sized_config_and_tokenizer
    big, _ = sized_config_and_tokenizer("youtu-vl-4b", text_layers=2, vision_layers=2)
    est = estimate_memory(big, cfgs["full"], b)
    assert est.parameters > 9e8 and est.weights == 4 * est.parameters   # 283k x 2560 embedding alone: 725M
