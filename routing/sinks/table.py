"""The named sinks: the targets producers may name, held by the service with their credentials.

A producer's callback is ``{"sink": "crm"}``; what ``crm`` is lives here, in the service's
``config/sinks.toml`` (``MIXBATCH_SINKS_FILE`` names another file):

    [sinks.crm]
    kind = "webhook"
    url = "https://crm.example.com/hooks/mixbatch"
    secret_env = "CRM_WEBHOOK_SECRET"          # whsec_<base64>, per Standard Webhooks
    # previous_secret_env = "CRM_WEBHOOK_SECRET_OLD"   while rotating: both sign

    [sinks.appdb]
    kind = "sql"
    url_env = "APPDB_URL"                      # a SQLAlchemy URL (sqlite, postgresql)
    table = "mixbatch_results"                 # optional: MIXBATCH_SQL_TABLE

    [sinks.answers]
    kind = "stream"
    key = "app:answers"
    maxlen = 100000                            # optional: MIXBATCH_STREAM_MAXLEN
    # url_env = "ANSWERS_REDIS_URL"            optional: another Redis; default the service's

Credentials are never in the file: a webhook's secret and a database's or another Redis's URL
are read from the environment variables the table names, when a delivery needs them. Loading
checks every entry and reports the first mistake as ``FILE, line N ([sinks.NAME] field):
message``: an unknown kind or key, a missing field, a name or variable name that breaks its
rule, a URL that does not parse, a host that is internal (``routing.sinks.guard``), a SQLite
file outside ``MIXBATCH_SINK_ALLOW_PATHS``, a stream key inside mixbatch's own namespace or
holding control characters, a ``maxlen`` over ``MIXBATCH_STREAM_MAXLEN_CEILING``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from routing.callbacks import SINK_NAME, SINK_NAME_RULE, check_sink_name
from routing.decide.tables import Table, TableFile, toml_label
from routing.errors import ConfigError
from routing.sinks.guard import (
    AddressPolicy,
    Endpoint,
    Resolver,
    bad_stream_key,
    path_refusal,
    redis_endpoint,
    resolve_host,
    sql_endpoint,
    webhook_endpoint,
)
from routing.sinks.settings import SinkSettings, get_sink_settings

__all__ = [
    "SinkTable",
    "SinkTarget",
    "SqlTarget",
    "StreamTarget",
    "WebhookTarget",
    "load_sinks",
    "parse_sinks",
]

ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SQL_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


def _env_name(value: str) -> str:
    if not ENV_NAME.fullmatch(value):
        raise ValueError(
            f"{value!r} is not an environment variable name (letters, digits and '_', "
            "not starting with a digit); the table names the variable, never the secret"
        )
    return value


def read_env(variable: str, sink: str, what: str) -> SecretStr:
    """The value of ``variable`` for sink ``sink``; ``ConfigError`` naming it when unset."""
    value = os.environ.get(variable)
    if not value:
        raise ConfigError(
            f"sink {sink!r}: {variable} is not set in the worker's environment (the {what})"
        )
    return SecretStr(value)


class _Target(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return check_sink_name(v)


class WebhookTarget(_Target):
    """POST each result, signed per Standard Webhooks with the secret ``secret_env`` holds."""

    kind: Literal["webhook"] = "webhook"
    url: str = Field(min_length=1, max_length=2048)
    secret_env: str
    previous_secret_env: str | None = None

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        webhook_endpoint(v)
        return v

    @field_validator("secret_env", "previous_secret_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return None if v is None else _env_name(v)

    def secrets(self) -> list[SecretStr]:
        """The signing secrets, current first, then the previous one while rotating."""
        names = [self.secret_env]
        if self.previous_secret_env:
            names.append(self.previous_secret_env)
        return [read_env(n, self.name, "webhook signing secret") for n in names]


class SqlTarget(_Target):
    """Upsert each result, by request id, into ``table`` of the database ``url_env`` names."""

    kind: Literal["sql"] = "sql"
    url_env: str
    table: str | None = None

    @field_validator("url_env")
    @classmethod
    def _env(cls, v: str) -> str:
        return _env_name(v)

    @field_validator("table")
    @classmethod
    def _identifier(cls, v: str | None) -> str | None:
        if v is not None and not _SQL_TABLE.fullmatch(v):
            raise ValueError(
                f"{v!r} must be 1-63 characters of letters, digits or '_', not starting "
                "with a digit"
            )
        return v

    def url(self) -> SecretStr:
        return read_env(self.url_env, self.name, "database URL")


class StreamTarget(_Target):
    """XADD each result to ``key``, once per request id, trimmed to about ``maxlen``."""

    kind: Literal["stream"] = "stream"
    key: str = Field(min_length=1, max_length=512)
    maxlen: int | None = Field(default=None, ge=1)
    url_env: str | None = None

    @field_validator("key")
    @classmethod
    def _key(cls, v: str) -> str:
        why = bad_stream_key(v)
        if why is not None:
            raise ValueError(why)
        return v

    @field_validator("url_env")
    @classmethod
    def _env(cls, v: str | None) -> str | None:
        return None if v is None else _env_name(v)

    def url(self) -> SecretStr | None:
        """Another Redis's URL, or None for the service's own."""
        if self.url_env is None:
            return None
        return read_env(self.url_env, self.name, "Redis URL")


SinkTarget = Annotated[WebhookTarget | SqlTarget | StreamTarget, Field(discriminator="kind")]
_KINDS: dict[str, type[WebhookTarget | SqlTarget | StreamTarget]] = {
    "webhook": WebhookTarget,
    "sql": SqlTarget,
    "stream": StreamTarget,
}


class SinkTable:
    """The sinks by name, and the file they came from (for messages)."""

    def __init__(
        self,
        targets: Iterable[WebhookTarget | SqlTarget | StreamTarget] = (),
        *,
        source: str = "the sinks table",
    ) -> None:
        self.source = source
        self._targets: dict[str, WebhookTarget | SqlTarget | StreamTarget] = {}
        for target in targets:
            if target.name in self._targets:
                raise ConfigError(f"{source}: sink {target.name!r} is defined twice")
            self._targets[target.name] = target

    def find(self, name: str) -> WebhookTarget | SqlTarget | StreamTarget | None:
        return self._targets.get(name)

    def names(self) -> tuple[str, ...]:
        return tuple(sorted(self._targets))

    def __contains__(self, name: object) -> bool:
        return name in self._targets

    def __iter__(self) -> Iterator[WebhookTarget | SqlTarget | StreamTarget]:
        return iter(self._targets.values())

    def __len__(self) -> int:
        return len(self._targets)

    def __repr__(self) -> str:
        return f"SinkTable({', '.join(self.names()) or 'no sinks'} from {self.source})"


def load_sinks(
    path: Path | str,
    *,
    settings: SinkSettings | None = None,
    namespace: str = "mb",
    resolver: Resolver = resolve_host,
    environ: Mapping[str, str] | None = None,
) -> SinkTable:
    """The table in ``path``, every entry checked (see the module's docstring)."""
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"MIXBATCH_SINKS_FILE={path}: cannot read ({exc})") from None
    return parse_sinks(
        text,
        source=str(path),
        settings=settings,
        namespace=namespace,
        resolver=resolver,
        environ=environ,
    )


