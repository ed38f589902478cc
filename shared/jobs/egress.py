"""Where a client may make the server connect, and a connection pinned to the address that was checked.

A callback URL is a client's instruction to open a connection from inside our network, so it is an
attack surface (server-side request forgery): cloud metadata at 169.254.169.254, the database, Redis
and S3 on private or loopback addresses, compose-internal names. A destination is allowed when its host
is one the organisation may use, its scheme is https (http only into networks an admin trusts) and the
addresses its name resolves to are public (or in a trusted network). The check runs at registration and
again before every attempt, and the attempt connects only to the addresses that check approved: a DNS
answer that changes between the two (rebinding) cannot steer the connection elsewhere.

No maintained library does this for a synchronous httpx/httpcore client (advocate wraps requests and
has been unmaintained since 2020; the httpx ones are async-only or brand new), so it is here: an
`httpcore` network backend, the documented extension point below httpx, which neither reads proxy
variables from the environment nor follows redirects.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any

import httpcore
import httpx

from shared.core.settings import Settings

log = logging.getLogger(__name__)
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")
# getaddrinfo has no timeout of its own; a few threads bound how long a lookup may hold an attempt.
_LOOKUPS = ThreadPoolExecutor(max_workers=4, thread_name_prefix="xrayq-dns")


class DestinationRefused(Exception):
    """A destination the policy refuses. The reason is for the server's log, never for the client."""


@dataclass(frozen=True)
class Destination:
    """A checked URL: the host as written (sent as Host and TLS SNI) and the addresses it may reach."""

    url: httpx.URL
    addresses: tuple[str, ...]

    @property
    def host(self) -> str:
        return self.url.raw_host.decode("ascii")

    @property
    def port(self) -> int:
        return self.url.port or (443 if self.url.scheme == "https" else 80)

    @property
    def key(self) -> str:
        """What concurrency limits and circuit breakers count by."""
        return f"{self.url.scheme}://{self.host}:{self.port}"


def trusted_networks(settings: Settings) -> list[IPNetwork]:
    return [
        ipaddress.ip_network(part.strip(), strict=False)
        for part in settings.callback_allow_networks.split(",")
        if part.strip()
    ]


def host_allowed(host: str, organisation: str | None, settings: Settings) -> bool:
    """The organisation's host allow-list (none configured: any host)."""
    lists = settings.callback_allowed_hosts
    allowed = lists.get(organisation or "", lists.get("*"))
    if allowed is None:
        return True
    host = host.lower().rstrip(".")
    for pattern in (entry.lower().rstrip(".") for entry in allowed):
        if host == pattern or (pattern.startswith("*.") and host.endswith(pattern[1:])):
            return True
    return False


