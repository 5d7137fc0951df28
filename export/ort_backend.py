"""ONNX Runtime backend: the engine directory's two graphs behind the runtime's ``Backend``.

Sessions are created once per backend and reused for every frame (``make_session``: the one
place densert creates an ONNX Runtime session; telemetry off). The KV cache stays an
``OrtValue`` between steps (IO binding): a decode step binds the previous step's present cache as
its past input without a round trip through numpy, and on CUDA the cache never leaves the GPU.
Prompt embeddings are rows of the engine's tied table (``TiedTable``), looked up on the host.

Memory: the CPU arena is off, so each stage returns its activations (the peak is the largest
stage, not the sum of all). Float graphs run without weight prepacking, so their weights stay
memory-mapped from ``*.onnx.data`` instead of being copied; quantized graphs need prepacking
(``MatMulNBits``' and the int8 GEMMs' (``DynamicQuantizeMatMul``) fast kernels run on prepacked
weights; the onnxruntime target writes its quantized Linears as int8 GEMMs and the int4 table as
MatMulNBits in its own layout; the tensorrt target's DequantizeLinear -> MatMul is fused at load).

Execution providers (``pick_providers``): ``device`` "auto" takes the CUDA execution provider
where onnxruntime-gpu (``densert[gpu]``) is installed and a GPU can run it, "cuda[:N]" asks for
it, "cpu" never; an explicit ``providers`` list overrides both. When CUDA was asked for (or
onnxruntime-gpu is installed) and cannot run, one line says why and the engine runs on
CPUExecutionProvider: the reason is found before any session is made, because ONNX Runtime
itself would log two multi-line errors and go on on CPU without saying so to the caller.
TensorRT's execution provider is never picked by default: densert's TensorRT path is
``--backend tensorrt``, and the onnxruntime target's fused ``com.microsoft`` operators are not
TensorRT's (pass ``providers=[...]`` to try it).

On CUDA (``OrtBackend._run``): the KV cache stays an ``OrtValue`` on the GPU between steps;
where torch sees the GPU too, the image embeddings, the vision hidden states and the task
scores are handed over as torch CUDA tensors through DLPack (no copy), the prompt is assembled
on the GPU (only the text tokens' table rows cross from the host), and the dense head reads the
scores where the engine wrote them, as on the TensorRT path. Only the last logits, which greedy
decoding reads on the host, come back. With a CPU build of torch those hand-overs go through
host memory instead (the cache still stays on the GPU).
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from densert.backend import Backend, PrefillResult, check_batch
from densert.errors import EngineError
from densert.image import MERGE
from densert.model.config import YoutuVLConfig
from densert.model.vision_meta import VisionMeta

from .manifest import BATCH_AXIS, cache_root, checkpoint_identity, load_manifest
from .quantize import NBITS_ACCURACY_LEVEL
from .tied_table import TiedTable

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}
CUDA_EP, CPU_EP = "CUDAExecutionProvider", "CPUExecutionProvider"
_GPU_EPS = (CUDA_EP, "TensorrtExecutionProvider")
# Ops of a quantized graph: its weights are prepacked (what these kernels run on).
QUANTIZED_OPS = {"DequantizeLinear", "com.microsoft::MatMulNBits", "com.microsoft::DynamicQuantizeMatMul"}


@dataclass
class OrtCache:
    """The present cache of the last step, as OrtValues in the graph's cache-output order."""
    values: list[Any]
    length: int


@dataclass
class OrtPrefillResult(PrefillResult):
    # scores_<task> of the prefill graph: [M, K] subset scores (mean of each group's lm_head rows)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)


def default_engine_dir(model_dir: str | Path, precision: str = "fp32", cache_layout: str = "latent") -> Path:
    """``<cache root>/engines/<checkpoint id[:16]>-<precision>-<layout>`` (see manifest.cache_root)."""
    ident = checkpoint_identity(model_dir)["checkpoint_id"]
    return cache_root() / "engines" / f"{ident[:16]}-{precision}-{cache_layout}"


