"""The docs as a reader uses them: every command they show parses with the real argument parser,
every relative link resolves, and the README stays a front door that reaches every page.

Commands are checked at ``--help`` level, without running a model: a whole command line in a
shell block is parsed by the parser of the command it names (``densert CMD``, ``python -m
densert.X``), exactly as ``densert.cli.main`` builds it; a synopsis (``[--flag X]``, ``a|b``,
``...``) and a command inside a sentence are checked flag by flag, choices included. A pytest
command must name test files that exist; a Python block must compile and use only names the
``densert`` package exports.
"""
from __future__ import annotations

import argparse
import ast
import contextlib
import importlib
import importlib.util
import io
import re
import shlex
from functools import lru_cache
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]


def doc_files() -> list[Path]:
    """The hand-written docs. The generated tables in benchmarks/results/*.md are records of the
    run that made them (their commands are what ran then), so only their index is checked."""
    files = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    files += sorted(p for p in ROOT.glob("*/README.md") if not p.parent.name.startswith("."))
    files += [ROOT / "benchmarks" / "results" / "README.md",
              ROOT / "densert" / "assets" / "densert-tiny" / "MODEL_CARD.md"]
    return [p for p in files if p.is_file()]


def rel(p: Path) -> str:
    return str(p.relative_to(ROOT))


FENCE = re.compile(r"^```([\w+-]*)[^\n]*\n(.*?)^```[ \t]*$", re.M | re.S)
INLINE = re.compile(r"(`+)(.+?)\1", re.S)
SHELL_LANGS = ("", "sh", "bash", "shell", "console")


def split_doc(text: str) -> tuple[list[tuple[str, str]], str]:
    """(language, body) of each fenced block, and the prose with the blocks blanked out."""
    blocks = [(m.group(1).lower(), m.group(2)) for m in FENCE.finditer(text)]
    return blocks, FENCE.sub("", text)


def shell_lines(body: str) -> list[str]:
    """Logical lines of a shell block: a trailing backslash continues the line."""
    return body.replace("\\\n", " ").splitlines()


def is_synopsis(words: list[str]) -> bool:
    """A usage line ([optional], a|b, repeated...) rather than a command to paste."""
    return any(c in w for w in words for c in "[]|") or any(w.endswith("...") for w in words)


# --- finding the parser of a command -------------------------------------------------------

class _Captured(Exception):
    def __init__(self, parser):
        super().__init__("captured")
        self.parser = parser


def _capture(self, *args, **kwargs):
    raise _Captured(self)


@lru_cache(maxsize=None)
def parser_of(entry: tuple[str, str]) -> argparse.ArgumentParser:
    """The parser a command builds: its entry point is run up to the moment it parses its
    arguments, then stopped, so nothing after parsing (a model load) happens."""
    kind, name = entry
    with mock.patch.object(argparse.ArgumentParser, "parse_args", _capture), \
            mock.patch.object(argparse.ArgumentParser, "parse_intermixed_args", _capture):
        try:
            if kind == "densert":
                from densert.cli import main
                main([name])
            else:
                importlib.import_module(name).main([])
        except _Captured as c:
            return c.parser
    raise AssertionError(f"{kind} {name} returned without parsing its arguments")


def entry_of(words: list[str]) -> tuple[tuple[str, str], list[str]] | None:
    """((kind, name), arguments) of a densert invocation, or None for another program."""
    if not words:
        return None
    head = words[0]
    if head in ("densert", ".venv/bin/densert"):
        return (("densert", words[1]), words[2:]) if len(words) > 1 else None
    if head == "torchrun" or re.fullmatch(r"(\S*/)?python3?", head):
        if "-m" not in words:
            return None
        i = words.index("-m")
        mod = words[i + 1] if i + 1 < len(words) else ""
        if mod == "densert":
            return (("densert", words[i + 2]), words[i + 3:]) if i + 2 < len(words) else None
        if mod.startswith("densert."):
            return ("module", mod), words[i + 2:]
        if mod == "pytest":
            return ("pytest", ""), words[i + 2:]
    return None


