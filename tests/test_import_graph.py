"""The modules of pretrain/, data_pipeline/ and launch/ import one another without a cycle, counting the
imports inside functions too (a deferred import hides a cycle from Python, not from a reader)."""
import ast
import os
from typing import Dict, List, Set

from tests.conftest import REPO

PACKAGES = ("pretrain", "data_pipeline", "launch")


def module_files() -> Dict[str, str]:
    """Every module of the packages by dotted name (a package by its own name), to its file."""
    modules = {}
    for package in PACKAGES:
        for folder, _, files in os.walk(os.path.join(REPO, package)):
            for name in files:
                if name.endswith(".py"):
                    path = os.path.join(folder, name)
                    parts = os.path.relpath(path, REPO)[:-3].split(os.sep)
                    modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return modules


def imported(node: ast.AST, module: str, is_package: bool, modules: Dict[str, str]) -> List[str]:
    """The modules an import statement names: ``from a import b`` is module a.b where that is one, else a
    (the packages above a module that Python runs on the way are not counted: they are not what it asked for)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    elif isinstance(node, ast.ImportFrom):
        base = node.module or ""
        if node.level:
            package = module.split(".") if is_package else module.split(".")[:-1]
            base = ".".join(package[:len(package) - node.level + 1] + ([base] if base else []))
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
    else:
        return []
    found = []
    for name in names:
        while name and name not in modules:  # `import a.b.c` of an attribute path: its module
            name = name.rpartition(".")[0]
        if name and name != module:
            found.append(name)
    return found


def import_graph() -> Dict[str, Set[str]]:
    """module -> the modules of the packages it imports anywhere in its file."""
    modules = module_files()
    graph = {}
    for module, path in modules.items():
        tree = ast.parse(open(path).read(), path)
        is_package = path.endswith("__init__.py")
        graph[module] = {name for node in ast.walk(tree) for name in imported(node, module, is_package, modules)}
    return graph


def cycles(graph: Dict[str, Set[str]]) -> List[List[str]]:
    """One cycle (as a path back to its start) through each node that lies on one, by depth-first search."""
    state, stack, found = {}, [], []

    def visit(node: str) -> None:
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                found.append(stack[stack.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    return found


def test_the_graph_sees_deferred_and_relative_imports():
    graph = import_graph()
    assert "pretrain.objectives" in graph["pretrain.plan"]  # imported at the top
    assert "pretrain.kernels" in graph["pretrain.plan"]  # imported inside build_plan
    assert {"pretrain.objectives.mae", "pretrain.objectives.base"} <= graph["pretrain.objectives"]


def test_there_is_no_import_cycle():
    found = cycles(import_graph())
    assert not found, "import cycles:\n" + "\n".join(" -> ".join(cycle) for cycle in found)