def make_session(path: str | Path, providers: Sequence[str], *, quantized: bool,
                 intra_op_threads: int | None = None, provider_options: Sequence[dict] | None = None):
    """An ONNX Runtime InferenceSession of one engine graph. Every session densert creates comes
    from here: ONNX Runtime's telemetry is on by default, and densert makes no network calls."""
    import onnxruntime as ort
    ort.disable_telemetry_events()
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    threads = intra_op_threads if intra_op_threads is not None else int(os.environ.get("DENSERT_ORT_THREADS", 0))
    so.intra_op_num_threads = threads  # 0 = ORT default (one per physical core)
    so.inter_op_num_threads = 1        # the graphs are one long chain; no parallel branches to run
    so.log_severity_level = 3
    so.enable_cpu_mem_arena = False
    if quantized:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(NBITS_ACCURACY_LEVEL))
    else:
        so.add_session_config_entry("session.disable_prepacking", "1")
    return ort.InferenceSession(str(path), so, providers=list(providers),
                                provider_options=list(provider_options) if provider_options else None)


@dataclass
class Providers:
    """``pick_providers``' answer: the session's providers (best first) with their options, where
    outputs kept on the device live, and the line to print when a GPU was wanted and not used."""
    names: list[str]
    options: list[dict]
    device: str = "cpu"                # "cuda" when the first provider runs on the GPU
    device_id: int = 0
    fallback: str | None = None


def pick_providers(requested: Sequence[str] | None = None, device: str | None = "auto") -> Providers:
    """The execution providers for ``device`` ("auto", "cpu", "cuda", "cuda:N"; see the module
    docstring), or exactly ``requested`` (an EngineError names any this onnxruntime lacks)."""
    import onnxruntime as ort
    avail = ort.get_available_providers()
    device = device or "auto"
    index = int(device.split(":")[1]) if device.startswith("cuda:") else 0
    if requested:
        missing = [p for p in requested if p not in avail]
        if missing:
            raise EngineError(f"ONNX Runtime providers {missing} are not available (this onnxruntime "
                              f"has {avail}); for CUDA / TensorRT install densert[gpu] (export/README.md, GPU)")
        on_gpu = requested[0] in _GPU_EPS
        return Providers(list(requested), [{"device_id": index} if on_gpu and p in _GPU_EPS else {}
                                           for p in requested], "cuda" if on_gpu else "cpu", index)
    cpu = Providers([CPU_EP], [{}])
    if device == "cpu":
        return cpu
    if CUDA_EP not in avail:
        shadowed = gpu_wheel_shadowed()
        if device == "auto" and shadowed is None:
            return cpu  # the CPU wheel and no GPU asked for: nothing to say
        why = shadowed or (f"this onnxruntime {ort.__version__} is the CPU build (no CUDA execution "
                           "provider); install densert[gpu] (export/README.md, GPU)")
        return Providers([CPU_EP], [{}], fallback=fallback_line(device, why))
    why = cuda_unusable(index)
    if why is not None:
        return Providers([CPU_EP], [{}], fallback=fallback_line(device, why))
    # kSameAsRequested: the CUDA arena grows by what a stage asks for, not to the next power of
    # two, so the GPU memory held is the largest stage's (as on CPU, where the arena is off).
    return Providers([CUDA_EP, CPU_EP], [{"device_id": index, "arena_extend_strategy": "kSameAsRequested"}, {}],
                     "cuda", index)


def fallback_line(device: str, why: str) -> str:
    """The one line said when CUDA was wanted and the engine runs on CPU instead."""
    asked = f"--device {device}" if device != "auto" else "--device auto, onnxruntime-gpu installed"
    return (f"densert: onnxruntime: {CUDA_EP} asked for ({asked}) is not usable: "
            f"{' '.join(why.split())}; running on {CPU_EP}")


def gpu_wheel_shadowed() -> str | None:
    """Why the CUDA provider is missing although onnxruntime-gpu is installed, or None when it
    is not installed: both wheels ship the ``onnxruntime`` module, and the CPU one (densert's base
    dependency) installed after it overwrote its files."""
    from importlib import metadata
    try:
        version = metadata.version("onnxruntime-gpu")
    except metadata.PackageNotFoundError:
        return None
    return (f"onnxruntime-gpu {version} is installed but the CPU wheel's files replaced its module "
            f"(both ship `onnxruntime`); run pip install --force-reinstall --no-deps "
            f"onnxruntime-gpu=={version}")


