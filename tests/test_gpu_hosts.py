"""GPU liveness per host: with GPU workers on several hosts, each host's report of a model (and
of each alias it serves) is stamped and expires on its own, so the local route stays open while
some host serving the model reports, and closes when the last one stops."""

from __future__ import annotations

import os
import socket
import time

import pytest
import redis

from routing.decide.options import RouteOptions
from routing.store.observations import ObservationStore, default_host

MODEL = "sentence-transformers/all-MiniLM-L6-v2"
ALIAS = "all-MiniLM-L6-v2"
BASE = RouteOptions(local_models=frozenset({MODEL, ALIAS}), gpu_max_age_s=60.0)


@pytest.fixture
def obs(redis_url: str, namespace: str) -> ObservationStore:
    return ObservationStore(redis.Redis.from_url(redis_url), namespace=namespace, gpu_max_age_s=60)


def _report(obs: ObservationStore, host: str, at: float, aliases: tuple[str, ...] = ()) -> None:
    obs.record_gpu(MODEL, texts_per_s=500.0, queue_wait_s=0.01, at=at, aliases=aliases, host=host)


def test_route_stays_open_while_some_host_reports(obs: ObservationStore) -> None:
    t0 = time.time() - 300
    _report(obs, "host-a:1", t0, (ALIAS,))
    _report(obs, "host-b:2", t0 + 10)
    both = obs.learned(BASE, t0 + 20, refresh_s=0)
    assert not both.gpu[MODEL].stale and not both.gpu[ALIAS].stale
    assert set(obs.gpu_hosts(t0 + 20)[MODEL]) == {"host-a:1", "host-b:2"}
    # host a stops; b goes on reporting: the model stays open, a's alias goes with a
    _report(obs, "host-b:2", t0 + 65)
    later = obs.learned(BASE, t0 + 70, refresh_s=0)
    assert not later.gpu[MODEL].stale
    assert ALIAS not in later.gpu, "only host a served the alias, and it stopped reporting"
    assert obs.gpu_hosts(t0 + 70) == {MODEL: {"host-b:2": t0 + 65}}
    # b stops too: the model's route closes once its last report is older than the max age
    assert obs.learned(BASE, t0 + 200, refresh_s=0).gpu[MODEL].stale


def test_a_host_entry_expires_on_its_own(obs: ObservationStore) -> None:
    """Entries of a host that stopped are dropped by the next report of any host, so the table
    holds only hosts that report (not every pid a restarted worker ever had)."""
    t0 = time.time() - 300
    _report(obs, "old:1", t0, (ALIAS,))
    _report(obs, "new:2", t0 + 61)
    fields = obs.redis.hkeys(obs.keys.obs_list("g", "hosts"))
    assert {f.decode() for f in fields} == {f'["{MODEL}","new:2",""]'}


def test_default_host_is_this_process() -> None:
    assert default_host() == f"{socket.gethostname()}:{os.getpid()}"
