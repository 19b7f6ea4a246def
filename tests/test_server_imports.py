"""The server's import graph stays acyclic and layered (checked from the source, imports in functions included)."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOP = ("server", "protocol", "scheduler")


def _module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _modules(package: str) -> dict[str, Path]:
    return {_module_name(p): p for p in sorted((ROOT / package).glob("*.py"))}


ALL = {name: path for package in TOP for name, path in _modules(package).items()}


def _imports(path: Path, known: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported module, at module level?) for every import in the file, wherever it sits."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top_level = {id(node) for node in tree.body}
    found: list[tuple[str, bool]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            # `from server import speech` imports the submodule server.speech
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names
                                     if f"{node.module}.{a.name}" in known]
        else:
            continue
        found += [(name, id(node) in top_level) for name in names]
    return found


def _graph(modules: dict[str, Path]) -> dict[str, set[str]]:
    return {name: {dep for dep, _ in _imports(path, ALL) if dep in modules and dep != name}
            for name, path in modules.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen, todo = set(), [start]
    while todo:
        for dep in graph[todo.pop()] - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_cycle_finder_finds_a_cycle() -> None:
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _find_cycle({"a": {"b"}, "b": set()}) is None


def test_server_has_no_import_cycle() -> None:
    assert _find_cycle(_graph(_modules("server"))) is None


def test_protocol_and_scheduler_have_no_import_cycle() -> None:
    assert _find_cycle(_graph(ALL)) is None


def test_server_never_imports_itself_inside_a_function() -> None:
    """Function-level imports are for heavy optional things (torch, boto3), never to dodge a cycle."""
    late = [(name, dep) for name, path in _modules("server").items()
            for dep, top_level in _imports(path, ALL) if not top_level and dep.startswith("server")]
    assert late == []


def test_handlers_depend_on_state_not_on_wiring_or_serving() -> None:
    graph = _graph(_modules("server"))
    outer = {"server.wiring", "server.serving", "server.server_thread", "server.__main__"}
    for handler in ("server.connection", "server.routes", "server.speech", "server.reference_audio",
                    "server.ws", "server.synthesis", "server.context", "server.state", "server.openai_routes",
                    "server.openai_speech"):
        assert not _reachable(graph, handler) & outer, handler


def test_layers_point_down() -> None:
    """protocol is the bottom (torch-free) layer; scheduler may import protocol, never the server."""
    for name, path in ALL.items():
        deps = {dep.split(".")[0] for dep, _ in _imports(path, ALL)}
        if name.startswith("protocol"):
            assert not deps & {"scheduler", "server", "kernels", "frontend"}, name
        if name.startswith("scheduler"):
            assert "server" not in deps, name
