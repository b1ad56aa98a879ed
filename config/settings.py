"""Settings: one typed object, built once per process from the environment (prefix MIXBATCH_).

Provider endpoints follow the SDKs' own variables (OPENAI_API_KEY, OPENAI_BASE_URL,
ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL), so an existing environment works unchanged; the
MIXBATCH_-prefixed names win when both are set. Units are in the names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any, Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from routing.decide.lanes import parse_lanes
from routing.errors import ConfigError
from routing.models import LaneSpec, ServiceConfig
from routing.sinks import SinkTable, get_sink_settings, load_sinks
from routing.store.base import redact_url

DEFAULT_LANES_FILE = Path(__file__).with_name("lanes.toml")
DEFAULT_SINKS_FILE = Path(__file__).with_name("sinks.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXBATCH_", extra="ignore")

    redis_url: str | None = Field(
        default=None,
        description="the lane store: redis://, rediss://, redis+cluster://, redis+sentinel://; "
        "unset: embedded Redis",
    )
    celery_broker_url: str | None = Field(
        default=None,
        validation_alias="MIXBATCH_BROKER_URL",
        description="Celery's broker (amqp://, redis://, sentinel://); unset: the store's URL "
        "when that is one Redis node or a Sentinel service; required with a cluster store",
    )
    broker_master_name: str | None = Field(
        default=None, description="the Sentinel service of a sentinel:// MIXBATCH_BROKER_URL"
    )
    data_dir: Path = Field(default=Path(".mixbatch"), description="embedded Redis data, beat state")
    namespace: str = Field(default="mb", description="prefix of every Redis key")
    lanes_file: Path = Field(default=DEFAULT_LANES_FILE, description="the lanes table (TOML)")
    sinks_file: Path = Field(default=DEFAULT_SINKS_FILE, description="the named sinks (TOML)")
    embedded_fsync: Literal["always", "everysec"] = "always"

    result_ttl_s: int = Field(default=7 * 86400, gt=0, description="how long results are kept")
    max_body_bytes: int = Field(default=1_000_000, gt=0, description="cap on one request body")
    default_max_attempts: int = Field(default=3, ge=1, le=100)

    lease_s: float = Field(
        default=120.0, gt=0, description="claim lease before the sweeper reclaims"
    )
    max_inflight: int = Field(default=512, gt=0, description="leased requests across all lanes")
    claim_batch: int = Field(default=256, gt=0, description="requests claimed per aggregate step")
    aggregate_budget_s: float = Field(default=1.5, gt=0)
    aggregate_interval_s: float = Field(default=2.0, gt=0)
    sweep_interval_s: float = Field(default=10.0, gt=0)
    visibility_timeout_s: int = Field(default=3600, gt=0)

    realtime_chunk: int = Field(default=8, gt=0, description="requests per realtime task")
    realtime_concurrency: int = Field(default=16, gt=0, description="per provider and model")
    realtime_timeout_s: float = Field(default=60.0, gt=0)
    realtime_budget_s: float = Field(
        default=120.0, gt=0, description="one request's semaphore wait and every try, together"
    )
    realtime_max_tries: int = Field(default=4, ge=1)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_cap_s: float = Field(default=30.0, gt=0)

    providers_file: Path = Field(
        default=Path(__file__).with_name("providers.toml"), description="provider accounts table"
    )
    providers: tuple[str, ...] = Field(
        default=("openai", "anthropic"), description="accounts whose keys must be set at start"
    )
    route_accounts: dict[str, tuple[str, ...]] = Field(
        default_factory=dict,
        description='endpoint -> accounts serving it, e.g. {"/v1/messages": ["bedrock"]}; unset: '
        "openai for OpenAI's endpoints, anthropic for /v1/messages, gemini for Gemini's",
    )
    prices_file: Path = Field(default=Path(__file__).with_name("prices.toml"))
    batch_enabled: bool = Field(default=True, description="route to provider batches at all")
    batch_turnaround_s: dict[str, float] = Field(
        default_factory=dict, description='per-account override, e.g. {"openai": 30}'
    )
    batch_margin_s: float = Field(
        default=600.0, ge=0, description="safety margin of the batch route"
    )
    hedge_margin_s: float = Field(
        default=120.0, ge=0, description="re-route a late batch's requests"
    )
    realtime_estimate_s: float = Field(
        default=30.0, gt=0, description="expected realtime turnaround"
    )
    batch_target_bytes: int = Field(
        default=20 * 1024 * 1024, gt=0, description="aim of one batch file"
    )
    batch_max_lines: int | None = Field(default=None, gt=0, description="cap below the provider's")
    batch_max_wait_s: float = Field(
        default=300.0, gt=0, description="longest a group waits to fill"
    )
    batch_flush_interval_s: float = Field(default=2.0, gt=0)
    batch_poll_interval_s: float = Field(default=5.0, gt=0)
    batch_poll_max_interval_s: float = Field(default=60.0, gt=0)
    batch_intent_grace_s: float = Field(
        default=60.0, gt=0, description="a take or intent not beaten this long is reconciled"
    )
    batch_collect_lease_s: float = Field(
        default=300.0, gt=0, description="one collector's hold on a finished batch"
    )
    batch_delete_files: bool = Field(
        default=False, description="delete provider files after collection"
    )

    route_quantile: float = Field(
        default=0.95,
        gt=0,
        lt=1,
        description="quantile of learned turnarounds the route choice uses",
    )
    route_min_samples: int = Field(default=5, ge=1, description="observations before priors yield")
    route_half_life_s: float = Field(default=7200.0, gt=0, description="weight of old observations")
    route_fast_margin_s: float = Field(default=5.0, ge=0)
    route_refresh_s: float = Field(default=5.0, gt=0, description="how often estimates are re-read")
    route_obs_max: int = Field(default=500, gt=0, description="observations kept per key")
    route_gpu_max_age_s: float = Field(
        default=900.0, gt=0, description="older GPU report: worker gone"
    )
    route_gpu_prior_wait_s: float = Field(default=2.0, ge=0)
    route_gpu_prior_texts_per_s: float = Field(default=50.0, gt=0)
    route_gpu_overhead_s: float = Field(default=1.0, ge=0)
    route_gpu_usd_per_hour: float = Field(default=1.0, ge=0, description="amortised GPU price")

    gpu_models_file: Path = Field(
        default=Path(__file__).with_name("models.toml"), description="local models table"
    )
    gpu_device: str | None = Field(
        default=None, description="torch device of the gpu worker (cpu, cuda:1); unset: cuda if any"
    )
    gpu_chunk: int = Field(default=64, gt=0, description="requests per gpu_batch message")

    delivery_max_attempts: int = Field(default=8, ge=1)
    delivery_lease_s: float = Field(default=60.0, gt=0)

    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    def lanes(self) -> tuple[LaneSpec, ...]:
        try:
            text = self.lanes_file.read_text()
        except OSError as exc:
            raise ConfigError(
                f"MIXBATCH_LANES_FILE={self.lanes_file}: cannot read ({exc})"
            ) from None
        return parse_lanes(text, source=str(self.lanes_file))

    def sink_table(self) -> SinkTable:
        return load_sinks(self.sinks_file, settings=get_sink_settings(), namespace=self.namespace)

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            lanes=self.lanes(),
            sinks=self.sink_table().names(),
            max_body_bytes=self.max_body_bytes,
            default_max_attempts=self.default_max_attempts,
        )

    def store_url(self) -> str:
        """The lane store every process shares: the configured one, else the embedded one."""
        if self.redis_url:
            return self.redis_url
        from routing.store.embedded import running_url

        url = running_url(self.data_dir)
        if url is None:
            raise ConfigError(
                "MIXBATCH_REDIS_URL is unset and no embedded Redis is running under "
                f"{str(self.data_dir)!r}: start everything with `mixbatch up`, or set MIXBATCH_REDIS_URL"
            )
        return url

    def broker_url(self) -> str:
        """Celery's broker: ``MIXBATCH_BROKER_URL``, else the store's own Redis (``broker_for``)."""
        return broker_for(self.store_url(), self.celery_broker_url)

    def broker_transport_options(self) -> dict[str, Any]:
        """What the broker's transport needs besides its URL: a Sentinel broker's service."""
        url = self.broker_url()
        if not url.startswith("sentinel://"):
            return {}
        name = self.broker_master_name
        if name is None and self.redis_url and self.redis_url.startswith(_SENTINEL_STORES):
            name = self.redis_url.partition("://")[2].split("/")[1]
        if not name:
            raise ConfigError(
                "MIXBATCH_BROKER_URL is a sentinel:// broker: set MIXBATCH_BROKER_MASTER_NAME "
                "to the Sentinel service Celery's queues live on"
            )
        return {"master_name": name}


#: Celery transports mixbatch runs on: RabbitMQ (amqp), one Redis, a Sentinel-managed Redis.
BROKER_SCHEMES = ("amqp", "amqps", "pyamqp", "redis", "rediss", "sentinel")
_SENTINEL_STORES = ("redis+sentinel://", "rediss+sentinel://")


def broker_for(store_url: str, broker_url: str | None) -> str:
    """Celery's broker for a lane store at ``store_url``, ``broker_url`` when one is set.

    Celery's Redis transport speaks to one node or through Sentinel, never to a Redis Cluster:
    a cluster store needs a broker of its own. A Sentinel store lends its sentinels to Celery.
    Durability is the lane store's either way, so any broker will do (docs/scale-out.md).
    """
    if broker_url:
        scheme = broker_url.partition("://")[0].lower()
        if scheme not in BROKER_SCHEMES:
            raise ConfigError(
                f"MIXBATCH_BROKER_URL: {redact_url(broker_url)} is no broker mixbatch runs on; "
                "use amqp:// (RabbitMQ), redis:// or sentinel://"
            )
        return broker_url
    scheme = store_url.partition("://")[0].lower()
    if scheme in ("redis+cluster", "rediss+cluster"):
        raise ConfigError(
            f"MIXBATCH_BROKER_URL is unset and MIXBATCH_REDIS_URL ({redact_url(store_url)}) is a "
            "Redis Cluster, which Celery's Redis transport cannot use: set MIXBATCH_BROKER_URL "
            "to amqp://... (RabbitMQ), redis://... or sentinel://..."
        )
    if store_url.startswith(_SENTINEL_STORES):
        hosts = store_url.partition("://")[2].split("/")[0].rpartition("@")
        auth = f"{hosts[0]}@" if hosts[1] else ""
        db = (store_url.split("/")[4:5] or ["0"])[0] or "0"
        return ";".join(f"sentinel://{auth}{h}/{db}" for h in hosts[2].split(","))
    return store_url


def redbeat_store_config(store_url: str, namespace: str) -> dict[str, Any]:
    """RedBeat's settings (``config.ops.redbeat_config``) on the lane store, in any form.

    RedBeat builds its own client: a cluster store is passed as one node plus
    ``cluster=True`` (its keys share one hash tag, so the lock and schedule stay in one slot);
    a Sentinel store as its sentinels and service.
    """
    from config.ops import redbeat_config
    from routing.store.connect import parse_redis_url

    conf = redbeat_config(store_url, namespace)
    if not conf:
        return conf
    target = parse_redis_url(store_url)
    if target.kind == "node":
        return conf
    options: dict[str, Any] = {"password": target.password} if target.password else {}
    if target.username:
        options["username"] = target.username
    host, port = target.nodes[0]
    if target.kind == "cluster":
        conf["redbeat_redis_url"] = target.node_url(host, port)
        conf["redbeat_redis_options"] = {"cluster": True}
        conf["redbeat_key_prefix"] = f"{{{namespace}:redbeat}}:"
    else:
        conf["redbeat_redis_url"] = f"redis-sentinel://{host}:{port}/{target.db}"
        conf["redbeat_redis_options"] = {
            **options,
            "sentinels": list(target.nodes),
            "service_name": target.service,
            "db": target.db,
        }
    return conf


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
