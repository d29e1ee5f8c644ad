"""The package's shape: modules and lines per part, the longest functions, the import graph.

``python scripts/package_map.py`` prints it; ``tests/test_project.py`` holds the package to
its rules with the same functions: the core (the modules at the top of ``dino_nb/``) never
imports a subpackage, and no import cycle exists, counting imports inside functions.
Lines are counted as ``wc -l`` counts them, docstrings included.
"""

from __future__ import annotations

import ast
import sys
from collections import defaultdict
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "dino_nb"
#: Modules kept only so that ``python -m dino_nb.<name>`` still works: a few lines each.
ENTRY_SHIMS = ("data", "embed", "evaluate", "train")


def module_name(path: Path) -> str:
    """``dino_nb/fast/crops.py`` -> ``dino_nb.fast.crops`` (``__init__`` -> the package)."""
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def part_of(module: str) -> str:
    """``core``, ``shim``, ``init`` or the subpackage's name."""
    parts = module.split(".")
    if len(parts) == 1:
        return "init"
    if len(parts) == 2 and not (PACKAGE / parts[1]).is_dir():
        return "shim" if parts[1] in ENTRY_SHIMS else "core"
    return parts[1]


def modules() -> dict[str, Path]:
    """Every module of the package by dotted name."""
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports(path: Path, name: str, known: set[str]) -> set[str]:
    """Package modules that ``path`` imports anywhere (also inside functions)."""
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            named = {f"{target}.{a.name}" for a in node.names} & known
            found |= named or ({target} & known)  # ``from . import checkpoint`` names a module
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name in known}
    return found - {name}


def graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports."""
    mods = modules()
    return {name: imports(path, name, set(mods)) for name, path in mods.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Every strongly connected group of more than one module (Tarjan's algorithm)."""
    index, low, stack, on, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                on.discard(w)
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                out.append(sorted(group))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return out


def upward_imports(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    """Imports from a core module into a subpackage (the core must not need them)."""
    return sorted(
        (a, b)
        for a, targets in edges.items()
        for b in targets
        if part_of(a) == "core" and part_of(b) not in ("core", "init")
    )


def functions(path: Path) -> list[tuple[int, str]]:
    """(lines, name) of every function and method in a module."""
    tree = ast.parse(path.read_text())
    return [
        (n.end_lineno - n.lineno + 1, n.name)
        for n in ast.walk(tree)
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)
    ]


def report() -> str:
    """The table this script prints."""
    mods = modules()
    by_part: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for name, path in mods.items():
        by_part[part_of(name)].append((name, len(path.read_text().splitlines())))
    lines = []
    for part in ("core", "notebook", "fast", "tools", "shim", "init"):
        rows = by_part.get(part, [])
        total = sum(n for _, n in rows)
        lines.append(f"{part}: {len(rows)} modules, {total} lines")
        lines += [f"    {n:5d}  {name}" for name, n in sorted(rows, key=lambda r: -r[1])]
    longest = sorted(
        ((n, f"{name}.{fn}", part_of(name)) for name, p in mods.items() for n, fn in functions(p)),
        reverse=True,
    )
    lines.append("longest functions:")
    lines += [f"    {n:4d}  {where} ({part})" for n, where, part in longest[:8]]
    edges = graph()
    lines.append(f"import cycles: {cycles(edges) or 'none'}")
    lines.append(f"core -> subpackage imports: {upward_imports(edges) or 'none'}")
    lines.append("imports (module -> package modules it imports):")
    lines += [
        f"    {a} -> {', '.join(sorted(b))}"
        for a, b in sorted(edges.items())
        if b and a != "dino_nb"
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
    sys.exit(0)
