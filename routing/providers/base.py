"""The seam between mixbatch and a provider's synchronous HTTP API.

A ``RealtimeAdapter`` does I/O and nothing else: one POST per ``call``, every failure mapped
once, in ``map_transport_errors`` and ``error_for_response``, onto mixbatch's error tree (the
batch adapters in ``routing.providers.batch`` share both, and the ``retry_call`` loop):

    httpx.TimeoutException            -> ProviderTimeout   (retryable)
    httpx.NetworkError, RemoteProtocolError -> ProviderError (retryable)
    other httpx.TransportError        -> ProviderError     (not retryable: our bug, not theirs)
    HTTP 429, 498 (Groq flex shed)    -> RateLimited       (retryable, retry_after_s)
    HTTP 408, 409, 5xx                -> ProviderError     (retryable)
    other HTTP 4xx                    -> ProviderError     (not retryable, the provider's message)

A provider's ``x-should-retry`` header overrides the status rule, as the OpenAI SDK does.
Subclasses only say where to POST and which headers authenticate. Retrying is not the
adapter's job: ``call_with_retries`` asks ``routing.decide.backoff`` and keeps within a time budget.

Secrets: the API key lives in a ``SecretStr`` and reaches only the request headers. Error
messages and log records carry the provider's name, the endpoint path, the status and the
provider's request id, never the key or the request body; httpx exceptions are not chained
because they hold the request, headers included.
"""

from __future__ import annotations

import abc
import contextlib
import logging
import math
import random
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any, ClassVar, Literal, Self, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator

from routing.decide.backoff import RetryPolicy, next_delay_s, parse_retry_after
from routing.errors import ConfigError, ProviderError, ProviderTimeout, RateLimited
from routing.models import Endpoint

__all__ = [
    "AccountClient",
    "ProviderAccount",
    "ProviderResponse",
    "RealtimeAdapter",
    "call_with_retries",
    "error_for_response",
    "map_transport_errors",
    "rate_limit_headers",
    "redact_secret",
    "retry_after_from_headers",
    "retry_call",
]

logger = logging.getLogger(__name__)

RETRYABLE_STATUSES = frozenset({408, 409, 429, 498})
#: Load shed: 429, and Groq flex's 498 ``capacity_exceeded``; both are ``RateLimited``.
RATE_LIMITED_STATUSES = frozenset({429, 498})
RATE_LIMIT_PREFIXES = ("x-ratelimit-", "anthropic-ratelimit-")
RATE_LIMIT_NAMES = frozenset({"retry-after", "retry-after-ms"})
_MAX_MESSAGE_CHARS = 500

T = TypeVar("T")


