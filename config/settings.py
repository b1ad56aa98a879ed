"""Settings: one typed object, built once per process from the environment (prefix MIXBATCH_).

Provider endpoints follow the SDKs' own variables (OPENAI_API_KEY, OPENAI_BASE_URL,
ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL), so an existing environment works unchanged; the
MIXBATCH_-prefixed names win when both are set. Units are in the names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

from routing.decide.lanes import parse_lanes
from routing.errors import ConfigError
from routing.models import LaneSpec, ServiceConfig
from routing.sinks import SinkTable, get_sink_settings, load_sinks

DEFAULT_LANES_FILE = Path(__file__).with_name("lanes.toml")
DEFAULT_SINKS_FILE = Path(__file__).with_name("sinks.toml")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXBATCH_", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for lanes and the Celery broker; unset: embedded Redis"
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

    def broker_url(self) -> str:
        """The Redis every process shares: the configured one, else the running embedded one."""
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


@functools.cache
def get_settings() -> Settings:
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings (tests change the environment between cases)."""
    get_settings.cache_clear()
