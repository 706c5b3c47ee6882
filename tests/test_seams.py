"""Each third-party framework behind one module: DeepSpeed behind ``pretrain/engine.py``, MLflow behind
``pretrain/tracking.py``.

Read from the source with ``ast`` (nothing is imported or started): every ``import`` / ``from ... import``
statement, at any depth (the lazy imports inside functions included), and every ``importlib.import_module``
/ ``__import__`` / ``find_spec`` call naming the package, in every module of the product packages.
"""
from __future__ import annotations

import ast
import pathlib

REPO = pathlib.Path(__file__).resolve().parent.parent
PACKAGES = ("pretrain", "data_pipeline", "launch")
SEAMS = {"deepspeed": "pretrain/engine.py", "mlflow": "pretrain/tracking.py"}
"""Each framework and the one module allowed to import it."""
IMPORT_CALLS = {"import_module", "__import__", "find_spec"}


def imported_packages(tree: ast.AST) -> set:
    """Top-level package names a module imports (statements and import calls with a literal name)."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            func = node.func
            called = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            if called in IMPORT_CALLS and isinstance(node.args[0].value, str):
                names.add(node.args[0].value.split(".")[0])
    return names


def importers(package: str) -> set:
    """The product modules (paths from the repository root) that import ``package``."""
    found = set()
    for top in PACKAGES:
        for path in sorted((REPO / top).rglob("*.py")):
            if package in imported_packages(ast.parse(path.read_text(), filename=str(path))):
                found.add(path.relative_to(REPO).as_posix())
    return found


def test_the_scan_sees_lazy_imports_and_import_calls():
    source = ("def f():\n    from deepspeed.utils import x\n"
              "def g():\n    import importlib\n    importlib.import_module('mlflow.tracking')\n")
    assert {"deepspeed", "mlflow"} <= imported_packages(ast.parse(source))


def test_deepspeed_is_imported_only_by_the_engine():
    assert importers("deepspeed") == {SEAMS["deepspeed"]}


def test_mlflow_is_imported_only_by_the_tracking_module():
    assert importers("mlflow") == {SEAMS["mlflow"]}