class ProviderAccount(BaseModel):
    """One set of credentials at one provider. The key is a ``SecretStr``: reprs show ``***``.

    ``base_url`` follows each SDK's convention, so a value copied from SDK docs works: OpenAI
    and compatible providers include ``/v1`` (``https://api.openai.com/v1``), Anthropic does
    not (``https://api.anthropic.com``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    kind: Literal["openai", "anthropic", "gemini", "bedrock", "mistral"]
    base_url: str = Field(min_length=1)
    api_key: SecretStr | None = None
    timeout_s: float = Field(default=60.0, gt=0)
    max_concurrency: int = Field(default=16, ge=1)
    anthropic_version: str = "2023-06-01"

    @field_validator("base_url")
    @classmethod
    def _base_url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"base_url {v!r} must start with http:// or https://")
        return v.rstrip("/")


class ProviderResponse(BaseModel):
    """A successful reply, plus what planners learn from it (latency, rate-limit headers)."""

    model_config = ConfigDict(frozen=True)

    provider: str
    status_code: int
    body: dict[str, Any]
    provider_request_id: str | None = None
    latency_s: float
    rate_limit: dict[str, str] = Field(default_factory=dict)


def rate_limit_headers(headers: Mapping[str, str]) -> dict[str, str]:
    """The headers a rate-limit planner wants (``x-ratelimit-*``, ``anthropic-ratelimit-*``,
    ``retry-after``), names lower-cased."""
    kept: dict[str, str] = {}
    for name, value in headers.items():
        low = name.lower()
        if low in RATE_LIMIT_NAMES or low.startswith(RATE_LIMIT_PREFIXES):
            kept[low] = value
    return kept


def retry_after_from_headers(headers: Mapping[str, str], now: float) -> float | None:
    """Seconds the provider asked us to wait: ``retry-after-ms`` first (OpenAI), then
    ``retry-after``. ``headers`` must look names up case-insensitively (httpx.Headers does)."""
    millis = headers.get("retry-after-ms")
    if millis is not None:
        try:
            value = float(millis) / 1000.0
        except ValueError:
            value = math.nan
        if math.isfinite(value) and value >= 0:
            return value
    return parse_retry_after(headers.get("retry-after"), now)


def _provider_message(response: httpx.Response) -> tuple[str, object]:
    """The provider's own error message and the parsed error body.

    OpenAI sends ``{"error": {"message", "type", "param", "code"}}``, Anthropic
    ``{"type": "error", "error": {"type", "message"}}``; ``param`` names the bad field, so it
    is appended. Anything else falls back to a short piece of the text or the reason phrase.
    """
    try:
        body: object = response.json()
    except ValueError:
        text = response.text.strip()
        return (text[:_MAX_MESSAGE_CHARS] or response.reason_phrase or "no error message"), text
    if isinstance(body, dict):
        error = body.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):
            message: str = error["message"]
            param = error.get("param")
            if isinstance(param, str) and param and param not in message:
                message = f"{message} (param: {param})"
            return message[:_MAX_MESSAGE_CHARS], body
        for field in ("message", "detail"):
            if isinstance(body.get(field), str):
                return body[field][:_MAX_MESSAGE_CHARS], body
        if isinstance(error, str):
            return error[:_MAX_MESSAGE_CHARS], body
    return (response.reason_phrase or "no error message"), body


def error_for_response(
    provider: str,
    path: str,
    response: httpx.Response,
    *,
    request_id: str | None,
    now: float,
    redact: Callable[[str], str] = lambda s: s,
    method: str = "POST",
) -> ProviderError:
    """Map an HTTP error reply onto the error tree; ``redact`` scrubs secrets from messages."""
    status = response.status_code
    message, body = _provider_message(response)
    text = redact(f"{provider} {method} {path} -> {status}: {message}")
    retryable = status in RETRYABLE_STATUSES or status >= 500
    should_retry = response.headers.get("x-should-retry", "").strip().lower()
    if should_retry in ("true", "false"):
        retryable = should_retry == "true"
    if status in RATE_LIMITED_STATUSES:
        return RateLimited(
            text,
            status_code=status,
            retryable=retryable,
            retry_after_s=retry_after_from_headers(response.headers, now),
            body=body,
            provider_request_id=request_id,
        )
    return ProviderError(
        text,
        status_code=status,
        retryable=retryable,
        retry_after_s=retry_after_from_headers(response.headers, now) if retryable else None,
        body=body,
        provider_request_id=request_id,
    )


def redact_secret(text: str, key: SecretStr | None) -> str:
    """Blank the key out of text that came from outside (a provider may echo it back)."""
    secret = key.get_secret_value() if key else ""
    return text.replace(secret, "***") if len(secret) >= 4 else text


@contextlib.contextmanager
def map_transport_errors(
    where: str, timeout_s: float, redact: Callable[[str], str] = lambda s: s
) -> Iterator[None]:
    """Translate httpx's transport errors once; nothing below this raises httpx types.

    ``where`` (account, method, path) starts each message. Shared by every adapter, realtime and
    batch, so one table decides what a broken connection means.
    """
    try:
        yield
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(
            redact(f"{where}: {type(exc).__name__} after {timeout_s:.3g} s"), retryable=True
        ) from None
    except (httpx.NetworkError, httpx.RemoteProtocolError) as exc:
        raise ProviderError(
            redact(f"{where}: {type(exc).__name__}: {exc}"), retryable=True
        ) from None
    except httpx.TransportError as exc:
        raise ProviderError(
            redact(f"{where}: {type(exc).__name__}: {exc}"), retryable=False
        ) from None


class AccountClient(abc.ABC):
    """What every adapter is: one account speaking one protocol, and the HTTP client it uses.

    Pass ``client`` to share a connection pool between adapters; an adapter closes only a
    client it created itself. A protocol says which endpoints it serves, where the provider's
    request id comes back and which headers authenticate (the only place the key is read).
    """

    kind: ClassVar[str]
    endpoints: ClassVar[frozenset[Endpoint]]
    request_id_header: ClassVar[str] = "x-request-id"
    route_name: ClassVar[str]
    """The route the adapter serves ("realtime", "batch"), for messages."""

    def __init__(
        self, account: ProviderAccount, client: httpx.Client | None, **client_options: Any
    ) -> None:
        self.account = account
        self._owns_client = client is None
        if client is None:
            client = httpx.Client(timeout=account.timeout_s, **client_options)
        self._client = client

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(name={self.account.name!r}, base_url={self.account.base_url!r})"
        )

    @abc.abstractmethod
    def auth_headers(self) -> dict[str, str]:
        """Headers that authenticate and version a request (the only place the key is read)."""
        ...

    def resolve_endpoint(self, endpoint: Endpoint | str) -> Endpoint:
        """``endpoint`` as an ``Endpoint`` this adapter serves, else a non-retryable error."""
        try:
            value: Endpoint | None = Endpoint(endpoint)
        except ValueError:
            value = None
        if value is None or value not in self.endpoints:
            supported = ", ".join(sorted(e.value for e in self.endpoints))
            raise ProviderError(
                f"{self.account.name} ({self.kind}) has no {self.route_name} endpoint "
                f"{str(endpoint)!r} (supported: {supported})",
                retryable=False,
            )
        return value

    def _error_for(self, method: str, path: str, response: httpx.Response) -> ProviderError:
        """An error reply as our error, with the provider's request id and secrets scrubbed."""
        return error_for_response(
            self.account.name,
            path,
            response,
            request_id=response.headers.get(self.request_id_header),
            now=time.time(),
            redact=self._redact,
            method=method,
        )

    def _redact(self, text: str) -> str:
        return redact_secret(text, self.account.api_key)

    def close(self) -> None:
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


