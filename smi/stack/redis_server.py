"""Redis from the system's redis-server (Debian package), with the durability the
job table relies on: AOF with appendfsync always (design.md, "The job table")."""

from __future__ import annotations

import shutil
from functools import partial
from urllib.parse import urlsplit

from smi.settings import Settings
from smi.stack import probes
from smi.stack.component import Component, not_loopback
from smi.stack.layout import Layout


HASH_MAX_LISTPACK_VALUE = 2048


def prepare(host: str, port: int, layout: Layout) -> list[str]:
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server not found: apt-get install redis-server")
    data_dir = layout.data_dir("redis")
    data_dir.mkdir(parents=True, exist_ok=True)
    return [server, "--bind", host, "--port", str(port),
            "--appendonly", "yes", "--appendfsync", "always",
            # The AOF is the durable copy; RDB snapshots would only add forks.
            "--save", "",
            # A job hash holds URLs longer than the default 64-byte limit of the compact
            # listpack encoding; past it Redis switches the hash to a hashtable at
            # more than twice the memory (3.0 vs 1.3 KiB for a completed job).
            "--hash-max-listpack-value", str(HASH_MAX_LISTPACK_VALUE),
            "--dir", str(data_dir)]


def component(settings: Settings, layout: Layout) -> Component:
    url = urlsplit(settings.redis_url)
    host, port = url.hostname or "127.0.0.1", url.port or 6379
    if url.scheme != "redis":
        cannot_start = f"REDIS_URL uses {url.scheme}://; the local Redis speaks plain redis://"
    else:
        cannot_start = not_loopback(host, "REDIS_URL")
    ping = partial(probes.redis_ping, settings.redis_url)
    return Component(
        name="redis",
        # Redis rewrites its process title to "redis-server host:port".
        program="redis-server",
        host=host,
        port=port,
        answers=ping,
        ready=ping,
        prepare=partial(prepare, host, port, layout),
        cannot_start=cannot_start,
    )
