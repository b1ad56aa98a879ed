"""Property tests of the submit boundary: whatever a producer sends, the lanes keep moving.

Any generated request, through the client and through ``mixbatch.enqueue`` (after the broker's
JSON round trip), is either refused with an ``InvalidRequest`` that names the field, or accepted
and then claimed like any other request: never another exception, never a stuck lane.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads

from routing.client import Client
from routing.errors import InvalidRequest
from routing.models import ServiceConfig, StoredResult
from routing.states import State
from routing.store.lanes import LaneStore

LANES = ("urgent", "standard", "bulk")
ENDPOINTS = ("/v1/chat/completions", "/v1/embeddings", "/v1/responses", "/v1/messages")
SETTINGS = settings(
    max_examples=120,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
deadlines = st.one_of(
    st.none(),
    st.floats(),
    st.integers(min_value=-(10**20), max_value=10**20),
    st.sampled_from(["90s", "15m", "6h", "1d", "400d", "0s", "-5m", "soon", "2031-01-01T00:00:00"]),
    st.floats(min_value=60, max_value=30 * 86400).map(lambda s: time.time() + s),
)
bodies = st.one_of(
    st.dictionaries(st.text(max_size=10), json_value, max_size=4),
    st.builds(
        lambda model, rest: {**rest, "model": model},
        st.sampled_from(["gpt-4o-mini", "claude-3-5-haiku-latest", "text-embedding-3-small"]),
        st.dictionaries(st.text(max_size=10), json_value, max_size=3),
    ),
)
requests = st.fixed_dictionaries(
    {"body": bodies},
    optional={
        "tenant": st.one_of(st.sampled_from(["default", "acme", "a.b@c"]), st.text(max_size=20)),
        "custom_id": st.one_of(st.none(), st.text(max_size=30)),
        "lane": st.one_of(st.sampled_from(LANES), st.text(max_size=10)),
        "deadline": deadlines,
        "endpoint": st.one_of(st.sampled_from(ENDPOINTS), st.text(max_size=20)),
        "model": st.one_of(st.none(), st.sampled_from(["gpt-4o-mini", "m"]), st.text(max_size=10)),
        "metadata": st.dictionaries(st.text(max_size=12), st.text(max_size=40), max_size=5),
        "max_attempts": st.one_of(st.none(), st.integers(min_value=-5, max_value=200)),
        "extra": st.integers(),
    },
)


@pytest.fixture
def worker_env(redis_url: str, namespace: str, store: LaneStore) -> Iterator[None]:
    """Settings of ``mixbatch.enqueue`` pointed at this test's Redis and namespace."""
    from config.settings import reset_settings
    from tasks import runtime

    saved = {k: os.environ.get(k) for k in ("MIXBATCH_REDIS_URL", "MIXBATCH_NAMESPACE")}
    os.environ.update({"MIXBATCH_REDIS_URL": redis_url, "MIXBATCH_NAMESPACE": namespace})
    reset_settings()
    runtime.reset()
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        reset_settings()
        runtime.reset()


def _drain_one(store: LaneStore, config: ServiceConfig, rid: str) -> None:
    """The accepted request is claimable (the lanes move) and can be answered."""
    claimed = store.claim_lanes(config.lanes, 50, lease_s=30)
    mine = [c for c in claimed if c.id == rid]
    if not mine:  # a duplicate custom_id: the first request is the one that waits
        assert store.status(rid).state in (State.CLAIMED, State.DONE, State.QUEUED)
    for c in claimed:
        assert store.finish(c.id, c.token, State.DONE, StoredResult(status_code=200, body={}))


def _named(exc: InvalidRequest) -> None:
    assert exc.field, f"{type(exc).__name__} names no field: {exc}"


@SETTINGS
@given(item=requests)
def test_client_submit_refuses_with_a_named_field_or_accepts(
    redis_url: str,
    namespace: str,
    store: LaneStore,
    service_config: ServiceConfig,
    item: dict[str, Any],
) -> None:
    with Client(redis_url, namespace=namespace) as client:
        try:
            ticket = client.submit(**item)
        except InvalidRequest as exc:
            _named(exc)
            return
        except TypeError:
            assert "extra" in item, "only an unknown keyword is a TypeError"
            return
    _drain_one(store, service_config, ticket.id)


@SETTINGS
@given(item=requests)
def test_enqueue_task_refuses_with_a_named_field_or_accepts(
    worker_env: None, store: LaneStore, service_config: ServiceConfig, item: dict[str, Any]
) -> None:
    from tasks.enqueue import enqueue

    wire = kombu_loads(kombu_dumps(item))
    try:
        ticket = enqueue(wire)
    except InvalidRequest as exc:
        _named(exc)
        return
    _drain_one(store, service_config, ticket["id"])
