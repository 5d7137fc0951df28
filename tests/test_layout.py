"""The tree's shape: imports point one way, `--help` stays torch-free, static tools find the
sources, missing extras are named."""
from __future__ import annotations

import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

import densert

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("runtime", "export", "kernels", "training", "benchmarks")


# ---------------------------------------------------------------- import direction
def module_files() -> dict[str, Path]:
    """densert module name -> source file, for the core and the five symlinked subpackages."""
    out = {}
    for base, prefix in [(ROOT / "densert", "densert")] + [(ROOT / s, f"densert.{s}") for s in SUBPACKAGES]:
        for p in base.rglob("*.py"):
            if any(part in SUBPACKAGES for part in p.relative_to(base).parts[:1]) and prefix == "densert":
                continue  # reached through a symlink: listed under its own folder
            rel = p.relative_to(base).with_suffix("").parts
            name = ".".join((prefix, *rel))
            out[name.removesuffix(".__init__")] = p
    return out


def imports_of(name: str, source: str, is_package: bool) -> set[str]:
    """Every densert module ``source`` imports, at any depth (lazy imports in functions too)."""
    out = set()
    pkg = name if is_package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name.startswith("densert")}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = pkg.split(".")
                base = base[: len(base) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            if not mod.startswith("densert"):
                continue
            out.add(mod)
            out |= {f"{mod}.{a.name}" for a in node.names}  # `from densert.tasks import prompts`
    return out


def import_edges() -> set[tuple[str, str]]:
    files = module_files()
    edges = set()
    for name, path in files.items():
        for target in imports_of(name, path.read_text(), path.name == "__init__.py"):
            if target in files:
                edges.add((name, target))
    return edges


def layer(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 and parts[1] in SUBPACKAGES else "core"


def is_cli(module: str) -> bool:
    return module.split(".")[-1] in ("cli", "__main__")


def violations(edges) -> list[str]:
    """The rules of docs/architecture.md: the core at the bottom, kernels self-contained, runtime
    and export never reaching up to training, benchmarks or a CLI module, export below runtime."""
    bad = []
    for src, dst in sorted(edges):
        s, d = layer(src), layer(dst)
        why = None
        if s == "kernels" and d != "kernels":
            why = "kernels import nothing of densert but kernels"
        elif is_cli(src):
            continue  # the command modules sit on top and may import anything
        elif is_cli(dst):
            why = "only CLI modules import CLI modules"
        elif s in ("runtime", "export") and d in ("training", "benchmarks"):
            why = f"{s} never imports {d}"
        elif s == "export" and d == "runtime":
            why = "export sits below runtime (runtime picks the exported backends)"
        elif s == "training" and d == "benchmarks":
            why = "training never imports benchmarks"
        elif s == "core" and d != "core" and src != "densert":
            why = "the core imports no subpackage (densert/__init__ re-exports lazily)"
        if why:
            bad.append(f"{src} -> {dst}: {why}")
    return bad


def test_imports_point_one_way():
    edges = import_edges()
    assert ("densert.runtime.dense", "densert.kernels.dense_head") in edges  # the walk sees edges
    assert violations(edges) == []


def test_forbidden_edges_are_reported():
    """The negative case: a lazy import from runtime into training, and kernels reaching into
    the core, both fail the check."""
    lazy = "def f():\n    from densert.training import trainer\n    return trainer\n"
    edges = {("densert.runtime.fake", t) for t in imports_of("densert.runtime.fake", lazy, False)}
    edges |= {("densert.kernels.fake", t)
              for t in imports_of("densert.kernels.fake", "from ..model import config\n", False)}
    edges |= {("densert.export.fake", "densert.runtime.cli")}
    found = violations(edges | import_edges())
    assert any(v.startswith("densert.runtime.fake -> densert.training") for v in found)
    assert any(v.startswith("densert.kernels.fake -> densert.model") for v in found)
    assert any(v.startswith("densert.export.fake -> densert.runtime.cli") for v in found)


def import_circles(edges, package: str) -> list[list[str]]:
    """The groups of ``package``'s modules that import each other, directly or through a chain
    (the strongly connected groups of its import graph with more than one module), sorted."""
    def inside(m):
        return m == package or m.startswith(package + ".")
    graph: dict[str, set[str]] = {}
    for src, dst in edges:
        if inside(src) and inside(dst) and src != dst:
            graph.setdefault(src, set()).add(dst)
            graph.setdefault(dst, set())
    order, low, stack, on_stack, groups = {}, {}, [], set(), []

    def visit(v):  # Tarjan's algorithm; the runtime's graph is far too shallow to need a loop
        order[v] = low[v] = len(order)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in order:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], order[w])
        if low[v] == order[v]:
            group = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                groups.append(sorted(group))

    for v in sorted(graph):
        if v not in order:
            visit(v)
    return sorted(groups)


