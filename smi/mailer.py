"""Sending email through the SMTP server of ``SMTP_URL`` (aiosmtplib).

``smtp://[user:pass@]host:port`` upgrades to TLS with STARTTLS when the server
offers it; ``smtps://`` speaks TLS from the first byte. Credentials in the URL make
the client log in.

Failures come out as the stage's error classes, so the retry policy of
smi.kafka.handling decides what happens: a server that is away, slow, or answers
4xx (try again later) is a TransientError; a 5xx answer (mailbox unavailable,
message refused) is a PermanentError. Recipients are customers: their addresses
never reach a log line or an error text (a server's reply often quotes them)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib import (SMTPException, SMTPNotSupported, SMTPRecipientsRefused, SMTPResponseException,
                        SMTPServerDisconnected)

from smi.errors import PermanentError, TransientError

log = logging.getLogger(__name__)

DEFAULT_PORTS = {"smtp": 25, "smtps": 465}
_ADDRESS = re.compile(r"[^\s<>\"'@]+@[^\s<>\"']+")


@dataclass(frozen=True)
class SmtpServer:
    host: str
    port: int
    implicit_tls: bool
    username: str | None = None
    password: str | None = None

    @classmethod
    def from_url(cls, url: str) -> SmtpServer:
        parts = urlsplit(url)
        if parts.scheme not in DEFAULT_PORTS or not parts.hostname:
            raise ValueError("SMTP_URL must look like smtp://[user:pass@]host:port or smtps://...")
        return cls(host=parts.hostname, port=parts.port or DEFAULT_PORTS[parts.scheme],
                   implicit_tls=parts.scheme == "smtps",
                   username=unquote(parts.username) if parts.username else None,
                   password=unquote(parts.password) if parts.password is not None else None)


def without_addresses(text: str) -> str:
    return _ADDRESS.sub("[address removed]", text)


def classify(exc: SMTPException | OSError) -> TransientError | PermanentError:
    """The stage error for a failed send, with a reason free of email addresses."""
    if isinstance(exc, SMTPRecipientsRefused):
        # Every recipient was refused; if any refusal was temporary, a retry may pass.
        codes = sorted({refusal.code for refusal in exc.recipients})
        reason = f"every recipient refused (SMTP {', '.join(map(str, codes))})"
        return TransientError(reason) if any(code < 500 for code in codes) else PermanentError(reason)
    if isinstance(exc, SMTPResponseException):
        reason = f"SMTP {exc.code}: {without_addresses(exc.message)}"
        return PermanentError(reason) if exc.code >= 500 else TransientError(reason)
    if isinstance(exc, SMTPNotSupported):
        # The server lacks what the configuration asks for (AUTH, TLS): no retry fixes that.
        return PermanentError(f"SMTP server does not support it: {without_addresses(str(exc))}")
    # Refused, reset or timed-out connections and a server that hung up.
    return TransientError(f"SMTP server unavailable: {type(exc).__name__}: {without_addresses(str(exc))}")


# A connection is reused for this many messages, and not after this many seconds
# idle (servers close idle sessions; a fresh one beats a failed send and a retry).
MESSAGES_PER_CONNECTION = 100
MAX_IDLE_SECONDS = 10.0


@dataclass
class _Connection:
    client: aiosmtplib.SMTP
    sent: int = 0
    idle_since: float = 0.0


class Mailer:
    """Sends over a few long-lived SMTP connections, at most ``connections`` at
    once: a stage handles a batch of messages concurrently, and a relay limits (and
    holds against us) connections per client; opening one per message would also
    cost a TCP and TLS handshake, EHLO and a login each time."""

    def __init__(self, server: SmtpServer, *, timeout: float = 30.0, connections: int = 8):
        self.server = server
        self.timeout = timeout
        self._slots = asyncio.Semaphore(connections)
        self._idle: list[_Connection] = []
        self._local_hostname: str | None = None

    @classmethod
    def from_url(cls, url: str, **options) -> Mailer:
        return cls(SmtpServer.from_url(url), **options)

    async def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` to its To, Cc and Bcc recipients (aiosmtplib takes the
        envelope from those headers and leaves Bcc out of what it transmits)."""
        async with self._slots:
            connection = self._reusable()
            while True:
                reused = connection is not None
                try:
                    if connection is None:
                        connection = await self._connect()
                    await connection.client.send_message(message)
                    break
                except BaseException as exc:
                    # A connection that failed may be mid-transaction: never reuse it.
                    if connection is not None:
                        connection.client.close()
                    if reused and isinstance(exc, (SMTPServerDisconnected, ConnectionError)):
                        # The server dropped the pooled connection while it was idle:
                        # once more, on a new one.
                        connection = None
                        continue
                    if isinstance(exc, (SMTPException, OSError)):
                        raise classify(exc) from None  # the original may quote a recipient
                    raise
            connection.sent += 1
            await self._put_back(connection)
        log.info("mail sent: %s", message["Message-ID"])

    async def close(self) -> None:
        idle, self._idle = self._idle, []
        for connection in idle:
            await self._quit(connection)

    def _reusable(self) -> _Connection | None:
        now = time.monotonic()
        while self._idle:
            connection = self._idle.pop()
            if connection.client.is_connected and now - connection.idle_since < MAX_IDLE_SECONDS:
                return connection
            connection.client.close()
        return None

    async def _connect(self) -> _Connection:
        server = self.server
        if self._local_hostname is None:
            # aiosmtplib would look the name up (socket.getfqdn, in a thread) for
            # every connection's EHLO.
            self._local_hostname = await asyncio.to_thread(socket.getfqdn)
        client = aiosmtplib.SMTP(
            hostname=server.host, port=server.port, username=server.username, password=server.password,
            use_tls=server.implicit_tls, local_hostname=self._local_hostname, timeout=self.timeout,
            # None: STARTTLS if the server offers it; never on top of implicit TLS.
            start_tls=False if server.implicit_tls else None)
        try:
            await client.connect()
        except BaseException:
            client.close()  # connected, but e.g. the login or STARTTLS failed
            raise
        return _Connection(client)

    async def _put_back(self, connection: _Connection) -> None:
        if connection.sent >= MESSAGES_PER_CONNECTION:
            await self._quit(connection)
            return
        connection.idle_since = time.monotonic()
        self._idle.append(connection)

    @staticmethod
    async def _quit(connection: _Connection) -> None:
        try:
            await connection.client.quit()
        except (SMTPException, OSError):
            connection.client.close()