class RealtimeAdapter(AccountClient):
    """One provider account's synchronous API: ``call`` POSTs once and returns or raises ours.

    The client an adapter creates has ``max_connections = account.max_concurrency``, a
    per-process bound; the cross-process bound is ``routing.store.semaphore.RedisSemaphore``.
    """

    route_name: ClassVar[str] = "realtime"

    def __init__(self, account: ProviderAccount, client: httpx.Client | None = None) -> None:
        if account.kind != self.kind:
            raise ConfigError(
                f"{type(self).__name__} cannot serve account {account.name!r} of kind "
                f"{account.kind!r}; use adapter_for(account)"
            )
        limits = httpx.Limits(
            max_connections=account.max_concurrency,
            max_keepalive_connections=account.max_concurrency,
        )
        super().__init__(account, client, limits=limits)

    @abc.abstractmethod
    def path_for(self, endpoint: Endpoint) -> str:
        """The path appended to ``account.base_url`` for ``endpoint``."""
        ...

    def wire(self, endpoint: Endpoint, body: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        """The path and body sent for ``body``; Gemini moves the model into the path."""
        return self.path_for(endpoint), body

    def call(
        self, endpoint: Endpoint | str, body: dict[str, Any], *, timeout_s: float | None = None
    ) -> ProviderResponse:
        """POST ``body`` once to ``endpoint``; a 2xx JSON object comes back, anything else raises."""
        target = self.resolve_endpoint(endpoint)
        path, body = self.wire(target, body)
        url = self.account.base_url + path
        timeout = self.account.timeout_s if timeout_s is None else timeout_s
        headers = {"accept": "application/json", **self.auth_headers()}
        started = time.monotonic()
        with self._map_transport_errors(target, timeout):
            response = self._client.post(url, json=body, headers=headers, timeout=timeout)
        latency = time.monotonic() - started
        request_id = response.headers.get(self.request_id_header)
        if response.status_code >= 400:
            raise self._error_for("POST", target.value, response)
        try:
            parsed = response.json() if response.content else None
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise ProviderError(
                f"{self.account.name} POST {target.value} -> {response.status_code}: "
                "the reply is not a JSON object",
                status_code=response.status_code,
                retryable=False,
                body=response.text[:_MAX_MESSAGE_CHARS],
                provider_request_id=request_id,
            )
        return ProviderResponse(
            provider=self.account.name,
            status_code=response.status_code,
            body=parsed,
            provider_request_id=request_id,
            latency_s=latency,
            rate_limit=rate_limit_headers(response.headers),
        )

    def _map_transport_errors(
        self, endpoint: Endpoint, timeout_s: float
    ) -> contextlib.AbstractContextManager[None]:
        return map_transport_errors(
            f"{self.account.name} POST {endpoint.value}", timeout_s, self._redact
        )


def call_with_retries(
    adapter: RealtimeAdapter,
    endpoint: Endpoint | str,
    body: dict[str, Any],
    *,
    policy: RetryPolicy,
    budget_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
) -> ProviderResponse:
    """``adapter.call`` retried per ``routing.decide.backoff.next_delay_s`` within ``budget_s`` seconds.

    Each try's timeout is cut to the budget left (httpx applies it per phase: connect, each
    read), and a wait that would end past the budget is not started: the last error is raised
    instead, with a note saying why, so the caller (the lane's requeue) still sees
    ``retryable`` and ``retry_after_s``.
    """
    return retry_call(
        lambda timeout_s: adapter.call(endpoint, body, timeout_s=timeout_s),
        provider=adapter.account.name,
        where=f"{adapter.account.name} POST {endpoint}",
        endpoint=str(endpoint),
        timeout_s=adapter.account.timeout_s,
        policy=policy,
        budget_s=budget_s,
        sleep=sleep,
        clock=clock,
        rng=rng,
    )


def retry_call(
    attempt_once: Callable[[float], T],
    *,
    provider: str,
    where: str,
    endpoint: str,
    timeout_s: float,
    policy: RetryPolicy,
    budget_s: float,
    sleep: Callable[[float], None] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rng: random.Random | None = None,
    may_retry: Callable[[ProviderError], bool] | None = None,
) -> T:
    """The retry loop behind every provider verb: ``attempt_once(timeout_s)`` per try.

    The loop of ``call_with_retries``, for any request shape (batch uploads, polls, downloads).
    ``where`` ("account METHOD path") starts messages and logs. ``may_retry`` vetoes a retry the
    policy would allow, for steps that are not idempotent: a create whose reply was lost may have
    created something, so trying again could do it twice.
    """
    deadline = clock() + budget_s
    attempt = 0
    last: ProviderError | None = None
    while True:
        attempt += 1
        left = deadline - clock()
        if left <= 0:
            if last is not None:
                last.add_note(f"mixbatch: gave up after {attempt - 1} tries; budget spent")
                raise last
            raise ProviderTimeout(
                f"{where}: a budget of {budget_s:g} s leaves no time for try {attempt}",
                retryable=True,
            )
        try:
            return attempt_once(min(timeout_s, left))
        except ProviderError as exc:
            delay = next_delay_s(exc, attempt, policy, rng)
            if delay is not None and may_retry is not None and not may_retry(exc):
                exc.add_note(
                    f"mixbatch: not retried after try {attempt}: the step is not idempotent"
                )
                raise
            if delay is None:
                if exc.retryable:
                    exc.add_note(f"mixbatch: gave up after {attempt} tries (max_tries)")
                raise
            if clock() + delay > deadline:
                exc.add_note(
                    f"mixbatch: gave up after {attempt} tries; waiting {delay:.2f} s "
                    f"would pass the {budget_s:g} s budget"
                )
                raise
            last = exc
            logger.warning(
                "%s failed on try %d (%s %s), retrying in %.2f s",
                where,
                attempt,
                type(exc).__name__,
                exc.status_code,
                delay,
                extra={
                    "provider": provider,
                    "endpoint": endpoint,
                    "provider_request_id": exc.provider_request_id,
                    "status_code": exc.status_code,
                    "error_type": type(exc).__name__,
                    "attempt": attempt,
                    "delay_s": round(delay, 3),
                },
            )
            sleep(delay)
