"""Webhook sink: POST the result as signed JSON, after refusing addresses it must not reach.

Each delivery carries ``Mixbatch-Signature`` (see ``routing.sinks.signing``) and
``Mixbatch-Request-Id``, the idempotency key: mixbatch delivers at least once, so a receiver
applies each request id once. How answers are treated:

    2xx                   delivered
    429, 5xx, timeouts,   retried with the shared backoff (a ``Retry-After`` is a floor)
    connection errors
    other 4xx, 3xx        dead letter at once: retrying will not change the answer, and
                          redirects are not followed (they could lead past the address check)

The address check (SSRF guard) resolves the host and refuses loopback, link-local (where cloud
metadata services live), private, reserved, multicast and otherwise non-global addresses,
unless the host or a CIDR holding the address is in ``MIXBATCH_WEBHOOK_ALLOW``. It runs at every
delivery, because DNS can change after submit, and the request is then sent to the very address
that was checked (the TLS name and ``Host`` header stay the URL's), so a second lookup cannot
swap it for another. Environment proxies are ignored for the same reason.
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from http import HTTPStatus

import httpx

from routing.callbacks import WebhookCallback
from routing.decide.backoff import parse_retry_after
from routing.models import Result
from routing.sinks.base import AddressRefused, DeliveryError, Sink
from routing.sinks.settings import SinkSettings
from routing.sinks.signing import (
    REQUEST_ID_HEADER,
    SIGNATURE_HEADER,
    signature_header,
    verify_signature,
)

__all__ = [
    "AddressPolicy",
    "Resolver",
    "WebhookSink",
    "new_http_client",
    "resolve_host",
    "verify_signature",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``(host, port) -> addresses``; tests swap in a fake to exercise hosts that resolve inward.
Resolver = Callable[[str, int], Sequence[str]]

_SNIPPET_BYTES = 200


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def _refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused by default, or None for an ordinary public address."""
    if ip.is_loopback:
        return "loopback"
    if ip.is_link_local:
        return "link-local (where cloud metadata services live)"
    if ip.is_multicast:
        return "multicast"
    if ip.is_unspecified:
        return "unspecified"
    if ip.is_private:
        return "private"
    if ip.is_reserved:
        return "reserved"
    if not ip.is_global:
        return "not globally routable"
    return None


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a webhook may reach: every public one, plus what the allow-list names."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_allow(cls, entries: Iterable[str]) -> AddressPolicy:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            item = entry.strip().lower().rstrip(".")
            try:
                networks.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item)
        return cls(frozenset(hosts), tuple(networks))

    def allowed_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def check(self, host: str, addresses: Sequence[str]) -> list[str]:
        """The addresses to connect to, or ``AddressRefused`` if any of them is refused.

        All must pass: a name resolving to one public and one private address would otherwise
        reach the private one on some tries.
        """
        if not addresses:
            raise DeliveryError(
                f"{host!r} resolved to no address", sink="webhook", retryable=True, code="dns"
            )
        if self.allowed_host(host):
            return list(addresses)
        for text in addresses:
            ip: IPAddress = ipaddress.ip_address(text.split("%", 1)[0])
            if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
                ip = ip.ipv4_mapped
            if any(ip.version == net.version and ip in net for net in self.networks):
                continue
            reason = _refusal(ip)
            if reason is not None:
                shown = host if host == text else f"{host} ({text})"
                raise AddressRefused(
                    f"refused to deliver to {shown}: the address is {reason}; "
                    "allow the host or its CIDR in MIXBATCH_WEBHOOK_ALLOW if it is meant"
                )
        return list(addresses)


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


class WebhookSink(Sink):
    kind = "webhook"

    def __init__(
        self,
        spec: WebhookCallback,
        *,
        settings: SinkSettings,
        client: httpx.Client,
        resolver: Resolver = resolve_host,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__(max_payload_bytes=settings.payload_limit(self.kind))
        self.spec = spec
        self.settings = settings
        self.client = client
        self.resolver = resolver
        self.clock = clock
        self.policy = AddressPolicy.from_allow(settings.webhook_allow)

    def _addresses(self, url: httpx.URL) -> list[str]:
        if url.scheme not in ("http", "https"):
            raise DeliveryError(
                f"scheme {url.scheme!r} is not allowed; a webhook is http or https",
                sink=self.kind,
                retryable=False,
                code="bad_url",
            )
        port = url.port or (443 if url.scheme == "https" else 80)
        try:
            addresses = self.resolver(url.host, port)
        except (OSError, UnicodeError) as exc:
            raise DeliveryError(
                f"cannot resolve {url.host!r} ({exc})", sink=self.kind, retryable=True, code="dns"
            ) from None
        return self.policy.check(url.host, addresses)

    def write(self, result: Result, payload: bytes) -> None:
        url = httpx.URL(self.spec.url)
        where = describe_url(url)
        secret = self.settings.webhook_secret_for(result.tenant)
        if secret is None:
            raise DeliveryError(
                f"no signing secret for tenant {result.tenant!r}: set MIXBATCH_WEBHOOK_SECRETS "
                '(JSON {"tenant": "secret"}) or MIXBATCH_WEBHOOK_SECRET, then replay',
                sink=self.kind,
                retryable=False,
                code="webhook_secret_missing",
            )
        addresses = self._addresses(url)
        headers = {
            "Content-Type": "application/json",
            "Host": url.netloc.decode("ascii"),
            SIGNATURE_HEADER: signature_header(
                secret.get_secret_value(), payload, timestamp=int(self.clock())
            ),
            REQUEST_ID_HEADER: result.id,
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
                    extensions=extensions,
                ) as response:
                    self._check_answer(response, where)
                    return
            except httpx.ConnectError as exc:
                failures.append(f"{address}: {exc or type(exc).__name__}")
            except httpx.TimeoutException:
                raise DeliveryError(
                    f"{where} did not answer within {self.settings.webhook_timeout_s:g}s "
                    "(MIXBATCH_WEBHOOK_TIMEOUT_S)",
                    sink=self.kind,
                    retryable=True,
                    code="timeout",
                ) from None
            except httpx.HTTPError as exc:
                raise DeliveryError(
                    f"{where}: {type(exc).__name__}: {exc}",
                    sink=self.kind,
                    retryable=True,
                    code="transport_error",
                ) from None
        raise DeliveryError(
            f"cannot connect to {where} ({'; '.join(failures)})",
            sink=self.kind,
            retryable=True,
            code="connect_failed",
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
