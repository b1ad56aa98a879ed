"""An app's own Celery beat enqueues recurring work into mixbatch: the Flask example's
``daily-digest`` entry (``routing.contrib.common.enqueue_many_entry``) sends
``mixbatch.enqueue_many``; a real mixbatch worker enqueues and answers it. A bad item in an
``enqueue_many`` list is refused alone, the others answered.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
from celery import Celery

from routing.contrib.common import send_enqueue_many
from routing.models import Result
from routing.sandbox import Knobs
from routing.states import State
from tests.test_e2e import db_url, make_stack, wait_for  # noqa: F401

ROOT = Path(__file__).resolve().parent.parent
FLASK_APP = ROOT / "examples" / "flask_app"
APP_BEAT = [sys.executable, "-m", "celery", "-A", "make_celery", "beat", "-l", "INFO", "-s"]
NO_BATCH = {"MIXBATCH_BATCH_ENABLED": "false"}
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def done(stack_results: list[Result]) -> list[Result]:
    return [r for r in stack_results if r.status is State.DONE and r.body]


@pytest.mark.timeout(180)
def test_flask_apps_beat_enqueues_its_digest_and_mixbatch_answers_it(
    tmp_path: Path,
    db_url: str,  # noqa: F811
) -> None:
    stack = make_stack(tmp_path, db_url, Knobs(latency_ms=5), **NO_BATCH)
    try:
        stack.start_worker("w1", concurrency=2)
        stack.start_beat()
        stack.wait_workers(["w1"])
        started = time.time()
        stack._spawn(  # the app's beat, exactly as its docstring runs it
            "app-beat",
            [*APP_BEAT, str(tmp_path / "app-beat-schedule")],
            cwd=FLASK_APP,
            env={
                "FLASK_DOCS_DIGEST_EVERY_S": "2",
                "FLASK_DOCS_DATABASE_URL": f"sqlite:///{tmp_path / 'docs.sqlite3'}",
            },
        )
        store = stack.store()
        wait_for(lambda: len(done(store.results("standard"))) >= 2, 120, "the digest answered")
        answered = done(store.results("standard"))
        assert all(r.created_at >= started - 1 for r in answered)
        assert {r.endpoint for r in answered} == {"/v1/chat/completions"}
        assert all(r.body and r.body.get("choices") for r in answered)
        log = (stack.log_dir / "app-beat.log").read_text()
        assert "mixbatch.enqueue_many" in log and "Write the" not in log  # bodies never logged
    finally:
        stack.stop()


@pytest.mark.timeout(180)
def test_enqueue_many_refuses_a_bad_item_alone(tmp_path: Path, db_url: str) -> None:  # noqa: F811
    stack = make_stack(tmp_path, db_url, Knobs(latency_ms=5), **NO_BATCH)
    producer = Celery("producer", broker=db_url, set_as_current=False)
    try:
        stack.start_worker("w1", concurrency=2)
        stack.start_beat()
        stack.wait_workers(["w1"])
        items = [
            {"lane": "urgent", "body": BODY, "custom_id": "a"},
            {"lane": "no-such-lane", "body": BODY, "custom_id": "b"},
            {"lane": "urgent", "body": BODY, "custom_id": "c"},
        ]
        send_enqueue_many(producer, items)
        store = stack.store()
        wait_for(lambda: len(done(store.results("urgent"))) >= 2, 120, "two answered")
        time.sleep(1)
        assert sorted(r.custom_id or "" for r in store.results("urgent")) == ["a", "c"]
        log = (stack.log_dir / "w1.log").read_text()
        assert "refused index=1 field=lane" in log, log[-2000:]
    finally:
        producer.close()
        stack.stop()
