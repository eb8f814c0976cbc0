"""The failed-attempt limiter of the gateway, in real Redis (one server and Redis
Cluster), on an injected clock: token buckets shared by every limiter (every
gateway process) of one namespace."""

from __future__ import annotations

import asyncio

import pytest

from services.gateway.ratelimit import FailedAttemptLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def limiter(redis, namespace, clock):
    """``limiter()`` is one gateway process's limiter; call it again for another's."""
    def make(**options) -> FailedAttemptLimiter:
        return FailedAttemptLimiter(redis, "downloads", namespace=namespace, clock=clock,
                                    **{"capacity": 20, "window_seconds": 60.0, **options})
    return make


async def test_a_client_may_fail_capacity_times_then_waits(limiter):
    limit = limiter()
    for n in range(20):
        assert await limit.retry_after("10.0.0.1") == 0
        assert await limit.charge("10.0.0.1") == (3 if n == 19 else 0)
    assert await limit.retry_after("10.0.0.1") == 3  # one failure refills every 60/20 s
    assert await limit.retry_after("10.0.0.2") == 0  # other clients are not affected


async def test_retry_after_counts_down_and_rounds_up(limiter, clock):
    limit = limiter()
    for _ in range(20):
        await limit.charge("c")
    clock.now += 1.0
    assert await limit.retry_after("c") == 2
    clock.now += 1.5
    assert await limit.retry_after("c") == 1  # 0.5 s left: never 0 while blocked
    clock.now += 0.5
    assert await limit.retry_after("c") == 0


async def test_the_bucket_refills_continuously_up_to_capacity(limiter, clock):
    limit = limiter()
    for _ in range(20):
        await limit.charge("c")
    clock.now += 30.0  # half a window: ten failures back
    for _ in range(10):
        assert await limit.retry_after("c") == 0
        await limit.charge("c")
    assert await limit.retry_after("c") > 0
    clock.now += 3600.0  # a long pause refills to capacity, not beyond
    for _ in range(19):
        await limit.charge("c")
    assert await limit.retry_after("c") == 0
    await limit.charge("c")
    assert await limit.retry_after("c") == 3


async def test_processes_share_one_bucket_per_client(redis, namespace, limiter, clock):
    first, second = limiter(), limiter()
    for n in range(20):
        await (first if n % 2 else second).charge("c")
    assert await first.retry_after("c") == 3
    assert await second.retry_after("c") == 3
    admin = FailedAttemptLimiter(redis, "admin", namespace=namespace, clock=clock)
    assert await admin.retry_after("c") == 0  # another scope: another bucket


async def test_a_refilled_bucket_leaves_no_key(redis, namespace, limiter, clock):
    limit = limiter(capacity=2, window_seconds=0.2)
    key = f"rl:{namespace}downloads:c"
    await limit.charge("c")
    assert await redis.exists(key) == 1
    ttl = await redis.pttl(key)
    assert 0 < ttl <= 100  # one failure of two: full again after half the window
    await limit.charge("c")
    assert 100 < await redis.pttl(key) <= 200
    await asyncio.sleep(0.25)
    assert await redis.exists(key) == 0


async def test_guessers_on_many_addresses_hold_keys_only_as_long_as_their_failures(redis, namespace, limiter):
    # Redis's memory follows the failures, not the addresses: 500 clients failing
    # once each leave nothing once a failure's share of the window (1 s) is over.
    limit = limiter(capacity=2, window_seconds=2.0)
    clients = [f"198.51.{n // 250}.{n % 250}" for n in range(500)]
    await asyncio.gather(*(limit.charge(client) for client in clients))
    keys = [f"rl:{namespace}downloads:{client}" for client in clients]
    assert await redis.exists(*keys) == 500
    await asyncio.sleep(1.1)
    assert await redis.exists(*keys) == 0


async def test_a_block_seen_is_answered_from_memory(redis, namespace, limiter, clock):
    limit = limiter()
    for _ in range(20):
        await limit.charge("c")
    assert len(limit) == 1
    await redis.delete(f"rl:{namespace}downloads:c")  # Redis forgot; this process still refuses
    assert await limit.retry_after("c") == 3
    clock.now += 3.0  # the block is over: Redis is asked again
    assert await limit.retry_after("c") == 0
    assert len(limit) == 0


async def test_remembered_blocks_are_capped(limiter):
    limit = limiter(capacity=1, max_remembered=3)
    for client in ("a", "b", "c", "d"):
        assert await limit.charge(client) == 60
    assert len(limit) == 3
    assert await limit.retry_after("a") == 60  # forgotten here, still blocked in Redis
    assert len(limit) == 3
