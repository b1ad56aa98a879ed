"""The Django example as its users run it.

- Its own test suite (``python manage.py test``) starts its own embedded Redis, sandbox, service
  worker, beat and the project's Celery worker (see ``examples/django_app/docs/tests.py``), so
  it shares nothing with this suite's Redis; the test database is a file under ``tmp_path``.
- Its nightly job: ``migrate`` stores it as a django-celery-beat PeriodicTask, the project's own
  beat (``celery -A project beat -S django``, the database scheduler) sends it to
  ``mixbatch.enqueue_many``, and a real mixbatch worker enqueues and answers it.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from routing.models import Result
from routing.sandbox import Knobs
from routing.states import State
from tests.test_e2e import db_url, make_stack, wait_for  # noqa: F401

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


#: Run in the example's ``manage.py shell``: the nightly job fires every second from now on,
#: through the real model's ``save`` (so django-celery-beat records the change, as the admin does).
EVERY_SECOND = """
from django_celery_beat.models import IntervalSchedule, PeriodicTask
task = PeriodicTask.objects.get(name="nightly-digest")
assert task.task == "mixbatch.enqueue_many" and task.crontab is not None, task
task.interval, _ = IntervalSchedule.objects.get_or_create(every=1, period="seconds")
task.crontab = None
task.save()
print("rescheduled", task.args.count('"lane": "bulk"'))
"""


def manage(env: dict[str, str], *argv: str) -> str:
    proc = subprocess.run(
        [sys.executable, "manage.py", *argv],
        cwd=EXAMPLE,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    return proc.stdout


def nightly_answers(results: list[Result]) -> list[Result]:
    return [r for r in results if r.status is State.DONE and r.body and r.body.get("choices")]


@pytest.mark.timeout(240)
def test_django_beat_sends_the_nightly_job_from_the_database_and_mixbatch_answers_it(
    tmp_path: Path,
    db_url: str,  # noqa: F811
) -> None:
    stack = make_stack(tmp_path, db_url, Knobs(latency_ms=5, batch_turnaround_s=1.0))
    django_env = {
        "DOCS_DATABASE": str(tmp_path / "docs.sqlite3"),
        "DJANGO_SETTINGS_MODULE": "project.settings",
    }
    try:
        stack.start_worker("w1", concurrency=2)
        stack.start_beat()
        stack.wait_workers(["w1"])
        env = stack.env() | django_env
        manage(env, "migrate", "--noinput")  # creates the PeriodicTask: 02:00 UTC nightly
        assert "rescheduled 4" in manage(env, "shell", "-c", EVERY_SECOND)
        started = time.time()
        beat = ["-m", "celery", "-A", "project", "beat", "-S", "django", "-l", "INFO"]
        stack._spawn("app-beat", [sys.executable, *beat], cwd=EXAMPLE, env=django_env)
        store = stack.store()

        def answered() -> list[Result]:
            return nightly_answers(store.results("bulk"))

        wait_for(lambda: len(answered()) >= 4, 150, "the nightly job's four requests answered")
        got = answered()
        assert all(r.created_at >= started - 1 for r in got)
        assert {r.endpoint for r in got} == {"/v1/chat/completions"}
        assert all(r.cost_usd is not None and r.cost_usd > 0 for r in got)
        log = (stack.log_dir / "app-beat.log").read_text()
        assert "DatabaseScheduler" in log, log[-3000:]
        assert "Sending due task nightly-digest (mixbatch.enqueue_many)" in log, log[-3000:]
        assert "Summarise today" not in log  # bodies never logged
    finally:
        stack.stop()
