"""``routing.client.AsyncClient`` against a real redis-server, each test one ``asyncio.run``.

The worker side is played by a sync ``LaneStore`` on the same namespace (in a thread where the
async side must be waiting meanwhile), and the sync ``Client`` reads what the async one wrote,
and the other way round: both clients must keep one store. That importing it loads no service
code is checked with ``routing.client`` in ``tests/test_client.py``.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any, TypeVar

import pytest
import redis

from routing.client import (
    AsyncClient,
    Client,
    ConfigError,
    DeadlineInPast,
    InvalidRequest,
    LaneFull,
    NotFound,
    Request,
    ResultTimeout,
    State,
    StoreUnavailable,
    UnknownLane,
)
from routing.keys import new_request_id
from routing.models import LaneSpec, ServiceConfig
from routing.store.embedded import free_port
from routing.store.lanes import LaneStore
from routing.store.submit import TAKEOVER_S
from tests.test_client import BODY, LANES, depths, work

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")
Session = Callable[[AsyncClient], Awaitable[T]]


def run(redis_url: str, namespace: str, session: Session[T], **kwargs: Any) -> T:
    """Open an AsyncClient, run ``session`` with it, close it: one event loop per call."""

    async def main() -> T:
        async with AsyncClient(redis_url, namespace=namespace, **kwargs) as client:
            return await session(client)

    return asyncio.run(main())


def later(delay_s: float, fn: Callable[[], object]) -> threading.Thread:
    """Do ``fn`` in a thread after ``delay_s``, while the event loop waits on something."""

    def go() -> None:
        time.sleep(delay_s)
        fn()

    thread = threading.Thread(target=go)
    thread.start()
    return thread


def command_calls(url: str, command: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        stats = r.info("commandstats")
    finally:
        r.close()
    return int(stats.get(f"cmdstat_{command}", {}).get("calls", 0))


# -- the surface, end to end -------------------------------------------------------------------


def test_submit_status_result_cancel(redis_url: str, namespace: str, store: LaneStore) -> None:
    async def session(mb: AsyncClient) -> None:
        ticket = await mb.submit(
            endpoint="/v1/chat/completions", body=BODY, lane="urgent", custom_id="doc-42"
        )
        assert ticket.id.startswith("urgent.")
        assert (ticket.lane, ticket.custom_id, ticket.duplicate) == ("urgent", "doc-42", False)
        status = await mb.status(ticket.id)
        assert (status.state, status.tenant, status.custom_id) == (
            State.QUEUED,
            "default",
            "doc-42",
        )
        with pytest.raises(ResultTimeout) as info:
            await mb.result(ticket.id, timeout=0.2)
        assert info.value.state == State.QUEUED

        worker = later(0.3, lambda: work(store, "urgent", {"answer": 42}))
        result = await mb.result(ticket.id, timeout=10)
        worker.join()
        assert result.ok and result.body == {"answer": 42} and result.status_code == 200
        assert (await mb.status(ticket.id)).state is State.DONE

        again = await mb.submit(Request(body=BODY, custom_id="doc-42"))
        assert (again.id, again.duplicate, again.lane) == (ticket.id, True, "urgent")

        queued = await mb.submit(body=BODY, lane="bulk")
        assert await mb.cancel(queued.id) is State.CANCELLED
        assert (await mb.result(queued.id, timeout=1)).status is State.CANCELLED
        assert await mb.cancel(ticket.id) is State.DONE, "a finished request keeps its outcome"
        for call in (mb.cancel, mb.status, mb.result):
            with pytest.raises(NotFound):
                await call("standard.01J0NOTAREQUEST")

    run(redis_url, namespace, session)


def test_both_clients_keep_one_store(redis_url: str, namespace: str, store: LaneStore) -> None:
    """What one client writes the other reads the same way, custom_ids included."""
    with Client(redis_url, namespace=namespace, tenant="acme") as sync:
        first = sync.submit(body=BODY, custom_id="shared", lane="bulk", metadata={"k": "v"})

        async def session(mb: AsyncClient) -> tuple[Any, ...]:
            dup = await mb.submit(body=BODY, custom_id="shared")
            mine = await mb.submit(body=BODY, custom_id="mine", lane="urgent")
            return dup, mine, await mb.status(first.id), await mb.status(mine.id)

        dup, mine, seen, async_status = run(redis_url, namespace, session, tenant="acme")
        assert (dup.id, dup.duplicate, dup.deadline) == (first.id, True, first.deadline)
        assert seen == sync.status(first.id)
        assert async_status == sync.status(mine.id)
        assert sync.submit(body=BODY, custom_id="mine").id == mine.id
        assert sync.store.prepared(mine.id).tenant == "acme"
    assert depths(store) == {"urgent": 1, "standard": 0, "bulk": 1}


def test_many_waiters_are_each_woken(redis_url: str, namespace: str, store: LaneStore) -> None:
    async def session(mb: AsyncClient) -> list[Any]:
        tickets = await mb.submit_many([{"body": BODY, "lane": "urgent"} for _ in range(8)])
        worker = later(0.2, lambda: [work(store, "urgent", {"n": i}) for i in range(8)])
        results = await asyncio.gather(*(mb.result(t.id, timeout=20) for t in tickets))
        worker.join()
        return results

    results = run(redis_url, namespace, session)
    assert sorted(r.body["n"] for r in results if r.body) == list(range(8))


def test_result_waits_without_polling(redis_url: str, namespace: str, store: LaneStore) -> None:
    """A three-second wait reads the request a few times (once per 2 s slice), not in a loop."""

    async def session(mb: AsyncClient) -> None:
        ticket = await mb.submit(body=BODY)
        reads = command_calls(redis_url, "hgetall")
        with pytest.raises(ResultTimeout):
            await mb.result(ticket.id, timeout=3)
        assert command_calls(redis_url, "hgetall") - reads <= 4
        assert command_calls(redis_url, "blpop") >= 2

    run(redis_url, namespace, session)


def test_a_cancelled_wait_leaves_the_client_usable(
    redis_url: str, namespace: str, store: LaneStore
) -> None:
    async def session(mb: AsyncClient) -> None:
        ticket = await mb.submit(body=BODY, lane="urgent")
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(mb.result(ticket.id), timeout=0.3)
        work(store, "urgent", {"ok": True})
        assert (await mb.result(ticket.id, timeout=5)).body == {"ok": True}

    run(redis_url, namespace, session)


# -- submit_many ---------------------------------------------------------------------------------


def test_submit_many_in_chunks(redis_url: str, namespace: str, store: LaneStore) -> None:
    progress: list[int] = []

    async def session(mb: AsyncClient) -> list[Any]:
        items: list[Request | dict[str, Any]] = [
            {"body": BODY, "lane": "urgent", "custom_id": "a"},
            Request(body=BODY, lane="bulk", custom_id="b"),
            {"body": {"input": "x"}, "model": "emb", "endpoint": "/v1/embeddings"},
            Request(body=BODY, custom_id="a", lane="bulk"),
            {"body": BODY, "custom_id": "e"},
        ]
        assert await mb.submit_many([]) == []
        return await mb.submit_many(items, chunk_size=2, on_progress=progress.append)

    tickets = run(redis_url, namespace, session)
    assert progress == [2, 2, 1]
    assert [t.custom_id for t in tickets] == ["a", "b", None, "a", "e"]
    assert [t.lane for t in tickets] == ["urgent", "bulk", "standard", "urgent", "standard"]
    assert [t.duplicate for t in tickets] == [False, False, False, True, False]
    assert tickets[3].id == tickets[0].id
    assert depths(store) == {"urgent": 1, "standard": 2, "bulk": 1}


def test_a_custom_id_twice_in_one_chunk_is_one_request(
    redis_url: str, namespace: str, store: LaneStore
) -> None:
    async def session(mb: AsyncClient) -> list[Any]:
        return await mb.submit_many([{"body": BODY, "custom_id": "twice"}] * 3)

    tickets = run(redis_url, namespace, session)
    assert len({t.id for t in tickets}) == 1
    assert [t.duplicate for t in tickets] == [False, True, True]
    assert depths(store)["standard"] == 1


def test_a_bad_item_enqueues_nothing(redis_url: str, namespace: str, store: LaneStore) -> None:
    async def session(mb: AsyncClient) -> None:
        good = [{"body": BODY, "lane": lane, "custom_id": f"ok-{lane}"} for lane in LANES]
        with pytest.raises(UnknownLane) as info:
            await mb.submit_many([*good[:2], {"body": BODY, "lane": "nope"}, good[2]])
        assert info.value.field == "items[2]"
        assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}
        prepared = await mb.prepare_many(good)
        assert [p.lane for p in prepared] == list(LANES)
        assert not any(t.duplicate for t in await mb.submit_many(good))

    run(redis_url, namespace, session)


def test_lane_full_reports_the_whole_call(
    redis_url: str, namespace: str, store: LaneStore, service_config: ServiceConfig
) -> None:
    tiny = LaneSpec(name="tiny", deadline_s=600, max_queued=3)
    store.publish_config(ServiceConfig(lanes=(*service_config.lanes, tiny)))
    items = [{"body": BODY, "lane": "tiny", "custom_id": f"c{i}"} for i in range(5)]

    async def session(mb: AsyncClient) -> None:
        with pytest.raises(LaneFull) as info:
            await mb.submit_many(items, chunk_size=2)
        assert info.value.lane == "tiny" and info.value.max_queued == 3
        assert [t.custom_id for t in info.value.accepted] == ["c0", "c1", "c2"]
        assert info.value.rejected == [3, 4]
        with pytest.raises(LaneFull) as one:
            await mb.submit(items[3])
        assert one.value.rejected == [0] and one.value.accepted == []

    run(redis_url, namespace, session)
    assert store.lane_stats("tiny").depth == 3
    # A refused custom_id was released: once there is room it is a new request, not a duplicate.
    assert len(store.claim("tiny", 1, lease_s=30)) == 1
    with Client(redis_url, namespace=namespace) as sync:
        assert sync.submit(items[3]).duplicate is False


# -- a custom_id whose first submitter died --------------------------------------------------------


def test_a_dead_submitters_custom_id_is_taken_over_under_its_id(
    redis_url: str, namespace: str, store: LaneStore
) -> None:
    """A custom_id reserved long ago whose request never appeared (its submitter died between
    reserving and creating) is created now, under the id that was reserved: a ticket already
    handed out for that id comes true. A fresh reservation is left to its submitter."""
    stale_id, fresh_id = new_request_id("bulk"), new_request_id("bulk")
    r = redis.Redis.from_url(redis_url)
    try:
        stamp = time.time() - TAKEOVER_S - 5
        r.set(store.keys.idempotency("default", "stale"), f"{stale_id}|{stamp!r}")
        r.set(store.keys.idempotency("default", "fresh"), f"{fresh_id}|{time.time()!r}")
    finally:
        r.close()

    async def session(mb: AsyncClient) -> tuple[Any, ...]:
        return (
            await mb.submit(body=BODY, custom_id="stale", lane="urgent"),
            await mb.submit(body=BODY, custom_id="fresh"),
        )

    stale, fresh = run(redis_url, namespace, session)
    assert (stale.id, stale.duplicate, stale.lane) == (stale_id, False, "bulk")
    status = store.status(stale_id)
    assert (status.state, status.custom_id, status.lane) == (State.QUEUED, "stale", "bulk")
    assert (fresh.id, fresh.duplicate) == (fresh_id, True)
    with pytest.raises(NotFound):
        store.status(fresh_id)
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 1}


# -- bad input ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "fields,error,field",
    [
        ({"body": BODY, "lane": "fast"}, UnknownLane, "lane"),
        ({"body": BODY, "deadline": time.time() - 60}, DeadlineInPast, "deadline"),
        ({"body": BODY, "colour": "red"}, InvalidRequest, "colour"),
    ],
)
def test_submit_refuses_a_bad_request(
    redis_url: str,
    namespace: str,
    store: LaneStore,
    fields: dict[str, Any],
    error: type[InvalidRequest],
    field: str,
) -> None:
    async def session(mb: AsyncClient) -> None:
        with pytest.raises(error) as info:
            await mb.submit(**fields)
        assert info.value.field == field
        with pytest.raises(TypeError, match="not both"):
            await mb.submit(Request(body=BODY), lane="bulk")

    run(redis_url, namespace, session)
    assert depths(store) == {"urgent": 0, "standard": 0, "bulk": 0}


def test_no_config_published_and_a_config_passed(
    redis_url: str, namespace: str, service_config: ServiceConfig
) -> None:
    async def without(mb: AsyncClient) -> None:
        with pytest.raises(ConfigError) as info:
            await mb.submit(body=BODY)
        assert "no lanes table" in str(info.value) and "AsyncClient" in str(info.value)

    async def given(mb: AsyncClient) -> State:
        return (await mb.status((await mb.submit(body=BODY)).id)).state

    run(redis_url, namespace, without)
    assert run(redis_url, namespace, given, config=service_config) is State.QUEUED


def test_an_unreachable_redis_is_store_unavailable_without_the_password(
    service_config: ServiceConfig,
) -> None:
    port = free_port()
    url = f"redis://mixbatch:s3cret-pw@127.0.0.1:{port}/0"
    calls: list[tuple[str, Callable[[AsyncClient], Coroutine[Any, Any, Any]]]] = [
        ("submit", lambda c: c.submit(body=BODY)),
        ("submit_many", lambda c: c.submit_many([{"body": BODY}])),
        ("status", lambda c: c.status("standard.01J0")),
        ("result", lambda c: c.result("standard.01J0", timeout=1)),
        ("cancel", lambda c: c.cancel("standard.01J0")),
    ]
    for config in (None, service_config):

        async def session(mb: AsyncClient) -> None:
            assert "s3cret" not in repr(mb)
            for name, call in calls:
                with pytest.raises(StoreUnavailable) as info:
                    await asyncio.wait_for(call(mb), timeout=30)
                message = str(info.value)
                assert f"127.0.0.1:{port}" in message, name
                assert "mixbatch:***@" in message and "s3cret" not in message, name
                assert info.value.retryable

        run(url, "nowhere", session, config=config)
