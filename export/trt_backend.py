"""TensorRT backend (``--backend tensorrt``): the engines of ``densert build-engine`` (or of the
printed trtexec lines).

Buffers are torch CUDA tensors (torch is already a dependency; on Jetson use NVIDIA's JetPack
wheel), bound with ``set_tensor_address`` and run with ``execute_async_v3``. Every output shape
is a function of the input shapes (no data-dependent ops in the graphs), so outputs are
allocated after ``set_input_shape`` without an output allocator. The KV cache stays on the GPU.

Rules this file keeps (each a TensorRT 10 requirement):
- TensorRT runs on its own stream; inputs are copied on the caller's stream, so the TensorRT
  stream waits for it before enqueueing, and the caller's stream waits for the outputs.
- A tensor with no elements (``image_embeds`` of a text-only prompt, the empty past of a
  prefill) still gets a valid, non-null address: ``enqueueV3`` rejects null addresses.
- Every ``set_input_shape`` / ``set_tensor_address`` result is checked.
- The LLM engine's two optimization profiles (prefill, decode) each get an execution context;
  an engine with one profile (trtexec) serves both from one context.
- An engine without densert's sidecar JSON (trtexec) is accepted: its I/O tensors, read from the
  engine, must match the manifest.
"""
from __future__ import annotations

import sys
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from densert.backend import Backend
from densert.errors import EngineError
from densert.model.config import YoutuVLConfig
from densert.model.vision_meta import VisionMeta

from .manifest import load_manifest
from .ort_backend import (
    NO_POSITIONS,
    OrtPrefillResult,
    check_patches,
    empty_past_shapes,
    engine_source,
    prompt_embeddings,
    vision_feeds,
)
from .tensorrt import PROFILES, check_engine_metadata, import_tensorrt
from .tied_table import TiedTable

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32,
          "bool": torch.bool}


@dataclass
class TrtCache:
    values: list[torch.Tensor]   # device tensors in the graph's cache-output order
    length: int


class CudaStreams:
    """TensorRT's stream, ordered against the caller's current stream both ways."""

    def __init__(self):
        self.stream = torch.cuda.Stream()

    @property
    def handle(self) -> int:
        return self.stream.cuda_stream

    @contextmanager
    def run(self):
        caller = torch.cuda.current_stream()
        self.stream.wait_stream(caller)            # inputs were prepared on the caller's stream
        with torch.cuda.stream(self.stream):
            yield
        caller.wait_stream(self.stream)            # outputs are read on the caller's stream
        self.stream.synchronize()


class _Graph:
    """One engine, its execution context per profile, its I/O specs."""

    def __init__(self, trt, runtime, path: Path, info: dict[str, Any], sidecar: dict | None):
        self.engine = runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise EngineError(f"{path}: TensorRT could not deserialize it (built by another TensorRT "
                              f"version or for another GPU?); rebuild with `densert build-engine {path.parent}`")
        self.inputs = {i["name"]: i for i in info["inputs"]}
        self.outputs = [o["name"] for o in info["outputs"]]
        if sidecar is None:
            self._check_io(trt, path)
        n = int(self.engine.num_optimization_profiles)
        self.contexts = []
        for p in range(n):
            ctx = self.engine.create_execution_context()
            if ctx is None:
                raise EngineError(f"{path}: TensorRT could not create an execution context (out of device memory?)")
            self.contexts.append(ctx)

    def _check_io(self, trt, path: Path) -> None:
        """An engine without a sidecar (trtexec): its I/O must be the manifest's."""
        e = self.engine
        names = [e.get_tensor_name(i) for i in range(e.num_io_tensors)]
        ins = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.INPUT]
        outs = [n for n in names if e.get_tensor_mode(n) == trt.TensorIOMode.OUTPUT]
        if sorted(ins) != sorted(self.inputs) or sorted(outs) != sorted(self.outputs):
            raise EngineError(f"{path}: the engine's inputs {ins} / outputs {outs} are not the manifest's "
                              f"{list(self.inputs)} / {self.outputs}; it was built from another export")
        for n, spec in self.inputs.items():
            got = _trt_to_torch(e.get_tensor_dtype(n))
            if got != _TORCH[spec["dtype"]]:
                raise EngineError(f"{path}: input {n} is {got} in the engine, {spec['dtype']} in the manifest")
        print(f"densert: {path.name} has no densert sidecar (built with trtexec?): its I/O matches the "
              "manifest; TensorRT version and GPU were checked by TensorRT at load", file=sys.stderr)

    def context(self, profile: int):
        return self.contexts[min(profile, len(self.contexts) - 1)]

    def profile_of(self, profile: int) -> int:
        return min(profile, len(self.contexts) - 1)