def commands_of(line: str) -> list[list[str]]:
    """Each ``&&``-joined command of a shell line, as words (comments dropped)."""
    try:
        words = shlex.split(line, comments=True)
    except ValueError:
        words = line.split("#")[0].split()
    out, cur = [], []
    for w in words:
        if w in ("&&", ";", "||"):
            out.append(cur)
            cur = []
        else:
            cur.append(w)
    return [c for c in out + [cur] if c]


# --- checks --------------------------------------------------------------------------------

def check_strict(entry, args) -> str | None:
    """Parse as the program would; the parser's own one-line error if it refuses."""
    parser = parser_of(entry)
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(args)
        except SystemExit as e:
            if e.code not in (0, None):
                return err.getvalue().strip() or f"exit {e.code}"
    return None


def check_flags(entry, args) -> str | None:
    """Every ``--flag`` exists; every value written after a flag with choices (``a|b|c`` or a
    plain lowercase word) is one of them."""
    actions = parser_of(entry)._option_string_actions
    words = [w.strip("[]") for w in args]
    for i, w in enumerate(words):
        if not w.startswith("--"):
            continue
        flag = re.sub(r"[,.;:)]+$", "", w.split("=", 1)[0])
        if flag not in actions:
            return f"no flag {flag}"
        choices = actions[flag].choices
        nxt = w.split("=", 1)[1] if "=" in w else (words[i + 1] if i + 1 < len(words) else "")
        if choices and nxt and not nxt.startswith("-") and re.fullmatch(r"[a-z0-9_|.-]+", nxt):
            bad = [v for v in nxt.rstrip(".").split("|") if v and v not in choices]
            if bad:
                return f"{flag}: {bad} not among {list(choices)}"
    return None


def check_pytest(args) -> str | None:
    for w in args:
        path = w.split("::")[0]
        if path.startswith("tests/") and not (ROOT / path).exists():
            return f"no {path}"
    return None


def check_repo_paths(args) -> str | None:
    """A command to paste that reads a file shipped in the repo names one that is there."""
    for w in args:
        if w.startswith(("samples/", "densert/assets/")) and not list(ROOT.glob(w)):
            return f"no {w} in the repo"
    return None


def check_command(words: list[str], strict: bool) -> str | None:
    found = entry_of(words)
    if found is None:
        return None
    (kind, name), args = found
    if strict and (problem := check_repo_paths(args)):
        return problem
    if kind == "pytest":
        return check_pytest(args)
    if kind == "densert":
        from densert.cli import COMMANDS
        if not re.fullmatch(r"[a-z][a-z0-9|-]*", name):
            return None  # a placeholder (`densert COMMAND`) or a quoted error message
        for cmd in name.split("|"):
            if cmd not in COMMANDS:
                return f"no command {cmd!r}"
        entries = [("densert", c) for c in name.split("|")]
    else:
        if importlib.util.find_spec(name) is None:
            return f"no module {name}"
        entries = [("module", name)]
    for entry in entries:
        problem = check_strict(entry, args) if strict else check_flags(entry, args)
        if problem:
            return problem
    return None


def doc_commands():
    """(doc, command text, strict) of every densert / pytest command the docs show."""
    for path in doc_files():
        blocks, prose = split_doc(path.read_text())
        for lang, body in blocks:
            if lang not in SHELL_LANGS:
                continue
            for line in shell_lines(body):
                for words in commands_of(line):
                    yield rel(path), " ".join(words), words, not is_synopsis(words)
        for m in INLINE.finditer(prose):
            span = " ".join(m.group(2).split())
            if re.match(r"(\.venv/bin/)?(densert|python3? -m |torchrun )", span):
                for words in commands_of(span):
                    yield rel(path), " ".join(words), words, False


