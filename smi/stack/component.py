"""What the manager needs to know about one service of the stack. Each service
module (kafka, redis, stripemock, mailsink) builds its Component from Settings."""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from typing import Awaitable, Callable


@dataclass(frozen=True)
class Component:
    name: str
    # A substring of /proc/<pid>/cmdline that identifies our process of this kind.
    program: str
    host: str
    port: int
    # A quick protocol-level check: does the configured address answer as this service?
    answers: Callable[[], Awaitable[bool]]
    # Stricter check used while starting (Kafka: a full produce/consume round trip).
    ready: Callable[[], Awaitable[bool]]
    # Blocking: fetches what is missing, writes config, returns the command to run.
    prepare: Callable[[], list[str]]
    # Why we may not start our own here (None = we can), e.g. a non-loopback address.
    cannot_start: str | None = None
    ready_timeout: float = 30.0
    stop_timeout: float = 10.0

    @property
    def address(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def split_host_port(text: str, default_port: int) -> tuple[str, int]:
    """'host:port', '[v6]:port' or 'host' -> (host, port)."""
    text = text.strip()
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, int(rest.lstrip(":") or default_port)
    host, sep, port = text.rpartition(":")
    return (host, int(port)) if sep else (text, default_port)


def not_loopback(host: str, variable: str) -> str | None:
    """The reason we will not start a local server for host, or None if it is loopback."""
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass
    return f"{variable} points at {host}, not this machine; start it there"
