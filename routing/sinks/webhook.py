"""Webhook sink: POST the result as JSON signed per Standard Webhooks, to a named target's URL,
after refusing addresses it must not reach, within one total deadline.

The target (a ``[sinks.<name>]`` entry of kind ``webhook`` in the sink table) holds the URL and
the names of the environment variables that hold its secrets: the producer names the sink and
chooses neither. Each delivery carries ``webhook-id`` (the request id, the idempotency key: a
receiver applies each id once), ``webhook-timestamp`` and ``webhook-signature`` (see
``routing.sinks.signing``; two signatures while a secret is rotated). How answers are treated:

    2xx                   delivered
    429, 5xx, timeouts,   retried with the shared backoff (a ``Retry-After`` is a floor)
    connection errors
    other 4xx, 3xx        dead letter at once: retrying will not change the answer, and
                          redirects are not followed (they could lead past the address check)

``MIXBATCH_WEBHOOK_TIMEOUT_S`` bounds the whole delivery (resolve, connect, send, the answer),
not each read: a receiver that trickles its answer is cut off when the time is up
(``routing.sinks.deadline``), so a slow receiver cannot hold a worker.

The address check (SSRF guard) resolves the host and refuses loopback, link-local (where cloud
metadata services live), private, reserved, multicast and otherwise non-global addresses,
unless the host or a CIDR holding the address is in ``MIXBATCH_SINK_ALLOW``
(``routing.sinks.guard``, which also refuses the IPv6 forms that tunnel an internal IPv4
address). It runs when the sinks table is loaded and at every
delivery, because DNS can change after submit, and the request is then sent to the very address
that was checked (the TLS name and ``Host`` header stay the URL's), so a second lookup cannot
swap it for another. Environment proxies are ignored for the same reason.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from http import HTTPStatus
from typing import Protocol

import httpx
from pydantic import SecretStr

from routing.decide.backoff import parse_retry_after
from routing.errors import ConfigError
from routing.models import Result
from routing.sinks.base import DeliveryError, Sink
from routing.sinks.deadline import TotalDeadline
from routing.sinks.guard import AddressPolicy, Resolver, resolve_host
from routing.sinks.settings import SinkSettings
from routing.sinks.signing import secret_key, verify_signature, webhook_headers

__all__ = [
    "AddressPolicy",
    "Resolver",
    "WebhookSink",
    "WebhookTargetLike",
    "new_http_client",
    "resolve_host",
    "verify_signature",
]

_SNIPPET_BYTES = 200


def new_http_client(timeout_s: float) -> httpx.Client:
    """The client every webhook delivery of a process shares.

    No environment proxies (a proxy would resolve the host itself, past the address check), no
    redirects, and no kept-alive connections: the pool is keyed by address, and a connection
    opened with one host name's TLS check must not carry another host's delivery.
    """
    return httpx.Client(
        timeout=httpx.Timeout(timeout_s),
        follow_redirects=False,
        trust_env=False,
        limits=httpx.Limits(max_keepalive_connections=0),
        headers={"User-Agent": "mixbatch-webhook"},
    )


def describe_url(url: httpx.URL) -> str:
    """The URL for messages: no userinfo and no query string, which may carry tokens."""
    port = f":{url.port}" if url.port else ""
    host = f"[{url.host}]" if ":" in url.host else url.host
    return f"{url.scheme}://{host}{port}{url.path}"


def _snippet(response: httpx.Response) -> str:
    """The first bytes of an error answer, to say why; never more, whatever the receiver sends."""
    data = b""
    try:
        for chunk in response.iter_bytes():
            data += chunk
            if len(data) >= _SNIPPET_BYTES:
                break
    except httpx.HTTPError:
        pass
    text = data[:_SNIPPET_BYTES].decode("utf-8", "replace").strip()
    return " ".join(text.split())


class WebhookTargetLike(Protocol):
    """What the sink needs of a webhook target (``routing.sinks.table.WebhookTarget``)."""

    @property
    def name(self) -> str: ...

    @property
    def url(self) -> str: ...

    @property
    def secret_env(self) -> str: ...

    def secrets(self) -> list[SecretStr]:
        """The active secrets, current first; ``ConfigError`` naming a variable that is unset."""
        ...


class WebhookSink(Sink):
    kind = "webhook"

    def __init__(
        self,
        target: WebhookTargetLike,
        *,
        settings: SinkSettings,
        client: httpx.Client,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.target = target
        self.settings = settings
        self.client = client
        self.resolver = resolver
        self.clock = clock
        self.policy = AddressPolicy.from_allow(settings.sink_allow)

    def _addresses(self, url: httpx.URL) -> list[str]:
        if url.scheme not in ("http", "https"):
            raise DeliveryError(
                f"scheme {url.scheme!r} is not allowed; a webhook is http or https",
                sink=self.kind,
                retryable=False,
                code="bad_url",
            )
        port = url.port or (443 if url.scheme == "https" else 80)
        return self.policy.resolve(url.host, port, self.resolver, sink=self.kind)

    def _keys(self) -> list[bytes]:
        """The target's signing keys, current first; a missing or malformed one is refused
        before anything is sent (the message names the variable, never its value)."""
        where = f"webhook sink {self.target.name!r}"
        try:
            secrets = self.target.secrets()
            return [secret_key(secret.get_secret_value()) for secret in secrets]
        except (ConfigError, ValueError) as exc:
            raise DeliveryError(
                f"{where}: no usable signing secret ({exc}); set {self.target.secret_env}, "
                "then replay",
                sink=self.kind,
                retryable=False,
                code="webhook_secret_missing",
            ) from None

    def write(self, result: Result, payload: bytes) -> None:
        try:
            url = httpx.URL(self.target.url)
        except httpx.InvalidURL:
            raise DeliveryError(
                f"sink {self.target.name!r} has a URL httpx cannot parse",
                sink=self.kind,
                retryable=False,
                code="bad_url",
            ) from None
        where = describe_url(url)
        keys = self._keys()
        limit_s = self.settings.webhook_timeout_s
        with TotalDeadline(limit_s) as deadline:
            addresses = self._addresses(url)
            headers = {
                "Content-Type": "application/json",
                "Host": url.netloc.decode("ascii"),
                **webhook_headers(keys, result.id, payload, timestamp=int(self.clock())),
            }
            extensions = {"sni_hostname": url.host} if url.scheme == "https" else {}
            failures: list[str] = []
            for address in addresses:
                try:
                    with self.client.stream(
                        "POST",
                        url.copy_with(host=address),
                        content=payload,
                        headers=headers,
                        timeout=deadline.timeout(),
                        extensions={**extensions, **deadline.extensions()},
                    ) as response:
                        self._check_answer(response, where)
                        return
                except httpx.HTTPError as exc:
                    if deadline.expired or isinstance(exc, httpx.TimeoutException):
                        raise self._timed_out(where, limit_s) from None
                    if not isinstance(exc, httpx.ConnectError):
                        raise DeliveryError(
                            f"{where}: {type(exc).__name__}: {exc}",
                            sink=self.kind,
                            retryable=True,
                            code="transport_error",
                        ) from None
                    failures.append(f"{address}: {exc or type(exc).__name__}")
        raise DeliveryError(
            f"cannot connect to {where} ({'; '.join(failures)})",
            sink=self.kind,
            retryable=True,
            code="connect_failed",
        )

    def _timed_out(self, where: str, limit_s: float) -> DeliveryError:
        return DeliveryError(
            f"{where} did not take the delivery within {limit_s:g}s, all of it "
            "(connect, send, answer; MIXBATCH_WEBHOOK_TIMEOUT_S)",
            sink=self.kind,
            retryable=True,
            code="timeout",
        )

    def _check_answer(self, response: httpx.Response, where: str) -> None:
        status = response.status_code
        if 200 <= status < 300:
            return
        try:
            phrase = HTTPStatus(status).phrase
        except ValueError:
            phrase = ""
        said = f"{where} answered {status} {phrase}".rstrip()
        snippet = _snippet(response)
        if snippet:
            said += f": {snippet}"
        if status == 429:
            raise DeliveryError(
                said,
                sink=self.kind,
                retryable=True,
                code="rate_limited",
                status_code=status,
                retry_after_s=parse_retry_after(response.headers.get("Retry-After"), self.clock()),
            )
        if status >= 500:
            raise DeliveryError(
                said, sink=self.kind, retryable=True, code="receiver_error", status_code=status
            )
        if 300 <= status < 400:
            raise DeliveryError(
                f"{said} (redirects are not followed; give the final URL)",
                sink=self.kind,
                retryable=False,
                code="receiver_redirected",
                status_code=status,
            )
        raise DeliveryError(
            f"{said} (a 4xx answer other than 429 is not retried)",
            sink=self.kind,
            retryable=False,
            code="receiver_rejected",
            status_code=status,
        )
