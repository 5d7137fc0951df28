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

Execution providers: ``providers=None`` picks TensorRT > CUDA > CPU among
``onnxruntime.get_available_providers()`` (onnxruntime-gpu exposes the first two when a GPU and
its libraries are present); pass an explicit list to override.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from densert.backend import PrefillResult
from densert.errors import EngineError
from densert.image import MERGE
from densert.model.config import YoutuVLConfig
from densert.model.vision_meta import VisionMeta

from .manifest import cache_root, checkpoint_identity, load_manifest
from .quantize import NBITS_ACCURACY_LEVEL
from .tied_table import TiedTable

_NP = {"float32": np.float32, "float16": np.float16, "int64": np.int64, "int32": np.int32}
# Ops of a quantized graph: its weights are prepacked (what these kernels run on).
QUANTIZED_OPS = {"DequantizeLinear", "com.microsoft::MatMulNBits", "com.microsoft::DynamicQuantizeMatMul"}
_PREFERRED = ("TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider")


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
                 intra_op_threads: int | None = None):
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
    return ort.InferenceSession(str(path), so, providers=list(providers))


def pick_providers(requested: Sequence[str] | None = None) -> list[str]:
    import onnxruntime as ort
    avail = ort.get_available_providers()
    if requested:
        missing = [p for p in requested if p not in avail]
        if missing:
            raise EngineError(f"ONNX Runtime providers {missing} are not available (this onnxruntime "
                              f"has {avail}); for CUDA / TensorRT install onnxruntime-gpu")
        return list(requested)
    return [p for p in _PREFERRED if p in avail]


class OrtBackend:
    name = "onnxruntime"

    def __init__(self, engine_dir: str | Path, model_dir: str | Path | None = None,
                 providers: Sequence[str] | None = None, intra_op_threads: int | None = None,
                 tasks: Sequence[str] = (), check_hashes: bool = True):
        """``model_dir``: the checkpoint the engine should come from (its hashes are checked
        against the manifest); None: the engine directory stands alone."""
        self.engine_dir = Path(engine_dir)
        self.manifest = m = load_manifest(engine_dir, model_dir, tasks, check_hashes=check_hashes)
        self.config = YoutuVLConfig.from_json_file(self.engine_dir / "config.json")
        self.cache_layout, self.precision = m["cache_layout"], m["precision"]
        self.max_patches = int(m["max_patches"])
        self.table = TiedTable(self.engine_dir, m["tied_table"], self.config.vocab_size,
                               self.config.hidden_size)
        self.providers = pick_providers(providers)
        self.sessions: dict[str, Any] = {}
        for g, info in m["graphs"].items():
            path = self.engine_dir / info["file"]
            try:
                sess = make_session(path, self.providers, quantized=bool(QUANTIZED_OPS & set(info["op_types"])),
                                    intra_op_threads=intra_op_threads)
            except Exception as e:  # ORT raises its own Fail/InvalidGraph types
                raise EngineError(f"engine dir {self.engine_dir}: ONNX Runtime cannot load {info['file']} "
                                  f"({type(e).__name__}: {str(e)[:300]}); re-run `densert export`") from None
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
        self._device = "cuda" if "CUDAExecutionProvider" in self.providers or "TensorrtExecutionProvider" in self.providers else "cpu"

    @property
    def head_table(self) -> TiedTable:
        """The lm_head rows the dense head reads (runtime.backends.lm_head_weight)."""
        return self.table

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
    def _feed(self, graph: str, name: str, value) -> np.ndarray:
        spec = self._io[graph]["in"][name]
        if isinstance(value, torch.Tensor):
            value = value.detach().cpu().numpy()
        arr = np.ascontiguousarray(value, dtype=_NP[spec["dtype"]])
        shape = spec["shape"]
        if arr.ndim != len(shape) or any(isinstance(s, int) and s != a for s, a in zip(shape, arr.shape)):
            raise EngineError(f"{graph} input {name!r}: shape {list(arr.shape)}, the engine expects {shape} "
                              f"(engine dir {self.engine_dir})")
        return arr

    def _run(self, graph: str, feeds: dict[str, Any], keep_on_device: Sequence[str] = ()):
        import onnxruntime as ort
        sess = self.sessions[graph]
        io = sess.io_binding()
        for k, v in feeds.items():
            if isinstance(v, ort.OrtValue):
                io.bind_ortvalue_input(k, v)
            else:
                io.bind_cpu_input(k, self._feed(graph, k, v))
        for o in self._io[graph]["out"]:
            io.bind_output(o, self._device if o in keep_on_device else "cpu")
        sess.run_with_iobinding(io)
        return dict(zip(self._io[graph]["out"], io.get_outputs()))

    @staticmethod
    def _t(v) -> torch.Tensor:
        return torch.from_numpy(v.numpy())

    # ---- Backend protocol
    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        check_patches(int(pixel_values.shape[0]), self.max_patches, self.engine_dir)
        out = self._run("vision", vision_feeds(pixel_values, meta))
        return self._t(out["image_embeds"]).float()

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> OrtPrefillResult:
        emb, pos = prompt_embeddings(self.table, input_ids, image_embeds, self.config)
        past = {n: np.zeros(s, self.float_dtype) for n, s in
                zip(self.past_inputs, empty_past_shapes(self.manifest))}
        out = self._run("llm", {"inputs_embeds": emb[None], "image_positions": pos, **past},
                        keep_on_device=self.cache_outputs)
        vision = self._t(out["vision_hidden"]).float() if len(pos) else None
        pre = self._t(out["pre_vision_hidden"])[0].float() if len(pos) and int(pos[0]) > 0 else None
        scores = {k[len("scores_"):]: self._t(v).float() for k, v in out.items() if k.startswith("scores_")}
        cache = OrtCache([out[c] for c in self.cache_outputs], int(emb.shape[0]))
        return OrtPrefillResult(vision_hidden=vision, pre_vision_hidden=pre,
                                last_logits=self._t(out["last_logits"])[0].float(), cache=cache,
                                scores=scores)

    def decode(self, token_id: int, cache: OrtCache) -> tuple[torch.Tensor, OrtCache]:
        if not isinstance(cache, OrtCache):
            raise TypeError(f"OrtBackend.decode takes the cache its prefill returned, got {type(cache).__name__}")
        feeds = {"inputs_embeds": self.table.rows([token_id])[None], "image_positions": NO_POSITIONS,
                 **dict(zip(self.past_inputs, cache.values))}
        out = self._run("llm", feeds, keep_on_device=self.cache_outputs)
        return (self._t(out["last_logits"])[0].float(),
                OrtCache([out[c] for c in self.cache_outputs], cache.length + 1))

    def cache_tensors(self, cache: OrtCache) -> tuple[torch.Tensor, ...]:
        """The cache as torch tensors (parity checks), in the torch model's layout."""
        return tuple(self._t(v).float() for v in cache.values)


