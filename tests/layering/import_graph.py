"""ember's import graph, read from the source (every ``import``: at module level, inside a function or under
``if TYPE_CHECKING:``), so the layering tests see the imports a module makes late, and those for types, as well."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("graphs", "compiler", "runtime", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(["ember", *parts])


def modules(package: str) -> dict[str, Path]:
    return {module_name(p): p for p in sorted((ROOT / package).rglob("*.py"))}


def imports_of(name: str, path: Path) -> set[str]:
    """The ember modules ``name`` imports (``from x import y`` counts ``x.y`` when that is a module)."""
    tree = ast.parse(path.read_text())
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.Import, ast.ImportFrom)):
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
            continue
        base = package
        for _ in range(max(node.level - 1, 0)):
            base = base.rpartition(".")[0]
        target = (f"{base}.{node.module}" if node.module else base) if node.level else node.module
        found.add(target)
        found.update(f"{target}.{alias.name}" for alias in node.names)
    return {m for m in found if m.startswith("ember.")}


def import_graph(*packages: str) -> dict[str, set[str]]:
    """Module -> the modules of ``packages`` it imports (imports of a package's ``__init__`` included)."""
    table = {name: path for package in packages for name, path in modules(package).items()}

    def with_parents(module: str) -> set[str]:  # importing a.b.c runs a.b's __init__ first
        parts = module.split(".")
        return {".".join(parts[:i]) for i in range(2, len(parts) + 1)}

    graph = {}
    for name, path in table.items():
        targets = set().union(*(with_parents(m) for m in imports_of(name, path))) if imports_of(name, path) else set()
        graph[name] = {m for m in targets if m in table and m != name and not name.startswith(m + ".")}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle (as a path that ends where it starts), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None