def cuda_unusable(device_id: int = 0) -> str | None:
    """Why ONNX Runtime's CUDA provider cannot run on GPU ``device_id`` here, or None when it can:
    no driver, no GPU, or the provider library missing CUDA / cuDNN libraries."""
    count, why = cuda_device_count()
    if why is not None:
        return why
    if device_id >= count:
        return f"cuda:{device_id} asked for but {count} GPU(s) are visible"
    return cuda_provider_load_error()


def cuda_device_count() -> tuple[int, str | None]:
    """(GPUs the CUDA driver sees, None) or (0, why not), from the driver library itself: torch
    may be a CPU build on a machine whose GPU ONNX Runtime can use."""
    import ctypes
    lib_name = "nvcuda.dll" if os.name == "nt" else "libcuda.so.1"
    try:
        cuda = ctypes.CDLL(lib_name)
    except OSError:
        return 0, f"no NVIDIA driver ({lib_name} not found), so no GPU here"
    rc = cuda.cuInit(0)
    if rc == 100:  # CUDA_ERROR_NO_DEVICE
        return 0, "the NVIDIA driver sees no GPU (cuInit: CUDA_ERROR_NO_DEVICE)"
    if rc != 0:
        return 0, f"the NVIDIA driver does not start (cuInit error {rc})"
    n = ctypes.c_int(0)
    rc = cuda.cuDeviceGetCount(ctypes.byref(n))
    if rc != 0 or n.value == 0:
        return 0, f"the NVIDIA driver sees no GPU (cuDeviceGetCount: error {rc}, {n.value} devices)"
    return n.value, None


def cuda_provider_load_error() -> str | None:
    """Why onnxruntime-gpu's CUDA provider library does not load (the first missing CUDA / cuDNN
    library, as the loader names it), or None. CUDA and cuDNN from NVIDIA's pip wheels are found
    as ONNX Runtime finds them (``onnxruntime.preload_dlls``)."""
    import contextlib
    import ctypes
    import io

    import onnxruntime as ort
    capi = Path(ort.__file__).parent / "capi"
    prefix, suffix = ("", ".dll") if os.name == "nt" else ("lib", ".so")
    if hasattr(ort, "preload_dlls"):
        with contextlib.redirect_stdout(io.StringIO()):  # it prints each library it misses
            try:
                ort.preload_dlls()
            except Exception:
                pass
    mode = getattr(ctypes, "RTLD_GLOBAL", 0)
    try:
        ctypes.CDLL(str(capi / f"{prefix}onnxruntime_providers_shared{suffix}"), mode=mode)
        ctypes.CDLL(str(capi / f"{prefix}onnxruntime_providers_cuda{suffix}"))
    except OSError as e:
        from onnxruntime.capi import build_and_package_info as info
        cuda = getattr(info, "cuda_version", "") or "its"
        return (f"its CUDA provider library does not load ({e}): it needs the CUDA {cuda} and "
                f"cuDNN 9 libraries (export/README.md, GPU)")
    return None


