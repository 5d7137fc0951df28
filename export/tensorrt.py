"""``densert build-engine``: TensorRT 10 engines from an engine directory's ONNX graphs.

One ``.engine`` per graph, written beside its ONNX file, plus ``<graph>.engine.json`` (TensorRT
version, GPU, compute capability, profiles, the checkpoint id of the manifest): a serialized
engine only runs on the TensorRT version and GPU it was built with, and the runtime refuses one
whose sidecar does not match (engines are not portable across JetPack releases).

Networks are **strongly typed**: every tensor keeps the dtype the ONNX graph gives it, so an fp16
export keeps its fp32 norms / softmax / RoPE islands (TensorRT's weakly typed FP16 mode may pick
fp16 for them and overflow: NVIDIA/TensorRT-LLM#3223). For an fp32 export, ``--fp16`` instead builds
weakly typed with the FP16 builder flag (TensorRT chooses per layer) — use an fp16 export for
production.

``import tensorrt`` happens inside the functions: densert runs without TensorRT, and says what is
missing when a TensorRT path is asked for.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from densert.errors import EngineError

from .options import BuildRequest

TRT_MISSING = (
    "TensorRT's Python bindings (`import tensorrt`) are not installed. On Jetson they ship with "
    "JetPack 6/7 (`sudo apt install python3-libnvinfer` or the nvidia-jetpack meta package; in a venv "
    "create it with --system-site-packages). On x86 with an NVIDIA GPU: `pip install tensorrt` "
    "(NVIDIA's wheels, pulled from pypi.nvidia.com). The ONNX Runtime backend (--backend onnxruntime) "
    "needs none of this.")


def import_tensorrt():
    try:
        import tensorrt as trt  # noqa: F401
    except ImportError as e:
        raise EngineError(f"{TRT_MISSING} ({e})") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} found; densert needs TensorRT 10 "
                          "(execute_async_v3 / set_input_shape / strongly typed networks): JetPack 6.1+ or 7")
    return trt


@dataclass
class BuildOptions:
    fp16: bool
    min_patches: int
    opt_patches: int
    max_patches: int
    min_seq: int
    opt_seq: int
    max_seq: int
    workspace_gb: float
    timing_cache: str | None
    strongly_typed: bool

    @classmethod
    def from_manifest(cls, m: dict[str, Any], request: BuildRequest | None = None, **overrides
                      ) -> "BuildOptions":
        """``request`` (or ``overrides``: its fields) resolved against the manifest."""
        r = dataclasses.replace(request or BuildRequest(), **overrides)
        fp16, min_patches, opt_patches = r.fp16, r.min_patches, r.opt_patches
        max_patches, max_seq, opt_seq = r.max_patches, r.max_seq, r.opt_seq
        workspace_gb, timing_cache = r.workspace_gb, r.timing_cache
        unit = m["config"]["vision"]["merge_unit"]
        max_patches = int(max_patches or m["max_patches"])
        if max_patches > m["max_patches"]:
            raise EngineError(f"--max-patches {max_patches} exceeds the export's max_patches {m['max_patches']}")
        for name, v in (("min", min_patches), ("max", max_patches)):
            if v % unit:
                raise EngineError(f"--{name}-patches {v} must be a multiple of {unit} (one merged token)")
        opt_patches = min(max(opt_patches - opt_patches % unit, min_patches), max_patches)
        if not min_patches <= opt_patches <= max_patches:
            raise EngineError(f"need min <= opt <= max patches, got {min_patches}, {opt_patches}, {max_patches}")
        max_seq = int(max_seq or (max_patches // unit + 512))
        opt_seq = int(opt_seq or min(max_seq, opt_patches // unit + 64))
        return cls(fp16=fp16, min_patches=min_patches, opt_patches=opt_patches, max_patches=max_patches,
                   min_seq=1, opt_seq=opt_seq, max_seq=max_seq, workspace_gb=workspace_gb,
                   timing_cache=timing_cache, strongly_typed=(m["precision"] == "fp16" or not fp16))


def profile_shapes(m: dict[str, Any], graph: str, o: BuildOptions) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """(min, opt, max) per input, with the manifest's symbolic axes bound to the options."""
    unit = m["config"]["vision"]["merge_unit"]
    dims = {
        "patches": (o.min_patches, o.opt_patches, o.max_patches),
        "cells": (o.min_patches // unit, o.opt_patches // unit, o.max_patches // unit),
        "seq": (o.min_seq, o.opt_seq, o.max_seq),
        # decode: the past holds at least the prefill's one token, at most max_seq - 1
        "past_seq": (1, max(o.opt_seq - 1, 1), o.max_seq - 1),
    }
    if graph == "llm_prefill":
        # A text-only prompt feeds zero image rows (an empty tensor is valid in TensorRT 10).
        dims["cells"] = (0, dims["cells"][1], dims["cells"][2])
    out = {}
    for spec in m["graphs"][graph]["inputs"]:
        mins, opts, maxs = [], [], []
        for s in spec["shape"]:
            lo, mid, hi = (s, s, s) if isinstance(s, int) else dims[s]
            mins.append(lo), opts.append(mid), maxs.append(hi)
        out[spec["name"]] = (mins, opts, maxs)
    return out


def trtexec_commands(engine_dir: str | Path, m: dict[str, Any], o: BuildOptions) -> list[str]:
    d = Path(engine_dir)
    lines = []
    for g, info in m["graphs"].items():
        shp = profile_shapes(m, g, o)
        fmt = lambda i: ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shp.items())  # noqa: E731
        flags = "--stronglyTyped" if o.strongly_typed else "--fp16"
        cache = o.timing_cache or str(d / "timing.cache")
        lines.append(f"trtexec --onnx={d / info['file']} --saveEngine={d / (g + '.engine')} {flags} "
                     f"--minShapes={fmt(0)} --optShapes={fmt(1)} --maxShapes={fmt(2)} "
                     f"--memPoolSize=workspace:{int(o.workspace_gb * 1024)}M --timingCacheFile={cache}")
    return lines


