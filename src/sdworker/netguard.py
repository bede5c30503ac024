"""Outbound request guard (SSRF): which addresses user-supplied URLs may reach.

Used for input image URLs and webhook targets. A host is resolved and every address it
resolves to must be public (not loopback, private, link-local, multicast, reserved,
shared, unspecified, or a cloud metadata endpoint), in any form: IPv4, IPv6, IPv4-mapped
IPv6 and numeric spellings such as 0x7f000001 (the resolver turns those into addresses).
The connection then goes to the checked address itself, so a DNS answer that changes
between check and connect (rebinding) cannot redirect it. Hand-written: no maintained
library does resolve-check-pin for httpx.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable
from dataclasses import dataclass
from urllib.parse import SplitResult, urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class UnsafeUrlError(ValueError):
    """A URL that may not be fetched; the message says why, without internal details."""


@dataclass(frozen=True)
class Target:
    """A checked URL: connect to `address`, send `Host: host_header`, verify TLS for `host`."""

    url: str  # the URL with the host replaced by the checked address
    host: str
    host_header: str
    scheme: str


@dataclass(frozen=True)
class AddressPolicy:
    """Hosts and networks allowed despite being non-public (e.g. an internal image CDN)."""

    allow_hosts: frozenset[str] = frozenset()
    allow_networks: tuple[IPNetwork, ...] = ()

    @classmethod
    def from_list(cls, entries: Iterable[str]) -> AddressPolicy:
        """Entries are host names, addresses or CIDR networks."""
        hosts, networks = set(), []
        for raw in entries:
            entry = raw.strip().lower()
            if not entry:
                continue
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry)
        return cls(frozenset(hosts), tuple(networks))

    def _allowed(self, address: IPAddress) -> bool:
        return any(address in network for network in self.allow_networks)

    def check_address(self, address: IPAddress) -> None:
        candidates = [address, *_embedded_ipv4(address)]
        for candidate in candidates:
            if self._allowed(candidate):
                return
        if any(not c.is_global or c.is_multicast for c in candidates):
            raise UnsafeUrlError("it points at a private, loopback or reserved address")

    def resolve(self, url: str) -> Target:
        """Check a URL and pick the address to connect to; UnsafeUrlError if refused."""
        try:
            parts = urlsplit(url)
            host = (parts.hostname or "").lower()
        except ValueError:  # e.g. an unclosed "[" in the host
            raise UnsafeUrlError("it is not a valid URL") from None
        if parts.scheme not in {"http", "https"}:
            raise UnsafeUrlError("only http and https URLs are accepted")
        if not host:
            raise UnsafeUrlError("the URL has no host")
        if parts.username or parts.password:
            raise UnsafeUrlError("credentials in URLs are not accepted")
        try:
            port = parts.port or (443 if parts.scheme == "https" else 80)
        except ValueError:
            raise UnsafeUrlError("the URL has an invalid port") from None
        addresses = _resolve(host, port)
        if host not in self.allow_hosts:
            for address in addresses:
                self.check_address(address)
        return _pinned(parts, host, addresses[0])


# IPv6 ranges that carry an IPv4 address in their last 32 bits: NAT64 (RFC 6052 and
# RFC 8215) and the deprecated IPv4-compatible form; Python calls some of them global.
_IPV4_CARRIERS = tuple(
    ipaddress.IPv6Network(net) for net in ("64:ff9b::/96", "64:ff9b:1::/48", "::/96")
)


def _embedded_ipv4(address: IPAddress) -> list[IPAddress]:
    if not isinstance(address, ipaddress.IPv6Address):
        return []
    found: list[IPAddress] = []
    for embedded in (address.ipv4_mapped, address.sixtofour):
        if embedded is not None:
            found.append(embedded)
    if any(address in network for network in _IPV4_CARRIERS):
        found.append(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    return found


def _resolve(host: str, port: int) -> list[IPAddress]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise UnsafeUrlError(f"its host {host!r} does not resolve") from exc
    addresses: list[IPAddress] = []
    for info in infos:
        address = ipaddress.ip_address(str(info[4][0]).split("%")[0])
        if address not in addresses:
            addresses.append(address)
    if not addresses:
        raise UnsafeUrlError(f"its host {host!r} does not resolve")
    return addresses


def _pinned(parts: SplitResult, host: str, address: IPAddress) -> Target:
    literal = f"[{address}]" if address.version == 6 else str(address)
    netloc = literal if parts.port is None else f"{literal}:{parts.port}"
    url = parts._replace(netloc=netloc).geturl()
    host_header = parts.netloc.rpartition("@")[2]
    return Target(url=url, host=host, host_header=host_header, scheme=parts.scheme)


def request_extensions(target: Target) -> dict[str, object]:
    """httpx extensions so TLS uses (and verifies) the original host name, not the IP."""
    return {"sni_hostname": target.host} if target.scheme == "https" else {}
