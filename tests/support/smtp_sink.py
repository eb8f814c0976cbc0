"""A real SMTP server inside the test process (aiosmtpd, in its own thread) that
keeps every message it accepts, parsed, with its envelope. Tests can take it down
and bring it back on the same port (an SMTP outage), or make it answer the next
messages with a refusal (451 try later, 550 mailbox unavailable)."""

from __future__ import annotations

import asyncio
import email
import email.policy
import socket
import threading
import time
from dataclasses import dataclass
from email.message import EmailMessage
from typing import Callable

from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, Envelope, Session


@dataclass(frozen=True)
class Delivery:
    mail_from: str
    rcpt_tos: tuple[str, ...]
    message: EmailMessage


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class _Handler:
    def __init__(self) -> None:
        self.deliveries: list[Delivery] = []
        self.refusals: list[str] = []
        self.sessions = 0  # EHLOs seen: one per client connection
        self.lock = threading.Lock()
        # Called in the sink's thread with each message accepted, before the client
        # hears "250" (SmtpSink.on_accept).
        self.on_accept: Callable[[Delivery], None] | None = None

    async def handle_EHLO(self, server: SMTP, session: Session, envelope: Envelope, hostname: str,
                          responses: list[str]) -> list[str]:
        with self.lock:
            self.sessions += 1
        session.host_name = hostname
        return responses

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        with self.lock:
            refusal = self.refusals.pop(0) if self.refusals else None
            if refusal:
                return refusal.format(recipient=envelope.rcpt_tos[0])
            message = email.message_from_bytes(envelope.original_content, policy=email.policy.default)
            delivery = Delivery(envelope.mail_from, tuple(envelope.rcpt_tos), message)
            self.deliveries.append(delivery)
        if self.on_accept is not None:
            self.on_accept(delivery)
        return "250 Message accepted for delivery"


class SmtpSink:
    def __init__(self, host: str = "127.0.0.1", port: int | None = None):
        self.host = host
        self.port = port or _free_port(host)
        self._handler = _Handler()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://{self.host}:{self.port}"

    def start(self) -> SmtpSink:
        self._controller = Controller(self._handler, hostname=self.host, port=self.port,
                                      server_hostname="smtp-sink", enable_SMTPUTF8=True)
        self._controller.start()
        return self

    def stop(self) -> None:
        """Down: connections to the port are refused until start() is called again."""
        if self._controller is not None:
            self._controller.stop()
            self._controller = None

    def refuse_next(self, count: int, reply: str = "451 4.3.0 Try again later") -> None:
        """Answer DATA of the next ``count`` messages with ``reply`` ({recipient} is
        replaced by the first recipient, as real servers quote it)."""
        with self._handler.lock:
            self._handler.refusals += [reply] * count

    def on_accept(self, callback: Callable[[Delivery], None] | None) -> None:
        """Call ``callback`` (in the sink's own thread) with each message accepted, before
        the client hears that it was: the moment an email is out."""
        self._handler.on_accept = callback

    @property
    def sessions(self) -> int:
        with self._handler.lock:
            return self._handler.sessions

    def deliveries(self, predicate: Callable[[Delivery], bool] = lambda d: True) -> list[Delivery]:
        with self._handler.lock:
            return [d for d in self._handler.deliveries if predicate(d)]

    async def wait_for(self, predicate: Callable[[Delivery], bool], *, count: int = 1,
                       timeout: float = 30.0) -> list[Delivery]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.deliveries(predicate)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} expected emails after {timeout}s")
            await asyncio.sleep(0.05)


def about_job(job_id: str, kind: str | None = None) -> Callable[[Delivery], bool]:
    """Emails of one job (of one kind: ready, resend, expiring, refund), by Message-ID."""
    prefix = f"<{kind}.{job_id}." if kind else None

    def matches(delivery: Delivery) -> bool:
        # A Message-ID line over 78 characters is folded: the parsed value then
        # starts with the continuation line's space.
        message_id = delivery.message["Message-ID"].strip()
        return job_id in message_id and (prefix is None or message_id.startswith(prefix))
    return matches
