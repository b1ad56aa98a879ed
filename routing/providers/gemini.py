"""Google's Gemini API (the Developer API, ``generativelanguage.googleapis.com``).

Requests keep Gemini's own shape: the body is a ``GenerateContentRequest`` (or an
``EmbedContentRequest``) and the model goes in the path, ``/v1beta/models/{model}:generateContent``.
mixbatch stores the model in the body as every request does; it is taken out of the body and put
in the path here. The account's ``base_url`` has no version (the google-genai SDK's convention);
the key goes in ``x-goog-api-key``.

The flex and priority tiers: the route sets ``service_tier`` in the body (``"flex"`` or
``"priority"``); it is sent as ``serviceTier``, as google-genai 3.6.1 sends
``GenerateContentConfig(service_tier=...)``: a top-level field of the request, its value in lower
case. The tier that answered comes back in ``usageMetadata.serviceTier`` (the SDK's output-only
field; the live API's echo is unconfirmed [U]), which the realtime route reads.
"""

from __future__ import annotations

from typing import Any, ClassVar

from routing.errors import ProviderError
from routing.models import Endpoint
from routing.providers.base import AccountClient, RealtimeAdapter

__all__ = ["API_VERSION", "GeminiAdapter", "GeminiProtocol", "model_path"]

API_VERSION = "v1beta"


def model_path(endpoint: Endpoint, model: str) -> str:
    """``/v1beta/models/{model}:generateContent`` (or ``:embedContent``) for ``model``."""
    bare = model.removeprefix("models/")
    if not bare or "/" in bare or ":" in bare:
        raise ProviderError(f"{model!r} is not a Gemini model name", retryable=False)
    return "/" + endpoint.value.lstrip("/").format(model=bare)


class GeminiProtocol(AccountClient):
    """What Gemini's adapters share, realtime and batch: its endpoints and auth."""

    kind: ClassVar[str] = "gemini"
    endpoints: ClassVar[frozenset[Endpoint]] = frozenset(
        {Endpoint.GENERATE_CONTENT, Endpoint.EMBED_CONTENT}
    )
    request_id_header: ClassVar[str] = "x-request-id"

    def auth_headers(self) -> dict[str, str]:
        if self.account.api_key:
            return {"x-goog-api-key": self.account.api_key.get_secret_value()}
        return {}


class GeminiAdapter(GeminiProtocol, RealtimeAdapter):
    """The synchronous API: one POST per call, the model in the path."""

    def path_for(self, endpoint: Endpoint) -> str:
        raise ProviderError(
            f"{self.account.name}: Gemini paths name the model; call wire(endpoint, body)",
            retryable=False,
        )

    def wire(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        model = body.get("model")
        if not isinstance(model, str):
            raise ProviderError(f"{self.account.name}: the request names no model", retryable=False)
        return model_path(endpoint, model), _tiered(body)


def _tiered(body: dict[str, Any]) -> dict[str, Any]:
    """``body`` less its model, the route's ``service_tier`` sent as ``serviceTier``. The route
    decides the tier (``with_tier``): a flex or priority ``serviceTier`` the producer wrote is
    taken out when the route set none, as ``service_tier`` is."""
    sent = {k: v for k, v in body.items() if k not in ("model", "service_tier", "serviceTier")}
    tier = body.get("service_tier")
    if tier is None and body.get("serviceTier") not in ("flex", "priority"):
        tier = body.get("serviceTier")
    if tier is not None:
        sent["serviceTier"] = tier
    return sent
