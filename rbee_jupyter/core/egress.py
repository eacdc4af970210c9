"""Which URLs a shared server may open on a user's behalf (external engines in service mode).

Registering an engine makes the server send requests to a URL the user chose: at
registration, on every health probe and with every generation. On a shared node that is a
way into what only the server can reach: its own loopback services, the cloud's metadata
endpoint (169.254.169.254 hands out the node's credentials), the private network. So a
URL registered by a user who is not an admin must

- match one of the administrator's URL patterns (``c.RbeeApp.engine_url_patterns``), when
  there are any;
- lead only to public addresses, or to networks the administrator opened
  (``c.RbeeApp.engine_allowed_networks``).

The address check is made on what the name resolves to *when the connection is made*, and
the connection goes to that very address (:class:`CheckedTransport`): a name that answered
a public address at registration and a loopback one a minute later (DNS rebinding) is
refused at the second connection, and there is no second resolution between the check
and the connect for an attacker to win. The name is also resolved once at registration
(:meth:`EgressPolicy.check_registration`), so a name that leads somewhere refused is a 403
at once, not an accepted registration whose first connection fails.
"""

from __future__ import annotations

import asyncio
import fnmatch
import ipaddress
import socket
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import httpx

from ..errors import UrlNotAllowed

__all__ = ["METADATA_HOSTS", "CheckedTransport", "EgressPolicy"]

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[[str, int], Awaitable[list[str]]]
Lookup = Callable[[str, int], list[str]]  # the blocking kind, for registration (run in a thread)

#: Names of cloud metadata services, refused whatever they resolve to (some resolve only inside the cloud).
METADATA_HOSTS = frozenset({"metadata", "metadata.google.internal", "metadata.goog", "instance-data",
                            "instance-data.ec2.internal", "metadata.azure.internal"})
_HINT = "Ask an administrator to register it, or to open it with c.RbeeApp.engine_allowed_networks."


def _kind(ip: Address) -> str | None:
    """Why ``ip`` is not a public address (None when it is one)."""
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return _kind(ip.ipv4_mapped)
    for kind, test in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local),
                       ("private", ip.is_private), ("multicast", ip.is_multicast),
                       ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved)):
        if test:
            return kind
    return None if ip.is_global else "non-public"


