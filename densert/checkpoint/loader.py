"""``load_model``: a checkpoint directory -> YoutuVLForConditionalGeneration in eval mode.

Memory: parameters are created on the ``meta`` device (buffers stay real, so e.g. the RoPE
frequencies are computed normally), then each tensor is read from disk into its own buffer with
``readinto``, cast, and assigned. Peak RSS is the loaded weights plus one tensor of scratch when
casting; no mmap pages or second copy of the model are held (measured in the slow test).

Validation is strict and reports everything at once: missing, unexpected and mis-shaped tensors
in one ``CheckpointError``. Known-unused keys (``IGNORED_KEYS``) are skipped on purpose.

Tied lm_head (``tie_word_embeddings: true``): ``lm_head.weight`` is normally absent and the
embedding is reused. If it is present anyway it must equal ``model.embed_tokens.weight`` exactly
(then it is dropped); a different matrix is an error, because silently picking one of the two
would run a different model than the one on disk. Set ``tie_word_embeddings: false`` to use it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path

import torch
from torch import nn

from densert.errors import CheckpointError

from .model_dir import read_all_headers, read_config
from .safetensors import TensorInfo, resolve_dtype

# Present in some SigLIP2 exports but unused: Youtu-VL feeds patches through 2-D RoPE only
# (spec youtu-vl-checkpoint.md sec. 2.1; mlx-vlm and mlxcel drop them too).
IGNORED_KEYS = frozenset({
    "siglip2.vision_model.embeddings.position_embedding.weight",
    "siglip2.vision_model.embeddings.position_ids",
})
FLOAT_DISK_DTYPES = ("F32", "F16", "BF16")
# The repeated layers: what the layer-by-layer export traces one at a time, and what a streamed
# model loads per forward.
LAYER_STACKS = ("model.layers", "siglip2.vision_model.encoder.layers")


@contextlib.contextmanager
def params_on_meta():
    """Create every nn.Parameter on ``meta`` (weights cost nothing and skip their init) while
    buffers are built for real. Patches ``nn.Module.register_parameter``; not thread-safe."""
    orig = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        orig(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = orig


def read_tensor(info: TensorInfo, f=None) -> torch.Tensor:
    """One tensor from disk in its stored dtype (a fresh CPU buffer, no mmap)."""
    out = torch.empty(info.shape, dtype=info.torch_dtype)
    buf = out.view(-1).view(torch.uint8).numpy() if out.numel() else None
    own = f is None
    f = open(info.path, "rb") if own else f
    try:
        f.seek(info.begin)
        n = f.readinto(buf) if buf is not None else 0
    finally:
        if own:
            f.close()
    if n != info.end - info.begin:
        raise CheckpointError(f"{info.path}: truncated while reading {info.name!r} "
                              f"({n} of {info.end - info.begin} bytes)")
    return out


def check_finite(t: torch.Tensor, info: TensorInfo) -> None:
    """A NaN or Inf weight poisons every map downstream (a constant map, exit 0): refuse it."""
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{info.path}: tensor {info.name!r} holds {bad} non-finite value(s) "
                              "(NaN/Inf); the checkpoint is damaged")


def validate(expected: dict[str, tuple[int, ...]], infos: dict[str, TensorInfo], tied: bool,
             where: Path) -> None:
    """One error listing every missing, unexpected, mis-shaped or non-float tensor."""
    problems: list[str] = []
    need = dict(expected)
    if tied:
        need.pop("lm_head.weight", None)
    have = {n: i for n, i in infos.items() if n not in IGNORED_KEYS}
    if tied:
        have.pop("lm_head.weight", None)   # compared with the embedding after loading
    missing = sorted(set(need) - set(have))
    unexpected = sorted(set(have) - set(need))
    if missing:
        problems.append(f"missing {len(missing)} tensor(s): " + ", ".join(missing))
    if unexpected:
        problems.append(f"unexpected {len(unexpected)} tensor(s): " + ", ".join(unexpected))
    shapes = [f"{n}: checkpoint {list(have[n].shape)} vs model {list(need[n])}"
              for n in sorted(set(need) & set(have)) if tuple(have[n].shape) != tuple(need[n])]
    if tied and "lm_head.weight" in infos and tuple(infos["lm_head.weight"].shape) != tuple(
            expected["lm_head.weight"]):
        shapes.append(f"lm_head.weight: checkpoint {list(infos['lm_head.weight'].shape)} vs model "
                      f"{list(expected['lm_head.weight'])}")
    if shapes:
        problems.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes))
    dtypes = [f"{n} ({i.dtype})" for n, i in sorted(have.items())
              if n in need and i.dtype not in FLOAT_DISK_DTYPES]
    if dtypes:
        problems.append(f"unsupported dtype (expected one of {FLOAT_DISK_DTYPES}): " + ", ".join(dtypes))
    if problems:
        raise CheckpointError(f"{where}: checkpoint does not match config.json: "
                              + "; ".join(problems))


def _set_param(module: nn.Module, name: str, value: torch.Tensor) -> None:
    owner, _, leaf = name.rpartition(".")
    mod = module.get_submodule(owner) if owner else module
    mod._parameters[leaf] = nn.Parameter(value, requires_grad=False)


def materialize(module: nn.Module, prefix: str, infos: dict[str, TensorInfo],
                dtype: torch.dtype = torch.float32) -> nn.Module:
    """Read the parameters of one submodule (checkpoint names ``prefix + name``) from disk into
    it: what the layer-by-layer export and the streamed reference hold at a time."""
    for name, _ in list(module.named_parameters()):
        info = infos[prefix + name]
        t = read_tensor(info)
        check_finite(t, info)
        _set_param(module, name, t.to(dtype))
    return module


def release(module: nn.Module) -> None:
    """Put a materialized submodule's parameters back on ``meta`` (their memory is freed)."""
    for name, p in list(module.named_parameters()):
        _set_param(module, name, torch.empty(p.shape, dtype=p.dtype, device="meta"))


