"""The provider accounts table (``config/providers.toml``) and the accounts built from it.

Keys come from the environment variables the table names (the SDKs' own: OPENAI_API_KEY,
ANTHROPIC_API_KEY, ...), base URLs from the table unless the SDK variable overrides them.
"""

from __future__ import annotations

import functools
import os

from config.settings import Settings
from routing.errors import ConfigError
from routing.providers import ProviderAccount
from routing.providers.capabilities import ProviderCapabilities, account_for, load_providers


@functools.cache
def _table(path: str, env_items: tuple[tuple[str, str], ...]) -> dict[str, ProviderCapabilities]:
    from pathlib import Path

    return load_providers(Path(path), dict(env_items))


def capabilities(settings: Settings) -> dict[str, ProviderCapabilities]:
    env = tuple(
        sorted(
            (k, v)
            for k, v in os.environ.items()
            if k.endswith(("_API_KEY", "_BASE_URL", "_ACCESS_KEY_ID"))
        )
    )
    return _table(str(settings.providers_file), env)


def capability(settings: Settings, name: str) -> ProviderCapabilities:
    table = capabilities(settings)
    if name not in table:
        known = ", ".join(sorted(table))
        raise ConfigError(
            f"no provider account {name!r} in {settings.providers_file} (known: {known})"
        )
    return table[name]


def provider_account(settings: Settings, name: str) -> ProviderAccount:
    """The account to call, with the settings' timeouts; a missing key names its variable."""
    account = account_for(capability(settings, name), os.environ)
    return account.model_copy(
        update={
            "timeout_s": settings.realtime_timeout_s,
            "max_concurrency": settings.realtime_concurrency,
        }
    )


def check_accounts(settings: Settings) -> None:
    """At start-up: every account in MIXBATCH_PROVIDERS has its key (errors name the variable)."""
    for name in settings.providers:
        provider_account(settings, name)


def batch_turnarounds(settings: Settings) -> dict[str, float]:
    """Expected batch turnaround per account that has a batch route (settings override the table)."""
    if not settings.batch_enabled:
        return {}
    table = capabilities(settings)
    return {
        name: settings.batch_turnaround_s.get(name, cap.expected_turnaround_s)
        for name, cap in table.items()
        if cap.batch and name in settings.providers
    }
