"""Provider adapters: mixbatch's only code that speaks a provider's HTTP protocol.

``adapter_for(account)`` picks the adapter for an account's ``kind``; callers then use the
common ``RealtimeAdapter`` interface and never need to know which provider is behind it.
"""

from __future__ import annotations

import httpx

from routing.errors import ConfigError
from routing.providers.anthropic import AnthropicAdapter
from routing.providers.base import (
    ProviderAccount,
    ProviderResponse,
    RealtimeAdapter,
    call_with_retries,
)
from routing.providers.openai import OpenAIAdapter

__all__ = [
    "ADAPTERS",
    "AnthropicAdapter",
    "OpenAIAdapter",
    "ProviderAccount",
    "ProviderResponse",
    "RealtimeAdapter",
    "adapter_for",
    "call_with_retries",
]

ADAPTERS: dict[str, type[RealtimeAdapter]] = {
    OpenAIAdapter.kind: OpenAIAdapter,
    AnthropicAdapter.kind: AnthropicAdapter,
}


def adapter_for(account: ProviderAccount, client: httpx.Client | None = None) -> RealtimeAdapter:
    """The realtime adapter for ``account.kind``; ``client`` shares a connection pool."""
    try:
        cls = ADAPTERS[account.kind]
    except KeyError:
        raise ConfigError(
            f"provider {account.name!r}: kind {account.kind!r} has no adapter "
            f"(kinds: {', '.join(sorted(ADAPTERS))})"
        ) from None
    return cls(account, client)