NO_POSITIONS = np.zeros(0, np.int64)


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
                      cfg: YoutuVLConfig) -> tuple[np.ndarray, np.ndarray]:
    """[T, d] fp32 inputs of the LLM graph and the [M] positions of the image pads: table rows
    for the text tokens, the k-th image row at the k-th image pad (the torch model's order)."""
    ids = input_ids.reshape(-1).to(torch.int64).numpy()
    is_img = ids == cfg.image_token_id
    pos = np.flatnonzero(is_img).astype(np.int64)
    n_rows = 0 if image_embeds is None else int(image_embeds.shape[0])
    if len(pos) != n_rows:
        raise ValueError(f"input_ids hold {len(pos)} image-pad tokens (id {cfg.image_token_id}) but "
                         f"{n_rows} image embeddings were given")
    emb = np.empty((len(ids), cfg.hidden_size), np.float32)
    text = np.flatnonzero(~is_img)
    emb[text] = table.rows(ids[text])
    if n_rows:
        emb[pos] = image_embeds.detach().float().cpu().numpy()
    return emb, pos


def empty_past_shapes(m: dict[str, Any]) -> list[list[int]]:
    """Shapes of a zero-length past cache, from the manifest's past_* inputs."""
    return [[0 if isinstance(d, str) else d for d in i["shape"]]
            for i in m["graphs"]["llm"]["inputs"] if i["name"].startswith("past_")]


def _tasks_available(model_dir, tasks) -> list[str]:
    """Without a tokenizer.json the dense tasks' vocab subsets are unknown: export chat only."""
    return list(tasks) if (Path(model_dir) / "tokenizer.json").is_file() else ["chat"]
