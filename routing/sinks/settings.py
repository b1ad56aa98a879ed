"""Settings of the result sinks, from the environment (prefix ``MIXBATCH_``).

They live beside the sinks rather than in ``config.settings`` so that ``routing`` stays free of
``config`` (imports run one way: docs/architecture.md) and a receiver or a test can build them.

    MIXBATCH_SINK_ALLOW                 hosts or CIDRs a network sink (webhook, SQL host,
                                        Redis host) may reach although they are loopback,
                                        link-local, private or reserved (JSON list, or
                                        comma-separated: "127.0.0.1/32,hooks.lan")
    MIXBATCH_WEBHOOK_ALLOW              its older name, still read (the two lists are joined)
    MIXBATCH_SINK_ALLOW_PATHS           directories where a SQLite sink's file may be (and a
                                        unix socket of a stream sink's Redis); none by default
    MIXBATCH_WEBHOOK_TIMEOUT_S          one webhook delivery, all of it, default 10
    MIXBATCH_MAX_PAYLOAD_BYTES          largest result any sink is sent, default 1 MB
    MIXBATCH_SINK_MAX_PAYLOAD_BYTES     JSON {"stream": 65536}: a lower (or higher) limit per sink
    MIXBATCH_STREAM_MAXLEN              default MAXLEN of a stream sink, default 100000
    MIXBATCH_STREAM_MAXLEN_CEILING      the largest maxlen a sinks table may give, 1000000
    MIXBATCH_STREAM_MARKER_TTL_S        how long a stream remembers a request id, default 7 days
    MIXBATCH_SQL_TABLE                  default table of the SQL sink, default mixbatch_results
    MIXBATCH_SQL_CONNECT_TIMEOUT_S      default 5
"""

from __future__ import annotations

import functools
import ipaddress
import json
import re
from pathlib import Path
from typing import Annotated, Any

from pydantic import Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from routing.decide.tables import settings_error

__all__ = ["SinkSettings", "get_sink_settings", "reset_sink_settings"]

_HOST = re.compile(r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_][a-z0-9_-]{0,62})*$")
_TABLE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")


class SinkSettings(BaseSettings):
    """Typed once per process. Secrets are not here: the sinks table names the variables that
    hold them (``routing.sinks.table``)."""

    model_config = SettingsConfigDict(env_prefix="MIXBATCH_", extra="ignore")

    sink_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_allow: Annotated[list[str], NoDecode] = Field(default_factory=list)
    sink_allow_paths: Annotated[list[Path], NoDecode] = Field(default_factory=list)
    webhook_timeout_s: float = Field(default=10.0, gt=0)
    max_payload_bytes: int = Field(default=1_000_000, gt=0)
    sink_max_payload_bytes: dict[str, int] = Field(default_factory=dict)
    stream_maxlen: int = Field(default=100_000, ge=1)
    stream_maxlen_ceiling: int = Field(default=1_000_000, ge=1)
    stream_marker_ttl_s: int = Field(default=7 * 86400, gt=0)
    sql_table: str = "mixbatch_results"
    sql_connect_timeout_s: float = Field(default=5.0, gt=0)

    @field_validator("sink_allow", "webhook_allow", "sink_allow_paths", mode="before")
    @classmethod
    def _split(cls, v: Any) -> Any:
        if isinstance(v, str):
            text = v.strip()
            if text.startswith("["):
                return json.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return v

    @field_validator("sink_allow", "webhook_allow")
    @classmethod
    def _hosts_or_cidrs(cls, v: list[str]) -> list[str]:
        out = []
        for entry in v:
            item = entry.strip().lower().rstrip(".")
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                if not _HOST.match(item):
                    raise ValueError(
                        f"{entry!r} is neither a host name nor an address or CIDR "
                        "(examples: 127.0.0.1/32, 10.0.0.0/8, hooks.internal)"
                    ) from None
            out.append(item)
        return out

    @field_validator("sink_allow_paths")
    @classmethod
    def _absolute(cls, v: list[Path]) -> list[Path]:
        for path in v:
            if not path.is_absolute():
                raise ValueError(f"{str(path)!r} is not an absolute directory")
        return [path.resolve() for path in v]

    @model_validator(mode="after")
    def _one_allow_list(self) -> SinkSettings:
        """Both names feed one list, so code reading either sees every entry."""
        joined = list(dict.fromkeys([*self.sink_allow, *self.webhook_allow]))
        self.sink_allow = joined
        self.webhook_allow = list(joined)
        return self

    @field_validator("sink_max_payload_bytes")
    @classmethod
    def _positive(cls, v: dict[str, int]) -> dict[str, int]:
        for sink, limit in v.items():
            if limit <= 0:
                raise ValueError(f"MIXBATCH_SINK_MAX_PAYLOAD_BYTES: {sink} must be above 0")
        return v

    @field_validator("sql_table")
    @classmethod
    def _table(cls, v: str) -> str:
        if not _TABLE.match(v):
            raise ValueError(f"MIXBATCH_SQL_TABLE: {v!r} is not a plain SQL identifier")
        return v

    def payload_limit(self, sink: str) -> int:
        return self.sink_max_payload_bytes.get(sink, self.max_payload_bytes)


@functools.cache
def get_sink_settings() -> SinkSettings:
    """The process's sink settings; a bad variable is a ``ConfigError`` that names it."""
    try:
        return SinkSettings()
    except ValidationError as exc:
        raise settings_error(exc) from None


def reset_sink_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_sink_settings.cache_clear()
