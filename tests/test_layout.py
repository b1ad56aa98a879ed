"""The layout's rules, read from the source (``ast``, nothing imported), so a break names its line.

Imports run one way (docs/architecture.md): ``routing`` never imports ``tasks``, ``config``,
``gpu_worker`` or ``torch``, and imports ``celery`` only in ``routing/contrib/``; ``gpu_worker``
never imports ``tasks``, ``config`` or ``celery``. An import inside a function or under
``TYPE_CHECKING`` counts like any other. Celery task modules only wire, so they stay short; no
module grows past what one reader holds; Lua lives in ``routing/lua/``, never in a Python string.
That importing ``routing.client`` loads no service code is checked in a fresh interpreter by
``tests/test_client.py``.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("routing", "tasks", "config", "gpu_worker")
NOT_PROJECT = {"tests", "examples", "benchmarks"}
TASK_MODULE_MAX_LINES = 80
MODULE_MAX_LINES = 500
IMPORT_CALLS = {"import_module", "__import__"}


def python_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*.py") if "__pycache__" not in p.parts)


def project_files() -> list[Path]:
    """Every module of the project: the packages and any top-level script, tests and the
    example and benchmark programs aside."""
    found = list(ROOT.glob("*.py"))
    for child in sorted(ROOT.iterdir()):
        if child.name not in NOT_PROJECT and (child / "__init__.py").is_file():
            found.extend(python_files(child))
    return sorted(found)


def rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, top-level module) for every absolute import in the file, at any depth, including
    ``importlib.import_module("name")`` and ``__import__("name")`` with a literal name."""
    tree = ast.parse(path.read_text(), filename=str(path))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                yield node.lineno, node.module.split(".")[0]
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
            first = node.args[0]
            if (
                name in IMPORT_CALLS
                and isinstance(first, ast.Constant)
                and isinstance(first.value, str)
            ):
                yield node.lineno, first.value.split(".")[0]


def offending(files: list[Path], forbidden: set[str]) -> list[str]:
    return [
        f"{rel(path)}:{line} imports {module}"
        for path in files
        for line, module in imports(path)
        if module in forbidden
    ]


def line_count(path: Path) -> int:
    return len(path.read_text().splitlines())


# -- the rule reader itself ------------------------------------------------------------------


def test_the_reader_sees_every_kind_of_import(tmp_path: Path) -> None:
    sample = tmp_path / "sample.py"
    sample.write_text(
        "import os.path\n"
        "from typing import TYPE_CHECKING\n"
        "from . import sibling\n"
        "if TYPE_CHECKING:\n"
        "    from celery import Celery\n"
        "def f():\n"
        "    import torch.nn\n"
        "    class C:\n"
        "        from config.settings import get_settings\n"
        "    return importlib.import_module('tasks.batch'), __import__('gpu_worker')\n"
    )
    assert sorted(imports(sample)) == [
        (1, "os"),
        (2, "typing"),
        (5, "celery"),
        (7, "torch"),
        (9, "config"),
        (10, "gpu_worker"),
        (10, "tasks"),
    ]


def test_the_project_is_found() -> None:
    names = {rel(p) for p in project_files()}
    assert {"routing/client.py", "tasks/runtime.py", "config/settings.py"} <= names
    assert "gpu_worker/engine.py" in names
    assert not any(n.split("/")[0] in NOT_PROJECT for n in names)


# -- imports run one way ---------------------------------------------------------------------


def test_routing_imports_no_service_code_and_no_torch() -> None:
    found = offending(python_files(ROOT / "routing"), {"tasks", "config", "gpu_worker", "torch"})
    assert not found, "\n".join(found)


def test_routing_imports_celery_only_in_contrib() -> None:
    contrib = ROOT / "routing" / "contrib"
    files = [p for p in python_files(ROOT / "routing") if contrib not in p.parents]
    found = offending(files, {"celery"})
    assert not found, "\n".join(found)


def test_gpu_worker_needs_no_celery_and_no_service_code() -> None:
    found = offending(python_files(ROOT / "gpu_worker"), {"tasks", "config", "celery"})
    assert not found, "\n".join(found)


# -- sizes -----------------------------------------------------------------------------------


def task_modules() -> list[Path]:
    return sorted(
        p for p in (ROOT / "tasks").glob("*.py") if p.name not in ("runtime.py", "__init__.py")
    )


@pytest.mark.parametrize("path", task_modules(), ids=rel)
def test_a_task_module_only_wires(path: Path) -> None:
    lines = line_count(path)
    assert lines <= TASK_MODULE_MAX_LINES, (
        f"{rel(path)} has {lines} lines; a Celery task module loads state, calls an engine "
        f"step and schedules what comes next, in at most {TASK_MODULE_MAX_LINES}"
    )


def test_no_module_is_over_the_limit() -> None:
    long = [
        f"{rel(p)}: {n} lines" for p in project_files() if (n := line_count(p)) > MODULE_MAX_LINES
    ]
    assert not long, f"over {MODULE_MAX_LINES} lines:\n" + "\n".join(long)


# -- Lua lives in routing/lua/ ---------------------------------------------------------------


def test_no_inline_lua() -> None:
    found = [
        f"{rel(p)}:{number}"
        for package in PACKAGES
        for p in python_files(ROOT / package)
        for number, line in enumerate(p.read_text().splitlines(), 1)
        if "redis.call" in line or "redis.pcall" in line
    ]
    assert not found, "Lua belongs in routing/lua/*.lua:\n" + "\n".join(found)
