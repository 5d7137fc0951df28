"""Write the Triton model repository: per model ``<name>/config.pbtxt`` and ``<name>/1/model.py``.

``model.py`` only imports ``densert.runtime.serve.triton_model``: the server's Python (the stub's
environment) needs densert installed, and the repository stays valid across densert updates.
Everything the model needs to load is in the ``densert`` parameter of ``config.pbtxt`` (JSON:
``triton_model``), so an operator can edit the checkpoint path, backend or threads there.
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from densert.errors import CLIError

from .contract import INPUTS, MODELS, OUTPUTS
from .triton_model import CONFIG_PARAMETER

# The dynamic batcher's longest wait for more requests before it runs a batch. The model runs the
# requests of a batch one after the other (tens to hundreds of milliseconds each on a CPU), so a
# few milliseconds of waiting cost little and let a busy server take what queued up at once.
DEFAULT_MAX_QUEUE_DELAY_US = 5000
DEFAULT_MAX_BATCH_SIZE = 8

def default_threads(instances: int) -> int:
    """torch threads per instance: the cores less one (Triton's own frontend and batcher threads
    run beside the model) shared by the instances, at least one. With every core given to torch,
    its OpenMP threads spin against the server's and clients' threads: on 2 cores, 2 threads per
    instance served 4-8 requests/s at 2-8 concurrent clients where 1 thread served 66-89
    (``python -m densert.benchmarks.bench_serve --size 64x64 --threads 2``, then ``--threads 1``;
    docs/serving.md)."""
    return max(1, ((os.cpu_count() or 1) - 1) // max(1, instances))


# `densert serve` sets it in the server's environment so that the stub imports the densert that
# started the server (the stub's embedded Python ignores PYTHONPATH); unset in a deployment.
SOURCE_ENV = "DENSERT_SOURCE"

MODEL_PY = f'''"""Triton Python-backend model written by `densert serve --write-repo`: densert's
{{task}} model (densert.runtime.serve.triton_model); its settings are the '{CONFIG_PARAMETER}'
parameter of config.pbtxt."""
import os
import sys

if os.environ.get("{SOURCE_ENV}"):
    sys.path.insert(0, os.environ["{SOURCE_ENV}"])

# Imported after the sys.path line, and only for Triton, which looks the class up in this file.
from densert.runtime.serve.triton_model import TritonPythonModel  # noqa: E402,F401
'''


@dataclass
class RepoSettings:
    """What ``densert serve`` puts into each model's ``config.pbtxt``."""

    models: tuple[str, ...] = MODELS
    model: str | None = None          # checkpoint dir (None: bundled densert-tiny / engine dir)
    settings: dict = field(default_factory=dict)   # PredictorOptions fields
    options: dict = field(default_factory=dict)    # DenseOptions fields
    instances: int = 1
    threads: int | None = None
    max_batch_size: int = DEFAULT_MAX_BATCH_SIZE
    dynamic_batching: bool = True
    max_queue_delay_us: int = DEFAULT_MAX_QUEUE_DELAY_US

    def __post_init__(self):
        bad = [m for m in self.models if m not in MODELS]
        if bad or not self.models:
            raise CLIError(f"--models {','.join(self.models)}: choose from {','.join(MODELS)}")
        for name, lo in (("instances", 1), ("max_batch_size", 1), ("max_queue_delay_us", 0)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < lo:
                raise CLIError(f"--{name.replace('_', '-')} must be an integer >= {lo}, got {v!r}")
        if self.threads is not None and (not isinstance(self.threads, int) or self.threads < 1):
            raise CLIError(f"--threads must be an integer >= 1, got {self.threads!r}")


def _dims(d) -> str:
    return "[ " + ", ".join(str(x) for x in d) + " ]"


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def config_pbtxt(task: str, s: RepoSettings) -> str:
    conf = {"task": task, "model": s.model, "settings": s.settings, "options": s.options,
            "threads": s.threads}
    ins = ",\n".join(
        f'  {{ name: "{t.name}" data_type: {t.triton_type} dims: {_dims(t.dims)} optional: true '
        f"allow_ragged_batch: true }}" for t in INPUTS)
    outs = ",\n".join(f'  {{ name: "{t.name}" data_type: {t.triton_type} dims: {_dims(t.dims)} }}'
                      for t in OUTPUTS[task])
    lines = [f"# densert {task} (written by `densert serve --write-repo`; see docs/serving.md)",
             f'name: "{task}"', 'backend: "python"', f"max_batch_size: {s.max_batch_size}",
             f"input [\n{ins}\n]", f"output [\n{outs}\n]",
             f"instance_group [ {{ kind: KIND_CPU count: {s.instances} }} ]"]
    if s.dynamic_batching:
        lines.append(f"dynamic_batching {{ max_queue_delay_microseconds: {s.max_queue_delay_us} }}")
    lines.append(f'parameters {{ key: "{CONFIG_PARAMETER}" value: {{ string_value: '
                 f"{_quote(json.dumps(conf))} }} }}")
    return "\n".join(lines) + "\n"


def write_repository(out: str | Path, s: RepoSettings, force: bool = False) -> list[Path]:
    """Write ``s.models`` into the repository folder ``out`` (created) -> the model folders. A
    model folder that already exists is an error unless ``force`` (then it is replaced)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CLIError(f"--write-repo {out}: exists and is not a folder")
    existing = [out / m for m in s.models if (out / m).exists()]
    if existing and not force:
        raise CLIError(f"--write-repo {out}: {', '.join(p.name for p in existing)} already "
                       "there; pass --force to replace")
    written = []
    for task in s.models:
        d = out / task
        if d.exists():
            shutil.rmtree(d)
        (d / "1").mkdir(parents=True)
        (d / "config.pbtxt").write_text(config_pbtxt(task, s))
        (d / "1" / "model.py").write_text(MODEL_PY.format(task=task))
        written.append(d)
    return written
