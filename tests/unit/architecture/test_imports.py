"""The import rules ARCHITECTURE.md states, checked on the source: services never import each other
(the launcher excepted), shared imports no service, each shared district imports only the districts
below it, and no module imports itself back through a circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
SERVICES = ("gateway", "worker", "trainer", "dicom")
# What each district of shared/ may import (besides itself), as ARCHITECTURE.md lists it.
SHARED_MAY_IMPORT = {
    "core": set(),
    "db": {"core"},
    "imaging": {"core"},
    "intake": {"core", "imaging"},
    "models": {"core", "db", "imaging", "schemas"},
    "jobs": {"core", "db", "imaging", "intake", "models", "schemas", "auth"},
    "training": {"core", "db", "imaging", "intake", "models", "schemas"},
    "auth": {"core", "db", "schemas"},
    "sessions": {"core", "db", "auth"},
    "schemas": {"core", "db"},
    "backup": {"core", "db"},
    "audit": {"core", "db"},
}


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports_of(path: Path, *, top_level_only: bool) -> set[str]:
    """Modules of ours imported by `path`; top-level only skips imports inside functions (run later,
    they cannot close a circle at import time)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.If):  # `if TYPE_CHECKING:` blocks import nothing at run time
            continue
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names)
    return {name for name in found if name.split(".")[0] in ("shared", "services")}


def sources(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "migrations" not in p.parts)


@pytest.mark.parametrize("service", SERVICES)
def test_a_service_imports_no_other_service(service: str) -> None:
    offending = {
        f"{module_name(path)} -> {name}"
        for path in sources(f"services/{service}")
        for name in imports_of(path, top_level_only=False)
        if name.startswith("services.") and name.split(".")[1] != service
    }
    assert not offending


def test_shared_imports_no_service() -> None:
    offending = {
        f"{module_name(path)} -> {name}"
        for path in sources("shared")
        for name in imports_of(path, top_level_only=False)
        if name.startswith("services")
    }
    assert not offending


def test_each_shared_district_imports_only_the_districts_below_it() -> None:
    offending = set()
    for path in sources("shared"):
        district = module_name(path).split(".")[1] if module_name(path) != "shared" else None
        if district is None:
            continue
        allowed = SHARED_MAY_IMPORT[district] | {district}
        for name in imports_of(path, top_level_only=False):
            target = name.split(".")[1] if name.count(".") >= 1 else None
            if name.startswith("shared.") and target not in allowed:
                offending.add(f"{module_name(path)} -> {name}")
    assert not offending


def test_no_module_imports_itself_back() -> None:
    modules = {module_name(path): path for package in ("shared", "services") for path in sources(package)}
    graph = {
        name: {target for target in imports_of(path, top_level_only=True) if target in modules and target != name}
        for name, path in modules.items()
    }
    circles: list[list[str]] = []
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(graph[node]):
            if state.get(target) == "open":
                circles.append([*trail[trail.index(target) :], target])
            elif target not in state:
                visit(target, [*trail, target])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    assert not circles
