"""README.md runs as written: every ```python, ```bash and ```sh block is executed in a fresh
directory, and its usage block names every command and flag the parser has.

Two kinds of command are checked, not run, by stand-ins on PATH: `pip install -e .[extras]`
(the package is installed in the environment running this test; the stand-in checks the extras
exist in pyproject.toml) and `python -m pytest` (the suite is the one running this test). Blocks
that quantize EfficientNet-Lite0 take minutes on two cores and are marked slow; the fast tier also
checks every block statically: Python names defined before use, `ptq` command lines accepted by
the parser.
"""
from __future__ import annotations

import ast
import builtins
import os
import re
import shlex
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from ptq.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
BLOCK = re.compile(r"^```(python|bash|sh)\n(.*?)^```", re.S | re.M)
BLOCKS = [(m.group(1), m.group(2), README[:m.start()].count("\n") + 1) for m in BLOCK.finditer(README)]

PIP = """#!{python}
import re, sys, tomllib
extras = set(tomllib.load(open({pyproject!r}, "rb"))["project"]["optional-dependencies"])
m = re.fullmatch(r"\\.(?:\\[([a-z,]+)\\])?", sys.argv[3]) if sys.argv[1:3] == ["install", "-e"] and len(sys.argv) == 4 else None
if m is None or not set(filter(None, (m.group(1) or "").split(","))) <= extras:
    sys.exit(f"README stand-in for pip: expected `pip install -e .[extras]` with extras from {{sorted(extras)}}, got {{sys.argv[1:]}}")
"""
PYTHON = """#!/bin/sh
if [ "$1" = "-m" ] && [ "$2" = "pytest" ]; then exit 0; fi
exec {python} "$@"
"""
PTQ = """#!/bin/sh
exec {python} -m ptq "$@"
"""


def slow(code: str) -> bool:
    return "efficientnet_lite0" in code


def block_params() -> list:
    return [pytest.param(lang, code, id=f"line{line}-{lang}", marks=[pytest.mark.slow] if slow(code) else [])
            for lang, code, line in BLOCKS]


@pytest.fixture
def sandbox(tmp_path: Path) -> tuple[Path, dict]:
    """A fresh working directory and an environment with the stand-ins first on PATH."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name, text in (("pip", PIP), ("python", PYTHON), ("ptq", PTQ)):
        (bin_dir / name).write_text(text.format(python=sys.executable, pyproject=str(ROOT / "pyproject.toml")))
        (bin_dir / name).chmod(0o755)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "PTQ_NO_PROGRESS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    return work, env


def test_the_readme_has_the_blocks_this_test_runs():
    langs = [lang for lang, _, _ in BLOCKS]
    assert langs.count("python") >= 1 and langs.count("bash") >= 2, langs


@pytest.mark.parametrize("lang, code", block_params())
def test_readme_block_runs_as_written(sandbox, lang, code):
    work, env = sandbox
    argv = [sys.executable, "-c", code] if lang == "python" else ["bash", "-euo", "pipefail", "-c", code]
    p = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=3600)
    assert p.returncode == 0, p.stderr[-3000:]


@pytest.mark.parametrize("code", [pytest.param(code, id=f"line{line}") for lang, code, line in BLOCKS if lang == "python"])
def test_readme_python_uses_no_name_before_defining_it(code):
    """Each name a block reads is a builtin or bound earlier in the block (an import, an assignment)."""
    bound, unbound = set(dir(builtins)), []
    for node in sorted(ast.walk(ast.parse(code)), key=lambda n: (getattr(n, "lineno", 0), getattr(n, "col_offset", 0))):
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
            bound.add(node.id)
        elif isinstance(node, ast.Name) and node.id not in bound:
            unbound.append(f"{node.id} (line {node.lineno})")
    assert not unbound, f"README python block reads undefined names: {unbound}"


def readme_commands() -> list[str]:
    """Every `ptq ...` command line of the executable blocks."""
    return [part.strip() for lang, code, _ in BLOCKS if lang != "python" for line in code.splitlines()
            for part in line.split("&&") if part.strip().startswith("ptq ")]


@pytest.mark.parametrize("command", readme_commands())
def test_readme_ptq_command_lines_parse(command):
    build_parser().parse_args(shlex.split(command)[1:])  # argparse exits 2 on a flag or value it does not know


def usage_block() -> str:
    return re.search(r"## Usage\n\n```\n(.*?)```", README, re.S).group(1)


def parser_flags() -> dict[str, set[str]]:
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    return {name: {s for a in p._actions for s in a.option_strings if s.startswith("--") and s != "--help"}
            for name, p in sub.choices.items()}


def test_the_usage_block_names_every_command_and_exactly_its_flags():
    commands = re.split(r"(?=\bptq (?=[a-z]))", usage_block())
    seen: dict[str, set[str]] = {}
    for chunk in commands:
        m = re.match(r"ptq ([a-z]+)", chunk)
        if m:
            seen.setdefault(m.group(1), set()).update(re.findall(r"--[a-z][a-z-]*", chunk))
    assert seen == parser_flags()


def test_the_pip_stand_in_refuses_an_extra_pyproject_lacks(sandbox):
    work, env = sandbox
    ok = subprocess.run(["pip", "install", "-e", ".[test]"], cwd=work, env=env, capture_output=True, text=True)
    bad = subprocess.run(["pip", "install", "-e", ".[nosuch]"], cwd=work, env=env, capture_output=True, text=True)
    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert "test" in extras and ok.returncode == 0 and bad.returncode == 1 and "nosuch" in bad.stderr
