"""The import rule of ARCHITECTURE.md: loom's layers import downward only, and no module imports
itself back through others. Every import counts, also those inside functions (a dependency all
the same). Run as a script, it prints the layer of each package and any arrow against the rule:
    python tests/test_architecture.py
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "loom"

# Top to bottom. A module may import its own layer and the layers below it.
LAYERS = [
    ("entry", ["loom.cli", "loom.__main__"]),
    ("commands", ["loom.launch", "loom.convert", "loom.peft", "loom.bench"]),
    ("run", ["loom.train", "loom.config"]),
    ("layout, data and planning", ["loom.parallel", "loom.data", "loom.plan"]),
    ("metrics", ["loom.metrics"]),
    ("models", ["loom.models"]),
    ("kernels", ["loom.kernels"]),
    ("files and settings", ["loom.files", "loom.settings", "loom.locks", "loom"]),
]
# torch.distributed's process-group API and its parallelisms (DeviceMesh, DTensor, FSDP,
# pipelining) are used in loom.parallel only; elsewhere just these packages of it.
DISTRIBUTED_OUTSIDE_PARALLEL = ("torch.distributed.checkpoint", "torch.distributed.run", "torch.distributed.elastic")


def modules() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imported_names(name: str, path: Path) -> list[str]:
    """Every module name an import statement of the file names (absolute, relative resolved)."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}".rstrip(".")
            found += [base] + [f"{base}.{a.name}" for a in node.names]
    return found


def import_graph() -> dict[str, set[str]]:
    """loom module -> the loom modules it imports."""
    mods = modules()

    def owner(target: str) -> str | None:
        while target and target not in mods:
            target = target.rpartition(".")[0]
        return target or None

    graph = {}
    for name, path in mods.items():
        graph[name] = {o for t in imported_names(name, path) if t.startswith("loom")
                       and (o := owner(t)) is not None and o != name}
    return graph


def layer_of(module: str) -> int:
    """Index in LAYERS (0 = top) of the longest package prefix that names module."""
    best, depth = None, -1
    for i, (_, packages) in enumerate(LAYERS):
        for package in packages:
            if (module == package or module.startswith(package + ".")) and package.count(".") > depth:
                best, depth = i, package.count(".")
    if best is None:
        raise AssertionError(f"{module} is in no layer of ARCHITECTURE.md")
    return best


def upward_arrows(graph: dict[str, set[str]]) -> list[str]:
    return sorted(f"{a} ({LAYERS[layer_of(a)][0]}) -> {b} ({LAYERS[layer_of(b)][0]})"
                  for a, targets in graph.items() for b in targets if layer_of(b) < layer_of(a))


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on_stack, found = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    sys.setrecursionlimit(max(sys.getrecursionlimit(), 10 * len(graph)))
    for v in sorted(graph):
        if v not in index:
            visit(v)
    return found


def distributed_outside_parallel() -> list[str]:
    bad = []
    for name, path in modules().items():
        if name.startswith("loom.parallel"):
            continue
        for target in imported_names(name, path):
            if target.startswith("torch.distributed") and not target.startswith(DISTRIBUTED_OUTSIDE_PARALLEL):
                bad.append(f"{name} imports {target}")
    return sorted(set(bad))


def test_imports_run_downward_only():
    assert upward_arrows(import_graph()) == []


def test_no_import_cycles():
    assert cycles(import_graph()) == []


def test_process_groups_live_in_loom_parallel():
    assert distributed_outside_parallel() == []


def test_the_checks_see_a_wrong_arrow_and_a_cycle():
    """The rule's own check fails on what it forbids."""
    graph = {"loom.models.transformer": {"loom.train.trainer"}, "loom.train.trainer": {"loom.models.transformer"}}
    assert upward_arrows(graph) == ["loom.models.transformer (models) -> loom.train.trainer (run)"]
    assert cycles(graph) == [["loom.models.transformer", "loom.train.trainer"]]
    with pytest.raises(AssertionError, match="in no layer"):
        layer_of("elsewhere.module")


if __name__ == "__main__":
    graph = import_graph()
    for i, (label, packages) in enumerate(LAYERS):
        members = sorted(m for m in graph if layer_of(m) == i)
        print(f"{i}. {label}: {', '.join(packages)} ({len(members)} modules)")
    edges = sum(len(t) for t in graph.values())
    print(f"{len(graph)} modules, {edges} import arrows; upward arrows: {upward_arrows(graph) or 'none'}; "
          f"cycles: {cycles(graph) or 'none'}; torch.distributed outside loom.parallel: "
          f"{distributed_outside_parallel() or 'none'}")
