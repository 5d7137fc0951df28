"""The runtime's tasks: one ``Task`` record each, the single table the rest is derived from.

From ``REGISTRY`` come the commands of ``densert`` (``densert.cli.COMMANDS``), each command's
flags (``runtime.cli``), the files ``--formats`` may pick (``runtime.options.FORMATS``) and their
help text, the tasks ``DensePredictor.stream`` runs (``runtime.stream``) and the task list of the
result sidecar (``runtime/sidecar.schema.json``, rewritten by ``python -m densert.runtime.registry``;
``tests/test_registry.py`` fails when the committed file differs).

Adding a task is one record here plus its flow: the prompt builder (``densert.tasks.prompts``),
the ``DensePredictor`` method, the result class (``runtime.results``) with its sidecar block
(``$defs`` of the schema) and files. docs/architecture.md walks through it.

Torch-free and import-light (``densert --help`` reads it): code is named, not imported; the test
resolves every name.
"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

from densert.tasks import DENSE_TASKS, GENERATING_TASKS

SCHEMA_FILE = Path(__file__).with_name("sidecar.schema.json")
# Files written only when ``--formats`` names them (the float TIFF: large, and few tools need it).
OPT_IN_FORMATS = ("tiff",)


@dataclass(frozen=True)
class Task:
    name: str                           # the command and the sidecar's "task"
    help: str                           # the command's line in ``densert --help``
    method: str                         # DensePredictor method: method(image, **options)
    result: str                         # the class it returns (runtime.results; a combined task:
                                        # runtime.multitask)
    prompts: tuple[str, ...] = ()       # the builders of densert.tasks.prompts its flow uses
    options: tuple[str, ...] = ()       # the method's keyword options; each is a flag
                                        # (runtime.cli.ARGUMENTS) and a stream option
    option_help: Mapping[str, str] = field(default_factory=dict)  # this task's wording of a flag
    formats: tuple[str, ...] = ()       # files --formats picks from, in the order they are written
    dense_flags: tuple[str, ...] = ()   # DenseOptions fields the command exposes as flags
    output_flags: tuple[str, ...] = ("formats",)  # OutputOptions fields it exposes
    flows: tuple[str, ...] = ("generate",)  # the sidecar's "flow" values (runtime/predictor.py)
    streams: bool = False               # --source and DensePredictor.stream run it per frame
    images: bool = True                 # takes IMAGE arguments (False: --source only)
    text_only: bool = False             # runs on a prompt alone when no image is given
    stdout: bool = False                # the answer is printed as well as written
    parts: tuple[str, ...] = ()         # a combined task: the tasks whose results it returns
                                        # (``.results``), each set written into --out/<part>/

    @property
    def schema(self) -> str | None:
        """The ``$defs`` entry of the sidecar's result block; None for a combined task (each
        part writes its own sidecar)."""
        return None if self.parts else self.name

    @property
    def dense(self) -> bool:
        """Its maps are read off the vision tokens (the dense head)."""
        return all(t in DENSE_TASKS for t in self.parts or (self.name,))

    @property
    def generates(self) -> bool:
        """Its flow generates text (a combined task scores from one prefill, generating none)."""
        return self.name in GENERATING_TASKS

    @property
    def default_formats(self) -> tuple[str, ...]:
        return tuple(f for f in self.formats if f not in OPT_IN_FORMATS)

    @property
    def prompt_builders(self) -> tuple:
        from densert.tasks import prompts
        return tuple(getattr(prompts, p) for p in self.prompts)


REGISTRY: dict[str, Task] = {t.name: t for t in (
    Task("depth", "metric depth maps from images", "depth", "DepthResult",
         prompts=("depth",), options=("preset", "focal"),
         formats=("npy", "png", "png16", "txt", "tiff"),
         dense_flags=("alignment", "temperature", "depth_mode", "depth_upsample"),
         output_flags=("formats", "range", "legend", "invalid"),
         flows=("one-prefill",), streams=True),
    Task("segment", "semantic / open-set segmentation maps from images", "segment", "SegResult",
         prompts=("semantic", "open_set", "detect_categories", "core_target"),
         options=("classes", "background"),
         option_help={
             "classes": "comma-separated class names (closed set: the model names the ones "
                        "present, the map scores those); default: none, the model names them "
                        "(open set)",
             "background": "closed set with a background class: the prompt omits \"without the "
                           "background class\", the <OTHERS> rule applies where the model names "
                           "<OTHERS> (always, with --fast)"},
         formats=("npy", "png", "overlay", "txt", "coco"),
         dense_flags=("alignment", "temperature", "crf", "fast", "open_set_max_boxes",
                      "refer_short_side"),
         flows=("closed-set:name-then-argmax", "closed-set:one-prefill",
                "open-set:detect-then-segment", "open-set:direct"), streams=True),
    Task("refer", "referring segmentation of an expression", "refer", "ReferResult",
         prompts=("referring", "core_target"), options=("expression",),
         formats=("npy", "overlay", "txt", "coco"),
         dense_flags=("alignment", "temperature", "crf", "refer_short_side"),
         flows=("ground-then-segment",)),
    Task("detect", "object detection: labelled boxes (all objects or given categories)",
         "detect", "DetectResult", prompts=("detect_all", "detect_categories"),
         options=("classes",),
         option_help={"classes": "comma-separated categories to detect (the open set's detection "
                                 "prompt); default: none, every object"},
         formats=("overlay", "txt", "coco")),
    Task("ground", "grounding: the box of the region an expression describes", "ground",
         "GroundResult", prompts=("grounding",), options=("expression",),
         formats=("overlay", "txt")),
    Task("pose", "pose estimation: persons with 16 MPII keypoints", "pose", "PoseResult",
         prompts=("pose",), formats=("overlay", "txt", "coco")),
    Task("chat", "chat / VQA with the release's decoding", "chat", "ChatResult",
         prompts=("chat",), options=("prompt",), formats=("txt",), output_flags=(),
         text_only=True, stdout=True),
    Task("dense", "depth and segmentation of every frame of a source from one prefill", "dense",
         "DenseResult", prompts=("depth", "semantic"),
         options=("preset", "focal", "classes", "background", "depth"),
         option_help={
             "preset": "depth preset (default: the model's task_defaults.json, else open-world); "
                       "the dataset presets put the prompt before the image and need their own "
                       "prefill",
             "classes": "comma-separated class names to segment from the same prefill "
                        "(default: none, depth only)",
             "background": "closed set with the <OTHERS> background rule"},
         dense_flags=("alignment", "temperature", "depth_mode", "depth_upsample", "crf"),
         output_flags=("range", "legend", "invalid"), flows=(), streams=True, images=False,
         parts=("depth", "segment")),
)}


def sidecar_tasks(tasks: Mapping[str, Task] = REGISTRY) -> list[Task]:
    """The tasks that write a sidecar of their own (not the combined ones)."""
    return [t for t in tasks.values() if t.schema is not None]


def formats(tasks: Mapping[str, Task] = REGISTRY) -> dict[str, tuple[str, ...]]:
    return {t.name: t.formats for t in sidecar_tasks(tasks)}


def schema_with_tasks(schema: dict, tasks: Mapping[str, Task] = REGISTRY) -> dict:
    """``schema`` (the sidecar's) with its task list, flows and per-task result blocks as
    ``tasks`` says; the ``$defs`` of the blocks are the schema's own."""
    rows = sidecar_tasks(tasks)
    props = dict(schema["properties"])
    props["task"] = {**props["task"], "enum": [t.name for t in rows]}
    props["flow"] = {**props["flow"], "enum": list(dict.fromkeys(f for t in rows for f in t.flows))}
    cases = [{"if": {"properties": {"task": {"const": t.name}}},
              "then": {"properties": {"result": {"$ref": f"#/$defs/{t.schema}"}}}} for t in rows]
    return {**schema, "properties": props, "allOf": cases}


def schema_text(schema: dict) -> str:
    return json.dumps(schema, indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    """``python -m densert.runtime.registry [--check]``: rewrite the sidecar schema's task list
    from the registry (``--check``: exit 1 if the committed file differs)."""
    import argparse
    parser = argparse.ArgumentParser(prog="python -m densert.runtime.registry",
                                     description=main.__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="exit 1 if the committed schema differs from the registry")
    args = parser.parse_args(argv)
    current = SCHEMA_FILE.read_text()
    want = schema_text(schema_with_tasks(json.loads(current)))
    if current == want:
        return 0
    if args.check:
        print(f"{SCHEMA_FILE} differs from the task registry; run python -m "
              "densert.runtime.registry", file=sys.stderr)
        return 1
    SCHEMA_FILE.write_text(want)
    print(f"rewrote {SCHEMA_FILE}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