def _embedded_ipv4(address: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for (mapped, 6to4, NAT64): it is the one really reached."""
    if address.ipv4_mapped is not None:
        return address.ipv4_mapped
    if address.sixtofour is not None:
        return address.sixtofour
    if address in _NAT64:
        return ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
    return None


def address_allowed(address: IPAddress, networks: Iterable[IPNetwork], *, public: bool = True) -> bool:
    """In a trusted network, or (when `public`) a global unicast address whatever form it is written in."""
    if isinstance(address, ipaddress.IPv6Address):
        embedded = _embedded_ipv4(address)
        if embedded is not None:
            return address_allowed(embedded, networks, public=public)
    if any(address.version == network.version and address in network for network in networks):
        return True
    return public and address.is_global and not address.is_multicast


def resolve_addresses(host: str, port: int, timeout_s: float) -> list[str]:
    """The system resolver's addresses for `host`, within `timeout_s` (a literal address: itself)."""
    future = _LOOKUPS.submit(socket.getaddrinfo, host, port, type=socket.SOCK_STREAM)
    try:
        answers = future.result(timeout=max(timeout_s, 0.001))
    except FutureTimeout:
        raise DestinationRefused(f"no DNS answer for {host} within {timeout_s:.1f}s") from None
    except OSError as exc:
        raise DestinationRefused(f"{host} does not resolve: {exc}") from None
    return list(dict.fromkeys(str(answer[4][0]) for answer in answers))


def check_destination(url: str, organisation: str | None, settings: Settings, timeout_s: float) -> Destination:
    """The URL as a Destination the policy allows, or DestinationRefused (with a reason for the log)."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, UnicodeError, TypeError) as exc:
        raise DestinationRefused(f"not a URL httpx accepts: {exc}") from None
    if parsed.scheme not in ("http", "https") or not host:
        raise DestinationRefused("not an http(s) URL with a host")
    if not host_allowed(host, organisation, settings):
        raise DestinationRefused(f"{host} is not on the allow-list of organisation {organisation!r}")
    networks = trusted_networks(settings)
    resolved = resolve_addresses(host, parsed.port or (443 if parsed.scheme == "https" else 80), timeout_s)
    # Plain http only into trusted networks; https anywhere public. Unallowed answers are dropped, not
    # connected to: an attacker's name that resolves to a public and a private address reaches the public one.
    public = parsed.scheme == "https"
    allowed = [
        a for a in resolved if address_allowed(ipaddress.ip_address(a.split("%", 1)[0]), networks, public=public)
    ]
    if not allowed:
        raise DestinationRefused(f"{host} resolves to {resolved}, none of them allowed for {parsed.scheme}")
    return Destination(parsed, tuple(allowed))


def _left(deadline: float, timeout: float | None, expired: type[Exception]) -> float:
    left = deadline - time.monotonic()
    if left <= 0:
        raise expired("the delivery's deadline has passed")
    return left if timeout is None else min(timeout, left)


class DeadlineStream(httpcore.NetworkStream):
    """A stream whose every read and write waits at most until one wall-clock deadline: a receiver that
    trickles a byte a second is cut at the deadline, not kept alive by each byte."""

    def __init__(self, inner: httpcore.NetworkStream, deadline: float) -> None:
        self._inner, self._deadline = inner, deadline

    def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        return self._inner.read(max_bytes, _left(self._deadline, timeout, httpcore.ReadTimeout))

    def write(self, buffer: bytes, timeout: float | None = None) -> None:
        self._inner.write(buffer, _left(self._deadline, timeout, httpcore.WriteTimeout))

    def close(self) -> None:
        self._inner.close()

    def start_tls(
        self, ssl_context: Any, server_hostname: str | None = None, timeout: float | None = None
    ) -> DeadlineStream:
        left = _left(self._deadline, timeout, httpcore.ConnectTimeout)
        return DeadlineStream(self._inner.start_tls(ssl_context, server_hostname, left), self._deadline)

    def get_extra_info(self, info: str) -> Any:
        return self._inner.get_extra_info(info)


class PinnedBackend(httpcore.NetworkBackend):
    """Connects only to the destination's checked addresses, whatever name httpcore asks for; TLS still
    verifies the certificate against the host name (httpcore passes it as SNI)."""

    def __init__(self, destination: Destination, deadline: float) -> None:
        self._destination, self._deadline = destination, deadline
        self._system = httpcore.SyncBackend()

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        if (host, port) != (self._destination.host, self._destination.port):
            raise httpcore.ConnectError("not the destination that was checked")
        failure: Exception = httpcore.ConnectError("no address to connect to")
        for address in self._destination.addresses:
            left = _left(self._deadline, timeout, httpcore.ConnectTimeout)
            try:
                stream = self._system.connect_tcp(address, port, left, local_address, socket_options)
            except (httpcore.ConnectError, httpcore.ConnectTimeout) as exc:
                failure = exc
                continue
            return DeadlineStream(stream, self._deadline)
        raise failure

    def connect_unix_socket(
        self, path: str, timeout: float | None = None, socket_options: Iterable[Any] | None = None
    ) -> httpcore.NetworkStream:
        raise httpcore.ConnectError("callbacks never use unix sockets")

    def sleep(self, seconds: float) -> None:
        time.sleep(seconds)
