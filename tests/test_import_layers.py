"""The package's import graph follows the layer order of DESIGN.md: every import in
``monarch_megatron`` (module level or inside a function) goes to the module's own package or to one
below it, and no module imports itself back through others (no cycle, at package or module level).

    monarch <- parallel <- models <- data <- checkpointing <- training <- convert <- launcher/
"""

from __future__ import annotations

import ast
import os

from tiny_demo import ROOT

LAYERS = ("monarch", "parallel", "models", "data", "checkpointing", "training", "convert")
PACKAGE = os.path.join(ROOT, "monarch_megatron")


def _modules() -> dict[str, str]:
    """``{dotted module name: file}`` of every module of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for name in files:
            if name.endswith(".py"):
                rel = os.path.relpath(os.path.join(folder, name), ROOT)[:-3].replace(os.sep, ".")
                out[rel.removesuffix(".__init__")] = os.path.join(folder, name)
    return out


def _imports(module: str, path: str, modules: dict[str, str]) -> set[str]:
    """The package modules ``module`` imports (anywhere in the file), resolved to known modules."""
    package = module if path.endswith("__init__.py") else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(open(path).read(), path)):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[:len(parts) - node.level + 1] + ([base] if base else []))
            names = [f"{base}.{a.name}" for a in node.names] + [base]
        else:
            continue
        for name in names:
            while name and name not in modules:
                name = name.rpartition(".")[0]
            if name.startswith("monarch_megatron.") and name != module:
                found.add(name)
    return found


def _layer(module: str) -> int | None:
    parts = module.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 and parts[1] in LAYERS else None


def test_no_package_imports_one_above_it() -> None:
    modules = _modules()
    assert {m.split(".")[1] for m in modules if m.count(".")} == set(LAYERS)
    upward = []
    for module, path in sorted(modules.items()):
        for target in sorted(_imports(module, path, modules)):
            if _layer(module) is not None and _layer(target) is not None and _layer(target) > _layer(module):
                upward.append(f"{module} imports {target}")
    assert upward == []


def _cycles(graph: dict[str, set[str]]) -> list[str]:
    """Every back edge of a depth-first walk of ``graph``, as the cycle it closes."""
    state: dict[str, int] = {}
    cycles = []

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                path = stack + [node]
                cycles.append(" -> ".join(path[path.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt, stack + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
    return cycles


def test_no_import_cycle() -> None:
    modules = _modules()
    graph = {m: _imports(m, p, modules) for m, p in modules.items()}
    # A package's __init__ re-exporting its own modules is not a cycle of those modules.
    graph = {m: {t for t in ts if not (t == m.rpartition(".")[0] and modules[t].endswith("__init__.py"))}
             for m, ts in graph.items()}
    assert _cycles(graph) == []
    packages: dict[str, set[str]] = {}
    for m, ts in graph.items():
        if m.count("."):
            packages.setdefault(m.split(".")[1], set()).update(t.split(".")[1] for t in ts if t.count("."))
    assert _cycles({p: ts - {p} for p, ts in packages.items()}) == []


def test_convert_is_a_leaf_only_launchers_import() -> None:
    modules = _modules()
    users = {m for m, p in modules.items() if not m.startswith("monarch_megatron.convert")
             and any(t.startswith("monarch_megatron.convert") for t in _imports(m, p, modules))}
    assert users == set()
