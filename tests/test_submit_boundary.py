"""The submit boundary: every value that reaches Redis is finite, bounded and well named.

An infinite deadline used to be stored as JSON ``null`` and stop every lane's claim for good;
a NaN left a hash in no queue. Each bad input here is refused with a ``MixbatchError`` that
names the field, through the client, the models and ``mixbatch.enqueue`` alike, and nothing of
it reaches the store.
"""

from __future__ import annotations

import json
import math
import time
from datetime import timedelta
from typing import Any

import pytest
from kombu.utils.json import dumps as kombu_dumps
from kombu.utils.json import loads as kombu_loads
from pydantic import ValidationError

from routing.client import Client
from routing.errors import InvalidRequest
from routing.keys import Keys
from routing.models import (
    MAX_METADATA_ITEMS,
    Endpoint,
    Prepared,
    ServiceConfig,
    coerce_request,
    prepare,
)
from routing.store.lanes import LaneStore

BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
BAD_DEADLINES = [math.inf, -math.inf, math.nan, 1e300, -1e300, 1e18, timedelta(days=10**6)]


def _lane_sizes(store: LaneStore) -> int:
    return sum(store.lane_stats(lane).depth for lane in ("urgent", "standard", "bulk"))


@pytest.mark.parametrize("deadline", BAD_DEADLINES, ids=repr)
def test_client_refuses_a_deadline_redis_cannot_order(
    redis_url: str, namespace: str, store: LaneStore, deadline: Any
) -> None:
    with Client(redis_url, namespace=namespace) as client:
        with pytest.raises(InvalidRequest) as err:
            client.submit(body=BODY, deadline=deadline)
        assert err.value.field == "deadline"
        with pytest.raises(InvalidRequest) as many:
            client.submit_many([{"body": BODY, "deadline": deadline}])
        assert many.value.field == "items[0]" and "deadline" in str(many.value)
    assert _lane_sizes(store) == 0
    assert store.redis.keys(f"{namespace}:*r:*") == []


@pytest.mark.parametrize("deadline", [math.inf, math.nan, -math.inf, 1e300], ids=repr)
def test_a_prepared_request_with_a_bad_number_cannot_be_built(deadline: float) -> None:
    """``LaneStore.submit_many`` takes only ``Prepared``; a bad number never gets that far."""
    now = time.time()
    with pytest.raises(ValidationError):
        Prepared(
            tenant="t",
            custom_id=None,
            lane="bulk",
            deadline=deadline,
            endpoint=Endpoint.CHAT,
            model="m",
            body={"model": "m"},
            metadata={},
            callback=None,
            max_attempts=3,
            created_at=now,
        )


@pytest.mark.parametrize("deadline", [math.inf, -math.inf, math.nan, 1e300], ids=repr)
def test_enqueue_task_refuses_json_infinity(service_config: ServiceConfig, deadline: float) -> None:
    """What ``mixbatch.enqueue`` receives from a producer's ``send_task`` (kombu's JSON)."""
    wire = kombu_loads(kombu_dumps({"body": BODY, "deadline": deadline}))
    with pytest.raises(InvalidRequest) as err:
        prepare(coerce_request(wire), service_config, time.time())
    assert err.value.field == "deadline"


@pytest.mark.parametrize(
    ("fields", "field"),
    [
        ({"tenant": "x}:idem:y"}, "tenant"),
        ({"tenant": "a b"}, "tenant"),
        ({"tenant": "{t}"}, "tenant"),
        ({"custom_id": "line\r\nbreak"}, "custom_id"),
        ({"metadata": {f"k{i}": "v" for i in range(MAX_METADATA_ITEMS + 1)}}, "metadata"),
        ({"metadata": {"bad key": "v"}}, "metadata"),
        ({"metadata": {"k": "v" * 10_000}}, "metadata"),
        ({"metadata": {"k": "a\nb"}}, "metadata"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"max_attempts": 10**9}, "max_attempts"),
    ],
)
def test_bad_fields_are_named(fields: dict[str, Any], field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        coerce_request({"body": BODY, **fields})
    assert err.value.field == field


def test_metadata_counts_against_the_body_cap(service_config: ServiceConfig) -> None:
    small = service_config.model_copy(update={"max_body_bytes": 2000})
    meta = {f"k{i}": "v" * 100 for i in range(20)}
    with pytest.raises(InvalidRequest) as err:
        prepare(coerce_request({"body": BODY, "metadata": meta}), small, time.time())
    assert err.value.field == "body" and "metadata" in str(err.value)


def test_idempotency_keys_of_distinct_pairs_never_collide() -> None:
    """The tenant rule keeps ``}`` and ``:`` out of the hash tag that ends the tenant."""
    keys = Keys("mb")
    pairs = [("x", "y}:idem:z"), ("x.y", "z"), ("x", "y:z"), ("xy", "z")]
    for tenant, _ in pairs:
        coerce_request({"body": BODY, "tenant": tenant})
    built = {keys.idempotency(t, c) for t, c in pairs}
    assert len(built) == len(pairs)


def test_good_requests_still_pass(
    redis_url: str, namespace: str, store: LaneStore, service_config: ServiceConfig
) -> None:
    with Client(redis_url, namespace=namespace) as client:
        ticket = client.submit(
            body=BODY,
            tenant="acme.eu-1@prod",
            custom_id="doc:42/a b",
            metadata={"team": "search", "job": "nightly-2026"},
            deadline="300d",
        )
    status = store.status(ticket.id)
    assert status.tenant == "acme.eu-1@prod" and status.custom_id == "doc:42/a b"
    assert json.loads(store.redis.hget(store.keys.request(ticket.id), "data") or "{}")[
        "metadata"
    ] == {
        "team": "search",
        "job": "nightly-2026",
    }
