"""The package's layout holds (../shared/LAYOUT.md, README "What is where"): no import circles between its
packages, and no floor imports one above it. Imports are read from the source (ast), lazy ones inside functions
included, so a circle cannot hide behind a deferred import."""

from __future__ import annotations

import ast
from pathlib import Path

import kvmart

PACKAGE_DIR = Path(kvmart.__file__).parent

# Floors, top to bottom: a room may import rooms on its own floor or below, never above. A room is a subpackage, or
# a module named here on its own (root modules such as config and errors, and the server's settings and metrics).
FLOORS: list[tuple[str, ...]] = [
    ("kvmart.cli",),
    ("kvmart.app",),  # composes the API and the web page
    ("kvmart.web", "kvmart.mcp"),  # faces: a person's page, an agent's MCP tools (a client of the HTTP API)
    ("kvmart.server.app",),  # the API app: routers, error handlers, middleware
    ("kvmart.server.api",),
    ("kvmart.server",),  # the server's root: auth, body parsing, HTTP errors, limits
    ("kvmart.server.pipeline",),
    ("kvmart.engines",),
    ("kvmart.reuse", "kvmart.economics"),
    ("kvmart.store",),
    ("kvmart.format",),
    ("kvmart.runtime",),
    ("kvmart.ledger", "kvmart.cluster"),
    ("kvmart.config", "kvmart.server.config", "kvmart.server.metrics"),  # settings and counters: leaves
    ("kvmart.codec",),
    ("kvmart.errors", "kvmart"),
]


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def package_of(module: str) -> str:
    """The room a module lives in: its subpackage (kvmart.server.api...), or itself for a root module."""
    known = sorted((p for floor in FLOORS for p in floor), key=len, reverse=True)
    return next(p for p in known if module == p or module.startswith(p + "."))


def imports_of(path: Path) -> set[str]:
    """Every kvmart module `path` imports, at any depth (TYPE_CHECKING-only imports excluded: they never run)."""
    tree = ast.parse(path.read_text())
    skipped = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
               for n in ast.walk(node)}
    found: set[str] = set()
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("kvmart")}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kvmart"):
            assert node.level == 0, f"{path}: relative import (kvmart imports absolutely)"
            found |= {f"{node.module}.{a.name}" if is_module(f"{node.module}.{a.name}") else node.module
                      for a in node.names}
    return found


def is_module(dotted: str) -> bool:
    base = PACKAGE_DIR.parent / dotted.replace(".", "/")
    return base.with_suffix(".py").exists() or (base / "__init__.py").exists()


def package_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for path in PACKAGE_DIR.rglob("*.py"):
        source = package_of(module_name(path))
        targets = {package_of(m) for m in imports_of(path)} - {source}
        graph.setdefault(source, set()).update(targets)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
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


def floor_of(package: str) -> int:
    return next(i for i, floor in enumerate(FLOORS) if package in floor)


def test_no_import_circles_between_packages():
    cycle = find_cycle(package_graph())
    assert cycle is None, "import circle: " + " -> ".join(cycle)


def test_no_package_imports_a_floor_above_it():
    upward = sorted(f"{src} imports {dst}" for src, dsts in package_graph().items() for dst in dsts
                    if floor_of(dst) < floor_of(src))
    assert not upward, "imports upward:\n" + "\n".join(upward)


def test_the_checker_finds_a_circle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
