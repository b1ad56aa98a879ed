"""The providers table: what each account can do, as data the planner reads and adapters obey.

One ``[providers.NAME]`` table per account in ``config/providers.toml``. The planner compares
routes with it (discount, expected turnaround, windows, whether a batch route exists at all);
the batch adapters check a file against its caps before uploading, so an oversize batch fails
here, naming the cap, rather than hours later at the provider.

Accounts are data, credentials are environment: a table names the variable that holds its key
(``api_key_env``), never the key. An account whose key variable is unset is left out of the
parsed table, unless it is ``always_listed`` (OpenAI and Anthropic, so that the service and its
sandbox demo know about them before any key exists). A listed account without a key fails only
when it is used, in ``account_for``, with an error naming the variable to set.

The base URL follows the SDKs: ``OPENAI_BASE_URL`` and ``ANTHROPIC_BASE_URL`` override the
table, and ``<NAME>_BASE_URL`` does the same for any other account (``GROQ_BASE_URL``).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from routing.decide.cost import base_model
from routing.decide.tables import Table, TableFile, first_error
from routing.errors import ConfigError, ProviderError
from routing.models import parse_duration_s
from routing.providers.base import ProviderAccount

__all__ = [
    "ProviderCapabilities",
    "account_for",
    "load_providers",
    "parse_providers",
    "tier_options",
]

_DURATION_FIELDS = ("result_retention", "expected_turnaround", "flex_latency")
_ENV_NAME = re.compile(r"^[A-Z_][A-Z0-9_]*$")


class ProviderCapabilities(BaseModel):
    """One account's row of the providers table. Sizes are bytes, times are seconds.

    ``max_line_bytes`` defaults to ``max_bytes`` (no per-line cap known). ``models`` is None when
    the account serves any model; a list makes every other model a routing error. ``windows``
    are the ``completion_window`` values the account accepts, the first being the default.
    ``file_purpose`` is the upload purpose of batch input files (Together wants ``batch-api``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1, pattern=r"^[a-z0-9][a-z0-9_-]*$")
    protocol: Literal["openai", "anthropic", "gemini", "bedrock", "mistral"]
    base_url: str = Field(min_length=1)
    api_key_env: str = Field(min_length=1)
    base_url_env: str | None = None
    always_listed: bool = False
    batch: bool = True
    windows: tuple[str, ...] = ("24h",)
    max_lines: int = Field(default=50_000, ge=1)
    max_bytes: int = Field(default=200_000_000, ge=1)
    max_line_bytes: int = Field(ge=1)
    cancel: bool = True
    discount: float = Field(default=0.5, ge=0.0, lt=1.0)
    result_retention_s: float = Field(default=30 * 86400.0, gt=0)
    expected_turnaround_s: float = Field(default=7200.0, gt=0)
    realtime: bool = True
    models: tuple[str, ...] | None = None
    file_purpose: str = Field(default="batch", min_length=1)
    timeout_s: float = Field(default=60.0, gt=0)
    #: Models with a flex tier (``service_tier: "flex"``): batch prices, slower, may shed load.
    flex_models: tuple[str, ...] = ()
    #: Prior for a flex call's latency, until observed values replace it.
    flex_latency_s: float = Field(default=600.0, gt=0)
    #: Models with a priority tier, and whether the account opts in for every lane (off: only
    #: lanes with ``priority_tier = true`` use it).
    priority_models: tuple[str, ...] = ()
    priority: bool = False
    #: Bedrock: where input and output JSONL live, the role Bedrock assumes to read them, the
    #: region, an S3 endpoint (for a loopback S3 such as the sandbox's), and the fewest records
    #: a job takes (below it the job is not created: the requests go another way).
    region: str | None = None
    s3_bucket: str | None = None
    s3_prefix: str = "mixbatch/"
    s3_url: str | None = None
    role_arn: str | None = None
    min_records: int = Field(default=1, ge=1)

    @model_validator(mode="before")
    @classmethod
    def _line_cap_default(cls, data: Any) -> Any:
        if isinstance(data, dict) and "max_line_bytes" not in data:
            return {**data, "max_line_bytes": data.get("max_bytes", 200_000_000)}
        return data

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"{v!r} must start with http:// or https://")
        return v.rstrip("/")

    @field_validator("api_key_env", "base_url_env")
    @classmethod
    def _env_name(cls, v: str | None) -> str | None:
        if v is not None and not _ENV_NAME.match(v):
            raise ValueError(f"{v!r} is not an environment variable name (A-Z, 0-9, _)")
        return v

    @field_validator("windows")
    @classmethod
    def _windows(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        if not v:
            raise ValueError("give at least one completion window, such as '24h'")
        for window in v:
            parse_duration_s(window)
        return v

    @field_validator("max_line_bytes")
    @classmethod
    def _line_cap(cls, v: int, info: ValidationInfo) -> int:
        max_bytes = info.data.get("max_bytes")
        if isinstance(max_bytes, int) and v > max_bytes:
            raise ValueError(f"{v} exceeds max_bytes ({max_bytes})")
        return v

    @field_validator("models")
    @classmethod
    def _models(cls, v: tuple[str, ...] | None) -> tuple[str, ...] | None:
        if v is not None and not v:
            raise ValueError("an empty list serves nothing; leave models out to serve any")
        return v

    @property
    def url_env(self) -> str:
        """The variable that overrides ``base_url``: ``OPENAI_BASE_URL``, ``GROQ_BASE_URL``..."""
        return self.base_url_env or f"{self.name.upper().replace('-', '_')}_BASE_URL"

    def window_s(self, window: str | None = None) -> float:
        """Seconds of ``window`` (default: the first listed), refusing one the account lacks."""
        return parse_duration_s(self.window(window))

    def window_for(self, slack_s: float) -> str:
        """The longest window that ends within ``slack_s`` (to a batch's tightest deadline),
        else the default: a longer window expires less (Groq ``7d``, Mistral ``timeout_hours``,
        Bedrock ``timeoutDurationInHours``)."""
        fitting = [w for w in self.windows if parse_duration_s(w) <= slack_s]
        return max(fitting, key=parse_duration_s) if fitting else self.windows[0]

    def window(self, window: str | None = None) -> str:
        if window is None:
            return self.windows[0]
        if window not in self.windows:
            raise ProviderError(
                f"provider account {self.name!r} has no completion window {window!r} "
                f"(its windows: {', '.join(self.windows)})",
                retryable=False,
            )
        return window

    def has_flex(self, model: str) -> bool:
        return _listed(self.flex_models, model)

    def has_priority(self, model: str) -> bool:
        return _listed(self.priority_models, model)

    def serves(self, model: str) -> bool:
        return self.models is None or model in self.models

    def require_model(self, model: str) -> None:
        """Refuse a model the account does not serve; a routing bug, so not retryable."""
        if not self.serves(model):
            listed = ", ".join(self.models or ())
            raise ProviderError(
                f"provider account {self.name!r} does not serve model {model!r} "
                f"(its models: {listed}); route the request elsewhere or add the model to "
                f"[providers.{self.name}] models",
                retryable=False,
            )

    def require_batch(self) -> None:
        if not self.batch:
            raise ConfigError(
                f"provider account {self.name!r} has no batch route (batch = false in its "
                "[providers.NAME] table); route its requests realtime"
            )


def _listed(models: tuple[str, ...], model: str) -> bool:
    """``model`` (or its base name, without a dated snapshot) is in ``models``."""
    return model in models or base_model(model) in models


def tier_options(
    table: Mapping[str, ProviderCapabilities], accounts: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """The ``RouteOptions`` fields the providers table sets: flex and priority models, the flex
    latency prior, who opted in to priority, batch minimums. ``accounts``: only those in use."""
    used = {n: c for n, c in table.items() if accounts is None or n in accounts}
    return {
        "flex_models": {n: frozenset(c.flex_models) for n, c in used.items() if c.flex_models},
        "flex_latency_s": {n: c.flex_latency_s for n, c in used.items()},
        "priority_models": {
            n: frozenset(c.priority_models) for n, c in used.items() if c.priority_models
        },
        "priority_accounts": frozenset(n for n, c in used.items() if c.priority),
        "batch_min_lines": {n: c.min_records for n, c in used.items() if c.min_records > 1},
        "batch_only": frozenset(n for n, c in used.items() if not c.realtime),
    }


def _fields(table: Table) -> dict[str, Any]:
    """TOML spellings to model fields: ``result_retention = "30d"`` becomes ``result_retention_s``."""
    fields = {**table.fields, "name": table.name}
    for name in _DURATION_FIELDS:
        if name in fields:
            if f"{name}_s" in fields:
                raise table.error(f"give {name} or {name}_s, not both", name)
            try:
                fields[f"{name}_s"] = parse_duration_s(fields.pop(name))
            except (ValueError, TypeError) as exc:
                raise table.error(str(exc), name) from None
    for name in ("windows", "models", "flex_models", "priority_models"):
        if isinstance(fields.get(name), list):
            fields[name] = tuple(fields[name])
    return fields


def parse_providers(
    text: str, source: str = "providers.toml", env: Mapping[str, str] | None = None
) -> dict[str, ProviderCapabilities]:
    """The accounts of a providers table that are in use under ``env``, by name.

    An account is kept when it is ``always_listed`` or its ``api_key_env`` is set (non-empty) in
    ``env``; every table is validated either way, so a typo in an unused account still fails.
    Errors name ``source`` and the line of the table, or of the bad key when it can be found.
    """
    environ: Mapping[str, str] = env if env is not None else {}
    kept: dict[str, ProviderCapabilities] = {}
    for table in TableFile(text, source).tables("providers", "providers.NAME", key_lines=True):
        cap = table.build(ProviderCapabilities, _fields(table))
        if cap.always_listed or environ.get(cap.api_key_env):
            kept[table.name] = cap
    return kept


def load_providers(path: Path, env: Mapping[str, str]) -> dict[str, ProviderCapabilities]:
    """``parse_providers`` of a file; an unreadable file is a ``ConfigError`` naming it."""
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the providers table ({exc})") from None
    return parse_providers(text, str(path), env)


def account_for(cap: ProviderCapabilities, env: Mapping[str, str]) -> ProviderAccount:
    """The credentials for ``cap`` from ``env``: its key, and its base URL unless overridden.

    Called when the account is about to be used, so a missing key is reported then, naming the
    variable to set; the key itself never appears in a message.
    """
    key = env.get(cap.api_key_env, "")
    if not key.strip():
        raise ConfigError(
            f"provider account {cap.name!r} needs an API key: set the environment variable "
            f"{cap.api_key_env}"
        )
    base_url = env.get(cap.url_env) or cap.base_url
    try:
        return ProviderAccount(
            name=cap.name,
            kind=cap.protocol,
            base_url=base_url,
            api_key=SecretStr(key.strip()),
            timeout_s=cap.timeout_s,
        )
    except ValidationError as exc:
        source = cap.url_env if env.get(cap.url_env) else f"[providers.{cap.name}] base_url"
        raise ConfigError(
            f"provider account {cap.name!r}: {source}: {first_error(exc)[1]}"
        ) from None
