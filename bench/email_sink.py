"""An SMTP server for bench.email_compose that accepts every message and keeps
nothing but a count (aiosmtpd, as the stack's mail sink, with SMTPUTF8 and
8BITMIME), run as its own process so its CPU is not the bench's:

    python -m bench.email_sink PORT

It prints "ready" once it listens; SIGTERM stops it, printing the count."""

from __future__ import annotations

import signal
import sys
import threading

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


class _Count:
    def __init__(self) -> None:
        self.messages = 0

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        self.messages += 1
        return "250 OK"


def main(port: int) -> None:
    handler = _Count()
    controller = Controller(handler, hostname="127.0.0.1", port=port, server_hostname="bench-sink",
                            enable_SMTPUTF8=True)
    controller.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    controller.stop()
    print(f"messages {handler.messages}", flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]))
