"""Layers point down (docs/architecture.md): every import of every module, at module level and inside functions,
read with ast.

    .venv/bin/python -m pytest tests/test_layers.py -q
"""
from __future__ import annotations

import ast
import fnmatch
import sys
from pathlib import Path

import pytest

from flipray import optional

REPO = Path(__file__).resolve().parents[1]
# Higher layers may import lower ones, never the reverse; bench/ measures everything, cluster/'s local services included.
LAYERS = {"flipray": 0, "dali_pipelines": 1, "jobs": 2, "tuning": 3, "cluster": 4, "bench": 5}
OPTIONAL = tuple(optional.EXTRAS)  # imported only through flipray.optional.require, inside functions


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """(imported module, line, at module level?) for every import statement and require("...") call in `path`."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found = []

    def visit(node, in_function: bool):
        for child in ast.iter_child_nodes(node):
            inner = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                found.extend((a.name, child.lineno, not in_function) for a in child.names)
            elif isinstance(child, ast.ImportFrom) and child.level == 0 and child.module:
                found.append((child.module, child.lineno, not in_function))
            elif (isinstance(child, ast.Call) and getattr(child.func, "id", getattr(child.func, "attr", None)) ==
                  "require" and child.args and isinstance(child.args[0], ast.Constant)):
                found.append((f"require:{child.args[0].value}", child.lineno, not in_function))
            visit(child, inner)

    visit(tree, False)
    return found


def modules(package: str) -> list[Path]:
    return sorted(p for p in (REPO / package).rglob("*.py") if "__pycache__" not in p.parts)


def top(name: str) -> str:
    return name.removeprefix("require:").split(".")[0]


@pytest.mark.parametrize("package", sorted(LAYERS))
def test_layers_point_down(package):
    bad = [f"{p.relative_to(REPO)}:{line} imports {name} ({top(name)}/ is not below {package}/)"
           for p in modules(package) for name, line, _ in imports(p)
           if top(name) in LAYERS and top(name) != package and LAYERS[top(name)] >= LAYERS[package]]
    assert not bad, "upward or sideways imports:\n" + "\n".join(bad)


def test_library_imports_optional_dependencies_only_inside_functions():
    bad = []
    for p in modules("flipray"):
        for name, line, module_level in imports(p):
            where = f"{p.relative_to(REPO)}:{line}"
            if name.startswith("require:") and module_level:
                bad.append(f"{where}: {name} at module level (inside the function that needs it)")
            elif not name.startswith("require:") and optional.extra_for(name):
                bad.append(f"{where}: import {name} (use flipray.optional.require({name!r}) inside a function)")
    assert not bad, "\n".join(bad)


def test_the_walk_sees_function_level_and_upward_imports(tmp_path):
    """The checker itself: an import hidden in a function, and a module-level require, are both found."""
    src = tmp_path / "m.py"
    src.write_text("import os\nfrom flipray.optional import require\nX = require('mlflow')\n"
                   "def f():\n    from jobs.report import main\n    ray = require('ray')\n")
    assert imports(src) == [("os", 1, True), ("flipray.optional", 2, True), ("require:mlflow", 3, True),
                            ("jobs.report", 5, False), ("require:ray", 6, False)]


def test_a_missing_optional_dependency_names_its_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'flipray\[mlflow\]'"):
        optional.require("mlflow")
    for name in [m for m in sys.modules if m.startswith("nvidia.dali.")]:  # submodules an earlier test imported
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "nvidia.dali", None)
    with pytest.raises(ImportError, match=r"flipray\[dali\]"):
        optional.require("nvidia.dali.fn")
    assert optional.require("json").dumps([1]) == "[1]"  # not optional: imported as it is


def test_readme_and_architecture_describe_the_tree():
    """The README's layout table names every top-level folder and every flipray/ subpackage and module; the
    architecture picture names every layer and subpackage."""
    readme = (REPO / "README.md").read_text()
    table = readme[readme.index("| folder | what it holds |"):readme.index("## The synthetic scenes")]
    arch = (REPO / "docs" / "architecture.md").read_text()
    ignored = [g.strip().rstrip("/") for g in (REPO / ".gitignore").read_text().splitlines() if g.strip()]
    folders = {p.name for p in REPO.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))
               and not any(fnmatch.fnmatch(p.name, g) for g in ignored)}  # build outputs (egg-info, data, runs)
    assert {f for f in folders if f"`{f}/`" not in table} == set()
    subpackages = {p.name for p in (REPO / "flipray").iterdir() if (p / "__init__.py").exists()}
    assert {s for s in subpackages if f"`{s}/`" not in table or f"{s}/" not in arch} == set()
    for path in (REPO / "flipray").rglob("*.py"):
        if path.name != "__init__.py":
            assert path.stem in table, f"README layout table does not mention {path.relative_to(REPO)}"
    assert all(f"{layer}/" in arch for layer in LAYERS)
    assert readme.splitlines()[1:3] == [
        "make demo    # fresh machine: installs, synthesizes scenes -> S3 -> Ray Train (2 workers) -> MLflow -> "
        "downstream tables",
        "make test    # fresh machine: installs, then runs the test suite"]
