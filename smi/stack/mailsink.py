"""A local SMTP server that accepts every message and writes it to a directory as
<timestamp>-<n>.eml, so tests and developers can read what the notifier sent.

Run: python -m smi.stack.mailsink --host 127.0.0.1 --port 2525 --dir var/mail
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import signal
import sys
from datetime import datetime, timezone
from functools import partial
from pathlib import Path
from urllib.parse import urlsplit

from aiosmtpd.smtp import SMTP, AuthResult, Envelope, Session

from smi.settings import Settings
from smi.stack import probes
from smi.stack.component import Component, not_loopback
from smi.stack.layout import Layout


class MailDirectory:
    """aiosmtpd handler: one .eml file per accepted message. The envelope is kept
    in X-MailFrom / X-RcptTo headers (as aiosmtpd's Message handler names them),
    since Bcc recipients appear nowhere else."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.counter = itertools.count(1)

    async def handle_DATA(self, server: SMTP, session: Session, envelope: Envelope) -> str:
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        path = self.directory / f"{stamp}-{next(self.counter)}.eml"
        envelope_headers = f"X-MailFrom: {envelope.mail_from}\r\nX-RcptTo: {', '.join(envelope.rcpt_tos)}\r\n"
        # Write under a dot-name and rename: readers globbing *.eml never see half a message.
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_bytes(envelope_headers.encode() + envelope.original_content)
        os.replace(tmp, path)
        return "250 Message accepted for delivery"


def accept_any_login(server: SMTP, session: Session, envelope: Envelope, mechanism: str, auth_data: object) -> AuthResult:
    """An SMTP_URL with user:pass makes the client log in; the sink lets anyone in."""
    return AuthResult(success=True)


async def serve(host: str, port: int, directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    handler = MailDirectory(directory)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: SMTP(handler, hostname="smi-mailsink", enable_SMTPUTF8=True,
                     authenticator=accept_any_login, auth_require_tls=False),
        host, port)
    stopping = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    print(f"mail sink listening on {host}:{port}, writing to {directory}", flush=True)
    await stopping.wait()
    server.close()
    await server.wait_closed()
    print("mail sink stopped", flush=True)


def component(settings: Settings, layout: Layout) -> Component:
    url = urlsplit(settings.smtp_url)
    host, port = url.hostname or "127.0.0.1", url.port or (465 if url.scheme == "smtps" else 25)
    if url.scheme == "smtps":
        cannot_start = "SMTP_URL uses smtps://; the local mail sink speaks plain SMTP"
    else:
        cannot_start = not_loopback(host, "SMTP_URL")
    check = partial(probes.smtp_ehlo, host, port, url.scheme == "smtps")
    return Component(
        name="mail",
        program="smi.stack.mailsink",
        host=host,
        port=port,
        answers=check,
        ready=check,
        prepare=lambda: [sys.executable, "-m", "smi.stack.mailsink", "--host", host, "--port", str(port),
                         "--dir", str(layout.data_dir("mail"))],
        cannot_start=cannot_start,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=2525)
    parser.add_argument("--dir", type=Path, default=Path("var/mail"))
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port, args.dir.resolve()))


if __name__ == "__main__":
    main()
