"""``routing.client`` as a producer uses it, against a real redis-server; the worker side is
played by a ``LaneStore`` on the same namespace."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import routing.client
import routing.errors
from routing.client import (
    Client,
    ConfigError,
    InvalidRequest,
    LaneFull,
    NotFound,
    Request,
    ResultTimeout,
    State,
    StoreUnavailable,
    UnknownEndpoint,
    UnknownLane,
)
from routing.models import LaneSpec, ServiceConfig, StoredResult
from routing.store.embedded import free_port
from routing.store.lanes import LaneStore

ROOT = Path(__file__).resolve().parent.parent
LANES = ("urgent", "standard", "bulk")
BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client(redis_url: str, namespace: str, store: LaneStore) -> Iterator[Client]:
    """A producer's client on the namespace where ``store`` published the default lanes."""
    with Client(redis_url, namespace=namespace) as c:
        yield c


def depths(store: LaneStore) -> dict[str, int]:
    return {lane: store.lane_stats(lane).depth for lane in LANES}


def work(store: LaneStore, lane: str, body: dict[str, Any], delay_s: float = 0.0) -> str:
    """Be the worker: claim one request of ``lane`` and answer it."""
    time.sleep(delay_s)
    [claimed] = store.claim(lane, 1, lease_s=30)
    assert store.finish(
        claimed.id,
        claimed.token,
        State.DONE,
        StoredResult.model_validate({"status_code": 200, "body": body}),
    )
    return claimed.id


# -- the public API, end to end ---------------------------------------------------------------


def test_submit_status_result(client: Client, store: LaneStore) -> None:
    ticket = client.submit(
        endpoint="/v1/chat/completions", body=BODY, lane="urgent", custom_id="doc-42"
    )
    assert ticket.id.startswith("urgent.")
    assert (ticket.lane, ticket.custom_id, ticket.duplicate) == ("urgent", "doc-42", False)
    status = client.status(ticket.id)
    assert (status.state, status.tenant, status.custom_id) == (State.QUEUED, "default", "doc-42")

    with pytest.raises(ResultTimeout):
        client.result(ticket.id, timeout=0.2)
    assert work(store, "urgent", {"answer": 42}) == ticket.id
    result = client.result(ticket.id, timeout=5)
    assert result.ok and result.body == {"answer": 42} and result.status_code == 200
    assert client.status(ticket.id).state is State.DONE

    again = client.submit(endpoint="/v1/chat/completions", body=BODY, custom_id="doc-42")
    assert (again.id, again.duplicate) == (ticket.id, True)


def test_result_waits_for_the_worker(client: Client, store: LaneStore) -> None:
    ticket = client.submit(body=BODY)
    worker = threading.Thread(target=work, args=(store, "standard", {"ok": True}, 0.2))
    worker.start()
    try:
        started = time.monotonic()
        result = client.result(ticket.id, timeout=10)
        assert time.monotonic() - started < 5
    finally:
        worker.join()
    assert result.status is State.DONE and result.body == {"ok": True}


def test_submit_a_request_object(client: Client) -> None:
    ticket = client.submit(Request(body=BODY, lane="bulk", deadline="2h", max_attempts=1))
    status = client.status(ticket.id)
    assert (status.lane, status.max_attempts) == ("bulk", 1)
    assert status.deadline == pytest.approx(status.created_at + 7200, abs=1)


def test_submit_takes_a_request_or_fields_not_both(client: Client, store: LaneStore) -> None:
    with pytest.raises(TypeError, match="not both"):
        client.submit(Request(body=BODY), lane="bulk")
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}


@pytest.mark.parametrize(
    "fields,error,field",
    [
        ({"body": BODY, "lane": "fast"}, UnknownLane, "lane"),
        ({"body": BODY, "endpoint": "/v1/completions"}, UnknownEndpoint, "endpoint"),
        ({"body": BODY, "colour": "red"}, InvalidRequest, "colour"),
        ({"body": {"messages": []}}, InvalidRequest, "model"),
    ],
)
def test_submit_refuses_a_bad_request(
    client: Client, store: LaneStore, fields: dict[str, Any], error: type[Exception], field: str
) -> None:
    with pytest.raises(error) as info:
        client.submit(**fields)
    assert isinstance(info.value, InvalidRequest) and info.value.field == field
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}


