"""The address guard: which hosts a network sink (webhook, SQL database, Redis) may reach.

Sink targets are named by the service's operator, not by producers, but a URL in a table can
still point inward by mistake or through DNS: at a loopback port, a private network, a cloud
metadata service. So every network target is checked twice: when the sinks table is loaded
(the host as written, and the addresses it resolves to then) and when a delivery connects (the
addresses it resolves to now, every one of them). The connection then goes to an address that
was checked, so a second lookup cannot swap it for another.

Refused unless allowed: loopback, link-local (where cloud metadata services live), private,
shared (100.64/10), reserved, multicast, unspecified and otherwise not globally routable
addresses, and the forms that smuggle an internal IPv4 address inside IPv6: IPv4-mapped
(``::ffff:127.0.0.1``) and IPv4-compatible (``::127.0.0.1``) addresses, 6to4 (``2002::/16``)
and NAT64 (``64:ff9b::/96``) addresses embedding an internal IPv4 address, Teredo
(``2001::/32``) and local-use NAT64 (``64:ff9b:1::/48``) addresses. ``MIXBATCH_SINK_ALLOW``
(or its older name ``MIXBATCH_WEBHOOK_ALLOW``) lists hosts or CIDRs that may be reached anyway.
"""

from __future__ import annotations

import ipaddress
import re
import socket
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import sqlalchemy as sa
from redis.connection import parse_url
from sqlalchemy import exc as sa_exc

from routing.sinks.base import AddressRefused, DeliveryError

__all__ = [
    "ALLOW_VARIABLE",
    "AddressPolicy",
    "Endpoint",
    "IPAddress",
    "Resolver",
    "bad_stream_key",
    "literal_address",
    "path_refusal",
    "redis_endpoint",
    "refusal",
    "resolve_host",
    "sql_endpoint",
    "webhook_endpoint",
]

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
#: ``(host, port) -> addresses``; tests swap in a fake to exercise hosts that resolve inward.
Resolver = Callable[[str, int], Sequence[str]]
ALLOW_VARIABLE = "MIXBATCH_SINK_ALLOW"

_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
_NAT64_LOCAL = ipaddress.IPv6Network("64:ff9b:1::/48")
_COMPATIBLE = ipaddress.IPv6Network("::/96")


