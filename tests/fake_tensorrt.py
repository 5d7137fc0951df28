"""A stand-in for the ``tensorrt`` module (TensorRT 10 Python API) that records every call.

No TensorRT can be installed here, so the build and runtime paths are checked against this:
- the builder records network flags, builder flags, profiles and the parsed graph;
- a "serialized engine" is JSON of the ONNX graph's I/O and the profiles;
- an execution context reads its bound inputs from the addresses it was given (ctypes) and runs
  the engine's ONNX graph with ONNX Runtime, so outputs are real numbers; like ``enqueueV3`` it
  fails when any bound address is null, and it records the stream handle it was given.
"""
from __future__ import annotations

import ctypes
import json
import types
from pathlib import Path

import numpy as np

from densert.export.onnx_types import BOOL, FLOAT, FLOAT16, INT8, INT32, INT64

CALLS: list[tuple] = []


class _DT:
    def __init__(self, name, np_dtype):
        self.name, self.np = name, np.dtype(np_dtype)

    def __repr__(self):
        return f"trt.{self.name}"


float32, float16, int32, int64, bool_, int8 = (_DT("float32", np.float32), _DT("float16", np.float16),
                                               _DT("int32", np.int32), _DT("int64", np.int64),
                                               _DT("bool", np.bool_), _DT("int8", np.int8))
_BY_ONNX = {FLOAT: float32, FLOAT16: float16, INT32: int32, INT64: int64, BOOL: bool_, INT8: int8}


class Logger:
    WARNING = 2

    def __init__(self, severity):
        pass


class NetworkDefinitionCreationFlag:
    STRONGLY_TYPED = 5


class BuilderFlag:
    FP16, TF32 = "FP16", "TF32"


class MemoryPoolType:
    WORKSPACE = "WORKSPACE"


class TensorIOMode:
    INPUT, OUTPUT = "INPUT", "OUTPUT"


class _Network:
    def __init__(self, flags):
        self.flags, self.onnx = flags, None


class _Profile:
    def __init__(self):
        self.shapes = {}

    def set_shape(self, name, lo, opt, hi):
        self.shapes[name] = (list(lo), list(opt), list(hi))


class _TimingCache:
    def serialize(self):
        return b"timing"


class _Config:
    def __init__(self):
        self.flags, self.profiles = set(["TF32"]), []   # TF32 is on by default in TensorRT

    def set_flag(self, f):
        CALLS.append(("set_flag", f))
        self.flags.add(f)

    def clear_flag(self, f):
        CALLS.append(("clear_flag", f))
        self.flags.discard(f)

    def set_memory_pool_limit(self, pool, size):
        CALLS.append(("set_memory_pool_limit", pool, size))

    def create_timing_cache(self, blob):
        return _TimingCache()

    def set_timing_cache(self, cache, ignore_mismatch):
        pass

    def get_timing_cache(self):
        return _TimingCache()

    def add_optimization_profile(self, p):
        self.profiles.append(p)


class Builder:
    def __init__(self, logger):
        pass

    def create_network(self, flags):
        CALLS.append(("create_network", flags))
        return _Network(flags)

    def create_builder_config(self):
        return _Config()

    def create_optimization_profile(self):
        return _Profile()

    def build_serialized_network(self, network, config):
        CALLS.append(("build", sorted(config.flags), len(config.profiles)))
        return json.dumps({"onnx": network.onnx, "profiles": [p.shapes for p in config.profiles],
                           "flags": sorted(config.flags)}).encode()


class OnnxParser:
    num_errors = 0

    def __init__(self, network, logger):
        self.network = network

    def parse_from_file(self, path):
        CALLS.append(("parse_from_file", Path(path).name))
        self.network.onnx = str(path)
        return True


class Runtime:
    def __init__(self, logger):
        pass

    def deserialize_cuda_engine(self, blob):
        return _Engine(json.loads(bytes(blob).decode()))


