"""The provider accounts table, built from settings (SDK environment variables)."""

from __future__ import annotations

from config.settings import Settings
from routing.providers import ProviderAccount


def provider_accounts(settings: Settings) -> dict[str, ProviderAccount]:
    return {
        "openai": ProviderAccount(
            name="openai",
            kind="openai",
            base_url=settings.openai_base_url,
            api_key=settings.openai_api_key,
            timeout_s=settings.realtime_timeout_s,
            max_concurrency=settings.realtime_concurrency,
        ),
        "anthropic": ProviderAccount(
            name="anthropic",
            kind="anthropic",
            base_url=settings.anthropic_base_url,
            api_key=settings.anthropic_api_key,
            timeout_s=settings.realtime_timeout_s,
            max_concurrency=settings.realtime_concurrency,
        ),
    }
