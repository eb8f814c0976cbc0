"""A free loopback port for a server that another process binds later."""

from __future__ import annotations

import random
import socket


def free_port() -> int:
    """A port free now, below the kernel's ephemeral range (32768 and up here): one
    from that range could be taken by an outgoing connection (a stage's to Kafka, a
    test's client) before the server that is to listen on it binds."""
    while True:
        port = random.randrange(23000, 27000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
                return port
            except OSError:
                continue
