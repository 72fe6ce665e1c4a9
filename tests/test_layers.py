"""The package's layering (docs/ARCHITECTURE.md), read from the source with `ast`: no import cycle
within ptq, each layer imports only from the layers before it, and the manifest is the only seam
between the methods and the back ends."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
# package directory on disk -> dotted name (the repository's calib/ installs as ptq.calib)
SOURCES = {ROOT / "ptq": "ptq", ROOT / "calib": "ptq.calib"}
# data-flow order; a module may import from its own layer or an earlier one
LAYERS = [
    {"ptq.errors", "ptq.version", "ptq.intmath", "ptq.intnorm", "ptq.determinism", "ptq.memory", "ptq.accbound", "ptq.bitserial", "ptq.metrics"},
    {"ptq.ir"},
    {"ptq.calib"},
    {"ptq.methods"},
    {"ptq.manifest"},
    {"ptq.runtime"},
    {"ptq.export"},
    {"ptq.recipe", "ptq.minilm", "ptq.models", "ptq.biascorrect", "ptq.card", "ptq.api", "ptq.sweep", "ptq.cli", "ptq.__main__", "ptq"},
]


def modules() -> dict[str, Path]:
    out = {}
    for root, pkg in SOURCES.items():
        for p in sorted(root.rglob("*.py")):
            rel = p.relative_to(root).with_suffix("")
            parts = [pkg, *rel.parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = p
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """Every ptq module `name` imports (at any depth of the file, lazy imports included)."""
    is_pkg = path.name == "__init__.py"
    base = name.split(".") if is_pkg else name.split(".")[:-1]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            mod = ".".join(base[:len(base) - node.level + 1] + ([node.module] if node.module else [])) if node.level else node.module
            targets = [f"{mod}.{a.name}" for a in node.names] + [mod]
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            # the root package is the API facade (it eagerly imports only ptq.version); every ptq
            # module has it as a parent, so `from .. import bitserial` is an import of bitserial
            if t and t != name and t != "ptq":
                found.add(t)
    return found


def layer_of(mod: str) -> int:
    for i, layer in enumerate(LAYERS):
        if any(mod == p or mod.startswith(p + ".") for p in layer if p != "ptq") or mod in layer:
            return i
    raise AssertionError(f"module {mod} belongs to no layer: add it to LAYERS and docs/ARCHITECTURE.md")


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(m, p, set(mods)) for m, p in mods.items()}


def test_every_module_has_a_layer():
    for m in modules():
        layer_of(m)


def test_no_import_cycle_within_ptq():
    g = graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(g[m]):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if m not in state:
            visit(m)


def test_each_layer_imports_only_earlier_layers():
    bad = [f"{m} (layer {layer_of(m)}) imports {d} (layer {layer_of(d)})"
           for m, deps in graph().items() for d in deps if layer_of(d) > layer_of(m)]
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("seam", ["ptq.manifest", "ptq.runtime", "ptq.export"])
def test_back_ends_never_import_a_method(seam):
    bad = [f"{m} imports {d}" for m, deps in graph().items() if m == seam or m.startswith(seam + ".")
           for d in deps if d == "ptq.methods" or d.startswith("ptq.methods.")]
    assert not bad, "\n".join(bad)


def test_the_checker_sees_a_cycle_and_an_upward_import(tmp_path):
    """The reader itself works: relative imports resolve, and a back-edge is caught."""
    pkg = tmp_path / "ptq"
    (pkg / "manifest").mkdir(parents=True)
    (pkg / "manifest" / "__init__.py").write_text("from ..methods import base\n")
    known = {"ptq", "ptq.manifest", "ptq.methods", "ptq.methods.base"}
    assert imports("ptq.manifest", pkg / "manifest" / "__init__.py", known) == {"ptq.methods", "ptq.methods.base"}
    assert layer_of("ptq.methods.base") < layer_of("ptq.manifest")
