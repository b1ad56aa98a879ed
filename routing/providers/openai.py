"""OpenAI and OpenAI-compatible providers (Together, Fireworks, Groq, vLLM, the sandbox).

Our endpoints are spelled as OpenAI spells them (``/v1/chat/completions``); the account's
``base_url`` already ends in ``/v1`` by SDK convention, so the prefix is dropped before joining.
"""

from __future__ import annotations

from typing import ClassVar

from routing.models import Endpoint
from routing.providers.base import AccountClient, RealtimeAdapter

__all__ = ["OpenAIAdapter", "OpenAIProtocol"]


class OpenAIProtocol(AccountClient):
    """What the OpenAI protocol's adapters share, realtime and batch: its endpoints and auth.

    Bearer-token auth; the request id comes back in ``x-request-id``. With no ``api_key`` no
    ``Authorization`` header is sent, for local servers that want none.
    """

    kind: ClassVar[str] = "openai"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset(
        {Endpoint.CHAT, Endpoint.EMBEDDINGS, Endpoint.RESPONSES}
    )
    request_id_header: ClassVar[str] = "x-request-id"

    def auth_headers(self) -> dict[str, str]:
        key = self.account.api_key
        return {"authorization": f"Bearer {key.get_secret_value()}"} if key else {}


class OpenAIAdapter(OpenAIProtocol, RealtimeAdapter):
    """The synchronous API: one POST per call, to the endpoint's path under ``base_url``."""

    def path_for(self, endpoint: Endpoint) -> str:
        return endpoint.value.removeprefix("/v1")