@dataclass(frozen=True)
class EgressPolicy:
    """The administrator's rules for URLs opened on behalf of users who are not admins.

    Args:
        url_patterns: shell-style patterns (``fnmatch``, e.g. ``"https://*.example.org/v1"``)
            one of which a URL must match; empty: any http(s) URL (its addresses still checked).
        allowed_networks: networks that may be reached although they are not public
            (e.g. ``10.1.2.0/24`` for a GPU rack); empty: public addresses only.
    """

    url_patterns: tuple[str, ...] = ()
    allowed_networks: tuple[Network, ...] = ()

    @classmethod
    def from_config(cls, url_patterns: Iterable[str] = (), allowed_networks: Iterable[str] = ()) -> EgressPolicy:
        """Build from trait values; raises ``ValueError`` naming a network that is not one."""
        return cls(tuple(url_patterns), tuple(ipaddress.ip_network(n, strict=False) for n in allowed_networks))

    def check_url(self, url: str) -> None:
        """At registration: the URL matches a pattern, and a literal address or metadata name is allowed.

        Names are resolved later, at every connection (:meth:`resolve`).

        Raises:
            UrlNotAllowed: the URL is outside the patterns, names a metadata service, or is a
                literal address that is not public and not in an allowed network.
        """
        if self.url_patterns and not any(fnmatch.fnmatchcase(url, p) for p in self.url_patterns):
            raise UrlNotAllowed(f"{url} matches none of the URL patterns this server allows for engines. {_HINT}",
                                details={"field": "url", "url_patterns": list(self.url_patterns)})
        host = (urlsplit(url).hostname or "").lower().rstrip(".")
        if host in METADATA_HOSTS:
            raise UrlNotAllowed(f"{host} is a cloud metadata service; the server never opens it for users.",
                                details={"field": "url", "host": host})
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return
        self.check_address(host, ip)

    def check_registration(self, url: str, *, lookup: Lookup | None = None) -> None:
        """At registration: :meth:`check_url`, then every address the URL's host name resolves to now.

        Blocking (it resolves the name): call it in a thread from an event loop. A name that
        does not resolve is let through: the first connection reports it as unreachable, as it
        does for any user. The check at each connection stays (:class:`CheckedTransport`):
        a name may resolve elsewhere later.

        Args:
            lookup: ``(host, port) -> addresses``; default the system resolver.

        Raises:
            UrlNotAllowed: as :meth:`check_url`, or an address of the name is refused; the
                details name the address and its kind (loopback, link-local, private, ...).
        """
        self.check_url(url)
        parts = urlsplit(url)
        host = (parts.hostname or "").lower().rstrip(".")
        try:
            ipaddress.ip_address(host)
            return  # a literal address: check_url judged it
        except ValueError:
            pass
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            port = 80
        try:
            addresses = (lookup or _lookup)(host, port)
        except OSError:
            return  # unresolvable now: the connection says so, for admins and users alike
        for address in addresses:
            self.check_address(host, ipaddress.ip_address(address))

    def check_address(self, host: str, ip: Address) -> None:
        """Raise ``UrlNotAllowed`` unless ``ip`` (what ``host`` resolved to) is public or in an allowed network."""
        kind = _kind(ip)
        if kind is None or any(ip in net for net in self.allowed_networks if ip.version == net.version):
            return
        said = f"{host} is" if host == str(ip) else f"{host} resolves to {ip}, which is"
        raise UrlNotAllowed(f"The server may not open {said} a {kind} address. {_HINT}",
                            details={"field": "url", "host": host, "address": str(ip), "kind": kind})

    async def resolve(self, host: str, port: int, *, resolver: Resolver | None = None) -> str:
        """The address to connect to: ``host`` resolved now, every address it has checked, the first returned.

        All of them are checked, not only the first: a name with one public and one private
        record would otherwise reach the private one whenever the order changes.
        """
        host = host.lower().rstrip(".")
        if host in METADATA_HOSTS:
            raise UrlNotAllowed(f"{host} is a cloud metadata service; the server never opens it for users.",
                                details={"field": "url", "host": host})
        addresses = await (resolver or _getaddrinfo)(host, port)
        if not addresses:
            raise UrlNotAllowed(f"{host} resolves to no address.", details={"field": "url", "host": host})
        for address in addresses:
            self.check_address(host, ipaddress.ip_address(address))
        return addresses[0]

    def transport(self, *, resolver: Resolver | None = None, **options: object) -> CheckedTransport:
        """An httpx transport that checks every connection against this policy."""
        return CheckedTransport(self, resolver=resolver, **options)


async def _getaddrinfo(host: str, port: int) -> list[str]:
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as e:
        raise httpx.ConnectError(f"cannot resolve {host}: {e.strerror}") from None
    return _addresses(infos)


def _lookup(host: str, port: int) -> list[str]:
    """The system resolver's addresses of ``host``, blocking (``socket.gaierror`` is an ``OSError``)."""
    return _addresses(socket.getaddrinfo(host, port, type=socket.SOCK_STREAM))


def _addresses(infos: list[Any]) -> list[str]:
    seen: list[str] = []
    for *_, sockaddr in infos:
        address = str(sockaddr[0]).split("%", 1)[0]  # an IPv6 scope id is not part of the address
        if address not in seen:
            seen.append(address)
    return seen


class CheckedTransport(httpx.AsyncBaseTransport):
    """Resolves each request's host, checks the addresses, and connects to the checked one.

    The request keeps its ``Host`` header, and TLS its server name (``sni_hostname``), so
    the engine and its certificate see the name the user registered.
    """

    def __init__(self, policy: EgressPolicy, *, resolver: Resolver | None = None, **options: object) -> None:
        self.policy = policy
        self._resolver = resolver
        self._inner = httpx.AsyncHTTPTransport(**options)  # type: ignore[arg-type]

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        url = request.url
        port = url.port or (443 if url.scheme == "https" else 80)
        address = await self.policy.resolve(url.host, port, resolver=self._resolver)
        if address != url.host:
            if url.scheme == "https":
                request.extensions = {**request.extensions, "sni_hostname": url.host}
            request.url = url.copy_with(host=address)
        return await self._inner.handle_async_request(request)

    async def aclose(self) -> None:
        await self._inner.aclose()
