"""Settings: one typed object, built once per process from the environment (prefix MIXBATCH_).

Provider endpoints follow the SDKs' own variables (OPENAI_API_KEY, OPENAI_BASE_URL,
ANTHROPIC_API_KEY, ANTHROPIC_BASE_URL), so an existing environment works unchanged; the
MIXBATCH_-prefixed names win when both are set. Units are in the names.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Literal

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from routing.errors import ConfigError
from routing.lanes import parse_lanes
from routing.models import LaneSpec, ServiceConfig

DEFAULT_LANES_FILE = Path(__file__).with_name("lanes.toml")


def _alias(name: str, sdk_name: str) -> AliasChoices:
    return AliasChoices(f"MIXBATCH_{name}", sdk_name)


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MIXBATCH_", extra="ignore")

    redis_url: str | None = Field(
        default=None, description="Redis for lanes and the Celery broker; unset: embedded Redis"
    )
    data_dir: Path = Field(default=Path(".mixbatch"), description="embedded Redis data, beat state")
    namespace: str = Field(default="mb", description="prefix of every Redis key")
    lanes_file: Path = Field(default=DEFAULT_LANES_FILE, description="the lanes table (TOML)")
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
    realtime_max_tries: int = Field(default=4, ge=1)
    retry_base_s: float = Field(default=0.5, gt=0)
    retry_cap_s: float = Field(default=30.0, gt=0)

    delivery_max_attempts: int = Field(default=8, ge=1)
    delivery_lease_s: float = Field(default=60.0, gt=0)

    openai_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("OPENAI_API_KEY", "OPENAI_API_KEY")
    )
    openai_base_url: str = Field(
        default="https://api.openai.com/v1",
        validation_alias=_alias("OPENAI_BASE_URL", "OPENAI_BASE_URL"),
    )
    anthropic_api_key: SecretStr | None = Field(
        default=None, validation_alias=_alias("ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY")
    )
    anthropic_base_url: str = Field(
        default="https://api.anthropic.com",
        validation_alias=_alias("ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL"),
    )

    log_level: str = "INFO"
    log_format: Literal["auto", "json", "text"] = "auto"

    @field_validator("openai_base_url", "anthropic_base_url")
    @classmethod
    def _strip_slash(cls, v: str) -> str:
        return v.rstrip("/")

    def lanes(self) -> tuple[LaneSpec, ...]:
        try:
            text = self.lanes_file.read_text()
        except OSError as exc:
            raise ConfigError(
                f"MIXBATCH_LANES_FILE={self.lanes_file}: cannot read ({exc})"
            ) from None
        return parse_lanes(text, source=str(self.lanes_file))

    def service_config(self) -> ServiceConfig:
        return ServiceConfig(
            lanes=self.lanes(),
            max_body_bytes=self.max_body_bytes,
            default_max_attempts=self.default_max_attempts,
        )

    def broker_url(self) -> str:
        """The Redis every process shares: the configured one, else the running embedded one."""
        if self.redis_url:
            return self.redis_url
        from routing.embedded import running_url

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