def test_no_import_circle_in_the_runtime():
    """No two modules of the runtime import each other, directly or through a chain (lazy
    imports count): each has its one place in the order the runtime is built in."""
    assert import_circles(import_edges(), "densert.runtime") == []


def test_import_circles_are_reported():
    edges = {("densert.runtime.a", "densert.runtime.b"), ("densert.runtime.b", "densert.runtime.c"),
             ("densert.runtime.c", "densert.runtime.a"), ("densert.runtime.c", "densert.runtime.d"),
             ("densert.runtime.e", "densert.runtime.f"), ("densert.runtime.f", "densert.runtime.e"),
             ("densert.runtime.d", "densert.export.x"), ("densert.export.x", "densert.runtime.c")}
    assert import_circles(edges, "densert.runtime") == [
        ["densert.runtime.a", "densert.runtime.b", "densert.runtime.c"],
        ["densert.runtime.e", "densert.runtime.f"]]


# ---------------------------------------------------------------- --help without torch
def test_help_imports_no_torch():
    from densert.cli import COMMANDS
    code = (
        "import sys\nfrom densert.cli import main\n"
        f"for c in {list(COMMANDS)!r} + [None]:\n"
        "    try:\n        main([c, '--help'] if c else ['--help'])\n"
        "    except SystemExit:\n        pass\n"
        "print(sorted(m for m in ('torch', 'onnxruntime', 'transformers', 'triton') if m in sys.modules))\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip().splitlines()[-1] == "[]"
    # the literal commands of the issue: `python -X importtime -m densert --help`, and the script
    for cmd in ([sys.executable, "-X", "importtime", "-m", "densert", "--help"],
                [sys.executable, "-X", "importtime", "-m", "densert", "depth", "--help"]):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT.parent)
        imported = {line.split("|")[-1].strip() for line in r.stderr.splitlines() if "|" in line}
        assert "densert.cli" in imported and "torch" not in imported, cmd


def test_every_flag_has_help_and_shows_its_default():
    import importlib
    import inspect as ins

    from densert.cli import COMMANDS, HelpFormatter, new_parser
    for name, (module, help_text) in COMMANDS.items():
        mod = importlib.import_module(module)
        p = new_parser(f"densert {name}", help_text)
        mod.configure(p, name) if len(ins.signature(mod.configure).parameters) >= 2 else mod.configure(p)
        fmt = HelpFormatter("x")
        for a in p._actions:
            if not a.option_strings or a.dest == "help":
                continue
            text = fmt._get_help_string(a)
            assert a.help, f"densert {name} {a.option_strings[0]} has no help text"
            assert "default" in text or a.default is False or a.required, \
                f"densert {name} {a.option_strings[0]}: help does not say its default: {text!r}"


# ---------------------------------------------------------------- static analysis, extras
def test_jedi_resolves_to_the_repo_files(tmp_path):
    """In the README's development install, go-to-definition lands on the file in the repo (the
    editable install maps ``densert`` to the repo's folder; the subpackages are symlinks in it)."""
    jedi = pytest.importorskip("jedi")
    if not Path(densert.__file__).resolve().is_relative_to(ROOT):
        pytest.skip(f"densert is installed from {densert.__file__}, not this repo (not the "
                    "development install)")
    env = jedi.create_environment(sys.prefix, safe=False)
    project = jedi.Project(tmp_path)  # a project elsewhere: resolution must go through the install
    cases = {"from densert.runtime.dense import DenseOptions\nDenseOptions": ROOT / "runtime" / "options.py",
             "import densert.kernels.dense_head as m\nm": ROOT / "kernels" / "dense_head.py",
             "from densert.model.config import YoutuVLConfig\nYoutuVLConfig": ROOT / "densert" / "model" / "config.py"}
    for code, want in cases.items():
        lines = code.splitlines()
        names = jedi.Script(code, path=tmp_path / "x.py", environment=env, project=project).goto(
            len(lines), len(lines[-1]) - 1, follow_imports=True)
        assert [Path(n.module_path).resolve() for n in names] == [want], code


