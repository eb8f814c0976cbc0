"""The public-address rule for image URLs, without I/O. The message schema applies
it to literal-IP hosts; the processor applies the same rule to every address a
hostname resolves to, and to every redirect (design.md, Security)."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from urllib.parse import urlsplit

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
ALLOWED_SCHEMES = ("http", "https")


class UnsafeURL(ValueError):
    """The URL may not be fetched: wrong scheme, no host, or a non-public address."""


@dataclass(frozen=True)
class HostAllowList:
    """URL_ALLOW_HOSTS: hosts or CIDRs exempt from the public-address rule (local
    development and tests only; empty by default)."""

    hosts: frozenset[str] = frozenset()
    networks: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = field(default=())

    @classmethod
    def parse(cls, spec: str | list[str] | None) -> "HostAllowList":
        items = spec.split(",") if isinstance(spec, str) else list(spec or [])
        hosts, nets = set(), []
        for item in (i.strip() for i in items):
            if not item:
                continue
            try:
                nets.append(ipaddress.ip_network(item, strict=False))
            except ValueError:
                hosts.add(item.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(nets))

    def allows_host(self, host: str) -> bool:
        return host.lower().rstrip(".") in self.hosts

    def allows_address(self, address: IPAddress) -> bool:
        return any(address in net for net in self.networks)


NO_EXEMPTIONS = HostAllowList()


def is_public_address(address: IPAddress) -> bool:
    """Globally routable unicast only: no loopback, private, link-local (cloud
    metadata lives there), multicast, reserved, shared or unspecified address."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return is_public_address(address.ipv4_mapped)
    return address.is_global and not address.is_multicast


def literal_ip(host: str) -> IPAddress | None:
    try:
        return ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        return None


def check_address(address: IPAddress, allow: HostAllowList = NO_EXEMPTIONS) -> None:
    if not (is_public_address(address) or allow.allows_address(address)):
        raise UnsafeURL(f"address {address} is not public")


def _split(url: str):
    try:
        parts = urlsplit(url)
        parts.port  # raises ValueError on a malformed port
    except ValueError as exc:
        raise UnsafeURL(f"malformed URL: {exc}") from None
    if parts.scheme.lower() not in ALLOWED_SCHEMES:
        raise UnsafeURL(f"scheme must be http or https, got {parts.scheme or 'none'!r}")
    if not parts.hostname:
        raise UnsafeURL("URL has no host")
    return parts


def check_browser_url(url: str) -> None:
    """A URL the customer's browser follows (success/cancel): scheme and host only."""
    _split(url)


def check_url(url: str, allow: HostAllowList = NO_EXEMPTIONS) -> str:
    """Static checks: scheme, host present, no credentials, and a literal-IP host
    must be public. Returns the host. A hostname is resolved and checked later."""
    parts = _split(url)
    host, port = parts.hostname, parts.port
    if parts.username is not None or parts.password is not None:
        raise UnsafeURL("URL must not carry credentials")
    if port == 0:
        raise UnsafeURL("port 0 is not allowed")
    if allow.allows_host(host):
        return host
    address = literal_ip(host)
    if address is not None:
        check_address(address, allow)
    elif host.rstrip(".").lower() in ("localhost", "localhost.localdomain") or host.endswith(".localhost"):
        raise UnsafeURL(f"host {host} is not public")
    return host