def resolve_host(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to, in the resolver's order, without duplicates."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    seen: dict[str, None] = {}
    for info in infos:
        seen.setdefault(str(info[4][0]), None)
    return list(seen)


def literal_address(host: str) -> IPAddress | None:
    """``host`` as an address if it is one (brackets and a zone index removed), else None."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _plain_refusal(ip: IPAddress) -> str | None:
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


def _embedded(ip: ipaddress.IPv6Address) -> tuple[str, ipaddress.IPv4Address] | None:
    """The IPv4 address an IPv6 transition form carries, with the form's name."""
    if ip.ipv4_mapped is not None:
        return "IPv4-mapped", ip.ipv4_mapped
    if ip.sixtofour is not None:
        return "6to4", ip.sixtofour
    if ip in _NAT64:
        return "NAT64", ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def refusal(ip: IPAddress) -> str | None:
    """Why ``ip`` is refused by default, or None for an ordinary public address."""
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.teredo is not None:
            return "a Teredo tunnel address (2001::/32)"
        if ip in _NAT64_LOCAL:
            return "a local-use NAT64 address (64:ff9b:1::/48)"
        if ip in _COMPATIBLE and int(ip) > 1:
            return "an IPv4-compatible IPv6 address (deprecated; ::a.b.c.d)"
        embedded = _embedded(ip)
        if embedded is not None:
            form, inner = embedded
            reason = _plain_refusal(inner)
            return None if reason is None else f"{form}, embedding {inner}, which is {reason}"
    return _plain_refusal(ip)


@dataclass(frozen=True)
class AddressPolicy:
    """Which addresses a sink may reach: every public one, plus what the allow-list names."""

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
        return host.strip("[]").lower().rstrip(".") in self.hosts

    def _allowed_address(self, ip: IPAddress) -> bool:
        inner = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
        return any(
            (a.version == net.version and a in net) for net in self.networks for a in (ip, inner)
            if a is not None
        )  # fmt: skip

    def why_refused(self, host: str, address: str) -> str | None:
        """Why connecting to ``address`` (which ``host`` resolved to) is refused, or None."""
        if self.allowed_host(host):
            return None
        ip = literal_address(address)
        if ip is None:
            return f"{address!r} is not an IP address"
        if self._allowed_address(ip):
            return None
        reason = refusal(ip)
        if reason is None:
            return None
        shown = host if literal_address(host) == ip else f"{host} ({ip})"
        return f"{shown} is {reason}; allow the host or its CIDR in {ALLOW_VARIABLE} if it is meant"

    def check(self, host: str, addresses: Sequence[str], *, sink: str = "webhook") -> list[str]:
        """The addresses to connect to, or ``AddressRefused`` if any of them is refused.

        All must pass: a name resolving to one public and one private address would otherwise
        reach the private one on some tries.
        """
        if not addresses:
            raise DeliveryError(
                f"{host!r} resolved to no address", sink=sink, retryable=True, code="dns"
            )
        for address in addresses:
            why = self.why_refused(host, address)
            if why is not None:
                raise AddressRefused(f"refused to connect: {why}", sink=sink)
        return list(addresses)

    def resolve(
        self, host: str, port: int, resolver: Resolver, *, sink: str = "webhook"
    ) -> list[str]:
        """Resolve ``host`` now and check every address (``check``); a failed lookup is
        retryable, since DNS may come back."""
        try:
            addresses = resolver(host.strip("[]"), port)
        except (OSError, UnicodeError) as exc:
            raise DeliveryError(
                f"cannot resolve {host!r} ({exc})", sink=sink, retryable=True, code="dns"
            ) from None
        return self.check(host, addresses, sink=sink)

    def at_load(self, host: str, port: int, resolver: Resolver) -> str | None:
        """Why the table may not name ``host``, or None. The host as written is checked, and
        the addresses it resolves to now; a name that does not resolve yet is left to the
        check at delivery (DNS may not be reachable where the table is loaded)."""
        if self.allowed_host(host):
            return None
        literal = literal_address(host)
        if literal is not None:
            return self.why_refused(host, str(literal))
        try:
            addresses = resolver(host, port)
        except (OSError, UnicodeError):
            return None
        for address in addresses:
            why = self.why_refused(host, address)
            if why is not None:
                return why
        return None


# -- what a target's URL reaches -----------------------------------------------------------------

_HOSTNAME = re.compile(
    r"^(?=.{1,253}$)[a-z0-9_]([a-z0-9_-]{0,62})(\.[a-z0-9_][a-z0-9_-]{0,62})*\.?$", re.IGNORECASE
)
_NUMERIC_LABEL = re.compile(r"^(0x[0-9a-f]*|[0-9]+)$", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_PG_QUERY_HOSTS = ("host", "hostaddr", "service", "servicefile")


@dataclass(frozen=True)
class Endpoint:
    """What a URL connects to: a ``host`` and ``port``, or a local ``path`` (a SQLite file, a
    unix socket), or neither (an in-memory SQLite database). ``tls``: the name must stay the
    host's for certificate checks, so the connection cannot be pinned to an address."""

    host: str | None = None
    port: int = 0
    path: Path | None = None
    tls: bool = False


def _host(host: str) -> str:
    """``host`` if it is an address or a host name; never a shorthand that a resolver would
    quietly read as an IPv4 address (``127.1``, ``0x7f000001``, ``2130706433``)."""
    if literal_address(host) is not None:
        return host
    if not _HOSTNAME.match(host):
        # not echoed: a URL with an unescaped '@' in its password puts part of it here
        raise ValueError("the host is not a host name or an IP address (escape '@' as %40)")
    last = host.rstrip(".").rsplit(".", 1)[-1]
    if _NUMERIC_LABEL.match(last):
        raise ValueError(f"{host!r} reads as an IPv4 address in a shorthand form; write a.b.c.d")
    return host


def webhook_endpoint(url: str) -> Endpoint:
    """Where a webhook URL goes, parsed as httpx (which sends it) parses it; ``ValueError``
    for a URL httpx cannot parse, a scheme other than http(s), or no host."""
    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise ValueError(f"not a URL httpx can parse ({exc})") from None
    if parsed.scheme not in ("http", "https"):
        raise ValueError(f"scheme {parsed.scheme or '(none)'!r} is not allowed: http or https")
    if not parsed.host:
        raise ValueError("the URL has no host")
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    return Endpoint(_host(parsed.host), port, tls=parsed.scheme == "https")


def sql_endpoint(url: str) -> Endpoint:
    """Where a SQLAlchemy URL goes: a PostgreSQL host named in the URL (not in its query, not
    a unix socket), or a SQLite file. The URL holds a password, so no message repeats it."""
    try:
        parsed = sa.make_url(url)
    except sa_exc.ArgumentError:
        raise ValueError("not a SQLAlchemy URL (postgresql://..., sqlite:///...)") from None
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.query:
            raise ValueError("a SQLite URL takes no query parameters here")
        database = parsed.database
        if not database or database == ":memory:":
            return Endpoint()
        if database.startswith("file:"):
            raise ValueError("SQLite URI filenames (file:...) are not accepted; give a path")
        return Endpoint(path=Path(database))
    if backend == "postgresql":
        named = [key for key in _PG_QUERY_HOSTS if key in parsed.query]
        if named:
            raise ValueError(
                f"{named[0]}= in the query is not accepted: name the host in the URL itself"
            )
        if not parsed.host:
            raise ValueError("a PostgreSQL URL must name its host (no unix sockets)")
        return Endpoint(_host(parsed.host), parsed.port or 5432)
    raise ValueError(f"dialect {backend!r} is not supported (sqlite, postgresql)")


def redis_endpoint(url: str) -> Endpoint:
    """Where a Redis URL goes, parsed by redis-py's own parser, without repeating the URL."""
    try:
        options = parse_url(url)
    except ValueError:
        raise ValueError("not a Redis URL (redis://, rediss:// or unix://)") from None
    if options.get("path"):
        return Endpoint(path=Path(str(options["path"])))
    host = str(options.get("host") or "localhost")
    tls = "connection_class" in options
    return Endpoint(_host(host), int(options.get("port") or 6379), tls=tls)


def path_refusal(path: Path, allowed: Sequence[Path], what: str) -> str | None:
    """Why ``path`` (resolved, links followed) may not be used, or None when it lies under
    one of the ``allowed`` directories (``MIXBATCH_SINK_ALLOW_PATHS``)."""
    resolved = path.expanduser().resolve()
    for directory in allowed:
        if resolved == directory or directory in resolved.parents:
            return None
    listed = ", ".join(str(d) for d in allowed) or "none listed"
    return f"{what} at {resolved} is not under a directory of MIXBATCH_SINK_ALLOW_PATHS ({listed})"


def bad_stream_key(key: str) -> str | None:
    """Why ``key`` cannot name a stream, or None: no control characters (no CR/LF reaches
    the wire), and braces only as a whole Redis Cluster hash tag, so the sink's marker key can
    share the stream's slot."""
    if _CONTROL.search(key):
        return f"{key!r} holds control characters (CR, LF, NUL, ...)"
    start = key.find("{")
    end = key.find("}", start + 1) if start != -1 else -1
    if ("{" in key or "}" in key) and not end > start + 1:
        return (
            f"{key!r}: braces in a stream key must form a Redis Cluster hash tag, e.g. "
            "'{tenant}:results'"
        )
    return None
