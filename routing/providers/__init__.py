"""Provider adapters: mixbatch's only code that speaks a provider's HTTP protocol.

``adapter_for(account)`` picks the adapter for an account's ``kind``; callers then use the
common ``RealtimeAdapter`` interface and never need to know which provider is behind it.
"""

from __future__ import annotations

import httpx

from routing.errors import ConfigError
from routing.providers.anthropic import AnthropicAdapter
from routing.providers.anthropic_batch import AnthropicBatchAdapter
from routing.providers.base import (
    ProviderAccount,
    ProviderResponse,
    RealtimeAdapter,
    call_with_retries,
)
from routing.providers.batch import BatchAdapter, batch_adapter_class, batch_adapter_for
from routing.providers.batch_jobs import (
    TERMINAL_BATCH_STATUSES,
    BatchJob,
    BatchStatus,
    LineError,
    LineResult,
)
from routing.providers.capabilities import (
    ProviderCapabilities,
    account_for,
    load_providers,
    parse_providers,
)
from routing.providers.gemini import GeminiAdapter
from routing.providers.openai import OpenAIAdapter
from routing.providers.openai_batch import OpenAIBatchAdapter

__all__ = [
    "ADAPTERS",
    "TERMINAL_BATCH_STATUSES",
    "AnthropicAdapter",
    "AnthropicBatchAdapter",
    "BatchAdapter",
    "BatchJob",
    "BatchStatus",
    "GeminiAdapter",
    "LineError",
    "LineResult",
    "OpenAIAdapter",
    "OpenAIBatchAdapter",
    "ProviderAccount",
    "ProviderCapabilities",
    "ProviderResponse",
    "RealtimeAdapter",
    "account_for",
    "adapter_for",
    "batch_adapter_class",
    "batch_adapter_for",
    "call_with_retries",
    "load_providers",
    "parse_providers",
]

ADAPTERS: dict[str, type[RealtimeAdapter]] = {
    OpenAIAdapter.kind: OpenAIAdapter,
    AnthropicAdapter.kind: AnthropicAdapter,
    GeminiAdapter.kind: GeminiAdapter,
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
