"""Which rate-limit bucket a peer address draws from."""

from __future__ import annotations

import pytest

from services.gateway.ratelimit import FailedAttemptLimiter, client_key


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
