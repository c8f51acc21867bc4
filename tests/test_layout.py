"""The architecture, checked from the code's own imports: no import cycle in proxy/, and each
role imports only the roles below it (docs/design.md draws the same picture)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.procs import REPO

PROXY = REPO / "proxy"
# What each role may import of proxy/ (besides itself): the floors of docs/design.md.
ALLOWED = {
    "proxy.chain": set(),
    "proxy.interception": {"proxy.config"},
    "proxy.operations": {"proxy.config"},
    "proxy.sessions": {"proxy.chain", "proxy.config", "proxy.operations"},
    "proxy.net": {"proxy.chain", "proxy.config", "proxy.sessions", "proxy.interception", "proxy.operations"},
}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(path): path for path in PROXY.rglob("*.py")}


def imports_of(path: Path, known: dict[str, Path]) -> set[str]:
    """Every proxy module `path` imports, wherever the import stands (TYPE_CHECKING blocks and
    function bodies too: a cycle hidden from the interpreter is still a knot for a reader)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("proxy"))
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("proxy"):
            for alias in node.names:
                submodule = f"{node.module}.{alias.name}"
                found.add(submodule if submodule in known else node.module)
    return found & set(known)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports_of(path, known) - {name} for name, path in known.items()}


def test_no_import_cycle_in_proxy() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(name: str, path: list[str]) -> None:
        state[name] = "visiting"
        for imported in sorted(edges[name]):
            if state.get(imported) == "visiting":
                cycle = path[path.index(imported):] + [imported]
                pytest.fail("import cycle: " + " -> ".join(cycle))
            if imported not in state:
                visit(imported, [*path, imported])
        state[name] = "done"

    for name in sorted(edges):
        if name not in state:
            visit(name, [name])


@pytest.mark.parametrize("role", sorted(ALLOWED))
def test_each_role_imports_only_the_roles_below_it(role: str) -> None:
    edges = graph()
    for name, imported in edges.items():
        if name != role and not name.startswith(role + "."):
            continue
        for target in imported:
            if target == role or target.startswith(role + "."):
                continue
            assert any(target == allowed or target.startswith(allowed + ".") for allowed in ALLOWED[role]), \
                f"{name} imports {target}: {role} may import only {sorted(ALLOWED[role]) or 'nothing of proxy/'}"
