"""TensorRT backend (``--backend tensorrt``): the engines of ``densert build-engine``.

Buffers are torch CUDA tensors (torch is already a dependency; on Jetson use NVIDIA's JetPack
wheel), bound with ``set_tensor_address`` and run with ``execute_async_v3`` on one stream. Every
output shape is a function of the input shapes (the export avoids data-dependent ops such as
NonZero), so outputs are allocated after ``set_input_shape`` without an output allocator. The KV
cache stays on the GPU between decode steps.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from densert.errors import EngineError
from densert.model.config import YoutuVLConfig
from densert.model.vision_meta import VisionMeta

from .manifest import load_manifest
from .ort_backend import OrtPrefillResult
from .tensorrt import check_engine_metadata, import_tensorrt

_TORCH = {"float32": torch.float32, "float16": torch.float16, "int64": torch.int64, "int32": torch.int32}


@dataclass
class TrtCache:
    values: list[torch.Tensor]   # CUDA tensors in the graph's cache-output order
    length: int


class TrtBackend:
    name = "tensorrt"

    def __init__(self, engine_dir: str | Path, model_dir: str | Path | None = None, tasks: Sequence[str] = (),
                 check_hashes: bool = True):
        trt = import_tensorrt()
        self.engine_dir = Path(engine_dir)
        self.manifest = m = load_manifest(engine_dir, model_dir, tasks, check_hashes=check_hashes)
        self.config = YoutuVLConfig.from_json_file(Path(model_dir or engine_dir) / "config.json")
        self.cache_layout, self.precision = m["cache_layout"], m["precision"]
        self.logger = trt.Logger(trt.Logger.WARNING)
        self.runtime = trt.Runtime(self.logger)
        self.stream = torch.cuda.Stream()
        self.engines, self.contexts = {}, {}
        for g in m["graphs"]:
            self.meta = check_engine_metadata(engine_dir, m, g, trt)
            engine = self.runtime.deserialize_cuda_engine((self.engine_dir / f"{g}.engine").read_bytes())
            if engine is None:
                raise EngineError(f"{self.engine_dir / (g + '.engine')}: TensorRT could not deserialize it; "
                                  f"rebuild with `densert build-engine {self.engine_dir}`")
            self.engines[g] = engine
            self.contexts[g] = engine.create_execution_context()
        self._io = {g: {"in": {i["name"]: i for i in info["inputs"]}, "out": [o["name"] for o in info["outputs"]]}
                    for g, info in m["graphs"].items()}
        self.cache_outputs = [o for o in self._io["llm_prefill"]["out"] if o.startswith("present_")]

    @classmethod
    def from_model(cls, model_dir, engine_dir=None, precision="fp32", **kwargs) -> "TrtBackend":
        if engine_dir is None:
            from .ort_backend import default_engine_dir
            engine_dir = default_engine_dir(model_dir, precision, kwargs.pop("cache_layout", "latent"))
        kwargs.pop("dtype", None)
        return cls(engine_dir, model_dir=model_dir, **kwargs)

    def _run(self, graph: str, feeds: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        ctx, spec = self.contexts[graph], self._io[graph]
        keep = []
        for name, v in feeds.items():
            t = v.to("cuda", _TORCH[spec["in"][name]["dtype"]]).contiguous()
            keep.append(t)
            if not ctx.set_input_shape(name, tuple(t.shape)):
                raise EngineError(f"{graph} input {name!r} shape {tuple(t.shape)} is outside the engine's "
                                  f"optimization profile; rebuild with larger --max-patches / --max-seq")
            ctx.set_tensor_address(name, t.data_ptr())
        outs = {}
        for name in spec["out"]:
            shape = tuple(ctx.get_tensor_shape(name))
            dt = self.engines[graph].get_tensor_dtype(name)
            t = torch.empty(shape, dtype=_trt_to_torch(dt), device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            outs[name] = t
        with torch.cuda.stream(self.stream):
            if not ctx.execute_async_v3(self.stream.cuda_stream):
                raise EngineError(f"TensorRT execution of {graph} failed (see the TensorRT log)")
        self.stream.synchronize()
        return outs

    def encode_image(self, pixel_values: torch.Tensor, meta: VisionMeta) -> torch.Tensor:
        out = self._run("vision", {"pixel_values": pixel_values, "cos": meta.cos, "sin": meta.sin,
                                   "window_index": meta.window_index, "reverse_index": meta.reverse_index,
                                   "window_segment_ids": meta.window_segment_ids,
                                   "image_segment_ids": meta.image_segment_ids})
        return out["image_embeds"].float().cpu()

    def prefill(self, input_ids: torch.Tensor, image_embeds: torch.Tensor | None) -> OrtPrefillResult:
        c = self.manifest["config"]
        ids = input_ids.reshape(1, -1).to(torch.int64)
        n_slots = int((ids == c["image_token_id"]).sum())
        if image_embeds is None:
            image_embeds = torch.zeros(0, c["hidden_size"])
        if n_slots != image_embeds.shape[0]:
            raise ValueError(f"input_ids hold {n_slots} image-pad tokens but {image_embeds.shape[0]} image embeddings were given")
        out = self._run("llm_prefill", {"input_ids": ids, "image_embeds": image_embeds})
        pos = (ids[0] == c["image_token_id"]).nonzero().flatten()
        # The dense head reads vision_hidden / scores where the engine wrote them: they stay
        # GPU tensors (runtime.dense runs the subset GEMM and the tail on the GPU), so no scores
        # cross to the host. The last logits do: greedy decoding picks tokens on the host.
        return OrtPrefillResult(
            vision_hidden=out["vision_hidden"].float() if n_slots else None,
            pre_vision_hidden=out["pre_vision_hidden"][0].float() if n_slots and int(pos[0]) > 0 else None,
            last_logits=out["last_logits"][0].float().cpu(),
            cache=TrtCache([out[n] for n in self.cache_outputs], int(ids.shape[1])),
            scores={k[len("scores_"):]: v.float() for k, v in out.items() if k.startswith("scores_")})

    def decode(self, token_id: int, cache: TrtCache) -> tuple[torch.Tensor, TrtCache]:
        if "llm_decode" not in self.contexts:
            raise EngineError(f"engine dir {self.engine_dir} has no llm_decode engine (exported without chat)")
        past = [n for n in self._io["llm_decode"]["in"] if n.startswith("past_")]
        out = self._run("llm_decode", {"input_ids": torch.tensor([[token_id]]), **dict(zip(past, cache.values))})
        return out["logits"][0].float().cpu(), TrtCache([out[n] for n in self.cache_outputs], cache.length + 1)

    def cache_tensors(self, cache: TrtCache) -> tuple[torch.Tensor, ...]:
        return tuple(v.float().cpu() for v in cache.values)


def _trt_to_torch(dt) -> torch.dtype:
    import tensorrt as trt
    table = {trt.float32: torch.float32, trt.float16: torch.float16, trt.int32: torch.int32,
             trt.int64: torch.int64, trt.bool: torch.bool, trt.int8: torch.int8}
    if dt not in table:
        raise EngineError(f"TensorRT tensor dtype {dt} has no torch equivalent in densert")
    return table[dt]