def test_missing_extra_is_one_line(tiny_checkpoint, tmp_path):
    code = ("import sys\nsys.modules['onnx'] = None\nfrom densert.cli import main\n"
            f"sys.exit(main(['export', '--model', {str(tiny_checkpoint)!r}, '--out', {str(tmp_path / 'e')!r}]))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent,
                       env={**os.environ, "DENSERT_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 2
    assert r.stderr.strip() == ("densert export: error: densert export needs the optional package "
                                "'onnx', which is not installed: pip install 'densert[export]'")
    assert not (tmp_path / "e").exists()


def test_top_level_folders_are_not_second_packages():
    """From the repo root (on sys.path as with `python -m`), the bare folder names are inert: no
    second copy of a module, a clear error for a submodule, and transformers' probe for a
    `kernels` package sees none (importing transformers there used to fail)."""
    code = ("import sys\n"
            "for stmt in ('from kernels import dense_head', 'import kernels.dense_head',\n"
            "             'from runtime import dense'):\n"
            "    try:\n        exec(stmt)\n    except ImportError as e:\n        print(type(e).__name__, e)\n"
            "print(sorted(m for m in sys.modules if m.startswith(('kernels.', 'runtime.'))))\n"
            "from transformers.utils.import_utils import is_kernels_available\n"
            "print(is_kernels_available())\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert lines[0] == "ImportError import densert.kernels, not kernels: this folder is the source of densert.kernels"
    assert lines[1].startswith("ModuleNotFoundError") and lines[2].startswith("ImportError import densert.runtime")
    assert lines[3] == "[]" and lines[4] == "False"


def test_base_install_runs_without_extras(tiny_checkpoint, tmp_path):
    """Every runtime command on the torch and ONNX Runtime backends imports no extra: every module
    an extra brings is blocked in the child (the engine is exported here first). The maps'
    DenseCRF, on by default as in the release, needs densert[crf]: without it segment and refer
    say so in one line before the model loads, and run with --no-crf."""
    from densert.export.onnx_export import export_engine
    from densert.extras import EXTRA_OF_MODULE
    engine = tmp_path / "engine"
    export_engine(tiny_checkpoint, engine, max_image_tokens=256, progress=False)
    img = ROOT / "samples" / "scene_3.png"
    runs = [["depth", str(img)], ["segment", str(img), "--classes", "floor,wall", "--no-crf"],
            ["refer", str(img), "--expression", "the box", "--refer-short-side", "64", "--no-crf"],
            ["detect", str(img)], ["ground", str(img), "--expression", "the box"],
            ["pose", str(img)], ["chat", "--prompt", "hi"],
            ["depth", str(img), "--backend", "onnxruntime", "--engine-dir", str(engine)]]
    code = ("import sys\n"
            f"for m in {sorted(EXTRA_OF_MODULE)!r}:\n    sys.modules[m] = None\n"
            "from densert.cli import main\n"
            f"for args in {runs!r}:\n"
            f"    rc = main([*args, '--model', {str(tiny_checkpoint)!r}, '--max-new-tokens', '4',"
            f" '--out', {str(tmp_path / 'o')!r}])\n"
            "    assert rc == 0, args\n"
            f"rc = main(['segment', {str(img)!r}, '--model', {str(tiny_checkpoint)!r}, '--out',"
            f" {str(tmp_path / 'o2')!r}])\n"
            "assert rc == 2, rc\n"
            "print('ok')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT.parent,
                       env={**os.environ, "DENSERT_CACHE_DIR": str(tmp_path / "cache")})
    assert r.returncode == 0 and r.stdout.strip().endswith("ok"), r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == (
        "densert segment: error: DenseCRF (on by default, as the release; --no-crf skips it) needs "
        "the optional package 'pydensecrf', which is not installed: pip install 'densert[crf]'")
    assert not (tmp_path / "o2").exists()