class OrtBackend(Backend):
    name = "onnxruntime"
    dtype = torch.float32   # the stages hand back float32 whatever the engine's precision

    def __init__(self, engine_dir: str | Path, model_dir: str | Path | None = None,
                 providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
                 tasks: Sequence[str] = (), check_hashes: bool = True, device: str | None = "auto"):
        """``model_dir``: the checkpoint the engine should come from (its hashes are checked
        against the manifest); None: the engine directory stands alone. ``device``: "auto",
        "cpu", "cuda" or "cuda:N" (``pick_providers``); ``providers`` overrides it."""
        self.engine_dir = Path(engine_dir)
        self.manifest = m = load_manifest(engine_dir, model_dir, tasks, check_hashes=check_hashes)
        self.config = YoutuVLConfig.from_json_file(self.engine_dir / "config.json")
        self.cache_layout, self.precision = m["cache_layout"], m["precision"]
        self.max_patches = int(m["max_patches"])
        self.table = TiedTable(self.engine_dir, m["tied_table"], self.config.vocab_size,
                               self.config.hidden_size)
        choice = pick_providers(providers, device)
        if choice.fallback:
            print(choice.fallback, file=sys.stderr)
        self.providers = choice.names
        self.sessions: dict[str, Any] = {}
        for g, info in m["graphs"].items():
            path = self.engine_dir / info["file"]
            try:
                sess = make_session(path, choice.names, quantized=bool(QUANTIZED_OPS & set(info["op_types"])),
                                    intra_op_threads=intra_op_threads, provider_options=choice.options)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise EngineError(f"engine dir {self.engine_dir}: ONNX Runtime cannot load {info['file']} "
                                  f"({type(e).__name__}: {str(e)[:300]}); re-run `densert export`") from None
            if choice.device == "cuda" and sess.get_providers()[0] != choice.names[0]:
                # The checks before passed, yet ONNX Runtime started the session on CPU (its log
                # above says why): the remaining graphs go there too, outputs stay on the host.
                print(fallback_line(device or "auto", f"ONNX Runtime did not start {choice.names[0]} "
                                    "(its log above)"), file=sys.stderr)
                choice = Providers([CPU_EP], [{}])
                self.providers = choice.names
            names = ([i.name for i in sess.get_inputs()], [o.name for o in sess.get_outputs()])
            want = ([i["name"] for i in info["inputs"]], [o["name"] for o in info["outputs"]])
            if names != want:
                raise EngineError(f"engine dir {self.engine_dir}: {info['file']} has inputs/outputs {names}, "
                                  f"the manifest says {want}; the graph and manifest are from different exports")
            self.sessions[g] = sess
        self._io = {g: {"in": {i["name"]: i for i in info["inputs"]},
                        "out": [o["name"] for o in info["outputs"]]} for g, info in m["graphs"].items()}
        self.cache_outputs = [o for o in self._io["llm"]["out"] if o.startswith("present_")]
        self.past_inputs = [i for i in self._io["llm"]["in"] if i.startswith("past_")]
        self.float_dtype = _NP[m["io_float_dtype"]]
        # Engines exported with a batch axis run a rig's prompts as one batch (measured to pay:
        # benchmarks/results/rig.md); older ones hold a fixed 1 there.
        self.supports_prefill_batch = self._io["llm"]["in"]["inputs_embeds"]["shape"][0] == BATCH_AXIS
        # ONNX Runtime binds by device type and id; the protocol's ``device`` is torch's spelling.
        self._device, self._device_id = choice.device, choice.device_id
        self.device = f"cuda:{self._device_id}" if self._device == "cuda" else "cpu"
        # Where the runtime's tensors can stay on the GPU: torch must see it too (a CPU build of
        # torch takes them through host memory; the cache stays on the GPU either way).
        self._torch_device = (torch.device("cuda", self._device_id) if self._device == "cuda"
                              and torch.cuda.is_available() else None)

    def head_weight(self) -> TiedTable:
        """The engine's tied table: rows read from the engine directory on demand."""
        return self.table

    def engine_source(self) -> dict:
        return engine_source(self.engine_dir, self.manifest)

    # ---- construction from a checkpoint
    @classmethod
    def from_model(cls, model_dir: str | Path | None, engine_dir: str | Path | None = None,
                   precision: str = "fp32", cache_layout: str = "latent",
                   tasks: Sequence[str] | None = None, dtype=None, **kwargs) -> "OrtBackend":
        """Open ``engine_dir``; with None, the per-checkpoint cache dir, exporting on first use
        (for the processor's whole patch cap: ONNX Runtime sizes nothing ahead, unlike a
        TensorRT profile). ``dtype`` is accepted for the runtime's ``make_backend`` signature:
        precision is the export's (``fp16`` when dtype is torch.float16)."""
        if dtype is not None and precision == "fp32" and dtype == torch.float16:
            precision = "fp16"
        if engine_dir is None:
            if model_dir is None:
                raise EngineError("the onnxruntime backend needs an engine dir or a checkpoint to export one "
                                  "from: pass --engine-dir ENGINES or --model CHECKPOINT")
            engine_dir = default_engine_dir(model_dir, precision, cache_layout)
            if not (Path(engine_dir) / "manifest.json").is_file():
                from densert.tasks import TASKS

                from .onnx_export import export_engine
                print(f"densert: no ONNX engine for {model_dir} yet; exporting to {engine_dir} "
                      "(once per checkpoint)", file=sys.stderr)
                from densert.image import DEFAULT_MAX_PATCHES
                export_engine(model_dir, engine_dir, precision=precision, cache_layout=cache_layout,
                              tasks=list(tasks) if tasks else _tasks_available(model_dir, TASKS),
                              max_image_tokens=DEFAULT_MAX_PATCHES // (MERGE * MERGE),
                              force=True)  # the cache dir is densert's own: a failed try is redone
        return cls(engine_dir, model_dir=model_dir, tasks=tasks or (), **kwargs)

    # ---- helpers
    def _check_shape(self, graph: str, name: str, got: Sequence[int]) -> None:
        shape = self._io[graph]["in"][name]["shape"]
        if len(got) != len(shape) or any(isinstance(s, int) and s != a for s, a in zip(shape, got)):
            raise EngineError(f"{graph} input {name!r}: shape {list(got)}, the engine expects {shape} "
                              f"(engine dir {self.engine_dir})")

    def _feed(self, graph: str, name: str, value) -> np.ndarray:
        spec = self._io[graph]["in"][name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(value, dtype=_NP[spec["dtype"]])
        self._check_shape(graph, name, arr.shape)
        return arr

    def _run(self, graph: str, feeds: dict[str, Any], keep_on_device: Sequence[str] = ()):
        """One graph run with I/O binding. Feeds: OrtValues (a previous step's cache) are bound
        where they live, torch CUDA tensors in place (DLPack), anything else copied from the host.
        Outputs named in ``keep_on_device`` stay on the provider's device; the rest come back to
        the host."""
        import onnxruntime as ort
        sess = self.sessions[graph]
        io = sess.io_binding()
        held = []    # device inputs must outlive the run
        for k, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(k, v)
            elif isinstance(v, torch.Tensor) and v.device.type == "cuda":
                t = v.detach().to(_TORCH[self._io[graph]["in"][k]["dtype"]]).contiguous()
                self._check_shape(graph, k, t.shape)
                ov = ort.OrtValue.from_dlpack(t)
                held.append((t, ov))
                io.bind_ortvalue_input(k, ov)
            else:
                io.bind_cpu_input(k, self._feed(graph, k, v))
        if held:
            # torch wrote them on its stream; the CUDA provider reads on its own
            torch.cuda.current_stream(held[0][0].device).synchronize()
        for o in self._io[graph]["out"]:
            if o in keep_on_device and self._device != "cpu":
                io.bind_output(o, self._device, self._device_id)
            else:
                io.bind_output(o, "cpu")
        sess.run_with_iobinding(io)
        return dict(zip(self._io[graph]["out"], io.get_outputs()))

    def _on_device(self, names: Sequence[str]) -> list[str]:
        """The outputs the runtime reads that stay on the GPU: only where torch can take them."""
        return list(names) if self._torch_device is not None else []

    @staticmethod
    def _t(v) -> torch.Tensor:
        """An output as a torch tensor: one on the GPU stays there (DLPack, no copy) where torch
        has CUDA; a host one, or any where torch is a CPU build, through numpy."""
        if v.device_name().lower() != "cpu" and torch.cuda.is_available():
            return torch.from_dlpack(v)
        return torch.from_numpy(v.numpy())

    # ---- Backend protocol
    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        """[cells, d] fp32 image embeddings; on the GPU where the engine runs there (prefill
        takes them from there)."""
        check_patches(int(pixel_values.shape[0]), self.max_patches, self.engine_dir)
        out = self._run("vision", vision_feeds(pixel_values, meta),
                        keep_on_device=self._on_device(["image_embeds"]))
        return self._t(out["image_embeds"]).float()

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> OrtPrefillResult:
        emb, pos = prompt_embeddings(self.table, input_ids, image_embeds, self.config,
                                     device=self._torch_device)
        past = {n: np.zeros(s, self.float_dtype) for n, s in
                zip(self.past_inputs, empty_past_shapes(self.manifest))}
        dense = [o for o in self._io["llm"]["out"] if o.startswith("scores_")
                 or o in ("vision_hidden", "pre_vision_hidden")]
        out = self._run("llm", {"inputs_embeds": emb[None], "image_positions": pos, **past},
                        keep_on_device=[*self.cache_outputs, *self._on_device(dense)])
        vision = self._t(out["vision_hidden"]).float() if len(pos) else None
        pre = self._t(out["pre_vision_hidden"])[0].float() if len(pos) and int(pos[0]) > 0 else None
        scores = {k[len("scores_"):]: self._t(v).float() for k, v in out.items() if k.startswith("scores_")}
        cache = OrtCache([out[c] for c in self.cache_outputs], int(emb.shape[0]))
        return OrtPrefillResult(vision_hidden=vision, pre_vision_hidden=pre,
                                last_logits=self._t(out["last_logits"])[0].float(), cache=cache,
                                scores=scores)

    def prefill_batch(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      past=None) -> list[OrtPrefillResult]:
        """The rows as one [B, T] batch of the LLM graph. The graph returns the hidden states at
        ``image_positions`` (indices into the batch's B x T positions, row after row), and its
        pre_vision_hidden only for the first: so each row asks for its pads and, where there is
        one, the position before them, and the rows come apart on the host."""
        if not self.supports_prefill_batch:
            return super().prefill_batch(input_ids, image_embeds, past)
        if past is not None:
            raise EngineError("the onnxruntime backend has no extend stage: prefill_batch takes no past")
        ids = check_batch(input_ids, image_embeds, self.config)
        b, t = ids.shape
        per = (0 if image_embeds is None else int(image_embeds.shape[0])) // b
        embs, wanted, pre = [], [], []
        for i in range(b):
            rows = None if image_embeds is None else image_embeds[i * per:(i + 1) * per]
            emb, pos = prompt_embeddings(self.table, ids[i:i + 1], rows, self.config,
                                         device=self._torch_device)
            embs.append(emb)
            pre.append(len(pos) > 0 and int(pos[0]) > 0)
            wanted.append(i * t + (np.concatenate([pos[:1] - 1, pos]) if pre[-1] else pos))
        past0 = {n: np.zeros(s, self.float_dtype) for n, s in
                 zip(self.past_inputs, empty_past_shapes(self.manifest, b))}
        stacked = torch.stack(embs) if self._torch_device is not None else np.stack(embs)
        dense = [o for o in self._io["llm"]["out"] if o.startswith("scores_") or o == "vision_hidden"]
        out = self._run("llm", {"inputs_embeds": stacked, "image_positions": np.concatenate(wanted),
                                **past0}, keep_on_device=self._on_device(dense))
        hidden = self._t(out["vision_hidden"]).float()
        logits = self._t(out["last_logits"]).float()
        scores = {k[len("scores_"):]: self._t(v).float() for k, v in out.items() if k.startswith("scores_")}
        results, at = [], 0
        for i in range(b):
            k = int(pre[i])
            rows = slice(at + k, at + k + per)
            results.append(OrtPrefillResult(
                vision_hidden=hidden[rows] if per else None,
                pre_vision_hidden=hidden[at] if k else None, last_logits=logits[i], cache=None,
                scores={name: v[rows] for name, v in scores.items()}))
            at += k + per
        return results

    def decode(self, token_id: int, cache: OrtCache) -> tuple[torch.Tensor, OrtCache]:
        if not isinstance(cache, OrtCache):
            raise TypeError(f"OrtBackend.decode takes the cache its prefill returned, got {type(cache).__name__}")
        feeds = {"inputs_embeds": self.table.rows([token_id])[None], "image_positions": NO_POSITIONS,
                 **dict(zip(self.past_inputs, cache.values))}
        out = self._run("llm", feeds, keep_on_device=self.cache_outputs)
        return (self._t(out["last_logits"])[0].float(),
                OrtCache([out[c] for c in self.cache_outputs], cache.length + 1))

    def cache_tensors(self, cache: OrtCache) -> tuple[torch.Tensor, ...]:
        """The cache as host torch tensors (parity checks), in the torch model's layout."""
        return tuple(self._t(v).float().cpu() for v in cache.values)


NO_POSITIONS = np.zeros(0, np.int64)


def engine_source(engine_dir: str | Path, manifest: dict[str, Any]) -> dict:
    """``Backend.engine_source`` of a backend running ``engine_dir``: the manifest's checkpoint."""
    ck = manifest["checkpoint"]
    return {"dir": str(engine_dir), "checkpoint_id": ck["checkpoint_id"],
            "exported_from": str(ck.get("path"))}


def check_patches(n: int, max_patches: int, engine_dir) -> None:
    if n > max_patches:
        raise EngineError(f"image has {n} patches, engine dir {engine_dir} was exported for at most "
                          f"{max_patches}; re-run `densert export ... --max-image-tokens {-(-n // (MERGE * MERGE))}`")


def vision_feeds(pixel_values: torch.Tensor, meta: VisionMeta) -> dict[str, torch.Tensor]:
    """The vision graph's inputs: patches and the host metadata of their grid."""
    return {"pixel_values": pixel_values, "cos": meta.cos, "sin": meta.sin,
            "window_index": meta.window_index, "reverse_index": meta.reverse_index,
            "window_slots": meta.window_slots, "window_inverse": meta.window_inverse,
            "image_segment_ids": meta.image_segment_ids}


def prompt_embeddings(table: TiedTable, input_ids: torch.Tensor, image_embeds: torch.Tensor | None,
                      cfg: YoutuVLConfig, device: torch.device | None = None):
    """[T, d] fp32 inputs of the LLM graph and the [M] positions of the image pads: table rows
    for the text tokens, the k-th image row at the k-th image pad (the torch model's order).
    A numpy array, or with ``device`` a torch tensor assembled there: the image rows stay on that
    device and only the text tokens' rows are copied to it."""
    ids = input_ids.reshape(-1).to(torch.int64).cpu().numpy()
    is_img = ids == cfg.image_token_id
    pos = np.flatnonzero(is_img).astype(np.int64)
    n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
    if len(pos) != n_rows:
        raise ValueError(f"input_ids hold {len(pos)} image-pad tokens (id {cfg.image_token_id}) but "
                         f"{n_rows} image embeddings were given")
    text = np.flatnonzero(~is_img)
    if device is not None:
        emb_t = torch.empty((len(ids), cfg.hidden_size), dtype=torch.float32, device=device)
        emb_t[torch.from_numpy(text).to(device)] = torch.from_numpy(table.rows(ids[text])).to(device)
        if n_rows:
            emb_t[torch.from_numpy(pos).to(device)] = image_embeds.detach().to(device, torch.float32)
        return emb_t, pos
    emb = np.empty((len(ids), cfg.hidden_size), np.float32)
    emb[text] = table.rows(ids[text])
    if n_rows:
        emb[pos] = image_embeds.detach().float().cpu().numpy()
    return emb, pos


def empty_past_shapes(m: dict[str, Any], batch: int = 1) -> list[list[int]]:
    """Shapes of a zero-length past cache of ``batch`` prompts, from the manifest's past_* inputs."""
    return [[batch if d == BATCH_AXIS else 0 if isinstance(d, str) else d for d in i["shape"]]
            for i in m["graphs"]["llm"]["inputs"] if i["name"].startswith("past_")]


def _tasks_available(model_dir, tasks) -> list[str]:
    """Without a tokenizer.json the dense tasks' vocab subsets are unknown: export chat only."""
    return list(tasks) if (Path(model_dir) / "tokenizer.json").is_file() else ["chat"]
