"""The Flask example's own test suite (``pytest`` in ``examples/flask_app``), run as its users
run it, with the example's own ``pytest.ini`` (warnings are errors there too).

It starts its own embedded Redis, sandbox, service worker, beat and the example's Celery worker
(see ``examples/flask_app/tests/conftest.py``), so it shares nothing with this suite's Redis.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_django_example import run_example_pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "flask_app"


@pytest.mark.timeout(240)
def test_flask_example_suite_passes(tmp_path: Path) -> None:
    run_example_pytest(EXAMPLE, tmp_path)