class _Engine:
    def __init__(self, spec):
        import onnx
        self.spec, self.path = spec, spec["onnx"]
        g = onnx.load(self.path, load_external_data=False).graph
        self.io = [(i.name, "INPUT", _BY_ONNX[i.type.tensor_type.elem_type]) for i in g.input]
        self.io += [(o.name, "OUTPUT", _BY_ONNX[o.type.tensor_type.elem_type]) for o in g.output]
        self._session = None

    @property
    def session(self):
        if self._session is None:
            import onnxruntime as ort
            self._session = ort.InferenceSession(self.path, providers=["CPUExecutionProvider"])
        return self._session

    num_io_tensors = property(lambda self: len(self.io))
    num_optimization_profiles = property(lambda self: len(self.spec["profiles"]))

    def get_tensor_name(self, i):
        return self.io[i][0]

    def get_tensor_mode(self, name):
        return {n: m for n, m, _ in self.io}[name]

    def get_tensor_dtype(self, name):
        return {n: d for n, _, d in self.io}[name]

    def get_tensor_profile_shape(self, name, profile):
        return self.spec["profiles"][profile][name]

    def get_device_memory_size_for_profile_v2(self, profile):
        return (1 << 20) * (profile + 1)

    def create_execution_context(self):
        return _Context(self)


class _Context:
    def __init__(self, engine):
        self.engine, self.shapes, self.addresses, self.profile = engine, {}, {}, 0
        self._outputs = None

    def set_optimization_profile_async(self, index, stream):
        CALLS.append(("set_optimization_profile_async", index, stream))
        self.profile = index
        return True

    def set_input_shape(self, name, shape):
        lo, _, hi = self.engine.spec["profiles"][self.profile][name]
        ok = all(a <= s <= b for a, s, b in zip(lo, shape, hi))
        CALLS.append(("set_input_shape", name, tuple(shape), self.profile, ok))
        self.shapes[name] = tuple(shape)
        self._outputs = None
        return ok

    def set_tensor_address(self, name, address):
        CALLS.append(("set_tensor_address", name, address))
        self.addresses[name] = address
        return True

    def _inputs(self):
        out = {}
        for name, mode, dt in self.engine.io:
            if mode != "INPUT":
                continue
            shape = self.shapes[name]
            n = int(np.prod(shape)) * dt.np.itemsize
            buf = (ctypes.c_char * n).from_address(self.addresses[name]) if n else b""
            out[name] = np.frombuffer(bytes(buf), dtype=dt.np).reshape(shape)
        return out

    def get_tensor_shape(self, name):
        if self._outputs is None:   # inputs are bound before output shapes are asked for
            names = [o.name for o in self.engine.session.get_outputs()]
            self._outputs = dict(zip(names, self.engine.session.run(None, self._inputs())))
        return self._outputs[name].shape

    def execute_async_v3(self, stream):
        nulls = sorted(n for n, a in self.addresses.items() if not a)
        CALLS.append(("execute_async_v3", stream, nulls))
        if nulls:
            return False            # enqueueV3 rejects a null address, even of an empty tensor
        for name, arr in self._outputs.items():
            if arr.size:
                ctypes.memmove(self.addresses[name], np.ascontiguousarray(arr).ctypes.data, arr.nbytes)
        return True


def module() -> types.ModuleType:
    m = types.ModuleType("tensorrt")
    m.__version__ = "10.3.0"
    for k, v in dict(globals()).items():
        if not k.startswith("_") and k not in ("module", "CALLS"):
            setattr(m, k, v)
    m.bool = bool_
    m.CALLS = CALLS
    return m


class RecordingStreams:
    """The backend's stream pair on CPU: records (into CALLS) the ordering the CUDA version
    enforces around every enqueue."""

    handle = 4242

    def run(self):
        from contextlib import contextmanager

        @contextmanager
        def ctx():
            CALLS.append(("stream", "trt stream waits for the caller's"))
            yield
            CALLS.append(("stream", "caller waits for the trt stream; synchronize"))
        return ctx()
