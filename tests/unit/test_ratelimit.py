"""The failed-lookup limiter of GET /downloads: token buckets on an injected clock."""

from __future__ import annotations

import pytest

from services.gateway.ratelimit import FailedLookupLimiter, client_key


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


def limiter(clock: Clock, **options) -> FailedLookupLimiter:
    return FailedLookupLimiter(**{"capacity": 20, "window_seconds": 60.0, **options}, clock=clock)


def test_a_client_may_fail_capacity_times_then_waits(clock):
    limit = limiter(clock)
    for _ in range(20):
        assert limit.retry_after("10.0.0.1") == 0
        limit.charge("10.0.0.1")
    assert limit.retry_after("10.0.0.1") == 3  # one token per 60/20 s
    assert limit.retry_after("10.0.0.2") == 0  # other clients are not affected


def test_retry_after_counts_down_and_rounds_up(clock):
    limit = limiter(clock)
    for _ in range(20):
        limit.charge("c")
    clock.now += 1.0
    assert limit.retry_after("c") == 2
    clock.now += 1.5
    assert limit.retry_after("c") == 1  # 0.5 s left: never 0 while blocked
    clock.now += 0.5
    assert limit.retry_after("c") == 0


def test_the_bucket_refills_continuously_up_to_capacity(clock):
    limit = limiter(clock)
    for _ in range(20):
        limit.charge("c")
    clock.now += 30.0  # half a window: ten tokens back
    for _ in range(10):
        assert limit.retry_after("c") == 0
        limit.charge("c")
    assert limit.retry_after("c") > 0
    clock.now += 3600.0  # a long pause refills to capacity, not beyond
    for _ in range(20):
        limit.charge("c")
    assert limit.retry_after("c") == 3


def test_an_unknown_client_is_not_tracked_until_it_fails(clock):
    limit = limiter(clock)
    assert limit.retry_after("c") == 0
    assert len(limit) == 0


def test_refilled_buckets_are_evicted(clock):
    limit = limiter(clock)
    for n in range(100):
        limit.charge(f"10.0.0.{n}")
    assert len(limit) == 100
    clock.now += 60.0  # all full again: no different from never seen
    limit.charge("10.0.1.1")
    assert len(limit) == 1


def test_only_refilled_buckets_are_evicted(clock):
    limit = limiter(clock)
    for _ in range(20):
        limit.charge("blocked")
    clock.now += 59.0
    limit.charge("recent")
    clock.now += 2.0  # "blocked" has refilled, "recent" has not
    limit.charge("newest")
    assert len(limit) == 2
    assert limit.retry_after("recent") == 0 and limit.retry_after("newest") == 0


def test_the_number_of_clients_is_capped_by_forgetting_the_least_recently_charged(clock):
    limit = limiter(clock, max_clients=3)
    for _ in range(20):
        limit.charge("a")
    for client in ("b", "c", "d"):
        limit.charge(client)
    assert len(limit) == 3
    assert limit.retry_after("a") == 0  # forgotten: its bucket starts full again
    for _ in range(20):
        limit.charge("b")  # charging moves a client to the back of the line
    limit.charge("e")
    assert len(limit) == 3
    assert limit.retry_after("b") == 3


@pytest.mark.parametrize("options", [{"capacity": 0}, {"window_seconds": 0}, {"max_clients": 0}])
def test_nonsense_limits_are_refused(options):
    with pytest.raises(ValueError):
        FailedLookupLimiter(**options)


@pytest.mark.parametrize(("remote", "key"), [
    ("203.0.113.7", "203.0.113.7"),
    ("::ffff:203.0.113.7", "203.0.113.7"),
    ("2001:db8:1:2:aaaa:bbbb:cccc:dddd", "2001:db8:1:2::/64"),
    ("2001:db8:1:2::1", "2001:db8:1:2::/64"),
    (None, "unknown"),
])
def test_clients_are_keyed_by_ipv4_address_or_ipv6_slash_64(remote, key):
    assert client_key(remote) == key