def stream_layers(model, infos: dict[str, TensorInfo], dtype: torch.dtype) -> None:
    """Decoder and ViT layers of a model built on ``meta`` load their weights right before their
    forward and drop them right after: the model computes exactly as when loaded whole, holding
    the embedding table, the small parts and one layer (a 4B model's fp32 reference in ~4 GB).
    Each forward reads the layers from disk again (the page cache keeps that cheap)."""
    for stack_name in LAYER_STACKS:
        for i, layer in enumerate(model.get_submodule(stack_name)):
            def load(m, args, prefix=f"{stack_name}.{i}."):
                materialize(m, prefix, infos, dtype)
            layer.register_forward_pre_hook(load)
            layer.register_forward_hook(lambda m, args, out: release(m))


def skeleton(path: str | Path):
    """The model of a checkpoint directory with its parameters on ``meta`` (buffers real), and
    the checkpoint's tensor headers, validated against it: what loading whole, streaming layers
    and exporting layer by layer all start from."""
    from densert.model.modeling import YoutuVLForConditionalGeneration
    path = Path(path)
    cfg = read_config(path)
    infos = read_all_headers(path)
    with params_on_meta():
        model = YoutuVLForConditionalGeneration(cfg).eval()
    validate({n: tuple(p.shape) for n, p in model.state_dict().items()}, infos,
             cfg.tie_word_embeddings, path)
    return model, infos


def load_model(path: str | Path, dtype: str | torch.dtype = "float32",
               device: str | torch.device = "cpu", *, streamed: bool = False):
    """Load a Youtu-VL checkpoint directory (single-file or sharded safetensors).

    ``streamed``: keep the decoder and ViT layers on disk and load each one for its forward
    (``stream_layers``); CPU only. Slower per call, a fraction of the memory."""
    dt = resolve_dtype(dtype)
    path = Path(path)
    model, infos = skeleton(path)
    cfg = model.config
    expected = {n: tuple(p.shape) for n, p in model.state_dict().items()}
    tied = cfg.tie_word_embeddings

    state: dict[str, torch.Tensor] = {}
    names = [n for n in expected if n in infos and not (tied and n == "lm_head.weight")]
    if streamed:
        names = [n for n in names if not n.startswith(tuple(f"{s}." for s in LAYER_STACKS))]
    by_file: dict[Path, list[str]] = {}
    for n in names:
        by_file.setdefault(infos[n].path, []).append(n)
    for fpath, fnames in by_file.items():
        with open(fpath, "rb") as f:
            for n in sorted(fnames, key=lambda n: infos[n].begin):
                t = read_tensor(infos[n], f)
                check_finite(t, infos[n])
                state[n] = t.to(device=device, dtype=dt)
                del t
    if tied and "lm_head.weight" in infos:
        head = read_tensor(infos["lm_head.weight"]).to(device=device, dtype=dt)
        if not torch.equal(head, state["model.embed_tokens.weight"]):
            raise CheckpointError(
                f"{path}: config says tie_word_embeddings=true but lm_head.weight differs from "
                "model.embed_tokens.weight; set tie_word_embeddings to false to use the separate head")
        del head
    model.load_state_dict(state, strict=False, assign=True)
    if tied:
        # assign=True replaced the embedding Parameter; the head must point at the new one.
        model.lm_head.weight = model.model.embed_tokens.weight
    if streamed:
        if torch.device(device).type != "cpu":
            raise CheckpointError("streamed layers load on the CPU only; use device='cpu'")
        stream_layers(model, infos, dt)
        return model.eval()
    model.to(device)
    still_meta = [n for n, p in model.named_parameters() if p.device.type == "meta"]
    if still_meta:
        raise CheckpointError(f"{path}: parameters left unloaded: {still_meta}")
    return model.eval()


