"""smi.mailer against a real SMTP server (aiosmtpd): connections are reused, at
most N at once, and a failure leaves no broken connection behind; a prepared
email (smi.mailer.Outgoing, the notifier's) arrives as the EmailMessage it
stands for would, with the same envelope, also on a server without 8BITMIME."""

from __future__ import annotations

import asyncio
import email
import email.policy
import re
import socket
from datetime import UTC, datetime
from email.message import EmailMessage

import pytest
from aiosmtpd.controller import Controller

from services.notifier import emails, outgoing
from smi.errors import PermanentError, TransientError
from smi.mailer import Mailer, Outgoing
from tests.support.smtp_sink import SmtpSink
from tests.unit.test_emails import LINK, job


def a_message(n: int) -> EmailMessage:
    message = EmailMessage()
    message["From"] = "Shop <shop@example.com>"
    message["To"] = f"buyer{n}@example.com"
    message["Subject"] = f"message {n}"
    message["Message-ID"] = f"<m{n}@test>"
    message.set_content(f"body {n}")
    return message


@pytest.fixture
def sink():
    sink = SmtpSink().start()
    yield sink
    sink.stop()


async def test_a_burst_shares_a_few_connections(sink):
    mailer = Mailer.from_url(sink.url, connections=3)
    try:
        await asyncio.gather(*(mailer.send(a_message(n)) for n in range(40)))
    finally:
        await mailer.close()
    delivered = sorted(d.message["Message-ID"] for d in sink.deliveries())
    assert delivered == sorted(f"<m{n}@test>" for n in range(40))
    assert 1 <= sink.sessions <= 3


def prepared(n: int) -> Outgoing:
    return Outgoing.from_message(a_message(n))


@pytest.mark.parametrize("make", [a_message, prepared], ids=["EmailMessage", "Outgoing"])
async def test_refusals_are_classified_and_the_next_send_works(sink, make):
    mailer = Mailer.from_url(sink.url, connections=1)
    try:
        await mailer.send(make(0))
        sink.refuse_next(1, "451 4.3.0 Try again later")
        with pytest.raises(TransientError, match="451"):
            await mailer.send(make(1))
        sink.refuse_next(1, "550 5.1.1 <{recipient}>: mailbox unavailable")
        with pytest.raises(PermanentError) as refused:
            await mailer.send(make(2))
        assert "buyer2@example.com" not in str(refused.value)  # never an address in a reason
        await mailer.send(make(3))
    finally:
        await mailer.close()
    assert [d.message["Message-ID"] for d in sink.deliveries()] == ["<m0@test>", "<m3@test>"]


async def test_a_server_restart_between_sends_costs_no_failed_send(sink):
    """The pooled connection dies with the server; the next send notices and
    sends on a new connection instead of failing."""
    mailer = Mailer.from_url(sink.url, connections=1)
    try:
        await mailer.send(a_message(0))
        sink.stop()
        sink.start()  # same port
        await mailer.send(a_message(1))
        assert sink.sessions == 2  # the first server's session, then one with the new server
        sink.stop()
        with pytest.raises(TransientError, match="unavailable"):
            await mailer.send(a_message(2))  # down: a transient error, retried by the stage
        sink.start()
        await mailer.send(a_message(3))
    finally:
        await mailer.close()
    assert [d.message["Message-ID"] for d in sink.deliveries()] == ["<m0@test>", "<m1@test>", "<m3@test>"]


# -- prepared emails ---------------------------------------------------------------

LETTERHEAD = emails.Letterhead("Bildermarkt Zürich & Co", "Bildermarkt Zürich & Co <shop@example.com>",
                               reply_to="help@example.com", admin_email="admin@example.com")
NOW = datetime(2025, 5, 13, 9, 30, tzinfo=UTC)


def normalised(raw: bytes) -> bytes:
    boundary = re.search(rb'boundary="([^"]+)"', raw).group(1)
    return raw.replace(boundary, b"BOUNDARY")


class _Keep:
    """Keeps what arrives, raw (the envelope, DATA as sent)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, tuple[str, ...], bytes]] = []

    async def handle_DATA(self, server, session, envelope) -> str:
        self.received.append((envelope.mail_from, tuple(envelope.rcpt_tos), envelope.original_content))
        return "250 OK"


@pytest.fixture(params=[True, False], ids=["8BITMIME", "7-bit server"])
def raw_sink(request):
    """An aiosmtpd server that keeps the raw DATA; decode_data=True makes it leave
    8BITMIME out of its EHLO answer."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    keep = _Keep()
    controller = Controller(keep, hostname="127.0.0.1", port=port, enable_SMTPUTF8=True,
                            decode_data=not request.param)
    controller.start()
    yield f"smtp://127.0.0.1:{port}", keep, request.param
    controller.stop()


@pytest.mark.parametrize("customer", ["buyer@example.com", "josé@example.com"])
async def test_a_prepared_email_arrives_as_its_email_message_would(raw_sink, customer):
    url, keep, _ = raw_sink
    the_job = job(email=customer, image_url="https://images.example.com/Grüße.png")
    mailer = Mailer.from_url(url, connections=1)
    try:
        await mailer.send(outgoing.download_ready(LETTERHEAD, the_job, LINK, sent_at=NOW))
        await mailer.send(emails.download_ready(LETTERHEAD, the_job, LINK, sent_at=NOW))
    finally:
        await mailer.close()
    (fast_from, fast_to, fast_raw), (ref_from, ref_to, ref_raw) = keep.received
    assert (fast_from, fast_to) == (ref_from, ref_to) == ("shop@example.com", (customer, "admin@example.com"))
    assert normalised(fast_raw) == normalised(ref_raw)
    message = email.message_from_bytes(fast_raw, policy=email.policy.default)
    assert message["Subject"] == "Your high-resolution image is ready - Bildermarkt Zürich & Co"
    assert message["Bcc"] is None and "Grüße.png" in message.get_body(("plain",)).get_content()


async def test_a_burst_of_prepared_emails_shares_a_few_connections(sink):
    jobs = [job(job_id=f"00000000-0000-4000-8000-{n:012d}", email=f"buyer{n}@example.com") for n in range(40)]
    mailer = Mailer.from_url(sink.url, connections=3)
    try:
        await asyncio.gather(*(mailer.send(outgoing.download_ready(LETTERHEAD, j, LINK, sent_at=NOW)) for j in jobs))
    finally:
        await mailer.close()
    deliveries = sink.deliveries()
    assert sorted(d.message["Message-ID"] for d in deliveries) == sorted(
        emails.message_id("ready", j.job_id) for j in jobs)
    assert all(d.rcpt_tos == (d.message["To"], "admin@example.com") for d in deliveries)
    assert 1 <= sink.sessions <= 3
