"""Every form of MIXBATCH_REDIS_URL and MIXBATCH_BROKER_URL: parsed, or refused in a sentence
that names the variable (and never shows a password). No server is needed here but the session
Redis; tests/test_cluster.py and tests/test_sentinel.py run the forms against real engines."""

from __future__ import annotations

import pytest

from config.settings import Settings, broker_for, redbeat_store_config
from routing.client import Client
from routing.errors import ConfigError, MixbatchError, StoreUnavailable
from routing.store.connect import Replication, connect, is_cluster, parse_redis_url
from routing.store.lanes import LaneStore
from tests.servers import free_ports


def test_cluster_and_sentinel_forms_parse() -> None:
    t = parse_redis_url("rediss+cluster://u:p%2Fw@a:7000,[::1]:7001,b/")
    assert (t.kind, t.tls, t.username, t.password) == ("cluster", True, "u", "p/w")
    assert t.nodes == (("a", 7000), ("::1", 7001), ("b", 6379))
    s = parse_redis_url("redis+sentinel://:pw@s1:26379,s2/mymaster/3")
    assert (s.kind, s.service, s.db, s.password) == ("sentinel", "mymaster", 3, "pw")
    assert s.nodes == (("s1", 26379), ("s2", 26379))
    assert parse_redis_url("redis://localhost:6379/0").kind == "node"
    assert is_cluster("redis+cluster://a:1/") and not is_cluster("redis://a:1/0")


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://a:1/", "unknown scheme"),
        ("redis+cluster:///", "names no host"),
        ("redis+cluster://a:notaport/", "bad port"),
        ("redis+cluster://a:99999/", "bad port"),
        ("redis+cluster://a:7000/3", "a Redis Cluster has one database"),
        ("redis+sentinel://s:26379/", "needs the Sentinel service name"),
        ("redis+sentinel://s:26379/svc/x", "not a number"),
        ("redis+sentinel://s:26379/svc/0/extra", "needs the Sentinel service name"),
    ],
)
def test_bad_forms_name_the_variable(url: str, why: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url(url)
    assert str(info.value).startswith("MIXBATCH_REDIS_URL: ")
    assert why in str(info.value)


def test_bad_url_never_shows_its_password() -> None:
    with pytest.raises(ConfigError) as info:
        parse_redis_url("redis+cluster://user:hunter2@a:bad/")
    assert "hunter2" not in str(info.value)


def test_cluster_with_no_reachable_node_is_a_clear_error() -> None:
    a, b = free_ports(2, bus=True)
    url = f"redis+cluster://:hunter2@127.0.0.1:{a},127.0.0.1:{b}/"
    for build in (lambda: connect(url), lambda: Client(url, namespace="x")):
        with pytest.raises(StoreUnavailable) as info:
            build()
        assert "MIXBATCH_REDIS_URL: no node of the Redis Cluster" in str(info.value)
        assert "hunter2" not in str(info.value)


def test_sentinel_with_no_reachable_sentinel_is_a_clear_error() -> None:
    (port,) = free_ports(1)
    with pytest.raises(StoreUnavailable, match="MIXBATCH_REDIS_URL: no sentinel"):
        connect(f"redis+sentinel://127.0.0.1:{port}/svc/0")


def test_plain_url_still_builds_lazily(redis_url: str) -> None:
    store = LaneStore.from_url(redis_url, namespace="urls")
    try:
        assert not store.cluster
        assert store.redis.ping()
    finally:
        store.close()


def test_cluster_store_needs_a_broker() -> None:
    with pytest.raises(ConfigError) as info:
        broker_for("redis+cluster://a:7000/", None)
    assert "MIXBATCH_BROKER_URL is unset" in str(info.value)
    assert "Redis Cluster" in str(info.value)
    assert broker_for("redis+cluster://a:7000/", "amqp://guest:guest@rabbit//").startswith("amqp")


@pytest.mark.parametrize("broker", ["amqp://h//", "pyamqp://h//", "redis://h/1", "sentinel://h:1"])
def test_broker_forms_accepted(broker: str) -> None:
    assert broker_for("redis://store/0", broker) == broker


def test_unknown_broker_scheme_names_the_variable() -> None:
    with pytest.raises(ConfigError, match="MIXBATCH_BROKER_URL: sqs://\\*\\*\\*@q is no broker"):
        broker_for("redis://store/0", "sqs://secret@q")


def test_broker_defaults_to_the_store() -> None:
    assert broker_for("redis://:pw@store:6379/2", None) == "redis://:pw@store:6379/2"
    lent = broker_for("redis+sentinel://:pw@s1:26379,s2:26380/svc/4", None)
    assert lent == "sentinel://:pw@s1:26379/4;sentinel://:pw@s2:26380/4"


def test_settings_sentinel_broker_takes_the_store_service(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIXBATCH_REDIS_URL", "redis+sentinel://s1:26379/svc/0")
    monkeypatch.delenv("MIXBATCH_BROKER_URL", raising=False)
    s = Settings()
    assert s.broker_url() == "sentinel://s1:26379/0"
    assert s.broker_transport_options() == {"master_name": "svc"}
    monkeypatch.setenv("MIXBATCH_REDIS_URL", "redis://store:6379/0")
    monkeypatch.setenv("MIXBATCH_BROKER_URL", "sentinel://s1:26379")
    with pytest.raises(ConfigError, match="MIXBATCH_BROKER_MASTER_NAME"):
        Settings().broker_transport_options()
    monkeypatch.setenv("MIXBATCH_BROKER_MASTER_NAME", "q")
    assert Settings().broker_transport_options() == {"master_name": "q"}


def test_redbeat_follows_every_store_form(monkeypatch: pytest.MonkeyPatch) -> None:
    from config.ops import reset_ops_settings

    monkeypatch.setenv("MIXBATCH_BEAT_SCHEDULER", "redbeat")
    reset_ops_settings()
    try:
        plain = redbeat_store_config("redis://h:1/0", "mb")
        assert plain["redbeat_redis_url"] == "redis://h:1/0"
        cluster = redbeat_store_config("redis+cluster://:pw@h:7000,h:7001/", "mb")
        assert cluster["redbeat_redis_options"] == {"cluster": True}
        assert cluster["redbeat_key_prefix"] == "{mb:redbeat}:"
        assert cluster["redbeat_redis_url"].startswith("redis://:pw@h:7000")
        sentinel = redbeat_store_config("redis+sentinel://s1:26379,s2:26379/svc/2", "mb")
        assert sentinel["redbeat_redis_options"]["sentinels"] == [("s1", 26379), ("s2", 26379)]
        assert sentinel["redbeat_redis_options"]["service_name"] == "svc"
    finally:
        monkeypatch.delenv("MIXBATCH_BEAT_SCHEDULER")
        reset_ops_settings()


@pytest.mark.parametrize(
    ("name", "value"),
    [("MIXBATCH_REDIS_MIN_REPLICAS", "one"), ("MIXBATCH_REDIS_WAIT_TIMEOUT_S", "0")],
)
def test_bad_replica_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, name: str, value: str
) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ConfigError, match=name):
        Replication.from_env()


def test_no_replicas_no_wait(redis_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Unset MIXBATCH_REDIS_MIN_REPLICAS on a master with no replica: nothing to wait for."""
    monkeypatch.delenv("MIXBATCH_REDIS_MIN_REPLICAS", raising=False)
    client = connect(redis_url)
    try:
        Replication(timeout_s=0.1).confirm(client, ["mb:{lane:x}:q"])
        with pytest.raises(MixbatchError, match="0 of the 1 replica"):
            Replication(min_replicas=1, timeout_s=0.1).confirm(client, ["mb:{lane:x}:q"])
    finally:
        client.close()