def auto_dtype(path: str | Path, device: str | torch.device = "cpu") -> torch.dtype:
    """``--dtype auto``: the checkpoint's own dtype (config ``torch_dtype``) where the device
    computes it natively (CUDA with bf16 support; a CPU with AVX512-BF16 or AMX), float32
    elsewhere (emulated bf16 is slower than fp32 on such CPUs)."""
    from densert.machine import cpu_computes_bf16
    own = resolve_dtype(read_config(path).torch_dtype or "float32")
    if own == torch.float32:
        return own
    dev = torch.device(device)
    if dev.type == "cuda":
        return own if own != torch.bfloat16 or torch.cuda.is_bf16_supported() else torch.float16
    return own if own == torch.bfloat16 and cpu_computes_bf16() else torch.float32


# Activation bytes per 16x16 patch (ViT: hidden, qkv, MLP intermediate, fp32) and per decoder
# token (MLA projections and the SwiGLU intermediate, fp32), plus the fixed attention chunks:
# an upper bound from the widths, for the fit check only.
def activation_bytes(cfg, max_patches: int) -> int:
    vc = cfg.vision_config
    per_patch = 4 * (6 * vc.hidden_size + 2 * vc.intermediate_size)
    per_token = 4 * (6 * cfg.hidden_size + 3 * cfg.intermediate_size)
    from densert.model.attention import DEFAULT_SCORE_BUDGET
    return max_patches * per_patch + (max_patches // vc.merge_unit + 512) * per_token + 4 * DEFAULT_SCORE_BUDGET


def weight_count(path: str | Path) -> int:
    """Values the model loads (from the headers; a tied head counts once)."""
    skip = IGNORED_KEYS | ({"lm_head.weight"} if read_config(path).tie_word_embeddings else set())
    return sum(i.numel for n, i in read_all_headers(path).items() if n not in skip)


def check_fits(path: str | Path, dtype, device: str | torch.device = "cpu", max_patches: int | None = None,
               chosen: str = "--dtype") -> int:
    """Refuse, before reading any weight, a model that would not fit the memory left: one line
    with the bytes it needs, the bytes available (and from where), and the dtype that would fit.
    Returns the estimate."""
    from densert.image import DEFAULT_MAX_PATCHES
    from densert.machine import available_memory
    dt = resolve_dtype(dtype)
    cfg = read_config(path)
    act = activation_bytes(cfg, max_patches or DEFAULT_MAX_PATCHES)
    count = weight_count(path)
    need = count * dt.itemsize + act
    free, source = available_memory(str(device))
    if need <= free:
        return need

    def gib(b):
        return f"{b / 2**30:.1f} GiB"

    fits = [d for d in (torch.bfloat16, torch.float16) if d.itemsize < dt.itemsize
            and count * d.itemsize + act <= free]
    hint = (f"; --dtype {str(fits[0]).removeprefix('torch.')} needs {gib(count * fits[0].itemsize + act)}"
            if fits else "; no dtype fits: run an engine (densert export --precision int4, then "
            "--backend onnxruntime --engine-dir) or free memory")
    raise CheckpointError(
        f"{path}: the model needs about {gib(need)} at {str(dt).removeprefix('torch.')} ({chosen}: "
        f"{gib(need - act)} of weights + {gib(act)} for images of {max_patches or DEFAULT_MAX_PATCHES} "
        f"patches) but {gib(max(free, 0))} is available ({source}){hint}")
