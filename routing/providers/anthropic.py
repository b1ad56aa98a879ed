"""Anthropic's Messages API.

The account's ``base_url`` has no ``/v1`` (the Anthropic SDK's convention), so the endpoint
is joined whole. Anthropic serves only ``/v1/messages`` of our endpoints; asking it for
another is a routing bug, reported as a non-retryable ``ProviderError`` naming the endpoint.
"""

from __future__ import annotations

from typing import ClassVar

from routing.models import Endpoint
from routing.providers.base import AccountClient, RealtimeAdapter

__all__ = ["AnthropicAdapter", "AnthropicProtocol"]


class AnthropicProtocol(AccountClient):
    """What Anthropic's adapters share, realtime and batch: its endpoint and auth.

    ``x-api-key`` and ``anthropic-version`` headers; the request id comes back in ``request-id``.
    """

    kind: ClassVar[str] = "anthropic"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset({Endpoint.MESSAGES})
    request_id_header: ClassVar[str] = "request-id"

    def auth_headers(self) -> dict[str, str]:
        headers = {"anthropic-version": self.account.anthropic_version}
        if self.account.api_key:
            headers["x-api-key"] = self.account.api_key.get_secret_value()
        return headers


class AnthropicAdapter(AnthropicProtocol, RealtimeAdapter):
    """The synchronous API: one POST per call to ``/v1/messages`` under ``base_url``."""

    def path_for(self, endpoint: Endpoint) -> str:
        return endpoint.value
