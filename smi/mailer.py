"""Sending email through the SMTP server of ``SMTP_URL`` (aiosmtplib).

``smtp://[user:pass@]host:port`` upgrades to TLS with STARTTLS when the server
offers it; ``smtps://`` speaks TLS from the first byte. Credentials in the URL make
the client log in.

Failures come out as the stage's error classes, so the retry policy of
smi.kafka.handling decides what happens: a server that is away, slow, or answers
4xx (try again later) is a TransientError; a 5xx answer (mailbox unavailable,
message refused) is a PermanentError. Recipients are customers: their addresses
never reach a log line or an error text (a server's reply often quotes them).

``Mailer.send`` takes an EmailMessage, or an ``Outgoing``: an email already
flattened into the bytes of DATA, with its envelope (the notifier builds those
without the email package's message objects, services/notifier/outgoing.py)."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import time
from dataclasses import dataclass, field
from functools import lru_cache
from email.message import EmailMessage
from typing import Callable
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib import (SMTPException, SMTPHeloError, SMTPNotSupported, SMTPRecipientRefused,
                        SMTPRecipientsRefused, SMTPResponseException, SMTPSenderRefused, SMTPServerDisconnected)
from aiosmtplib.email import extract_recipients, extract_sender, flatten_message, quote_address

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


@dataclass(frozen=True)
class Outgoing:
    """An email ready for SMTP: the envelope, and DATA as aiosmtplib's
    send_message would transmit it to a server that offers 8BITMIME (Bcc left
    out, CRLF line endings). ``as_message`` gives the same email as an
    EmailMessage, for a server without 8BITMIME (the email package then
    re-encodes 8-bit parts)."""

    message_id: str
    sender: str
    recipients: tuple[str, ...]
    data: bytes
    smtputf8: bool  # the envelope has a non-ASCII address
    build_message: Callable[[], EmailMessage] = field(repr=False)

    def as_message(self) -> EmailMessage:
        return self.build_message()

    @classmethod
    def from_message(cls, message: EmailMessage, build: Callable[[], EmailMessage] | None = None) -> Outgoing:
        """What send_message takes from ``message`` (sender, recipients, the flattened
        bytes); ``build`` makes the message again (default: this one)."""
        sender = extract_sender(message)
        recipients = tuple(extract_recipients(message))
        if sender is None or not recipients:
            raise ValueError("the message has no sender or no recipient")  # as send_message
        utf8 = not (sender + "".join(recipients)).isascii()
        return cls(str(message["Message-ID"]), sender, recipients,
                   flatten_message(message, utf8=utf8, cte_type="8bit"), utf8,
                   build or (lambda: message))


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

    async def send(self, message: EmailMessage | Outgoing) -> None:
        """Deliver ``message``: an EmailMessage to its To, Cc and Bcc recipients
        (aiosmtplib takes the envelope from those headers and leaves Bcc out of what
        it transmits), an Outgoing to its envelope."""
        async with self._slots:
            connection = self._reusable()
            while True:
                reused = connection is not None
                try:
                    if connection is None:
                        connection = await self._connect()
                    await _transmit(connection.client, message)
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
        # DEBUG: the notifier logs each email it sends (job and kind) at INFO already.
        log.debug("mail sent: %s", message.message_id if isinstance(message, Outgoing) else message["Message-ID"])

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
            if client.is_ehlo_or_helo_needed:
                # (connect() greets only for STARTTLS or a login.) The extensions
                # decide how a prepared email goes out.
                try:
                    await client.ehlo()
                except SMTPHeloError:
                    await client.helo()
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


async def _transmit(client: aiosmtplib.SMTP, message: EmailMessage | Outgoing) -> None:
    if isinstance(message, EmailMessage):
        await client.send_message(message)
    elif not client.supports_extension("8bitmime"):
        await client.send_message(message.as_message())
    else:
        await _sendmail(client, message)


async def _sendmail(client: aiosmtplib.SMTP, message: Outgoing) -> None:
    """aiosmtplib's sendmail for a prepared email, with the MAIL options its
    send_message would give it: what it does, without parsing every address twice
    and the sender in every email (``email.utils.parseaddr`` made up about a fifth
    of the CPU of a send)."""
    if message.smtputf8 and not client.supports_extension("smtputf8"):
        raise SMTPNotSupported("An address containing non-ASCII characters was provided, but "
                               "SMTPUTF8 is not supported by this server")
    options = [b"SMTPUTF8", b"BODY=8BITMIME"] if message.smtputf8 else [b"BODY=8BITMIME"]
    if client.supports_extension("size"):
        options.insert(0, b"SIZE=%d" % len(message.data))  # DATA is CRLF already
    encoding = "utf-8" if message.smtputf8 else "ascii"
    sender = _quoted_sender(message.sender).encode(encoding)
    recipients = [(r, quote_address(r).encode(encoding)) for r in message.recipients]
    try:
        response = await client.execute_command(b"MAIL", b"FROM:" + sender, *options)
        if response.code != 250:
            raise SMTPSenderRefused(response.code, response.message, message.sender)
        refused = []
        for recipient, quoted in recipients:
            response = await client.execute_command(b"RCPT", b"TO:" + quoted)
            if response.code not in (250, 251):
                refused.append(SMTPRecipientRefused(response.code, response.message, recipient))
        if len(refused) == len(recipients):
            raise SMTPRecipientsRefused(refused)
        await client.data(message.data)
    except (SMTPResponseException, SMTPRecipientsRefused):
        # As sendmail: reset the envelope for the connection's next email.
        try:
            await client.rset()
        except (ConnectionError, SMTPResponseException):
            pass
        raise


# The shop's address is the sender of every email: checked and quoted once
# (aiosmtplib.email.quote_address refuses what could inject SMTP commands).
_quoted_sender = lru_cache(maxsize=16)(quote_address)