def test_cancel(client: Client, store: LaneStore) -> None:
    queued = client.submit(body=BODY)
    assert client.cancel(queued.id) is State.CANCELLED
    result = client.result(queued.id, timeout=1)
    assert result.status is State.CANCELLED

    finished = client.submit(body=BODY, lane="bulk")
    work(store, "bulk", {"ok": 1})
    assert client.cancel(finished.id) is State.DONE
    with pytest.raises(NotFound):
        client.cancel("standard.01J0NOTAREQUEST")
    with pytest.raises(NotFound):
        client.status("standard.01J0NOTAREQUEST")


# -- submit_many ------------------------------------------------------------------------------


def test_submit_many_mixes_dicts_and_requests(client: Client, store: LaneStore) -> None:
    items: list[Request | dict[str, Any]] = [
        {"body": BODY, "lane": "urgent", "custom_id": "a"},
        Request(body=BODY, lane="bulk", custom_id="b"),
        {"body": {"input": "x"}, "model": "emb", "endpoint": "/v1/embeddings", "custom_id": "c"},
        Request(body=BODY, custom_id="a", lane="urgent"),
    ]
    tickets = client.submit_many(items)
    assert [t.custom_id for t in tickets] == ["a", "b", "c", "a"]
    assert [t.lane for t in tickets] == ["urgent", "bulk", "standard", "urgent"]
    assert [t.duplicate for t in tickets] == [False, False, False, True]
    assert tickets[3].id == tickets[0].id
    assert depths(store) == {"urgent": 1, "standard": 1, "bulk": 1}


@pytest.mark.parametrize(
    "bad,error",
    [
        ({"body": BODY, "lane": "nope"}, UnknownLane),
        (Request(body=BODY, endpoint="/v2/chat"), UnknownEndpoint),
        ({"body": BODY, "deadline": "whenever"}, InvalidRequest),
        ({"lane": "bulk"}, InvalidRequest),
        ({"body": BODY, "unknown": 1}, InvalidRequest),
    ],
)
def test_submit_many_with_a_bad_item_enqueues_nothing(
    client: Client, store: LaneStore, bad: Request | dict[str, Any], error: type[InvalidRequest]
) -> None:
    good: list[Request | dict[str, Any]] = [
        {"body": BODY, "lane": lane, "custom_id": f"ok-{lane}"} for lane in LANES
    ]
    items = [*good[:2], bad, good[2]]
    with pytest.raises(error) as info:
        client.submit_many(items, chunk_size=1)
    assert type(info.value) is error
    assert info.value.field == "items[2]"
    assert str(info.value).startswith("items[2]: ")
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}
    # Nothing was written, so the custom_ids are still free.
    assert not any(t.duplicate for t in client.submit_many(good))


def test_submit_many_in_chunks_reports_progress(client: Client, store: LaneStore) -> None:
    progress: list[int] = []
    items = ({"body": BODY, "custom_id": f"c{i}"} for i in range(5))
    tickets = client.submit_many(items, chunk_size=2, on_progress=progress.append)
    assert progress == [2, 2, 1]
    assert [t.custom_id for t in tickets] == [f"c{i}" for i in range(5)]
    assert depths(store)["standard"] == 5
    assert client.submit_many([]) == []


def test_lane_full_in_a_later_chunk_reports_the_whole_call(
    client: Client, store: LaneStore, service_config: ServiceConfig
) -> None:
    """``LaneFull.accepted``/``rejected`` describe the caller's items, not the last chunk."""
    tiny = LaneSpec(name="tiny", deadline_s=600, max_queued=3)
    store.publish_config(ServiceConfig(lanes=(*service_config.lanes, tiny)))
    items = [{"body": BODY, "lane": "tiny", "custom_id": f"c{i}"} for i in range(5)]
    with pytest.raises(LaneFull) as info:
        client.submit_many(items, chunk_size=2)
    assert info.value.lane == "tiny"
    assert store.lane_stats("tiny").depth == 3
    accepted = info.value.accepted
    assert [t.custom_id for t in accepted] == ["c0", "c1", "c2"]
    assert info.value.rejected == [3, 4]


def test_prepare_many_writes_nothing(client: Client, store: LaneStore) -> None:
    prepared = client.prepare_many([{"body": BODY}, Request(body=BODY, lane="urgent")])
    assert [p.lane for p in prepared] == ["standard", "urgent"]
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}


# -- tenants ----------------------------------------------------------------------------------


