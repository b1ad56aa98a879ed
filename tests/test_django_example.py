"""The Django example's own test suite (``python manage.py test``), run as its users run it.

It starts its own embedded Redis, sandbox, service worker, beat and the project's Celery worker
(see ``examples/django_app/docs/tests.py``), so it shares nothing with this suite's Redis; the
test database is a file under ``tmp_path``.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "django_app"


def example_env(tmp_path: Path) -> dict[str, str]:
    """This process's environment without the settings this suite set for its own stack."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("MIXBATCH_") and k not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH")
    }
    env["DOCS_TEST_DATABASE"] = str(tmp_path / "test_db.sqlite3")
    return env


def run_example(
    example: Path, tmp_path: Path, argv: list[str], passed: str = " passed", failed: str = "failed"
) -> None:
    """Run an example's own test suite in its own directory, as its users run it."""
    proc = subprocess.run(
        argv,
        cwd=example,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert passed in output and failed not in output, output[-6000:]


def run_example_pytest(example: Path, tmp_path: Path) -> None:
    """An example whose suite is pytest, with the example's own ``pytest.ini``."""
    argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider"]
    run_example(example, tmp_path, [*argv, "--basetemp", str(tmp_path / "t")])


@pytest.mark.timeout(240)
def test_django_example_suite_passes(tmp_path: Path) -> None:
    argv = [sys.executable, "manage.py", "test", "--noinput", "-v", "2"]
    run_example(EXAMPLE, tmp_path, argv, passed="OK", failed="FAILED")
