"""Memory per rank you can plan with: an estimate printed before training, and a meter that
measures the real peak on CPU (``tests/test_training_memory.py`` holds one to the other).

The estimate (``estimate_memory``) adds up, for the chosen options:

* weights: every parameter (fp32 master weights; LoRA adapters included);
* gradients: one fp32 value per trainable parameter;
* optimizer: AdamW's two fp32 states per trainable parameter;
* activations: the tensors autograd keeps for the backward, counted exactly by tracing the
  model's forward on the first batch under ``FakeTensorMode`` (shapes, no data, no memory:
  a 4B model traces on a laptop), plus the loss terms that cannot be traced (NTP-M streams the
  vocabulary with data-dependent control flow) computed from the batch's shapes, plus the
  transients alive at the forward's end (the text logits) and one backward working set.
  With gradient checkpointing: what lies outside the layers, every layer's input, and one
  layer's activations (recomputed in the backward).

The training step runs forward -> zero_grad(set_to_none) -> backward -> optimizer step, so the
previous step's gradients are still alive during the forward. Steady-state peak = weights +
gradients + optimizer + max(activations, the optimizer step's scratch). With FSDP across w ranks,
weights, gradients and optimizer states are sharded (/ w) while the unsharded parameters of the
root unit and of two layers (the one running and the one prefetched) are held in full.

The meter (``LiveTensorMeter``) is a ``TorchDispatchMode`` that sees every tensor created while
it is active, holds a weak reference to each storage and adds up the bytes of the storages
alive, so its peak is the largest amount of tensor memory that existed at once (torch's CPU
allocator keeps no statistics of its own).
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

MB = 2**20


@dataclass
class MemoryEstimate:
    weights: int
    gradients: int
    optimizer: int
    activations: int
    optimizer_scratch: int
    parameters: int
    trainable: int
    world: int = 1
    detail: dict = dataclasses.field(default_factory=dict)

    @property
    def peak(self) -> int:
        return self.weights + self.gradients + self.optimizer + max(self.activations,
                                                                    self.optimizer_scratch)

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "peak": self.peak}

    def lines(self, what: str) -> list[str]:
        return [f"estimated memory per rank ({what}):",
                f"  weights      {self.weights / MB:10.1f} MiB  ({self.parameters / 1e6:.2f}M parameters)",
                f"  gradients    {self.gradients / MB:10.1f} MiB  ({self.trainable / 1e6:.2f}M trainable)",
                f"  optimizer    {self.optimizer / MB:10.1f} MiB  (AdamW, 2 fp32 states per trainable)",
                f"  activations  {self.activations / MB:10.1f} MiB  (saved for backward + transients)",
                f"  peak         {self.peak / MB:10.1f} MiB"]


# ---------------------------------------------------------------------------------------------
# Estimate
# ---------------------------------------------------------------------------------------------
def _storage_key(t: torch.Tensor):
    return t.untyped_storage()._cdata


class _SavedBytes:
    """saved_tensors_hooks pack hook: bytes of distinct non-parameter storages, per region."""

    def __init__(self, params):
        self.params = {_storage_key(p) for p in params}
        self.seen: dict = {}
        self.region = "outside"
        self.by_region: dict[str, int] = {}
        self.largest = 0

    def pack(self, t: torch.Tensor):
        k = _storage_key(t)
        if k not in self.params and k not in self.seen:
            n = t.untyped_storage().nbytes()
            self.seen[k] = n
            self.by_region[self.region] = self.by_region.get(self.region, 0) + n
            self.largest = max(self.largest, n)
        return t


def _trace_activations(model, mode, batch, precision: str, device_type: str) -> dict:
    """Forward of the model body and the text head on fake tensors of ``batch``'s shapes."""
    from densert.model.vision_meta import build_vision_meta

    meta = build_vision_meta(batch.grids, model.config.vision_config)   # host metadata: real
    layers = {**{f"vision.{i}": m for i, m in enumerate(model.siglip2.vision_model.encoder.layers)},
              **{f"llm.{i}": m for i, m in enumerate(model.model.layers)}}
    # answer positions: a data-dependent selection, so taken from the real targets
    answer = batch.text_targets >= 0
    real = {"ids": batch.input_ids, "pv": batch.pixel_values, "tgt": batch.text_targets[answer],
            "sel": answer.nonzero(as_tuple=True)}
    with mode:
        meta = type(meta)(**{f.name: (mode.from_tensor(v) if isinstance(v, torch.Tensor) else v)
                             for f in dataclasses.fields(meta) for v in [getattr(meta, f.name)]})
        ids, pv, tgt = (mode.from_tensor(real[k]) for k in ("ids", "pv", "tgt"))
        sel = tuple(mode.from_tensor(i) for i in real["sel"])
    counter = _SavedBytes(list(model.parameters()))
    inputs: dict[str, int] = {}
    hooks = []
    for name, m in layers.items():
        def pre(mod, args, name=name):
            counter.region = name
            inputs[name] = args[0].untyped_storage().nbytes()

        def post(mod, args, out):
            counter.region = "outside"
        hooks += [m.register_forward_pre_hook(pre), m.register_forward_hook(post)]
    ac = torch.autocast(device_type, dtype=torch.bfloat16, enabled=precision == "bf16")
    try:
        with mode, ac, torch.autograd.graph.saved_tensors_hooks(counter.pack, lambda t: t):
            img = model.encode_image(pv, meta)
            emb = model.model.embed_tokens(ids)
            # the model's embed(), without its data-dependent count check
            emb = emb.masked_scatter((ids == model.config.image_token_id)[..., None], img.to(emb.dtype))
            h, _ = model.model(emb, None, "full", use_cache=False)
            logits = model.lm_head(h[sel]).float()
            torch.nn.functional.cross_entropy(logits, tgt)
            logits_bytes = logits.untyped_storage().nbytes()
    finally:
        for hk in hooks:
            hk.remove()
    layer_saved = {k: v for k, v in counter.by_region.items() if k != "outside"}
    return {"outside": counter.by_region.get("outside", 0), "layers": layer_saved,
            "layer_inputs": inputs, "largest": counter.largest, "text_logits": logits_bytes,
            "hidden_dim": model.config.hidden_size}


