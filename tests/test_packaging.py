"""What the distribution installs: the project's packages by name, and only what runs in them.

The benchmarks are the package ``emprocess_bench`` beside ``emprocess`` (not a generic
top-level ``benchmarks``); a module of ``emprocess/`` that only tests and benchmarks use
belongs there too (as ``emprocess/drift.py`` did, now ``emprocess_bench/reslice.py``).
"""

from __future__ import annotations

import ast
import re
import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PACKAGE = REPO / "emprocess"
# What starts the runtime from outside its modules: the DAG file, the containers'
# gunicorn command lines and the `emprocess` console script (pyproject).
RUNTIME_ROOTS = (
    REPO / "emprocess.py",
    REPO / "fiji_cloudrun" / "Dockerfile",
    REPO / "emwrite_docker" / "Dockerfile",
    REPO / "pyproject.toml",
)
MODULE_PATH = re.compile(r"\bemprocess(?:\.\w+)+")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, bool]]:
    """Every module ``path`` imports (``from a import b`` gives ``a`` and ``a.b``), and
    whether the import runs when the module loads (not inside a function)."""
    tree = ast.parse(path.read_text(), str(path))
    in_function: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(inner) for inner in ast.walk(node) if inner is not node)
    found = []
    for node in ast.walk(tree):
        loads = id(node) not in in_function
        if isinstance(node, ast.Import):
            found += [(alias.name, loads) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.append((node.module, loads))
            found += [(f"{node.module}.{alias.name}", loads) for alias in node.names]
    return found


def test_only_the_projects_own_packages_are_installed() -> None:
    include = PYPROJECT["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = find_packages(str(REPO), include=include)
    assert {p.split(".")[0] for p in packages} == {"emprocess", "emprocess_bench"}, packages
    assert "emprocess.cli" in packages  # the command is a package of its own
    assert PYPROJECT["project"]["scripts"] == {"emprocess": "emprocess.cli:main"}
    assert PYPROJECT["tool"]["mypy"]["packages"] == ["emprocess", "emprocess_bench"]


def test_the_runtime_imports_the_benchmarks_only_in_the_bench_commands() -> None:
    """`emprocess bench` imports a benchmark when it runs; nothing else in emprocess/ does."""
    bench_commands = PACKAGE / "cli" / "bench.py"
    seen = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for name, loads in _imports(path):
            if name.split(".")[0] in ("emprocess_bench", "benchmarks"):
                assert path == bench_commands and not loads, (path, name)
                seen.append(name)
    assert "emprocess_bench.plan" in seen  # the check above looked at the right imports


def test_every_runtime_module_is_used_by_the_runtime() -> None:
    """Each module of emprocess/ is imported by another one or started from outside (the
    DAG file, a container, the console script, a gunicorn setting): none is there for the
    tests or benchmarks alone."""
    modules = {_module_name(p): p for p in PACKAGE.rglob("*.py")}
    used: set[str] = set()
    for path in [*modules.values(), *RUNTIME_ROOTS]:
        text = path.read_text()
        used.update(MODULE_PATH.findall(text))  # also gunicorn's "emprocess.services.x:app"
        if path.suffix == ".py":
            used.update(name for name, _ in _imports(path) if name != _module_name(path))
    unused = sorted(
        name
        for name in modules
        if name.count(".")
        and not name.endswith(".__main__")  # `python -m emprocess.cli` runs it
        and not any(u == name or u.startswith(name + ".") for u in used)
    )
    assert unused == [], f"only tests or benchmarks use {unused}: move them to emprocess_bench"


def test_the_solve_s_scipy_is_declared_where_the_solve_runs() -> None:
    """collect's global solve (kernels/solve.py, scipy) runs in the Airflow worker."""
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert any(req.startswith("scipy") for req in extras["airflow"]), extras["airflow"]
    solve = {name.split(".")[0] for name, _ in _imports(PACKAGE / "kernels" / "solve.py")}
    assert "scipy" in solve
