"""Shared fixtures: one real Redis per session (the embedded one, on a free port), a fresh key
namespace per test so tests never see each other's requests, and a default lanes table."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from routing.decide.lanes import parse_lanes
from routing.models import ServiceConfig
from routing.store.embedded import EmbeddedRedis
from routing.store.lanes import LaneStore
from tests.servers import rabbit  # noqa: F401  (one RabbitMQ node for the session, every module)

ROOT = Path(__file__).resolve().parent.parent


def need_server(reason: str) -> None:
    """A test whose server is missing: skipped on a laptop, a failure in CI (``CI=true``)."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true and {reason}", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedRedis]:
    server = EmbeddedRedis(tmp_path_factory.mktemp("redis"), appendfsync="everysec").start()
    os.environ["MIXBATCH_REDIS_URL"] = server.url
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_url(redis_server: EmbeddedRedis) -> str:
    return redis_server.url


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:10]}"


@pytest.fixture
def service_config() -> ServiceConfig:
    return ServiceConfig(lanes=parse_lanes((ROOT / "config" / "lanes.toml").read_text()))


@pytest.fixture
def store(redis_url: str, namespace: str, service_config: ServiceConfig) -> Iterator[LaneStore]:
    s = LaneStore(redis.Redis.from_url(redis_url), namespace=namespace, url=redis_url)
    s.publish_config(service_config)
    yield s
    s.close()
