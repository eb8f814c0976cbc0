"""Which rate-limit bucket a request draws from: the client behind our proxies, and
its address (or IPv6 /64)."""

from __future__ import annotations

from ipaddress import ip_network

import pytest

from services.gateway.ratelimit import FailedAttemptLimiter, client_address, client_key


@pytest.mark.parametrize(("remote", "key"), [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    (None, "unknown"),
])
def test_clients_are_keyed_by_ipv4_address_or_ipv6_slash_64(remote, key):
    assert client_key(remote) == key


@pytest.mark.parametrize("options", [{"capacity": 0}, {"window_seconds": 0}, {"max_remembered": 0}])
def test_nonsense_limits_are_refused(options):
    with pytest.raises(ValueError):
        FailedAttemptLimiter(None, "downloads", **options)


PROXIES = [ip_network("10.0.0.0/8"), ip_network("2001:db8:ffff::/48")]


@pytest.mark.parametrize(("peer", "forwarded", "client"), [
    # No proxy of ours in front: the peer, whatever the header says.
    ("203.0.113.7", ["198.51.100.1"], "203.0.113.7"),
    # One proxy: the address it saw.
    ("10.0.0.5", ["198.51.100.1"], "198.51.100.1"),
    # The client's own X-Forwarded-For is left of what our proxy appended: never read.
    ("10.0.0.5", ["6.6.6.6, 198.51.100.1"], "198.51.100.1"),
    ("10.0.0.5", ["6.6.6.6", "198.51.100.1"], "198.51.100.1"),  # two header lines count as one list
    # A chain of our proxies: the first address that is not ours.
    ("10.0.0.5", ["198.51.100.1, 10.1.2.3"], "198.51.100.1"),
    ("2001:db8:ffff::1", ["2001:db8:1::9, 10.9.9.9"], "2001:db8:1::9"),
    ("::ffff:10.0.0.5", ["198.51.100.1"], "198.51.100.1"),  # a v4 proxy on a dual-stack socket
    # A proxy of ours with no header (a health check through it): the proxy.
    ("10.0.0.5", [], "10.0.0.5"),
    # Every hop ours: the leftmost.
    ("10.0.0.5", ["10.0.0.7, 10.0.0.6"], "10.0.0.7"),
    # Not an address where our proxy wrote one: charged to that proxy, never to the text.
    ("10.0.0.5", ["198.51.100.1, nonsense"], "10.0.0.5"),
    ("10.0.0.5", ["nonsense, 10.0.0.6"], "10.0.0.6"),
    ("10.0.0.5", [" , "], "10.0.0.5"),
])
def test_the_client_is_the_first_address_from_the_right_that_is_not_our_proxy(peer, forwarded, client):
    assert client_address(peer, forwarded, PROXIES) == client


def test_without_trusted_proxies_the_header_is_ignored():
    assert client_address("10.0.0.5", ["198.51.100.1"], []) == "10.0.0.5"
    assert client_address(None, ["198.51.100.1"], []) is None