class TrtBackend(Backend):
    name = "tensorrt"
    dtype = torch.float32   # the stages hand back float32 whatever the engine's precision

    def __init__(self, engine_dir: str | Path, model_dir: str | Path | None = None, tasks: Sequence[str] = (),
                 check_hashes: bool = True, device: str = "cuda", streams=None):
        """``device`` / ``streams``: the CUDA device and stream pair; tests pass a CPU device and a
        recording stream to run the binding logic against a fake TensorRT module."""
        trt = import_tensorrt()
        self.trt = trt
        self.engine_dir = Path(engine_dir)
        self.manifest = m = load_manifest(engine_dir, model_dir, tasks, check_hashes=check_hashes)
        if m.get("target", "tensorrt") != "tensorrt":
            raise EngineError(f"engine dir {engine_dir}: exported for {m['target']}; TensorRT needs "
                              "`densert export --target tensorrt` then `densert build-engine`")
        self.config = YoutuVLConfig.from_json_file(self.engine_dir / "config.json")
        self.cache_layout, self.precision = m["cache_layout"], m["precision"]
        self.max_patches = int(m["max_patches"])
        self.table = TiedTable(self.engine_dir, m["tied_table"], self.config.vocab_size, self.config.hidden_size)
        self.device = device
        self.streams = streams if streams is not None else CudaStreams()
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.graphs: dict[str, _Graph] = {}
        for g, info in m["graphs"].items():
            side = check_engine_metadata(engine_dir, m, g, trt)
            self.graphs[g] = _Graph(trt, self.runtime, self.engine_dir / f"{g}.engine", info, side)
        # Contexts start on profile 0; the decode context of a two-profile engine moves to 1.
        with self.streams.run():
            for g, graph in self.graphs.items():
                for p, ctx in enumerate(graph.contexts):
                    if p and not ctx.set_optimization_profile_async(p, self.streams.handle):
                        raise EngineError(f"{g}.engine: cannot select optimization profile {p}")
        # A valid address for tensors with no elements (enqueueV3 rejects null ones).
        self._empty = torch.empty(256, dtype=torch.uint8, device=device)
        llm = self.graphs["llm"]
        self.cache_outputs = [o for o in llm.outputs if o.startswith("present_")]
        self.past_inputs = [i for i in llm.inputs if i.startswith("past_")]
        self.float_dtype = _TORCH[m["io_float_dtype"]]

    def head_weight(self) -> TiedTable:
        """The engine's tied table: rows read from the engine directory on demand."""
        return self.table

    def engine_source(self) -> dict:
        return engine_source(self.engine_dir, self.manifest)

    @classmethod
    def from_model(cls, model_dir, engine_dir=None, precision="fp32", **kwargs) -> "TrtBackend":
        if engine_dir is None:
            from .ort_backend import default_engine_dir
            engine_dir = default_engine_dir(model_dir, precision, kwargs.pop("cache_layout", "latent"))
        kwargs.pop("dtype", None)
        return cls(engine_dir, model_dir=model_dir, **kwargs)

    # ---- binding
    def _bind(self, ctx, graph: str, name: str, t: torch.Tensor) -> None:
        addr = t.data_ptr() if t.numel() else self._empty.data_ptr()
        if not ctx.set_tensor_address(name, addr):
            raise EngineError(f"TensorRT rejected the address of {graph} tensor {name!r} "
                              f"(shape {tuple(t.shape)}, {t.dtype})")

    def _run(self, graph: str, feeds: dict[str, Any], profile: int = 0) -> dict[str, torch.Tensor]:
        g = self.graphs[graph]
        ctx = g.context(profile)
        outs: dict[str, torch.Tensor] = {}
        with self.streams.run():
            keep = []
            for name, v in feeds.items():
                if not isinstance(v, torch.Tensor):
                    v = torch.from_numpy(np.ascontiguousarray(v))
                t = v.to(self.device, _TORCH[g.inputs[name]["dtype"]]).contiguous()
                keep.append(t)
                self._check_shape(g, graph, name, tuple(t.shape), profile)
                if not ctx.set_input_shape(name, tuple(t.shape)):
                    raise EngineError(f"{graph} input {name!r} shape {tuple(t.shape)} is outside the engine's "
                                      "optimization profile; rebuild with larger --max-patches / --max-seq")
                self._bind(ctx, graph, name, t)
            for name in g.outputs:
                shape = tuple(ctx.get_tensor_shape(name))
                if any(s < 0 for s in shape):
                    raise EngineError(f"{graph} output {name!r} has unresolved shape {shape}")
                t = torch.empty(shape, dtype=_trt_to_torch(g.engine.get_tensor_dtype(name)), device=self.device)
                self._bind(ctx, graph, name, t)
                outs[name] = t
            if not ctx.execute_async_v3(self.streams.handle):
                raise EngineError(f"TensorRT execution of {graph} failed (see the TensorRT log)")
        return outs

    def _check_shape(self, g: _Graph, graph: str, name: str, shape: tuple[int, ...], profile: int) -> None:
        lo, _, hi = g.engine.get_tensor_profile_shape(name, g.profile_of(profile))
        for i, (a, b, s) in enumerate(zip(lo, hi, shape)):
            if not a <= s <= b:
                raise EngineError(f"{graph} input {name!r} axis {i} is {s}, the engine's "
                                  f"{PROFILES[graph][g.profile_of(profile)]} profile takes {a}..{b}; "
                                  f"rebuild with `densert build-engine {self.engine_dir}` and larger "
                                  "--max-patches / --max-seq (within the export's budget)")

    # ---- Backend protocol
    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        check_patches(int(pixel_values.shape[0]), self.max_patches, self.engine_dir)
        out = self._run("vision", vision_feeds(pixel_values, meta))
        return out["image_embeds"].float().cpu()

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> OrtPrefillResult:
        emb, pos = prompt_embeddings(self.table, input_ids, image_embeds, self.config)
        past = {n: torch.zeros(s, dtype=self.float_dtype) for n, s in
                zip(self.past_inputs, empty_past_shapes(self.manifest))}
        out = self._run("llm", {"inputs_embeds": emb[None], "image_positions": pos, **past}, profile=0)
        n = len(pos)
        # The dense head reads vision_hidden / scores where the engine wrote them: they stay
        # GPU tensors (runtime.dense runs the subset GEMM and the tail on the GPU), so no scores
        # cross to the host. The last logits do: greedy decoding picks tokens on the host.
        return OrtPrefillResult(
            vision_hidden=out["vision_hidden"].float() if n else None,
            pre_vision_hidden=out["pre_vision_hidden"][0].float() if n and int(pos[0]) > 0 else None,
            last_logits=out["last_logits"][0].float().cpu(),
            cache=TrtCache([out[c] for c in self.cache_outputs], int(emb.shape[0])),
            scores={k[len("scores_"):]: v.float() for k, v in out.items() if k.startswith("scores_")})

    def decode(self, token_id: int, cache: TrtCache) -> tuple[torch.Tensor, TrtCache]:
        feeds = {"inputs_embeds": self.table.rows([token_id])[None], "image_positions": NO_POSITIONS,
                 **dict(zip(self.past_inputs, cache.values))}
        out = self._run("llm", feeds, profile=1)
        return out["last_logits"][0].float().cpu(), TrtCache([out[c] for c in self.cache_outputs], cache.length + 1)

    def cache_tensors(self, cache: TrtCache) -> tuple[torch.Tensor, ...]:
        return tuple(v.float().cpu() for v in cache.values)


def _trt_to_torch(dt) -> torch.dtype:
    import tensorrt as trt
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if dt not in table:
        raise EngineError(f"TensorRT tensor dtype {dt} has no torch equivalent in densert")
    return table[dt]
