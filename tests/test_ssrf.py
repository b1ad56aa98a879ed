"""The address guard (``routing.sinks.guard``) on every network sink: webhook URLs, PostgreSQL
hosts, another Redis; when the table is loaded and when a delivery connects.

Internal addresses are refused in every spelling that reaches one: plain, and tunnelled inside
IPv6 (IPv4-mapped, IPv4-compatible, 6to4, NAT64, Teredo). A name's DNS answer can change after
the table was loaded, so each delivery resolves again and checks every address; the tests use
a resolver whose answer changes between the two, and the system's own ``localhost``.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Iterator

import psycopg
import pytest
import sqlalchemy as sa

from routing.callbacks import SinkCallback
from routing.errors import ConfigError
from routing.models import ServiceConfig
from routing.sinks import AddressRefused, DeliveryError, SinkContext, sink_for
from routing.sinks.guard import AddressPolicy, literal_address, redis_endpoint, refusal
from routing.sinks.table import SqlTarget, StreamTarget, WebhookTarget
from routing.store.lanes import LaneStore
from tests.test_sink_table import context_for, deliver, finished, parse, sink_settings

#: (address, the form's name in the refusal)
TUNNELLED = [
    ("::ffff:127.0.0.1", "IPv4-mapped, embedding 127.0.0.1, which is loopback"),
    ("::ffff:169.254.169.254", "IPv4-mapped, embedding 169.254.169.254, which is link-local"),
    ("::ffff:10.0.0.1", "IPv4-mapped, embedding 10.0.0.1, which is private"),
    ("::127.0.0.1", "IPv4-compatible IPv6 address"),
    ("::10.0.0.1", "IPv4-compatible IPv6 address"),
    ("2002:7f00:1::1", "6to4, embedding 127.0.0.1, which is loopback"),
    ("2002:a9fe:a9fe::1", "6to4, embedding 169.254.169.254, which is link-local"),
    ("2002:c0a8:101::1", "6to4, embedding 192.168.1.1, which is private"),
    ("64:ff9b::7f00:1", "NAT64, embedding 127.0.0.1, which is loopback"),
    ("64:ff9b::a9fe:a9fe", "NAT64, embedding 169.254.169.254, which is link-local"),
    ("64:ff9b:1::a00:1", "local-use NAT64 address"),
    ("2001:0:4136:e378:8000:63bf:3fff:fdd2", "Teredo tunnel address"),
    ("2001::1", "Teredo tunnel address"),
]
PLAIN = [
    ("127.0.0.1", "loopback"),
    ("::1", "loopback"),
    ("169.254.169.254", "link-local"),
    ("fe80::1", "link-local"),
    ("10.1.2.3", "private"),
    ("fd00::1", "private"),
    ("100.64.0.1", "not globally routable"),
    ("0.0.0.0", "unspecified"),
    ("224.0.0.1", "multicast"),
]
#: Public addresses, also in their tunnelled forms: nothing internal, so they pass.
PUBLIC = ["93.184.215.14", "2606:2800:21f:cb07:6820:80da:af6b:8b2c", "::ffff:93.184.215.14"]
PUBLIC += ["2002:5db8:d70e::1", "64:ff9b::5db8:d70e"]


@pytest.mark.parametrize(("address", "why"), TUNNELLED + PLAIN)
def test_internal_addresses_are_refused_in_every_form(address: str, why: str) -> None:
    ip = literal_address(address)
    assert ip is not None
    reason = refusal(ip)
    assert reason is not None and why in reason


@pytest.mark.parametrize("address", PUBLIC)
def test_public_addresses_pass(address: str) -> None:
    ip = literal_address(address)
    assert ip is not None and refusal(ip) is None


def test_the_allow_list_admits_a_network_in_every_form() -> None:
    policy = AddressPolicy.from_allow(["127.0.0.1/32", "hooks.internal"])
    assert policy.check("127.0.0.1", ["127.0.0.1"]) == ["127.0.0.1"]
    assert policy.check("h", ["::ffff:127.0.0.1"]) == ["::ffff:127.0.0.1"]
    assert policy.check("hooks.internal", ["10.0.0.1"]) == ["10.0.0.1"]
    with pytest.raises(AddressRefused, match=r"127\.0\.0\.2 is loopback"):
        policy.check("127.0.0.2", ["127.0.0.2"])
    with pytest.raises(AddressRefused, match=r"6to4, embedding 127.0.0.1"):
        policy.check("h", ["2002:7f00:1::1"])


# -- at load ------------------------------------------------------------------------------------


@pytest.mark.parametrize(("address", "why"), TUNNELLED)
def test_a_tunnelled_address_in_a_url_is_refused_at_load(address: str, why: str) -> None:
    text = f'[sinks.crm]\nkind = "webhook"\nurl = "https://[{address}]/h"\nsecret_env = "S"\n'
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert "sinks.toml, line 3 ([sinks.crm] url): refused:" in str(info.value)
    assert why in str(info.value)


@pytest.mark.parametrize(("address", "why"), TUNNELLED)
def test_a_name_resolving_to_a_tunnelled_address_is_refused_at_load(address: str, why: str) -> None:
    text = '[sinks.crm]\nkind = "webhook"\nurl = "https://crm.example.com/h"\nsecret_env = "S"\n'
    with pytest.raises(ConfigError) as info:
        parse(text, resolver=lambda host, port: ["93.184.215.14", address])
    assert f"crm.example.com ({ipaddress.ip_address(address)}) is " in str(info.value)
    assert why in str(info.value)


# -- at delivery: the DNS answer changed since the table was loaded -----------------------------


class Rebinding:
    """A resolver that answers a public address first (the table's load), then ``later``."""

    def __init__(self, later: str) -> None:
        self.later = later
        self.calls: list[str] = []

    def __call__(self, host: str, port: int) -> list[str]:
        self.calls.append(host)
        return ["93.184.215.14"] if len(self.calls) == 1 else [self.later]


@pytest.fixture
def now() -> float:
    return time.time()


def deliver_failing(
    store: LaneStore,
    config: ServiceConfig,
    context: SinkContext,
    sink: str,
    now: float,
    **environ: str,
) -> tuple[str, str]:
    """Finish a request for ``sink`` and deliver it once through ``context`` (closed after),
    with ``environ`` set meanwhile; the delivery's status and its error's message."""
    rid = finished(store, config, now, {"sink": sink})
    try:
        with pytest.MonkeyPatch.context() as env:
            for name, value in environ.items():
                env.setenv(name, value)
            out = deliver(store, context, rid, now + 1)
    finally:
        context.close()
    assert out.error is not None, out
    return out.status, out.error.message


SECRET = {"S": "whsec_c2VjcmV0LXNlY3JldC1zZWNyZXQ="}


@pytest.mark.parametrize(("address", "why"), TUNNELLED + PLAIN[:3])
def test_a_webhook_whose_name_turns_inward_is_refused_at_delivery(
    store: LaneStore, service_config: ServiceConfig, now: float, address: str, why: str
) -> None:
    resolver = Rebinding(address)
    text = '[sinks.crm]\nkind = "webhook"\nurl = "https://crm.example.com/h"\nsecret_env = "S"\n'
    table = parse(text, resolver=resolver)  # loads: the name was public then
    [target] = table
    context = context_for(store, target, settings=sink_settings(sink_allow=[]), resolver=resolver)
    status, message = deliver_failing(store, service_config, context, "crm", now, **SECRET)
    assert status == "dead letter", "a refused address is not retried"
    assert why in message and "crm.example.com" in message
    assert len(resolver.calls) == 2, "resolved again at delivery"


def test_localhost_is_refused_at_delivery_with_the_systems_resolver(
    store: LaneStore, service_config: ServiceConfig, now: float
) -> None:
    """No fake: ``localhost`` resolves to loopback, and nothing is sent there."""
    target = WebhookTarget(name="crm", url="http://localhost:9/h", secret_env="S")
    context = context_for(store, target, settings=sink_settings(sink_allow=[]))
    status, message = deliver_failing(store, service_config, context, "crm", now, **SECRET)
    assert status == "dead letter"
    assert "refused to connect: localhost (127.0.0.1) is loopback" in message


def test_a_postgres_host_turning_inward_is_refused_before_connecting(
    store: LaneStore, service_config: ServiceConfig, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    resolver = Rebinding("2002:a9fe:a9fe::1")
    url = "postgresql+psycopg://app:hunter2@db.example.com/app"
    monkeypatch.setenv("APPDB_URL", url)
    text = '[sinks.appdb]\nkind = "sql"\nurl_env = "APPDB_URL"\n'
    table = parse(text, resolver=resolver, environ={"APPDB_URL": url})  # public at load
    context = context_for(store, *table, settings=sink_settings(sink_allow=[]), resolver=resolver)
    status, message = deliver_failing(store, service_config, context, "appdb", now)
    assert status == "dead letter"
    assert "db.example.com (2002:a9fe:a9fe::1) is 6to4, embedding 169.254.169.254" in message
    assert "hunter2" not in message
    assert len(resolver.calls) == 2, "resolved at load, and again at delivery"


def test_a_postgres_connection_goes_to_the_checked_address(
    store: LaneStore, service_config: ServiceConfig, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """libpq is handed the address that was checked (``hostaddr``), so it does not look the
    name up again; the name stays ``host`` (TLS and passfile checks use it)."""
    url = "postgresql+psycopg://app:pw@db.example.com:5433/app"
    monkeypatch.setenv("APPDB_URL", url)
    target = SqlTarget(name="appdb", url_env="APPDB_URL")
    context = context_for(store, target, resolver=lambda host, port: ["93.184.215.14"])
    seen: dict[str, object] = {}

    @sa.event.listens_for(context.engines.engine(url, "93.184.215.14"), "do_connect")
    def _capture(
        dialect: object, record: object, cargs: object, cparams: dict[str, object]
    ) -> None:
        seen.update(cparams)
        raise psycopg.OperationalError("not connecting anywhere in a test")

    status, message = deliver_failing(store, service_config, context, "appdb", now)
    assert (seen["host"], seen["hostaddr"], seen["port"]) == (
        "db.example.com",
        "93.184.215.14",
        5433,
    )
    assert status == "retry" and "not connecting anywhere" in message


def test_another_redis_turning_inward_is_refused_and_the_client_pinned(
    store: LaneStore, redis_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A stream sink on another Redis: refused when its name turns inward after the load;
    when its address is allowed, the client connects to the checked address."""
    port = redis_endpoint(redis_url).port
    monkeypatch.setenv("R_URL", f"redis://cache.example.com:{port}/0")
    resolver = Rebinding("::1")
    text = '[sinks.s]\nkind = "stream"\nkey = "app:answers"\nurl_env = "R_URL"\n'
    [target] = parse(
        text, resolver=resolver, environ={"R_URL": f"redis://cache.example.com:{port}/0"}
    )
    assert isinstance(target, StreamTarget)
    refused = context_for(store, target, settings=sink_settings(sink_allow=[]), resolver=resolver)
    try:
        with pytest.raises(AddressRefused, match=r"cache.example.com \(::1\) is loopback"):
            sink_for(SinkCallback(sink="s"), refused)
    finally:
        refused.close()
    allowed = context_for(store, target, resolver=lambda host, p: ["127.0.0.1"])
    try:
        client, own = allowed.redis_for(target)
        assert not own
        assert client.connection_pool.connection_kwargs["host"] == "127.0.0.1"
        assert client.ping()
    finally:
        allowed.close()


def test_a_dns_failure_at_delivery_is_retried(
    store: LaneStore, service_config: ServiceConfig, now: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    def down(host: str, port: int) -> list[str]:
        raise OSError("temporary failure in name resolution")

    monkeypatch.setenv("R_URL", "redis://cache.example.com:6379/0")
    context = context_for(
        store, StreamTarget(name="s", key="app:answers", url_env="R_URL"), resolver=down
    )
    status, message = deliver_failing(store, service_config, context, "s", now)
    assert status == "retry" and "cannot resolve 'cache.example.com'" in message


def test_guard_errors_are_delivery_errors() -> None:
    assert issubclass(AddressRefused, DeliveryError)


@pytest.fixture(autouse=True)
def _no_leftover_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("MIXBATCH_SINK_ALLOW", raising=False)
    monkeypatch.delenv("MIXBATCH_WEBHOOK_ALLOW", raising=False)
    yield
