"""``densert build-engine``: TensorRT 10 engines from an engine directory's ONNX graphs.

One ``.engine`` per graph, written beside its ONNX file, plus ``<graph>.engine.json`` (TensorRT
version, GPU, compute capability, profiles, memory per context, the checkpoint id of the
manifest): a serialized engine only runs on the TensorRT version and GPU it was built with, and
the runtime refuses one whose sidecar does not match. An engine built with the printed
``trtexec`` lines has no sidecar; the runtime then reads its I/O from the engine itself.

Networks are always **strongly typed**: every tensor keeps the dtype the ONNX graph gives it, so
an fp16 export keeps its fp32 norms / softmax / RoPE islands and an fp32 export stays fp32
(``BuilderFlag.FP16`` is deprecated since TensorRT 10.12; precision comes from the export:
``densert export --precision fp16``). TF32 is off unless asked for: the fp32 parity gate is
measured with fp32 math.

Profiles are sized for the frame the export was made for (``--max-image-tokens`` /
``--image-size``), since TensorRT reserves activation memory for a profile's maximum. The LLM
engine has two: prefill (any prompt, no past) and decode (one token, any past), one execution
context each; the build reports the device memory each context needs.

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

from .manifest import BATCH_AXIS
from .options import BuildRequest

TRT_MISSING = (
    "TensorRT's Python bindings (`import tensorrt`) are not installed. On Jetson they ship with "
    "JetPack 6/7 (`sudo apt install python3-libnvinfer` or the nvidia-jetpack meta package; in a venv "
    "create it with --system-site-packages). On x86 with an NVIDIA GPU: `pip install tensorrt` "
    "(NVIDIA's wheels, pulled from pypi.nvidia.com). The ONNX Runtime backend (--backend onnxruntime) "
    "needs none of this.")
# Profiles of each graph, in engine order: the LLM graph serves prefill and decode.
PROFILES = {"vision": ("image",), "llm": ("prefill", "decode")}


def import_tensorrt():
    try:
        import tensorrt as trt
    except ImportError as e:
        raise EngineError(f"{TRT_MISSING} ({e})") from None
    major = int(trt.__version__.split(".")[0])
    if major < 10:
        raise EngineError(f"TensorRT {trt.__version__} found; densert needs TensorRT 10 "
                          "(execute_async_v3 / set_input_shape / strongly typed networks): JetPack 6.1+ or 7")
    return trt


@dataclass
class BuildOptions:
    min_patches: int
    opt_patches: int
    max_patches: int
    min_seq: int
    opt_seq: int
    max_seq: int
    workspace_gb: float
    timing_cache: str | None
    tf32: bool

    @classmethod
    def from_manifest(cls, m: dict[str, Any], request: BuildRequest | None = None, **overrides
                      ) -> "BuildOptions":
        """``request`` (or ``overrides``: its fields) resolved against the manifest."""
        r = dataclasses.replace(request or BuildRequest(), **overrides)
        min_patches, opt_patches = r.min_patches, r.opt_patches
        max_patches, max_seq, opt_seq = r.max_patches, r.max_seq, r.opt_seq
        unit = m["config"]["vision"]["merge_unit"]
        max_patches = int(max_patches or m["max_patches"])
        if max_patches > m["max_patches"]:
            raise EngineError(f"--max-patches {max_patches} exceeds the export's {m['max_patches']} "
                              f"(re-export with a larger --max-image-tokens)")
        for name, v in (("min", min_patches), ("max", max_patches)):
            if v % unit:
                raise EngineError(f"--{name}-patches {v} must be a multiple of {unit} (one merged token)")
        opt_patches = min(max(opt_patches - opt_patches % unit, min_patches), max_patches)
        if not min_patches <= opt_patches <= max_patches:
            raise EngineError(f"need min <= opt <= max patches, got {min_patches}, {opt_patches}, {max_patches}")
        max_seq = int(max_seq or (max_patches // unit + 512))
        opt_seq = int(opt_seq or min(max_seq, opt_patches // unit + 64))
        return cls(min_patches=min_patches, opt_patches=opt_patches, max_patches=max_patches,
                   min_seq=1, opt_seq=opt_seq, max_seq=max_seq, workspace_gb=r.workspace_gb,
                   timing_cache=r.timing_cache, tf32=r.tf32)


def _window_slots(m: dict[str, Any], patches: int, worst: bool) -> int:
    """Window slots of an image of ``patches`` patches: its worst aspect ratio, or a square one."""
    from densert.model.vision_meta import most_windows
    v = m["config"]["vision"]
    cells = patches // v["merge_unit"]
    if m.get("grids") and patches >= m["max_patches"]:
        return m["max_window_slots"]      # exported for named image sizes: exactly theirs
    if worst:
        return most_windows(cells, v["window_cells"]) * v["window_slots"]
    side = -(-int(cells ** 0.5) // v["window_cells"])
    return max(1, side * side) * v["window_slots"]


def profile_shapes(m: dict[str, Any], graph: str,
                   o: BuildOptions) -> list[dict[str, tuple[list[int], list[int], list[int]]]]:
    """Per optimization profile of ``graph`` (``PROFILES``): (min, opt, max) per input, with the
    manifest's symbolic axes bound to the options."""
    unit = m["config"]["vision"]["merge_unit"]
    cells = (o.min_patches // unit, o.opt_patches // unit, o.max_patches // unit)
    dims_of = {
        "image": {"patches": (o.min_patches, o.opt_patches, o.max_patches), "cells": cells,
                  "slots": (m["config"]["vision"]["window_slots"], _window_slots(m, o.opt_patches, False),
                            _window_slots(m, o.max_patches, True))},
        # prefill: a prompt with up to max cells of image rows (0: text only), no past
        "prefill": {"seq": (o.min_seq, o.opt_seq, o.max_seq), "cells": (0, cells[1], cells[2]),
                    "past_seq": (0, 0, 0), BATCH_AXIS: (1, 1, 1)},
        # decode: one token, no image rows, a past of the prompt and the tokens so far
        "decode": {"seq": (1, 1, 1), "cells": (0, 0, 0),
                   "past_seq": (1, max(o.opt_seq - 1, 1), o.max_seq - 1), BATCH_AXIS: (1, 1, 1)},
    }
    out = []
    for prof in PROFILES[graph]:
        dims = dims_of[prof]
        shapes = {}
        for spec in m["graphs"][graph]["inputs"]:
            mins, opts, maxs = [], [], []
            for s in spec["shape"]:
                lo, mid, hi = (s, s, s) if isinstance(s, int) else dims[s]
                mins.append(lo), opts.append(mid), maxs.append(hi)
            shapes[spec["name"]] = (mins, opts, maxs)
        out.append(shapes)
    return out


def merged_profile(profiles: list[dict]) -> dict[str, tuple[list[int], list[int], list[int]]]:
    """One profile covering all of ``profiles`` (opt from the first): what a trtexec line
    builds, since trtexec takes one shape range per input."""
    out = {}
    for name in profiles[0]:
        lo = [min(p[name][0][i] for p in profiles) for i in range(len(profiles[0][name][0]))]
        hi = [max(p[name][2][i] for p in profiles) for i in range(len(profiles[0][name][2]))]
        out[name] = (lo, profiles[0][name][1], hi)
    return out


def trtexec_commands(engine_dir: str | Path, m: dict[str, Any], o: BuildOptions) -> list[str]:
    """Equivalent trtexec lines (one profile per engine: the LLM's spans prefill and decode;
    the runtime runs both on it)."""
    d = Path(engine_dir)
    lines = []
    for g, info in m["graphs"].items():
        shp = merged_profile(profile_shapes(m, g, o))

        def fmt(i):
            return ",".join(f"{n}:{'x'.join(map(str, s[i]))}" for n, s in shp.items())

        cache = o.timing_cache or str(d / "timing.cache")
        tf32 = "" if o.tf32 else " --noTF32"
        lines.append(f"trtexec --onnx={d / info['file']} --saveEngine={d / (g + '.engine')} --stronglyTyped"
                     f"{tf32} --minShapes={fmt(0)} --optShapes={fmt(1)} --maxShapes={fmt(2)} "
                     f"--memPoolSize=workspace:{int(o.workspace_gb * 1024)}M --timingCacheFile={cache}")
    return lines


def build_engines(engine_dir: str | Path, m: dict[str, Any], o: BuildOptions, graphs=None,
                  log=print) -> dict[str, Path]:
    from . import trt_rules
    if m.get("target", "tensorrt") != "tensorrt":
        raise EngineError(f"{engine_dir}: exported for {m['target']} (its int4 weights are ONNX "
                          "Runtime's MatMulNBits); re-export with `densert export --target tensorrt`")
    trt = import_tensorrt()
    d = Path(engine_dir)
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    runtime = trt.Runtime(logger)
    cache_path = Path(o.timing_cache) if o.timing_cache else d / "timing.cache"
    out = {}
    for g in graphs or list(m["graphs"]):
        info = m["graphs"][g]
        onnx_path = d / info["file"]
        import onnx
        bad = trt_rules.problems(onnx.load(str(onnx_path), load_external_data=False))
        if bad:
            raise EngineError(f"{onnx_path} uses what TensorRT {trt_rules.OLDEST_TENSORRT} cannot parse: "
                              + "; ".join(bad[:5]))
        network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
        parser = trt.OnnxParser(network, logger)
        # parse_from_file (not parse(bytes)) so external data next to the file is found.
        if not parser.parse_from_file(str(onnx_path)):
            errs = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise EngineError(f"TensorRT cannot parse {onnx_path}: {errs}")
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(o.workspace_gb * (1 << 30)))
        if not o.tf32:
            config.clear_flag(trt.BuilderFlag.TF32)
        timing = config.create_timing_cache(cache_path.read_bytes() if cache_path.is_file() else b"")
        config.set_timing_cache(timing, ignore_mismatch=False)
        for shapes in profile_shapes(m, g, o):
            profile = builder.create_optimization_profile()
            for name, (lo, mid, hi) in shapes.items():
                profile.set_shape(name, lo, mid, hi)
            config.add_optimization_profile(profile)
        t0 = time.time()
        log(f"build-engine: {g} ({onnx_path.name}), strongly typed, profiles {', '.join(PROFILES[g])} ...")
        blob = builder.build_serialized_network(network, config)
        if blob is None:
            raise EngineError(f"TensorRT failed to build {onnx_path} (see the TensorRT log above)")
        path = d / f"{g}.engine"
        path.write_bytes(bytes(blob))
        cache_path.write_bytes(bytes(config.get_timing_cache().serialize()))
        meta = engine_metadata(trt, m, g, o)
        meta["build_seconds"] = round(time.time() - t0, 1)
        meta["context_memory_bytes"] = context_memory(runtime, bytes(blob), len(PROFILES[g]))
        (d / f"{g}.engine.json").write_text(json.dumps(meta, indent=2) + "\n")
        mem = ", ".join(f"{p} {b / 2**20:.0f} MiB" for p, b in zip(PROFILES[g], meta["context_memory_bytes"]))
        log(f"build-engine: wrote {path} ({path.stat().st_size / 2**20:.1f} MiB of weights and kernels, "
            f"{meta['build_seconds']} s); device memory per execution context: {mem}")
        out[g] = path
    return out


