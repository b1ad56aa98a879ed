"""The named sinks table (``config/sinks.toml``): what it accepts, and every entry it refuses,
each with the file and line of the mistake.

Also the two places a sink's name is checked: at submit, against the names the service
publishes with its config, and at delivery, against the table the worker loaded. The helpers
(``sink_settings``, ``with_sinks``, ``finished``, ``context_for``) are shared with the other
sink tests.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from config.settings import DEFAULT_SINKS_FILE, Settings
from routing.client import Client
from routing.engine.deliver import Outcome, run_delivery
from routing.errors import ConfigError, InvalidRequest
from routing.models import Request, ServiceConfig, StoredResult, coerce_request, prepare
from routing.sinks import SinkContext, SinkSettings, SinkTable, sink_for
from routing.sinks.table import (
    SinkTarget,
    SqlTarget,
    StreamTarget,
    WebhookTarget,
    load_sinks,
    parse_sinks,
)
from routing.states import State
from routing.store.lanes import LaneStore

SOURCE = "sinks.toml"


def sink_settings(paths: Sequence[Path] = (), **overrides: Any) -> SinkSettings:
    """Settings that allow loopback (the tests' receivers and Redis live there) and SQLite
    files under ``paths``."""
    values: dict[str, Any] = {
        "sink_allow": ["127.0.0.1/32"],
        "sink_allow_paths": [str(p) for p in paths],
        "webhook_timeout_s": 2.0,
    }
    values.update(overrides)
    return SinkSettings(_env_file=None, **values)  # type: ignore[call-arg]


def with_sinks(config: ServiceConfig, *names: str) -> ServiceConfig:
    """``config`` as a service with these sinks publishes it."""
    return config.model_copy(update={"sinks": tuple(sorted({*config.sinks, *names}))})


BODY: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}


def finished(
    store: LaneStore, config: ServiceConfig, now: float, callback: dict[str, Any] | None, **kw: Any
) -> str:
    """A request submitted with ``callback`` (its sink published), claimed and finished DONE:
    its result waits in the outbox. ``kw``: more fields of the request (``custom_id``)."""
    if callback is not None and "sink" in callback:
        config = with_sinks(config, callback["sink"])
    request = Request.model_validate({"body": dict(BODY), "callback": callback, **kw})
    [ticket] = store.submit_many([prepare(request, config, now)], config, now=now)
    [claimed] = store.claim(ticket.lane, 1, lease_s=60, now=now)
    answer = {"choices": [{"message": {"role": "assistant", "content": "hello"}}]}
    stored = StoredResult.model_validate({"status_code": 200, "body": answer})
    assert store.finish(ticket.id, claimed.token, State.DONE, stored, now=now + 0.5)
    return ticket.id


def deliver(store: LaneStore, context: SinkContext, request_id: str, now: float) -> Outcome:
    """One delivery attempt through the context's sinks, as the deliver task makes it."""
    return run_delivery(
        store,
        request_id,
        sinks=lambda spec: sink_for(spec, context),
        max_attempts=5,
        lease_s=30,
        now=now,
    )


def context_for(
    store: LaneStore, *targets: SinkTarget, settings: SinkSettings | None = None, **kw: Any
) -> SinkContext:
    """A worker's sink context over ``targets``, writing streams into the test's Redis."""
    return SinkContext(
        settings or sink_settings(),
        sinks=SinkTable(targets, source="test sinks"),
        redis=store.redis,
        namespace=store.keys.ns,
        **kw,
    )


def public(host: str, port: int) -> list[str]:
    """A resolver under which every name is a public address (example.com's)."""
    return ["93.184.215.14"]


def parse(text: str, **kw: Any) -> SinkTable:
    kw.setdefault("settings", sink_settings(sink_allow=[]))
    kw.setdefault("resolver", public)
    kw.setdefault("environ", {})
    return parse_sinks(text, source=SOURCE, **kw)


GOOD = """\
[sinks.crm]
kind = "webhook"
url = "https://crm.example.com/hooks/mixbatch"
secret_env = "CRM_WEBHOOK_SECRET"

[sinks.appdb]
kind = "sql"
url_env = "APPDB_URL"
table = "mixbatch_results"

[sinks.answers]
kind = "stream"
key = "app:answers"
maxlen = 100000
"""


def test_the_shipped_table_has_no_sinks() -> None:
    """No target a user did not configure: only commented examples."""
    table = load_sinks(DEFAULT_SINKS_FILE, settings=sink_settings())
    assert len(table) == 0 and table.names() == ()
    assert "[sinks.crm]" in DEFAULT_SINKS_FILE.read_text()


def test_the_documented_table_loads() -> None:
    table = parse(GOOD)
    assert table.names() == ("answers", "appdb", "crm")
    crm, appdb, answers = table.find("crm"), table.find("appdb"), table.find("answers")
    assert isinstance(crm, WebhookTarget) and crm.secret_env == "CRM_WEBHOOK_SECRET"
    assert isinstance(appdb, SqlTarget) and appdb.table == "mixbatch_results"
    assert isinstance(answers, StreamTarget) and (answers.key, answers.maxlen) == (
        "app:answers",
        100000,
    )
    assert table.find("nope") is None and "crm" in table


def test_secrets_come_from_the_environment_current_first(monkeypatch: pytest.MonkeyPatch) -> None:
    target = WebhookTarget(
        name="crm", url="https://crm.example.com/h", secret_env="NEW", previous_secret_env="OLD"
    )
    monkeypatch.setenv("NEW", "whsec_bmV3")
    monkeypatch.setenv("OLD", "whsec_b2xk")
    assert [s.get_secret_value() for s in target.secrets()] == ["whsec_bmV3", "whsec_b2xk"]
    assert "whsec" not in repr(target.secrets()), "never shown in a repr or a log line"
    monkeypatch.delenv("OLD")
    with pytest.raises(ConfigError, match=r"sink 'crm': OLD is not set"):
        target.secrets()


BAD: list[tuple[str, str, str]] = [
    (
        "unknown kind",
        '[sinks.crm]\nkind = "ftp"\nurl = "ftp://x"\n',
        "sinks.toml, line 2 ([sinks.crm] kind): unknown kind 'ftp': a sink is one of webhook, "
        "sql, stream",
    ),
    ("no kind", '[sinks.crm]\nurl = "https://x.example"\n', "line 1 ([sinks.crm]): kind: missing"),
    (
        "missing env var name",
        '[sinks.crm]\nkind = "webhook"\nurl = "https://crm.example.com/h"\n',
        "sinks.toml, line 1 ([sinks.crm]): secret_env: Field required",
    ),
    (
        "sql without url_env",
        '[sinks.db]\nkind = "sql"\nurl = "postgresql://u:pw@db.example/app"\n',
        "line 3 ([sinks.db] url): a sql sink's URL may hold a password, so it is never written "
        "here: put it in an environment variable of the worker and name that in url_env",
    ),
    (
        "a secret instead of a variable name",
        '[sinks.crm]\nkind = "webhook"\nurl = "https://crm.example.com/h"\n'
        'secret_env = "whsec_c2VjcmV0IHZhbHVl+/="\n',
        "line 4 ([sinks.crm] secret_env): 'whsec_c2VjcmV0IHZhbHVl+/=' is not an environment "
        "variable name",
    ),
    (
        "URL httpx cannot parse",
        '[sinks.crm]\nkind = "webhook"\nurl = "http://[::1"\nsecret_env = "S"\n',
        "line 3 ([sinks.crm] url): not a URL httpx can parse",
    ),
    (
        "not http",
        '[sinks.crm]\nkind = "webhook"\nurl = "file:///etc/passwd"\nsecret_env = "S"\n',
        "line 3 ([sinks.crm] url): scheme 'file' is not allowed: http or https",
    ),
    (
        "shorthand IPv4 host",
        '[sinks.crm]\nkind = "webhook"\nurl = "http://2130706433/h"\nsecret_env = "S"\n',
        "line 3 ([sinks.crm] url): '2130706433' reads as an IPv4 address in a shorthand form",
    ),
    (
        "internal address",
        '[sinks.crm]\nkind = "webhook"\nurl = "http://169.254.169.254/latest"\nsecret_env = "S"\n',
        "line 3 ([sinks.crm] url): refused: 169.254.169.254 is link-local (where cloud metadata "
        "services live); allow the host or its CIDR in MIXBATCH_SINK_ALLOW if it is meant",
    ),
    (
        "private address",
        '[sinks.crm]\nkind = "webhook"\nurl = "https://10.1.2.3/h"\nsecret_env = "S"\n',
        "line 3 ([sinks.crm] url): refused: 10.1.2.3 is private",
    ),
    (
        "key in our namespace",
        '[sinks.s]\nkind = "stream"\nkey = "mb:{lane:standard}:q"\n',
        "line 3 ([sinks.s] key): 'mb:{lane:standard}:q' is inside mixbatch's own key namespace "
        "(mb:)",
    ),
    (
        "CR/LF in a key",
        '[sinks.s]\nkind = "stream"\nkey = "answers\\r\\nFLUSHALL"\n',
        "line 3 ([sinks.s] key): 'answers\\r\\nFLUSHALL' holds control characters",
    ),
    (
        "braces that are no hash tag",
        '[sinks.s]\nkind = "stream"\nkey = "a{}b"\n',
        "line 3 ([sinks.s] key): 'a{}b': braces in a stream key must form a Redis Cluster hash tag",
    ),
    (
        "maxlen over the ceiling",
        '[sinks.s]\nkind = "stream"\nkey = "answers"\nmaxlen = 1000001\n',
        "line 4 ([sinks.s] maxlen): 1000001 is over the ceiling of 1000000 "
        "(MIXBATCH_STREAM_MAXLEN_CEILING)",
    ),
    (
        "maxlen zero",
        '[sinks.s]\nkind = "stream"\nkey = "answers"\nmaxlen = 0\n',
        "line 4 ([sinks.s] maxlen): Input should be greater than or equal to 1",
    ),
    (
        "bad sink name",
        '[sinks."CRM Hooks"]\nkind = "webhook"\nurl = "https://x.example/h"\nsecret_env = "S"\n',
        "sinks.toml, line 1 ([sinks.\"CRM Hooks\"]): 'CRM Hooks' is not a sink name: 1-64 "
        "characters of a-z, 0-9, '-' or '_'",
    ),
    (
        "bad table name",
        '[sinks.db]\nkind = "sql"\nurl_env = "DB_URL"\ntable = "answers; DROP TABLE x"\n',
        "line 4 ([sinks.db] table): 'answers; DROP TABLE x' must be 1-63 characters",
    ),
    (
        "a typo in the top table",
        '[sink.crm]\nkind = "webhook"\n',
        "sinks.toml, line 1: unknown table [sink]; each sink is a [sinks.NAME] table",
    ),
    ("not TOML", "[sinks.crm\n", "sinks.toml: not valid TOML"),
]


@pytest.mark.parametrize(("text", "message"), [c[1:] for c in BAD], ids=[c[0] for c in BAD])
def test_every_bad_entry_is_refused_naming_its_line(text: str, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse(text)
    assert message in str(info.value)


def test_a_name_resolving_inward_is_refused_at_load() -> None:
    """``localhost`` resolves to loopback with the system's own resolver."""
    text = '[sinks.crm]\nkind = "webhook"\nurl = "http://localhost:8080/h"\nsecret_env = "S"\n'
    with pytest.raises(ConfigError, match=r"line 3 \(\[sinks.crm\] url\): refused: localhost "):
        parse_sinks(text, source=SOURCE, settings=sink_settings(sink_allow=[]), environ={})
    allowed = sink_settings(sink_allow=["localhost"])
    assert parse_sinks(text, source=SOURCE, settings=allowed, environ={}).names() == ("crm",)


def test_a_name_that_does_not_resolve_yet_is_left_to_delivery() -> None:
    def down(host: str, port: int) -> list[str]:
        raise OSError("temporary failure in name resolution")

    assert parse(GOOD, resolver=down).names() == ("answers", "appdb", "crm")


def test_urls_held_in_the_environment_are_checked_when_set(tmp_path: Path) -> None:
    sql = '[sinks.db]\nkind = "sql"\nurl_env = "DB_URL"\n'
    stream = '[sinks.s]\nkind = "stream"\nkey = "answers"\nurl_env = "R_URL"\n'
    refused = {
        "postgresql+psycopg://app:pw@10.0.0.7/app": "refused: 10.0.0.7 is private",
        "postgresql://app:pw@db.example/app?host=10.0.0.7": "host= in the query is not accepted",
        "postgresql:///app": "must name its host",
        f"sqlite:///{tmp_path / 'elsewhere' / 'x.db'}": "a SQLite file at",
        "sqlite:////etc/cron.d/x": "is not under a directory of MIXBATCH_SINK_ALLOW_PATHS",
        "mysql://db.example/app": "dialect 'mysql' is not supported",
    }
    allowed = tmp_path / "dbs"
    for url, message in refused.items():
        with pytest.raises(ConfigError) as info:
            parse(sql, environ={"DB_URL": url}, settings=sink_settings([allowed], sink_allow=[]))
        assert "line 3 ([sinks.db] url_env)" in str(info.value) and message in str(info.value)
        assert "pw" not in str(info.value), "the URL's password is never repeated"
    ok = parse(
        sql, environ={"DB_URL": f"sqlite:///{allowed / 'a.db'}"}, settings=sink_settings([allowed])
    )
    assert ok.names() == ("db",)
    assert parse(sql).names() == ("db",), "an unset variable is checked at delivery"
    with pytest.raises(ConfigError, match=r"line 4 \(\[sinks.s\] url_env\): refused: 127.0.0.1"):
        parse(stream, environ={"R_URL": "redis://:pw@127.0.0.1:6379/0"})
    with pytest.raises(ConfigError, match=r"R_URL: not a Redis URL"):
        parse(stream, environ={"R_URL": "http://:hunter2@x/"})


def test_the_ceiling_is_a_setting() -> None:
    text = '[sinks.s]\nkind = "stream"\nkey = "answers"\nmaxlen = 5000\n'
    with pytest.raises(ConfigError, match="over the ceiling of 1000"):
        parse(text, settings=sink_settings(stream_maxlen_ceiling=1000))
    assert parse(text, settings=sink_settings(stream_maxlen_ceiling=5000)).names() == ("s",)


def test_the_namespace_is_the_services() -> None:
    text = '[sinks.s]\nkind = "stream"\nkey = "prod:answers"\n'
    assert parse(text).names() == ("s",)
    with pytest.raises(ConfigError, match=r"inside mixbatch's own key namespace \(prod:\)"):
        parse(text, namespace="prod")


def test_the_service_publishes_its_sink_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "sinks.toml"
    path.write_text('[sinks.answers]\nkind = "stream"\nkey = "app:answers"\n')
    monkeypatch.setenv("MIXBATCH_SINKS_FILE", str(path))
    assert Settings().service_config().sinks == ("answers",)
    monkeypatch.setenv("MIXBATCH_SINKS_FILE", str(tmp_path / "missing.toml"))
    with pytest.raises(ConfigError, match=r"MIXBATCH_SINKS_FILE=.*missing.toml: cannot read"):
        Settings().service_config()


# -- the name, at submit and at delivery ------------------------------------------------------


def test_the_client_refuses_a_sink_the_service_does_not_have(
    store: LaneStore, service_config: ServiceConfig, redis_url: str
) -> None:
    config = with_sinks(service_config, "answers", "crm")
    with Client(redis_url, namespace=store.keys.ns, config=config) as client:
        with pytest.raises(InvalidRequest) as info:
            client.submit(body=BODY, callback={"sink": "crn"})
        assert info.value.field == "callback.sink"
        assert str(info.value) == (
            "callback.sink: the service has no sink 'crn' (its sinks: answers, crm; they are "
            "registered in its config/sinks.toml)"
        )
        assert client.submit(body=BODY, callback={"sink": "crm"}).id
    assert store.lane_stats("standard").depth == 1, "only the known name was enqueued"


@pytest.mark.parametrize(
    ("callback", "field", "message"),
    [
        ({"sink": "CRM!"}, "callback.sink", "'CRM!' is not a sink name"),
        ({"sink": "crm", "url": "https://x"}, "callback.url", "Extra inputs are not permitted"),
        (
            {"kind": "webhook", "url": "https://hooks.example.com/h"},
            "callback.kind",
            "inline webhook callbacks are no longer accepted: the service holds targets and "
            "their credentials now. Register the webhook target as a named sink in the "
            "service's config/sinks.toml (or the file MIXBATCH_SINKS_FILE names) and send "
            '{"sink": NAME}',
        ),
        ({"kind": "sql", "url": "sqlite:////tmp/x.db"}, "callback.kind", "inline sql callbacks"),
        (
            {"kind": "stream", "key": "k", "redis_url": "redis://h"},
            "callback.kind",
            "inline stream",
        ),
        ({"kind": "ftp"}, "callback.kind", "unknown callback kind 'ftp': a callback is"),
        ({}, "callback.kind", 'missing: a callback is {"sink": NAME} or {"kind": "celery"'),
    ],
)
def test_a_callback_names_a_sink_never_a_target(
    callback: dict[str, Any], field: str, message: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        coerce_request({"body": BODY, "callback": callback})
    assert info.value.field == field
    assert message in str(info.value)


def test_a_sink_the_worker_does_not_have_is_a_dead_letter(
    store: LaneStore, service_config: ServiceConfig
) -> None:
    """Published once, since removed from the table: the delivery says which file to fix."""
    now = time.time()
    rid = finished(store, service_config, now, {"sink": "gone"})
    context = context_for(store, StreamTarget(name="answers", key="app:answers"))
    try:
        out = deliver(store, context, rid, now + 1)
    finally:
        context.close()
    assert out.status == "dead letter"
    assert out.error is not None and out.error.code == "unknown_sink"
    assert out.error.message == (
        "named sink: no sink named 'gone' in test sinks (sinks: answers); add it to the "
        "service's config/sinks.toml (or the file MIXBATCH_SINKS_FILE names), then replay"
    )
    assert store.status(rid).state is State.DONE and store.result(rid) is not None
