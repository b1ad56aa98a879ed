"""A whole mixbatch for the example's tests, started once per session.

An embedded Redis (or ``DOCS_TEST_REDIS_URL``: a database nothing else uses), the sandbox
provider, a service worker and beat (``tasks.cli.stack.LocalStack``), and the example's own Celery
worker on ``flask_docs.callbacks``, all on a SQLite file in a temporary directory that the
worker and the tests share.
"""

import os
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from celery import Celery
from flask import Flask
from flask.testing import FlaskClient
from flask_docs import create_app
from flask_docs.db import document, documents, mixbatch

from routing.sandbox import Knobs
from tasks.cli.stack import LocalStack

APP_DIR = Path(__file__).resolve().parent.parent
CALLBACK_QUEUE = "flask_docs.callbacks"
#: Beat and the sweeper run often, and no provider batches: answers come back in a second or two.
FAST = {
    "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
    "MIXBATCH_SWEEP_INTERVAL_S": "1",
    "MIXBATCH_BATCH_ENABLED": "false",
    "MIXBATCH_LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    data_dir = tmp_path_factory.mktemp("mixbatch")
    env = FAST | {"FLASK_DOCS_DATABASE_URL": f"sqlite:///{data_dir / 'docs.sqlite3'}"}
    s = LocalStack(
        data_dir,
        redis_url=os.environ.get("DOCS_TEST_REDIS_URL") or None,
        namespace=f"flask{uuid.uuid4().hex[:8]}",
        knobs=Knobs(latency_ms=5),
        env=env,
    )
    s.start()
    try:
        s.start_worker("service", concurrency=2)
        s.start_beat()
        # One process, so messages are taken in the order they were sent.
        s.start_worker(
            "callbacks", queues=[CALLBACK_QUEUE], concurrency=1, app="make_celery", cwd=APP_DIR
        )
        s.wait_workers(["service", "callbacks"])
        yield s
    finally:
        s.stop()


@pytest.fixture(scope="session")
def app(stack: LocalStack) -> Flask:
    return create_app(
        {
            "TESTING": True,
            "DATABASE_URL": stack.env()["FLASK_DOCS_DATABASE_URL"],
            "MIXBATCH_REDIS_URL": stack.url,
            "MIXBATCH_NAMESPACE": stack.namespace,
        }
    )


@pytest.fixture
def client(app: Flask) -> FlaskClient:
    return app.test_client()


@pytest.fixture(scope="session")
def producer(stack: LocalStack) -> Iterator[Celery]:
    """Sends messages to the example's worker, as the mixbatch service does."""
    celery = Celery("flask-docs-tests", broker=stack.url, set_as_current=False)
    yield celery
    celery.close()


def _wait_for(check: Callable[[], bool], timeout_s: float, what: str) -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


@pytest.fixture
def wait_for() -> Callable[[Callable[[], bool], float, str], None]:
    """``wait_for(check, timeout_s, what)``: poll until ``check()`` is true."""
    return _wait_for


@pytest.fixture
def wait_done(app: Flask, stack: LocalStack) -> Callable[[int], dict[str, Any]]:
    """Wait until the callback worker has filled a document; its row as JSON."""

    def row(doc_id: int) -> dict[str, Any]:
        with app.app_context(), mixbatch.engine.connect() as conn:
            found = document(conn, doc_id)
        assert found is not None, f"no document {doc_id}"
        return found

    def wait(doc_id: int, timeout_s: float = 45) -> dict[str, Any]:
        try:
            _wait_for(lambda: row(doc_id)["status"] != "queued", timeout_s, f"document {doc_id}")
        except AssertionError:
            logs = sorted(stack.log_dir.glob("*.log"))
            tails = {p.name: p.read_text(errors="replace")[-2000:] for p in logs}
            raise AssertionError(f"document {doc_id} never filled; worker logs: {tails}") from None
        return row(doc_id)

    return wait


@pytest.fixture
def insert_document(app: Flask) -> Callable[..., int]:
    """Insert a document directly (not through the view); its id."""

    def insert(text: str, task: str = "embed") -> int:
        with app.app_context(), mixbatch.engine.begin() as conn:
            query = sa.insert(documents).values(text=text, task=task)
            return int(conn.execute(query).inserted_primary_key[0])

    return insert