def build_engines(engine_dir: str | Path, m: dict[str, Any], o: BuildOptions, graphs=None, log=print) -> dict[str, Path]:
    trt = import_tensorrt()
    d = Path(engine_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    cache_path = Path(o.timing_cache) if o.timing_cache else d / "timing.cache"
    out = {}
    for g in graphs or list(m["graphs"]):
        info = m["graphs"][g]
        flags = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED) if o.strongly_typed else 0
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        onnx_path = d / info["file"]
        # parse_from_file (not parse(bytes)) so external data next to the file is found.
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(o.workspace_gb * (1 << 30)))
        if o.fp16 and not o.strongly_typed:
            config.set_flag(trt.BuilderFlag.FP16)
        timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        profile = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile_shapes(m, g, o).items():
            profile.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(profile)
        t0 = time.time()
        log(f"build-engine: {g} ({onnx_path.name}), strongly typed={o.strongly_typed} ...")
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
        path = d / f"{g}.engine"
        path.write_bytes(bytes(blob))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        meta = engine_metadata(trt, m, g, o)
        meta["build_seconds"] = round(time.time() - t0, 1)
        (d / f"{g}.engine.json").write_text(json.dumps(meta, indent=2) + "\n")
        log(f"build-engine: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {meta['build_seconds']} s)")
        out[g] = path
    return out


def device_identity() -> dict[str, Any]:
    import torch
    if not torch.cuda.is_available():
        raise EngineError("TensorRT engines need a CUDA GPU, and torch sees none "
                          "(on Jetson install NVIDIA's JetPack torch wheel)")
    p = torch.cuda.get_device_properties(0)
    return {"gpu": p.name, "compute_capability": f"{p.major}.{p.minor}"}


def engine_metadata(trt, m: dict[str, Any], graph: str, o: BuildOptions) -> dict[str, Any]:
    return {"tensorrt": trt.__version__, **device_identity(), "graph": graph,
            "checkpoint_id": m["checkpoint"]["checkpoint_id"], "onnx_sha256": m["graphs"][graph]["sha256"],
            "options": asdict(o), "profile": profile_shapes(m, graph, o)}


def check_engine_metadata(engine_dir: str | Path, m: dict[str, Any], graph: str, trt) -> dict[str, Any]:
    d = Path(engine_dir)
    side, eng = d / f"{graph}.engine.json", d / f"{graph}.engine"
    if not eng.is_file() or not side.is_file():
        raise EngineError(f"engine dir {d} has no TensorRT engine for {graph} ({eng.name}); "
                          f"run `densert build-engine {d}` on this device")
    meta = json.loads(side.read_text())
    dev = device_identity()
    problems = []
    if meta.get("tensorrt") != trt.__version__:
        problems.append(f"built with TensorRT {meta.get('tensorrt')}, this is {trt.__version__}")
    if meta.get("compute_capability") != dev["compute_capability"]:
        problems.append(f"built for compute capability {meta.get('compute_capability')} ({meta.get('gpu')}), "
                        f"this GPU is {dev['compute_capability']} ({dev['gpu']})")
    if meta.get("onnx_sha256") != m["graphs"][graph]["sha256"] or meta.get("checkpoint_id") != m["checkpoint"]["checkpoint_id"]:
        problems.append("built from a different export of the ONNX graphs")
    if problems:
        raise EngineError(f"{eng}: " + "; ".join(problems) + f"; rebuild with `densert build-engine {d}`")
    return meta
