"""The task registry (runtime/registry.py) is the one table of the runtime's tasks: every name in a
record resolves, and the CLI tables, the formats, the stream's tasks and the sidecar schema's task
list are what it says, including for a task added to it."""
from __future__ import annotations

import argparse
import dataclasses
import inspect
import json

import pytest

from densert.cli import COMMANDS, new_parser
from densert.runtime import cli, multitask, options, registry, results, stream
from densert.runtime.options import DenseOptions, OutputOptions
from densert.runtime.predictor import DensePredictor
from densert.runtime.registry import REGISTRY, Task
from densert.tasks import DENSE_TASKS, GENERATING_TASKS, TASKS


def _schema() -> dict:
    return json.loads(registry.SCHEMA_FILE.read_text())


def test_the_registry_holds_the_model_contract_tasks_in_order():
    assert tuple(t.name for t in registry.sidecar_tasks()) == TASKS
    combined = [t for t in REGISTRY.values() if t.parts]
    assert [t.name for t in combined] == ["dense"]
    assert all(p in TASKS for t in combined for p in t.parts)
    assert [t.name for t in REGISTRY.values() if t.dense] == [*DENSE_TASKS, "dense"]
    assert tuple(t.name for t in REGISTRY.values() if t.generates) == GENERATING_TASKS


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_name_in_a_record_resolves(name):
    t = REGISTRY[name]
    method = getattr(DensePredictor, t.method)
    params = inspect.signature(method).parameters
    assert list(params)[1] == "image" and set(t.options) <= set(params), (name, list(params))
    cls = getattr(multitask if t.parts else results, t.result)
    if not t.parts:
        assert cls.task == name and t.schema in _schema()["$defs"]
    assert len(t.prompt_builders) == len(t.prompts) and all(map(callable, t.prompt_builders))
    cli_fields = {f.name for f in dataclasses.fields(DenseOptions) if f.metadata.get("cli", True)}
    assert set(t.dense_flags) <= cli_fields
    assert set(t.output_flags) <= {f.name for f in dataclasses.fields(OutputOptions)}
    assert set(t.options) <= set(cli.ARGUMENTS) and set(t.option_help) <= set(t.options)
    assert set(t.default_formats) <= set(t.formats)
    assert t.images or t.streams, "a task without IMAGE arguments needs --source"


def test_the_tables_are_the_registry():
    assert cli.DENSE_FLAGS == {n: t.dense_flags for n, t in REGISTRY.items()}
    assert cli.OUTPUT_FLAGS == {n: t.output_flags for n, t in REGISTRY.items()}
    assert cli.MAP_COMMANDS == ("segment", "refer", "dense")
    assert options.FORMATS == {n: REGISTRY[n].formats for n in TASKS}
    assert options.DEFAULT_FORMATS["depth"] == ("npy", "png", "png16", "txt")
    assert OutputOptions.__dataclass_fields__["formats"].metadata["help"] == options.formats_help()
    assert stream.TASKS == ("depth", "segment", "dense")
    for name, t in REGISTRY.items():
        assert COMMANDS[name] == ("densert.runtime.cli", t.help)
    schema = _schema()
    assert schema["properties"]["task"]["enum"] == list(TASKS)
    assert schema == registry.schema_with_tasks(schema)  # the committed file is the generated one
    assert registry.main(["--check"]) == 0


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {s for a in parser._actions for s in a.option_strings}


def test_a_task_added_to_the_registry_appears_everywhere(monkeypatch):
    """One record: its command's flags, its --formats entry and help, its stream entry and its
    place in the sidecar schema (task, flow, result block) follow from it."""
    count = Task("count", "count objects", "detect", "DetectResult", prompts=("detect_all",),
                 options=("classes",), formats=("txt", "csv"), dense_flags=("alignment",),
                 output_flags=("formats", "legend"), flows=("count-then-sum",), streams=True)
    tasks = {**REGISTRY, "count": count}
    dense, output, maps = cli.flag_tables(tasks)
    assert dense["count"] == ("alignment",) and output["count"] == ("formats", "legend")
    assert "count" not in maps
    assert registry.formats(tasks)["count"] == ("txt", "csv")
    assert "count: txt,csv" in options.formats_help(tasks)
    doc = registry.schema_with_tasks(_schema(), tasks)
    assert doc["properties"]["task"]["enum"] == [*TASKS, "count"]
    assert doc["properties"]["flow"]["enum"][-1] == "count-then-sum"
    assert doc["allOf"][-1] == {"if": {"properties": {"task": {"const": "count"}}},
                                "then": {"properties": {"result": {"$ref": "#/$defs/count"}}}}

    monkeypatch.setitem(REGISTRY, "count", count)
    p = new_parser("densert count", count.help)
    cli.configure(p, "count")
    assert {"--classes", "--alignment", "--formats", "--legend", "--source"} <= _flags(p)
    assert not {"--crf", "--preset", "--range"} & _flags(p)
    assert stream.TaskSpec.of("count", {"classes": ["cup"]}).options == {"classes": ["cup"]}
    with pytest.raises(ValueError, match="a count stream takes classes"):
        stream.TaskSpec.of("count", {"preset": "nyuv2"})


def test_the_schema_command_rewrites_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = _schema()
    stale["properties"]["task"]["enum"] = ["depth"]
    stale["allOf"] = stale["allOf"][:1]
    f = tmp_path / "sidecar.schema.json"
    f.write_text(registry.schema_text(stale))
    monkeypatch.setattr(registry, "SCHEMA_FILE", f)
    assert registry.main(["--check"]) == 1
    assert "differs from the task registry" in capsys.readouterr().err
    assert registry.main([]) == 0
    fresh = json.loads(f.read_text())
    assert fresh == registry.schema_with_tasks(stale) and fresh["properties"]["task"]["enum"] == list(TASKS)
    assert [c["if"]["properties"]["task"]["const"] for c in fresh["allOf"]] == list(TASKS)
    assert registry.main(["--check"]) == 0