def parse_sinks(
    text: str,
    *,
    source: str,
    settings: SinkSettings | None = None,
    namespace: str = "mb",
    resolver: Resolver = resolve_host,
    environ: Mapping[str, str] | None = None,
) -> SinkTable:
    """``load_sinks`` of a text; ``environ`` (default ``os.environ``) holds the URLs that
    ``url_env`` names: a URL set there is checked now, one unset is checked at delivery."""
    file = TableFile(text, source)
    for top in file.doc:
        if top != "sinks":
            line = file.line(top)
            raise ConfigError(
                f"{source}, line {line or '?'}: unknown table {toml_label((top,))}; "
                "each sink is a [sinks.NAME] table"
            )
    raw = file.doc.get("sinks", {})
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}, line {file.line('sinks') or '?'}: sinks must be a table")
    checks = _Checks(
        settings or get_sink_settings(),
        namespace,
        resolver,
        os.environ if environ is None else environ,
    )
    targets = []
    for name, fields in raw.items():
        table = Table.of(file, ("sinks", name), fields, key_lines=True)
        targets.append(checks.target(table))
    return SinkTable(targets, source=source)


class _Checks:
    """What loading checks beyond each entry's own fields: addresses, paths, namespace."""

    def __init__(
        self,
        settings: SinkSettings,
        namespace: str,
        resolver: Resolver,
        environ: Mapping[str, str],
    ) -> None:
        self.settings = settings
        self.namespace = namespace
        self.resolver = resolver
        self.environ = environ
        self.policy = AddressPolicy.from_allow(settings.sink_allow)

    def target(self, table: Table) -> WebhookTarget | SqlTarget | StreamTarget:
        if not SINK_NAME.fullmatch(table.name):
            raise table.error(f"{table.name!r} is not a sink name: {SINK_NAME_RULE}")
        kind = table.fields.get("kind")
        if kind not in _KINDS:
            what = "missing" if kind is None else f"unknown kind {kind!r}"
            raise table.error(
                f"{what}: a sink is one of {', '.join(_KINDS)} (Celery callbacks need no "
                'sink: a producer gives {"kind": "celery", "task": ...} inline)',
                "kind",
            )
        for key in ("url", "redis_url"):
            if kind != "webhook" and key in table.fields:
                raise table.error(
                    f"a {kind} sink's URL may hold a password, so it is never written here: "
                    "put it in an environment variable of the worker and name that in url_env",
                    key,
                )
        target = table.build(_KINDS[kind], {**table.fields, "name": table.name})
        if isinstance(target, WebhookTarget):
            endpoint = webhook_endpoint(target.url)
            self._address(table, "url", endpoint.host, endpoint.port)
        elif isinstance(target, SqlTarget):
            self._sql(table, target)
        else:
            self._stream(table, target)
        return target

    def _address(self, table: Table, key: str, host: str | None, port: int) -> None:
        if host is None:
            return
        why = self.policy.at_load(host, port, self.resolver)
        if why is not None:
            raise table.error(f"refused: {why}", key)

    def _env_url(
        self, table: Table, variable: str | None, parse: Callable[[str], Endpoint], what: str
    ) -> None:
        """Check the URL ``variable`` holds, if it is set here: where it goes must be allowed.
        Messages name the variable, never repeat the URL (it may hold a password)."""
        url = self.environ.get(variable) if variable else None
        if not url:
            return
        try:
            endpoint = parse(url)
        except ValueError as exc:
            raise table.error(f"{variable}: {exc}", "url_env") from None
        if endpoint.path is not None:
            why = path_refusal(endpoint.path, self.settings.sink_allow_paths, what)
            if why is not None:
                raise table.error(why, "url_env")
        self._address(table, "url_env", endpoint.host, endpoint.port)

    def _sql(self, table: Table, target: SqlTarget) -> None:
        self._env_url(table, target.url_env, sql_endpoint, "a SQLite file")

    def _stream(self, table: Table, target: StreamTarget) -> None:
        own = f"{self.namespace}:"
        if target.key.startswith(own):
            raise table.error(
                f"{target.key!r} is inside mixbatch's own key namespace ({own}); whatever "
                "Redis the sink names, choose a key outside it",
                "key",
            )
        ceiling = self.settings.stream_maxlen_ceiling
        if target.maxlen is not None and target.maxlen > ceiling:
            raise table.error(
                f"{target.maxlen} is over the ceiling of {ceiling} "
                "(MIXBATCH_STREAM_MAXLEN_CEILING)",
                "maxlen",
            )
        self._env_url(table, target.url_env, redis_endpoint, "a Redis unix socket")
