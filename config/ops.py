"""Settings of the operations side: Flower, the metrics endpoint, beat's scheduler, health.

They sit beside ``config.settings`` rather than in it so that the operations tools can be
configured (and refuse bad values) without touching the request path's settings. Same prefix:

    MIXBATCH_FLOWER_ADDRESS           where Flower binds, default 127.0.0.1
    MIXBATCH_FLOWER_PORT              default 5555
    MIXBATCH_FLOWER_BASIC_AUTH        "user:password" (several: "a:pw1,b:pw2"); required for any
                                      address that is not loopback
    MIXBATCH_FLOWER_READ_ONLY         true: Flower shows, but cannot revoke tasks or stop workers
    MIXBATCH_METRICS_ADDRESS          where `mixbatch metrics` and a worker's endpoint bind,
                                      default 127.0.0.1 (set 0.0.0.0 for a remote Prometheus)
    MIXBATCH_METRICS_PORT             port of `mixbatch metrics`, default 9808
    MIXBATCH_WORKER_METRICS_PORT      set: every worker serves the same endpoint on this port
    MIXBATCH_BEAT_SCHEDULER           "file" (default) or "redbeat": beat's schedule and a lock
                                      in Redis, so a second beat waits instead of double-firing
    MIXBATCH_BEAT_LOCK_TIMEOUT_S      a standby beat takes over this long after the holder died
    MIXBATCH_BEAT_MAX_LOOP_INTERVAL_S longest beat sleeps between looks at its schedule
    MIXBATCH_HEALTH_TIMEOUT_S         how long `mixbatch health` waits for workers to answer

Secrets are ``SecretStr``: no repr, log line or ``--json`` output shows them.
"""

from __future__ import annotations

import errno
import functools
import ipaddress
import socket
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from routing.decide.tables import settings_error
from routing.errors import ConfigError

__all__ = [
    "OpsSettings",
    "check_port",
    "get_ops_settings",
    "is_loopback",
    "load_ops_settings",
    "redbeat_config",
    "reset_ops_settings",
]

DEFAULT_METRICS_PORT = 9808


class OpsSettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXBATCH_", extra="ignore")

    flower_address: str = "127.0.0.1"
    flower_port: int = Field(default=5555, ge=1, le=65535)
    flower_basic_auth: SecretStr | None = None
    flower_read_only: bool = False

    metrics_address: str = "127.0.0.1"
    metrics_port: int = Field(default=DEFAULT_METRICS_PORT, ge=1, le=65535)
    worker_metrics_port: int | None = Field(default=None, ge=1, le=65535)

    beat_scheduler: Literal["file", "redbeat"] = "file"
    beat_lock_timeout_s: int = Field(default=30, ge=2)
    beat_max_loop_interval_s: int = Field(default=5, ge=1)

    health_timeout_s: float = Field(default=2.0, gt=0)

    @field_validator("flower_basic_auth")
    @classmethod
    def _user_password_pairs(cls, v: SecretStr | None) -> SecretStr | None:
        """Flower splits the value on commas, then each entry on its first colon."""
        if v is None:
            return None
        for entry in v.get_secret_value().split(","):
            user, sep, password = entry.partition(":")
            if not sep or not user.strip() or not password:
                # never echo the value: it is a password
                raise ValueError(
                    "must be user:password (several separated by commas), "
                    "with a non-empty user and password"
                )
        return v


def load_ops_settings() -> OpsSettings:
    """Read the environment now; a bad variable is a ``ConfigError`` naming it (never a secret)."""
    try:
        return OpsSettings()
    except ValidationError as exc:
        raise settings_error(exc) from None


@functools.cache
def get_ops_settings() -> OpsSettings:
    """The process's operations settings, read once."""
    return load_ops_settings()


def reset_ops_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_ops_settings.cache_clear()


def is_loopback(address: str) -> bool:
    """Whether binding ``address`` keeps a server reachable from this machine only.

    An empty address or a host name other than ``localhost`` counts as public: either may
    bind (or resolve to) an interface other machines reach.
    """
    text = address.strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        return ipaddress.ip_address(text).is_loopback
    except ValueError:
        return False


def check_port(address: str, port: int, variable: str) -> None:
    """Raise ``ConfigError`` naming ``variable`` when ``address:port`` cannot be bound.

    Checked before a server starts so the error is one sentence instead of a traceback from
    deep inside Tornado or ``http.server`` (there is a short race; the server's own bind then
    still fails loudly).
    """
    family = socket.AF_INET6 if ":" in address.strip("[]") else socket.AF_INET
    try:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((address.strip("[]"), port))
    except OSError as exc:
        why = "already in use" if exc.errno == errno.EADDRINUSE else (exc.strerror or str(exc))
        raise ConfigError(
            f"{variable}: cannot listen on {address}:{port} ({why}); pick another port"
        ) from None


def redbeat_config(
    broker_url: str, namespace: str, ops: OpsSettings | None = None
) -> dict[str, Any]:
    """Celery settings that make beat use RedBeat, or nothing for the default file scheduler.

    RedBeat keeps the schedule and a lock in Redis: a second beat process blocks on the lock
    and only takes over when the holder stops renewing it (``MIXBATCH_BEAT_LOCK_TIMEOUT_S``
    after it died), so two beats never fire the same entry twice. Every option is explicit:
    RedBeat's fallbacks to ``broker_url`` and ``broker_transport_options`` are deprecated.
    """
    ops = ops or get_ops_settings()
    if ops.beat_scheduler != "redbeat":
        return {}
    return {
        "beat_scheduler": "redbeat.RedBeatScheduler",
        "redbeat_redis_url": broker_url,
        "redbeat_redis_options": {},
        "redbeat_key_prefix": f"{namespace}:redbeat:",
        "redbeat_lock_timeout": ops.beat_lock_timeout_s,
        "beat_max_loop_interval": ops.beat_max_loop_interval_s,
    }