def _vision_loss_bytes(batch, kind: str, k: int, vocab: int, d: int) -> tuple[int, int]:
    """(saved, transient) bytes of the vision loss, per task group, from the batch's shapes."""
    from .losses import NTPM_CHUNK
    saved = transient = 0
    for task in sorted(set(batch.tasks)):
        rows = [b for b, t in enumerate(batch.tasks) if t == task and batch.positives[b].shape[1]]
        if not rows:
            continue
        L = sum(batch.counts[b] for b in rows)
        P = max(batch.positives[b].shape[1] for b in rows)
        if kind == "ntpm":
            # the gathered hidden rows, and per token the P + k selected ids (int64) and their
            # gradient coefficients (fp32); the streamed chunk of logits and its top-k merge
            saved += L * d * 4 + L * (P + k) * 12 + L * 8
            transient = max(transient, L * min(vocab, NTPM_CHUNK) * 4 * 2)
        else:
            # the baselines form [L, V] logits, targets and masks
            saved += L * d * 4 + L * vocab * (4 + 4 + 2)
            transient = max(transient, L * vocab * 4)
    return saved, transient


def estimate_memory(model_config, cfg, batch, world: int = 1, device_type: str = "cpu"
                    ) -> MemoryEstimate:
    """Estimate for training a model of ``model_config`` with ``cfg`` (LoRA, freezing, precision,
    checkpointing, FSDP) on batches like ``batch`` (a ``samples.Batch``), ``world`` ranks. Works
    on a fake model: no weights are loaded or allocated."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from densert.model.modeling import YoutuVLForConditionalGeneration

    from .finetune import count_parameters, lora_modules, prepare
    with torch.device("meta"):
        model = YoutuVLForConditionalGeneration(model_config)
    prepare(model, dataclasses.replace(cfg, grad_checkpoint=False))
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    _to_fake(model, mode, device_type)
    params = list({id(p): p for p in model.parameters()}.values())
    n = count_parameters(model)
    wbytes = sum(p.numel() * p.element_size() for p in params)
    tbytes = sum(p.numel() * 4 for p in params if p.requires_grad)
    largest = max((p.numel() * 4 for p in params if p.requires_grad), default=0)
    tr = _trace_activations(model, mode, batch, cfg.precision, device_type)
    loss_saved, loss_transient = _vision_loss_bytes(batch, cfg.loss, cfg.k, model_config.vocab_size,
                                                    tr["hidden_dim"])
    layers = tr["layers"]
    if cfg.grad_checkpoint:
        body = tr["outside"] + sum(tr["layer_inputs"].values()) + max(layers.values(), default=0)
    else:
        body = tr["outside"] + sum(layers.values())
    # One backward working set: the gradient of the largest saved tensor and of its input.
    backward = 2 * tr["largest"]
    acts = body + loss_saved + max(tr["text_logits"] + loss_transient, backward)
    # AdamW's step: CUDA runs the foreach kernels (one scratch list as large as the trainable
    # parameters), CPU runs it parameter by parameter (scratch of the largest, twice).
    scratch = tbytes if device_type == "cuda" else 2 * largest
    weights, grads, optim = wbytes, tbytes, 2 * tbytes
    detail = {"activations_outside_layers": tr["outside"], "activations_layers": sum(layers.values()),
              "activations_loss": loss_saved, "text_logits": tr["text_logits"],
              "loss_transient": loss_transient, "backward_working_set": backward,
              "lora_layers": len(lora_modules(model))}
    if world > 1 and cfg.fsdp:
        layer_params = _layer_param_bytes(model)
        root = wbytes - sum(layer_params)
        unsharded = root + 2 * max(layer_params, default=0)
        weights = wbytes // world + unsharded
        grads, optim = tbytes // world + unsharded, 2 * tbytes // world
        scratch = scratch // world
        detail["fsdp_unsharded"] = unsharded
    return MemoryEstimate(weights=weights, gradients=grads, optimizer=optim, activations=acts,
                          optimizer_scratch=scratch, parameters=n["total"], trainable=n["trainable"],
                          world=world, detail=detail)


def _to_fake(model, mode, device_type: str) -> None:
    """Every parameter and buffer of a ``meta`` model -> a fake tensor on ``device_type`` (same
    shape, dtype, requires_grad; tied parameters stay tied)."""
    made: dict[int, torch.Tensor] = {}
    with mode:
        for mod in model.modules():
            for store in (mod._parameters, mod._buffers):
                for name, t in store.items():
                    if t is None:
                        continue
                    if id(t) not in made:
                        f = torch.empty(t.shape, dtype=t.dtype, device=device_type)
                        made[id(t)] = (torch.nn.Parameter(f, requires_grad=t.requires_grad)
                                       if isinstance(t, torch.nn.Parameter) else f)
                    store[name] = made[id(t)]


def _layer_param_bytes(model) -> list[int]:
    layers = [*model.siglip2.vision_model.encoder.layers, *model.model.layers]
    return [sum(p.numel() * p.element_size() for p in m.parameters()) for m in layers]


# ---------------------------------------------------------------------------------------------
# Measurement
# ---------------------------------------------------------------------------------------------
class LiveTensorMeter(TorchDispatchMode):
    """Bytes of tensor storage alive, and their peak, while the mode is active. Tensors made
    before it (parameters, gradients, optimizer states) are added with ``track``."""

    def __init__(self):
        super().__init__()
        self._live: dict[int, tuple[weakref.ref, int]] = {}
        self.current = 0
        self.peak = 0

    def track(self, *tensors) -> None:
        for t in tree_flatten(list(tensors))[0]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta":
                self._add(t.untyped_storage())
        self.peak = max(self.peak, self.current)

    def _add(self, st) -> None:
        key = st._cdata
        if key in self._live or st.nbytes() == 0:
            return
        n = st.nbytes()

        def gone(_ref, key=key, n=n):
            if self._live.pop(key, None) is not None:
                self.current -= n
        self._live[key] = (weakref.ref(st, gone), n)
        self.current += n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._add(t.untyped_storage())
        self.peak = max(self.peak, self.current)
        return out
