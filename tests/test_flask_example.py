"""The Flask example's own test suite (``pytest`` in ``examples/flask_app``), run as its users
run it, with the example's own ``pytest.ini`` (warnings are errors there too).

It starts its own embedded Redis, sandbox, service worker, beat and the example's Celery worker
(see ``examples/flask_app/tests/conftest.py``), so it shares nothing with this suite's Redis.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_django_example import example_env

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask_app"


@pytest.mark.timeout(240)
def test_flask_example_suite_passes(tmp_path: Path) -> None:
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "--basetemp",
            str(tmp_path / "t"),
        ],
        cwd=EXAMPLE,
        env=example_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=180,
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-6000:]
    assert " passed" in output and "failed" not in output, output[-6000:]
