"""The house as text: each module of the project's packages and CLIs, its lines, and the project modules it
imports (at any depth in the file: lazy imports count). Before/after a restructuring, on any checkout:

    python -m tests.house [ROOT]        # ROOT: a checkout (default: this one)

The last lines name every import cycle and every module over 400 lines (tests/test_repo.py enforces the rules).
"""
from __future__ import annotations

import ast
import sys
from pathlib import Path

PACKAGES = ("jaxgpt", "formats", "torchref", "parity", "benchmarks", "scripts")


def modules(root: Path) -> dict[str, Path]:
    found = {}
    for d in PACKAGES:
        for p in sorted((root / d).rglob("*.py")):
            found[".".join(p.relative_to(root).with_suffix("").parts).removesuffix(".__init__")] = p
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The project modules `path` imports (`from pkg import mod` counts as pkg.mod when that is a module)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else []
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module for a in node.names]
        out.update(n for n in names if n in known)
    return out


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected groups of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            group = []
            while True:
                w = stack.pop()
                group.append(w)
                if w == v:
                    break
            if len(group) > 1:
                found.append(sorted(group))
    for v in graph:
        if v not in index:
            visit(v)
    return found


def main(root: Path) -> None:
    known = modules(root)
    graph = {m: imports(p, known) - {m} for m, p in known.items()}
    for m, p in known.items():
        print(f"{m} ({len(p.read_text().splitlines())} lines) -> {', '.join(sorted(graph[m])) or '-'}")
    big = [m for m, p in known.items() if len(p.read_text().splitlines()) > 400]
    print(f"{len(known)} modules, {sum(len(v) for v in graph.values())} imports; cycles: "
          f"{'; '.join(' <-> '.join(c) for c in cycles(graph)) or 'none'}; over 400 lines: {', '.join(big) or 'none'}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[1])
