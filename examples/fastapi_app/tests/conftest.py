"""A whole mixbatch for the example's tests, started once per session.

An embedded Redis (or ``DOCS_TEST_REDIS_URL``: a database nothing else uses), the sandbox
provider, a service worker and beat (``tasks.cli.stack.LocalStack``); the app runs in FastAPI's
``TestClient``, whose lifespan builds the app's ``AsyncClient`` on the client's event loop.
"""

import os
import uuid
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from fastapi_jobs import create_app

from routing.sandbox import Knobs
from tasks.cli.stack import LocalStack

#: Beat runs often, and no provider batches: answers come back in a second or two.
FAST = {
    "MIXBATCH_AGGREGATE_INTERVAL_S": "0.3",
    "MIXBATCH_SWEEP_INTERVAL_S": "1",
    "MIXBATCH_BATCH_ENABLED": "false",
    "MIXBATCH_LOG_LEVEL": "WARNING",
}


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalStack]:
    namespace = f"fastapi{uuid.uuid4().hex[:8]}"
    redis_url = os.environ.get("DOCS_TEST_REDIS_URL") or None
    data_dir = tmp_path_factory.mktemp("mixbatch")
    knobs = Knobs(latency_ms=5)
    with LocalStack(data_dir, redis_url=redis_url, namespace=namespace, knobs=knobs, env=FAST) as s:
        s.start_worker("service", concurrency=2)
        s.start_beat()
        s.wait_workers(["service"])
        yield s


@pytest.fixture(scope="session")
def client(stack: LocalStack) -> Iterator[TestClient]:
    with TestClient(create_app(stack.url, stack.namespace)) as c:
        yield c
