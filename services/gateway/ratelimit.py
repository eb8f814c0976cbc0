"""Failed-attempt limits per client (download-token lookups, admin tokens), kept in
Redis so that every gateway process counts against the same limit.

Download tokens are 64 random letters and digits, so guessing one is hopeless; the
limit keeps it that way cheaply. Only failures are charged: a customer downloading
(and resuming with Range requests) never runs dry. With the counts in one process,
N gateway processes would let a guesser try N times as often: here they share them.

The limit is a token bucket of ``capacity`` failures refilled over ``window_seconds``,
stored as GCRA does (one number per client: the moment its bucket is full again),
so a client costs one small key that expires exactly when it is no different from
a client never seen. That bounds Redis's memory by the failures, not by the
addresses they come from: each failure keeps its client's key alive for
window/capacity more (3 s at the defaults), so a guesser spread over a million
addresses that fails F times a second holds about 3·F keys of ~70 bytes on average
(never more than its failures of the last window), and F is what the gateways can
answer. Time comes from the caller's wall clock, not Redis's, so the
script is deterministic (replicas and AOF replay it as it ran) and tests can set it;
gateway hosts agree on the time to far better than a second.

Each process also remembers the blocks it has seen, until they end: a blocked
client's requests are refused without a Redis round trip. Such a block can only be
shorter than Redis's, never longer (a bucket's full-again moment only moves later
until it passes), so the memory never refuses what Redis would allow."""

from __future__ import annotations

import ipaddress
import math
import time
from collections import OrderedDict
from ipaddress import IPv4Network, IPv6Address, IPv6Network
from typing import Callable, Sequence

from aiohttp import web

from services.gateway.context import CONTEXT

# KEYS[1]: the client's key. ARGV: now (ms), interval (ms a failure takes to refill),
# window (ms), 1 to charge a failure or 0 to look. Returns the ms until the client
# may fail once more; 0 while it may.
GCRA = """
local now, interval, window = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local full_at = tonumber(redis.call('GET', KEYS[1]) or now)
if full_at < now then full_at = now end
if ARGV[4] == '1' then
  full_at = math.min(full_at + interval, now + window)
  redis.call('SET', KEYS[1], full_at, 'PX', math.max(1, math.ceil(full_at - now)))
end
return math.max(0, math.ceil(full_at - now - (window - interval)))
"""


def client_of(request: web.Request) -> str:
    """The bucket ``request``'s client draws from."""
    trusted = request.app[CONTEXT].settings.trusted_proxies
    return client_key(client_address(request.remote, request.headers.getall("X-Forwarded-For", []), trusted))


def client_address(peer: str | None, forwarded_for: list[str],
                   trusted: Sequence[IPv4Network | IPv6Network]) -> str | None:
    """Who a request comes from: its peer, unless the peer is one of our ``trusted``
    proxies. Then X-Forwarded-For is read from the right, each entry appended by the
    proxy that received the connection, and the first address that is not one of
    ours is the client. Entries further left came from the client itself and could
    say anything, so they are never read. An entry that is not an address stops the
    walk at the proxy that wrote it, so a broken chain is charged to the proxy, never
    to a name the client chose.

    (aiohttp-remotes' XForwardedStrict does this walk too, but answers 400 to any
    request that does not come through a proxy, such as a health check, and rewrites
    the request's host and scheme, which the gateway takes from PUBLIC_BASE_URL.)"""
    if not trusted:
        return peer
    hops = [entry.strip() for header in forwarded_for for entry in header.split(",")]
    address = peer
    for entry in [peer, *reversed(hops)]:
        try:
            parsed = ipaddress.ip_address(entry or "")
        except ValueError:
            return address
        address = entry
        if isinstance(parsed, IPv6Address) and parsed.ipv4_mapped:
            parsed = parsed.ipv4_mapped
        if not any(parsed in network for network in trusted):
            return address
    return address  # every hop is ours: the leftmost is as close to the client as it gets


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


class FailedAttemptLimiter:
    """``capacity`` failures per ``window_seconds`` per client, refilled continuously,
    under Redis keys ``rl:<namespace><scope>:<client>``. ``clock`` returns Unix time
    in seconds (injectable for tests)."""

    def __init__(self, redis, scope: str, *, namespace: str = "", capacity: int = 20,
                 window_seconds: float = 60.0, max_remembered: int = 10_000,
                 clock: Callable[[], float] = time.time):
        if capacity < 1 or window_seconds <= 0 or max_remembered < 1:
            raise ValueError("capacity, window_seconds and max_remembered must be positive")
        self.prefix = f"rl:{namespace}{scope}:"
        self.window_ms = round(window_seconds * 1000)
        self.interval_ms = self.window_ms / capacity
        self.max_remembered = max_remembered
        self.clock = clock
        self._script = redis.register_script(GCRA)
        self._blocked_until: OrderedDict[str, float] = OrderedDict()  # Unix seconds, oldest block first

    async def retry_after(self, client: str) -> int:
        """Whole seconds until ``client`` may try again; 0 if it may now."""
        now = self.clock()
        until = self._blocked_until.get(client)
        if until is not None:
            if until > now:
                return _whole_seconds(until - now)
            del self._blocked_until[client]
        return self._remember(client, now, await self._run(client, now, charge=False))

    async def charge(self, client: str) -> int:
        """Record one failure by ``client``; returns what ``retry_after`` would now."""
        now = self.clock()
        return self._remember(client, now, await self._run(client, now, charge=True))

    def __len__(self) -> int:
        """Blocks this process remembers."""
        return len(self._blocked_until)

    async def _run(self, client: str, now: float, *, charge: bool) -> float:
        wait_ms = await self._script(keys=[self.prefix + client],
                                     args=[math.floor(now * 1000), self.interval_ms, self.window_ms, int(charge)])
        return int(wait_ms) / 1000

    def _remember(self, client: str, now: float, wait: float) -> int:
        if wait <= 0:
            return 0
        while self._blocked_until and (len(self._blocked_until) >= self.max_remembered
                                       or next(iter(self._blocked_until.values())) <= now):
            self._blocked_until.popitem(last=False)
        self._blocked_until.pop(client, None)
        self._blocked_until[client] = now + wait
        return _whole_seconds(wait)


def _whole_seconds(wait: float) -> int:
    # Rounded to the millisecond first: float noise (2.0000000000000004 s) must not
    # add a whole second; and never 0 while blocked.
    return max(1, math.ceil(round(wait, 3)))