def test_every_doc_command_parses():
    failures, seen = [], 0
    for doc, text, words, strict in doc_commands():
        if entry_of(words) is None:
            continue
        seen += 1
        problem = check_command(words, strict)
        if problem:
            failures.append(f"{doc}: `{text}`: {problem}")
    assert seen > 50, f"only {seen} commands found in the docs: is the extraction broken?"
    assert not failures, "\n".join(failures)


def test_the_checks_catch_a_broken_command():
    """The checker itself: a wrong flag, a wrong choice, a missing value, a missing command or
    test file would each be reported."""
    assert check_command(["densert", "depth", "x.png", "--no-such-flag"], strict=True)
    assert check_command(["densert", "depth", "x.png", "--preset", "nowhere"], strict=True)
    assert check_command(["densert", "depth", "[--preset", "open-world|nowhere]"], strict=False)
    assert check_command(["densert", "export", "--out", "E"], strict=True)  # --model missing
    assert check_command(["densert", "depht", "x.png"], strict=False)
    assert check_command(["python", "-m", "densert.benchmarks.bench_stream", "--nope"], strict=True)
    assert check_command(["python", "-m", "pytest", "tests/test_nothing_here.py"], strict=False)
    assert check_command(["densert", "depth", "samples/scene_99.png"], strict=True)
    assert check_command(["densert", "depth", "x.png", "--preset", "nyuv2"], strict=True) is None


def test_python_blocks_compile_and_use_exported_names():
    import densert
    failures = []
    for path in doc_files():
        blocks, _ = split_doc(path.read_text())
        for lang, body in blocks:
            if lang != "python":
                continue
            try:
                tree = ast.parse(body)
            except SyntaxError as e:
                failures.append(f"{rel(path)}: {e}")
                continue
            for node in ast.walk(tree):
                if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                        and node.value.id == "densert" and not hasattr(densert, node.attr)):
                    failures.append(f"{rel(path)}: densert.{node.attr} does not exist")
    assert not failures, "\n".join(failures)


# --- links ---------------------------------------------------------------------------------

LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")


def slugs(md: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens, repeats
    numbered."""
    blocks_removed = FENCE.sub("", md.read_text())
    out, counts = set(), {}
    for m in re.finditer(r"^#{1,6}\s+(.+?)\s*#*\s*$", blocks_removed, re.M):
        s = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = counts.get(s, 0)
        counts[s] = n + 1
        out.add(s if n == 0 else f"{s}-{n}")
    return out


def links_of(path: Path) -> list[str]:
    _, prose = split_doc(path.read_text())
    prose = INLINE.sub("", prose)
    return [m.group(1) for m in LINK.finditer(prose)]


def test_every_relative_link_resolves():
    failures = []
    for path in doc_files():
        for target in links_of(path):
            if re.match(r"[a-z]+:", target):
                continue  # https:, mailto:
            file, _, anchor = target.partition("#")
            dest = (path.parent / file).resolve() if file else path
            if not dest.exists():
                failures.append(f"{rel(path)}: {target}: no such file")
            elif anchor and dest.suffix == ".md" and anchor not in slugs(dest):
                failures.append(f"{rel(path)}: {target}: no heading #{anchor}")
    assert not failures, "\n".join(failures)


def test_readme_is_a_front_door():
    """Under 200 lines, one link away from every page of the manual, and its test command is
    the one CI runs."""
    readme = ROOT / "README.md"
    assert len(readme.read_text().splitlines()) < 200
    linked = {(readme.parent / t.partition("#")[0]).resolve() for t in links_of(readme)}
    missing = [rel(p) for p in doc_files() if p != readme and p.resolve() not in linked]
    assert not missing, f"README.md does not link: {missing}"
    ci = (ROOT / ".ci" / "run").read_text().strip().splitlines()
    test_command = ci[-1]
    blocks, _ = split_doc(readme.read_text())
    setup = blocks[0][1].splitlines()
    assert test_command in setup, (test_command, setup)
    # CI installs what the README's first command installs.
    for step in ("-e '.[all,serve]'", "--no-deps nvidia-pytriton==0.7.0"):
        assert step in setup[0] and step in "\n".join(ci), step
