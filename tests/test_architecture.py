"""The package's layering, checked from its source: no import cycles, no private
names imported across modules (Flower's go through the adapter), imports that
point down the layers, and short modules."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "flwr_scaling"
ADAPTER = "flwr_scaling.protocol.flower_adapter"

# Layers, lowest first: a module may import its own layer and the ones below.
# The math knows nothing of Flower or files; the Flower glue (protocol, strategies,
# clients) is given its settings; the run configuration is the vocabulary the server
# and client apps share; running, studies and the command line sit on top.
LAYERS = [
    ("flwr_scaling.errors", "flwr_scaling.core"),
    ("flwr_scaling.data",),
    ("flwr_scaling.protocol",),
    ("flwr_scaling.strategies",),
    ("flwr_scaling.methods",),
    ("flwr_scaling.run.config",),
    ("flwr_scaling.clients",),
    ("flwr_scaling.testing",),
    ("flwr_scaling.server_app", "flwr_scaling.run", "flwr_scaling.deploy"),
    ("flwr_scaling.studies",),
    ("flwr_scaling.cli", "flwr_scaling.__main__", "flwr_scaling"),
]
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    best = None
    for index, prefixes in enumerate(LAYERS):
        for prefix in prefixes:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (index, len(prefix))
    assert best is not None, f"{module} belongs to no layer: add it to LAYERS in {__file__}"
    return best[0]


def imports(module: str) -> list[tuple[str, list[str], bool]]:
    """(imported module, names, at module level) for every import of a package module."""
    tree = ast.parse(MODULES[module].read_text())
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            assert node.level == 0, f"{module}: relative import (the package uses absolute imports)"
            found.append((node.module, [alias.name for alias in node.names], id(node) in top_level))
        elif isinstance(node, ast.Import):
            found.extend((alias.name, [], id(node) in top_level) for alias in node.names)
    return found


def test_every_module_imports_only_its_layer_or_lower():
    wrong = []
    for module in MODULES:
        for target, _, _ in imports(module):
            if target.startswith("flwr_scaling") and target != "flwr_scaling":
                if layer_of(target) > layer_of(module):
                    wrong.append(f"{module} -> {target}")
    assert not wrong, "imports that point up the layers:\n" + "\n".join(wrong)


def test_no_import_cycle_between_modules():
    graph = {module: set() for module in MODULES}
    for module in MODULES:
        for target, names, _ in imports(module):  # deferred imports count too: a cycle is a tangle either way
            for candidate in [f"{target}.{name}" for name in names] + [target]:
                if candidate in MODULES and candidate != module:
                    graph[module].add(candidate)
                    break
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1 and not nxt.startswith(node + ".") and not node.startswith(nxt + "."):
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]) if nxt in path else f"{node} -> {nxt}")
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in MODULES:
        if module not in state:
            visit(module, [module])
    # A package's __init__ importing its own submodules is not a cycle.
    real = [c for c in cycles if not all(part.startswith(c.split(" -> ")[0]) for part in c.split(" -> "))]
    assert not real, "import cycles:\n" + "\n".join(real)


def test_no_private_name_is_imported_across_modules():
    wrong = []
    for module in MODULES:
        for target, names, _ in imports(module):
            private = [name for name in names if name.startswith("_") and not name.startswith("__")]
            if private and module != ADAPTER:
                wrong.append(f"{module}: from {target} import {', '.join(private)}")
            if target.startswith("flwr") and not target.startswith("flwr_scaling") and module != ADAPTER:
                if any(part.startswith("_") for part in target.split(".")):
                    wrong.append(f"{module}: imports Flower's private module {target}")
    assert not wrong, "private names imported across modules:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_modules_are_short_or_say_why(module):
    source = MODULES[module].read_text()
    lines = source.count("\n")
    if lines > MAX_LINES:
        docstring = ast.get_docstring(ast.parse(source)) or ""
        if "long because" not in docstring.lower():
            pytest.fail(f"{module} has {lines} lines (> {MAX_LINES}); split it or say in its docstring why it is long")
