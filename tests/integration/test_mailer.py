"""smi.mailer against a real SMTP server (aiosmtpd): connections are reused, at
most N at once, and a failure leaves no broken connection behind."""

from __future__ import annotations

import asyncio
from email.message import EmailMessage

import pytest

from smi.errors import PermanentError, TransientError
from smi.mailer import Mailer
from tests.support.smtp_sink import SmtpSink


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


async def test_refusals_are_classified_and_the_next_send_works(sink):
    mailer = Mailer.from_url(sink.url, connections=1)
    try:
        await mailer.send(a_message(0))
        sink.refuse_next(1, "451 4.3.0 Try again later")
        with pytest.raises(TransientError, match="451"):
            await mailer.send(a_message(1))
        sink.refuse_next(1, "550 5.1.1 <{recipient}>: mailbox unavailable")
        with pytest.raises(PermanentError) as refused:
            await mailer.send(a_message(2))
        assert "buyer2@example.com" not in str(refused.value)  # never an address in a reason
        await mailer.send(a_message(3))
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