def test_the_clients_tenant_applies_to_dicts_and_keyword_fields(
    redis_url: str, namespace: str, store: LaneStore
) -> None:
    with Client(redis_url, namespace=namespace, tenant="acme") as acme:
        ticket = acme.submit(body=BODY, custom_id="x")
        assert acme.status(ticket.id).tenant == "acme"
        other = acme.submit({"body": BODY, "custom_id": "x", "tenant": "globex"})
        assert acme.status(other.id).tenant == "globex"
        assert other.id != ticket.id


def test_the_clients_tenant_applies_to_request_objects(
    redis_url: str, namespace: str, store: LaneStore
) -> None:
    """``acme.submit(custom_id="x", ...)`` and ``acme.submit(Request(custom_id="x", ...))`` are
    the same request of the same tenant: the second is a duplicate of the first."""
    with Client(redis_url, namespace=namespace, tenant="acme") as acme:
        first = acme.submit(body=BODY, custom_id="x")
        second = acme.submit(Request(body=BODY, custom_id="x"))
        assert acme.status(second.id).tenant == "acme"
        assert (second.id, second.duplicate) == (first.id, True)


# -- configuration and connection errors ------------------------------------------------------


def test_no_config_published(redis_url: str, namespace: str) -> None:
    with Client(redis_url, namespace=namespace) as c:
        with pytest.raises(ConfigError) as info:
            c.submit(body=BODY)
        message = str(info.value)
        assert "no lanes table" in message
        assert redis_url in message
        assert "mixbatch up" in message and "config=" in message


def test_a_config_can_be_passed_instead(
    redis_url: str, namespace: str, service_config: ServiceConfig
) -> None:
    with Client(redis_url, namespace=namespace, config=service_config) as c:
        ticket = c.submit(body=BODY, lane="bulk")
        assert c.status(ticket.id).state is State.QUEUED


def test_no_redis_url_and_nothing_running(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("MIXBATCH_REDIS_URL", raising=False)
    monkeypatch.setenv("MIXBATCH_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match="MIXBATCH_REDIS_URL"):
        Client()


def test_a_closed_port_is_store_unavailable_without_the_password(
    service_config: ServiceConfig,
) -> None:
    port = free_port()
    url = f"redis://mixbatch:s3cret-pw@127.0.0.1:{port}/0"
    calls = [
        ("submit", lambda c: c.submit(body=BODY)),
        ("status", lambda c: c.status("standard.01J0")),
        ("result", lambda c: c.result("standard.01J0", timeout=1)),
        ("cancel", lambda c: c.cancel("standard.01J0")),
    ]
    for config in (None, service_config):
        with Client(url, namespace="nowhere", config=config) as c:
            assert "s3cret" not in repr(c)
            for name, call in calls:
                started = time.monotonic()
                with pytest.raises(StoreUnavailable) as info:
                    call(c)
                assert time.monotonic() - started < 5, name
                message = str(info.value)
                assert f"127.0.0.1:{port}" in message, name
                assert "mixbatch:***@" in message, name
                assert "s3cret" not in message, name
                assert info.value.retryable


# -- the public surface -----------------------------------------------------------------------


def test_exported_members() -> None:
    assert routing.client.__all__ == [
        "AsyncClient",
        "BodyTooLarge",
        "CeleryCallback",
        "Client",
        "ConfigError",
        "DeadlineInPast",
        "Endpoint",
        "InvalidRequest",
        "LaneFull",
        "MalformedInput",
        "MixbatchError",
        "NotFound",
        "Request",
        "Result",
        "ResultTimeout",
        "Route",
        "State",
        "StatusInfo",
        "StoreUnavailable",
        "Ticket",
        "UnknownEndpoint",
        "UnknownLane",
    ]
    assert routing.client.__all__ == sorted(routing.client.__all__)
    for name in routing.client.__all__:
        assert getattr(routing.client, name) is not None, name
    # The errors are mixbatch's own tree, re-exported, not copies.
    for name in ("InvalidRequest", "LaneFull", "NotFound", "ResultTimeout", "StoreUnavailable"):
        assert getattr(routing.client, name) is getattr(routing.errors, name)
        assert issubclass(getattr(routing.client, name), routing.client.MixbatchError)


def test_importing_the_client_pulls_in_no_service_code() -> None:
    forbidden = {
        "config",
        "tasks",
        "gpu_worker",
        "celery",
        "kombu",
        "torch",
        "starlette",
        "uvicorn",
        "openai",
        "anthropic",
    }
    code = (
        "import routing.client, routing.async_client, sys; "
        f"print(sorted(m for m in sys.modules if m.split('.')[0] in {sorted(forbidden)!r}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
