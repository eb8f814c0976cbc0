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

import logging
import re
from dataclasses import dataclass
from email.message import EmailMessage
from urllib.parse import unquote, urlsplit

import aiosmtplib
from aiosmtplib import SMTPException, SMTPNotSupported, SMTPRecipientsRefused, SMTPResponseException

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


class Mailer:
    def __init__(self, server: SmtpServer, *, timeout: float = 30.0):
        self.server = server
        self.timeout = timeout

    @classmethod
    def from_url(cls, url: str, **options) -> Mailer:
        return cls(SmtpServer.from_url(url), **options)

    async def send(self, message: EmailMessage) -> None:
        """Deliver ``message`` to its To, Cc and Bcc recipients (aiosmtplib takes the
        envelope from those headers and leaves Bcc out of what it transmits)."""
        server = self.server
        try:
            await aiosmtplib.send(
                message, hostname=server.host, port=server.port, username=server.username,
                password=server.password, use_tls=server.implicit_tls,
                # None: STARTTLS if the server offers it; never on top of implicit TLS.
                start_tls=False if server.implicit_tls else None, timeout=self.timeout)
        except (SMTPException, OSError) as exc:
            raise classify(exc) from None  # the original may quote a recipient
        log.info("mail sent: %s", message["Message-ID"])
