"""The module map holds: no import cycle (lazy imports inside functions count too), model/ knows
nothing of HTTP serving, Redis, RQ or Label Studio, and no module reaches the web app."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("backend", "model")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))}


def _type_checking_block(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def imports_of(path: Path, known: set[str]) -> set[str]:
    """Every project module this file imports, at any depth, except under `if TYPE_CHECKING:`."""
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if _type_checking_block(node):
            return
        names = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        for name in names:
            while name and name not in known:
                name = name.rpartition(".")[0]
            if name and name.split(".")[0] in PACKAGES and name not in PACKAGES:
                found.add(name)
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text()))
    return found


def import_graph() -> dict[str, set[str]]:
    mods = modules()
    return {name: imports_of(path, set(mods)) - {name} for name, path in mods.items()}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (cycle := dfs(nxt)):
                return cycle
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := dfs(node)):
            return cycle
    return None


def test_the_import_graph_has_no_cycle():
    assert find_cycle(import_graph()) is None, " -> ".join(find_cycle(import_graph()))


def test_find_cycle_sees_a_cycle_through_a_lazy_import():
    # the checker itself: the kind of cycle the review found (app -> jobs -> app, lazily)
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    lazy = "def later():\n    from backend.services import Services\n"
    tmp = ROOT / "tests" / "__lazy_probe__.py"
    try:
        tmp.write_text(lazy)
        assert imports_of(tmp, {"backend.services"}) == {"backend.services"}
    finally:
        tmp.unlink()


def test_model_knows_nothing_of_serving_redis_or_label_studio():
    forbidden = ("flask", "gunicorn", "redis", "rq", "label_studio_sdk", "backend")
    for name, path in modules().items():
        if not name.startswith("model"):
            continue
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                targets = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
                bad = [t for t in targets if t.split(".")[0] in forbidden]
                assert not bad, f"{name} imports {bad}"


def test_only_the_web_entry_points_import_the_web_app():
    # services are built by their users (web app, worker, CLI) and passed in: nothing reaches up
    # into the Flask module for them
    graph = import_graph()
    users = sorted(name for name, deps in graph.items() if "backend.web.app" in deps)
    assert users == ["backend.web.server", "backend.web.wsgi"] or users == ["backend.web.wsgi"], users


@pytest.mark.parametrize("name", sorted(n for n in modules() if n != "backend.web.wsgi"))
def test_every_module_imports(name):
    importlib.import_module(name)
