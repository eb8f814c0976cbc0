"""A token bucket per client for failed download-token lookups, in process memory.

Download tokens are 64 random letters and digits, so guessing one is hopeless; the
limit keeps it that way cheaply and stops a client from hammering Redis with
guesses. Only failures are charged: a customer downloading (and resuming with Range
requests) never runs dry. Memory is bounded: a bucket that has refilled is the
same as no bucket and is dropped, and past ``max_clients`` the least recently
charged client is forgotten."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable


def client_key(remote: str | None) -> str:
    """The bucket a peer address draws from. An IPv6 host usually holds a whole /64,
    so per-address buckets would give it 2**64 of them: it gets one per /64."""
    try:
        address = ipaddress.ip_address(remote or "")
    except ValueError:
        return remote or "unknown"  # a Unix socket: one bucket for all of it
    if isinstance(address, ipaddress.IPv6Address):
        if address.ipv4_mapped:
            return str(address.ipv4_mapped)
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return str(address)


@dataclass(slots=True)
class _Bucket:
    tokens: float
    updated: float


class FailedLookupLimiter:
    """``capacity`` failures per ``window_seconds`` per client, refilled continuously.
    ``clock`` returns seconds on a monotonic scale (injectable for tests)."""

    def __init__(self, *, capacity: int = 20, window_seconds: float = 60.0, max_clients: int = 10_000,
                 clock: Callable[[], float] = time.monotonic):
        if capacity < 1 or window_seconds <= 0 or max_clients < 1:
            raise ValueError("capacity, window_seconds and max_clients must be positive")
        self.capacity = capacity
        self.rate = capacity / window_seconds  # tokens per second
        self.max_clients = max_clients
        self.clock = clock
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()  # least recently charged first

    def __len__(self) -> int:
        return len(self._buckets)

    def retry_after(self, client: str) -> int:
        """Whole seconds until ``client`` may look a token up again; 0 if it may now."""
        bucket = self._buckets.get(client)
        if bucket is None:
            return 0
        missing = 1 - self._level(bucket, self.clock())
        if missing <= 0:
            return 0
        # Rounded to the microsecond first: float noise (2.0000000000000004 s) must
        # not add a whole second.
        return max(1, math.ceil(round(missing / self.rate, 6)))

    def charge(self, client: str) -> None:
        """Record one failed lookup by ``client``."""
        now = self.clock()
        self._drop_refilled(now)
        bucket = self._buckets.pop(client, None)
        level = self.capacity if bucket is None else self._level(bucket, now)
        if len(self._buckets) >= self.max_clients:
            self._buckets.popitem(last=False)
        self._buckets[client] = _Bucket(max(level - 1, 0.0), now)

    def _level(self, bucket: _Bucket, now: float) -> float:
        return min(self.capacity, bucket.tokens + (now - bucket.updated) * self.rate)

    def _drop_refilled(self, now: float) -> None:
        # Buckets are in charge order, so every bucket idle for a whole window (full
        # by then, whatever its level was) is at the front: amortised O(1) per charge.
        while self._buckets:
            oldest = next(iter(self._buckets.values()))
            if self._level(oldest, now) < self.capacity:
                return
            self._buckets.popitem(last=False)
