"""The floors stay floors: lib and config <- mm <- drivers <- fs <- tools, and
no import cycle among the package's modules (issue: layers).

Each layer is imported alone in a fresh interpreter, and what it pulled in
is checked; the cycle check reads every module's imports (all of them but
those under ``if TYPE_CHECKING:``, which never run) and looks for a loop.
"""
from __future__ import annotations

import ast
import json
import os
import subprocess
import sys

import pytest

import cdmfs

PACKAGE = os.path.dirname(cdmfs.__file__)

# What each layer may import from the package, besides itself.
BELOW = {
    "lib": set(),
    "config": {"lib"},
    "mm": {"lib", "config", "_core"},
    "drivers": {"lib", "config", "_core", "mm"},
    "fs": {"lib", "config", "_core", "mm", "drivers"},
    "client": {"lib"},
    "tools": {"lib", "config", "_core", "mm", "drivers", "fs", "client"},
}


def layer_of(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def modules_in(layer: str) -> list[str]:
    """Every module of a layer (a subpackage, or a top-level module)."""
    path = os.path.join(PACKAGE, layer)
    if not os.path.isdir(path):
        return [f"cdmfs.{layer}"]
    out = []
    for folder, _, files in os.walk(path):
        rel = os.path.relpath(folder, PACKAGE).replace(os.sep, ".")
        for f in files:
            if f.endswith(".py"):
                name = f"cdmfs.{rel}" if f == "__init__.py" else f"cdmfs.{rel}.{f[:-3]}"
                out.append(name)
    return sorted(out)


def loaded_by(mods: list[str]) -> set[str]:
    """The package's modules in sys.modules after importing mods in a fresh interpreter."""
    code = ("import importlib, json, sys\n"
            f"for m in {mods!r}: importlib.import_module(m)\n"
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('cdmfs.'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return set(json.loads(out.stdout))


@pytest.mark.parametrize("layer", sorted(BELOW))
def test_a_layer_imports_only_the_layers_below(layer):
    # ``import cdmfs`` itself loads the public client; what a layer adds is its own.
    pulled = {layer_of(m) for m in loaded_by(modules_in(layer)) - loaded_by(["cdmfs"])} - {layer, ""}
    assert pulled <= BELOW[layer], f"{layer} pulled in {sorted(pulled - BELOW[layer])}"


def test_every_import_goes_down():
    for m in sorted(ALL - {"cdmfs"}):
        for n in GRAPH[m]:
            if layer_of(n) != layer_of(m):
                assert layer_of(n) in BELOW[layer_of(m)], f"{m} imports {n}"


def runtime_imports(path: str, module: str) -> set[str]:
    """The package modules a module imports when it runs (anywhere in it, but
    not under ``if TYPE_CHECKING:``)."""
    tree = ast.parse(open(path).read())
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    skip = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip.update(id(n) for n in ast.walk(node))
    out = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rsplit(".", 1)[0]
            target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
            if not target.startswith("cdmfs"):
                continue
            for alias in node.names:      # ``from . import x`` names a module
                out.add(f"{target}.{alias.name}" if f"{target}.{alias.name}" in ALL else target)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.startswith("cdmfs"))
    return {m for m in out if m in ALL}


ALL = {m for layer in BELOW for m in modules_in(layer)} | {"cdmfs"}


def import_graph() -> dict[str, set[str]]:
    graph = {}
    for m in ALL:
        rel = m.split(".")[1:]
        path = os.path.join(PACKAGE, *rel)
        path = os.path.join(path, "__init__.py") if os.path.isdir(path) else path + ".py"
        if os.path.exists(path):
            graph[m] = runtime_imports(path, m)
    return graph


GRAPH = import_graph()


def test_no_import_cycle():
    graph = GRAPH
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(graph.get(m, ())):
            if state.get(n) == 1:       # a way back to a module still being visited
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)
    assert len(graph) > 25      # every module was read