def context_memory(runtime, blob: bytes, profiles: int) -> list[int]:
    """Device memory an execution context of each profile needs (activations, scratch)."""
    engine = runtime.deserialize_cuda_engine(blob)
    if engine is None:
        raise EngineError("TensorRT could not deserialize the engine it just built")
    per = getattr(engine, "get_device_memory_size_for_profile_v2", None)   # TensorRT >= 10.1
    if per is not None:
        return [int(per(i)) for i in range(profiles)]
    total = getattr(engine, "device_memory_size_v2", None)
    return [int(total if total is not None else engine.device_memory_size)] * profiles


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


def check_engine_metadata(engine_dir: str | Path, m: dict[str, Any], graph: str, trt) -> dict[str, Any] | None:
    """The sidecar of a densert-built engine, checked against this TensorRT, GPU and export;
    None for an engine built by the printed trtexec lines (no sidecar: the runtime checks its
    I/O against the manifest instead, and TensorRT itself refuses a foreign engine)."""
    d = Path(engine_dir)
    side, eng = d / f"{graph}.engine.json", d / f"{graph}.engine"
    if not eng.is_file():
        raise EngineError(f"engine dir {d} has no TensorRT engine for {graph} ({eng.name}); "
                          f"run `densert build-engine {d}` on this device")
    if not side.is_file():
        return None
    meta = json.loads(side.read_text())
    dev = device_identity()
    problems = []
    if meta.get("tensorrt") != trt.__version__:
        problems.append(f"built with TensorRT {meta.get('tensorrt')}, this is {trt.__version__}")
    if meta.get("compute_capability") != dev["compute_capability"]:
        problems.append(f"built for compute capability {meta.get('compute_capability')} ({meta.get('gpu')}), "
                        f"this GPU is {dev['compute_capability']} ({dev['gpu']})")
    if (meta.get("onnx_sha256") != m["graphs"][graph]["sha256"]
            or meta.get("checkpoint_id") != m["checkpoint"]["checkpoint_id"]):
        problems.append("built from a different export of the ONNX graphs")
    if problems:
        raise EngineError(f"{eng}: " + "; ".join(problems) + f"; rebuild with `densert build-engine {d}`")
    return meta
