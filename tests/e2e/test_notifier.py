"""The notifier end to end: a real notifier process, a real SMTP server (in the test
process), the real gateway serving the links, Kafka and Redis (issue 5).

Jobs are built in the job table through the real transition path, with a real file
under STORAGE_DIR; the tests publish the events the processor, checkout and janitor
would, and read what arrived in the SMTP sink."""

from __future__ import annotations

import asyncio
import email
import email.policy
import os
import re
import uuid
from datetime import timedelta
from email.utils import parsedate_to_datetime

import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import Command, JobEvent, rfc3339, utcnow
from schemas.job import to_ms
from schemas.status import JobStatus as S
from schemas.topics import JOBS_COMMANDS, JOBS_COMPLETED, JOBS_EXPIRING, PAYMENTS_REFUNDS
from services.notifier import emails
from smi.mailer import Outgoing
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, start_stage
from tests.support.jobs import make_job
from tests.support.kafka_watch import eventually, for_job
from tests.support.processes import StageProcess
from tests.support.smtp_sink import Delivery, SmtpSink, about_job

SHOP = "E2E Prints & Co"
ADMIN_EMAIL = "admin@shop.example.com"
LETTERHEAD = emails.Letterhead(SHOP, f"{SHOP} <shop@shop.example.com>", "help@shop.example.com", ADMIN_EMAIL)
LINK = re.compile(r"https?://\S+/downloads/([A-Za-z0-9]{64})")
# The notifier's topics in the session's namespace, as the broker names them.
NOTIFIER_TOPICS = [KAFKA_NAMES.topic(t) for t in (JOBS_COMPLETED, PAYMENTS_REFUNDS, JOBS_EXPIRING, JOBS_COMMANDS)]


@pytest.fixture(scope="module")
def sink():
    server = SmtpSink().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
async def notifier(stage_env, sink, tmp_path_factory, producer, table, storage_dir, watcher):
    """The notifier stage, ready: it has emailed a probe job. (After the watcher, so
    that sees every message the module causes.)"""
    stage = await start_stage("notifier", {**stage_env, "SMTP_URL": sink.url, "SHOP_NAME": LETTERHEAD.shop_name,
                                           "MAIL_FROM": LETTERHEAD.mail_from, "REPLY_TO": LETTERHEAD.reply_to,
                                           "ADMIN_EMAIL": LETTERHEAD.admin_email},
                              tmp_path_factory.mktemp("notifier-logs"))
    probe, _ = await completed_job(table, storage_dir)
    await publish_completed(producer, probe.job_id)
    try:
        await sink.wait_for(about_job(probe.job_id, "ready"), timeout=90)
    except AssertionError:
        stage.stop()
        pytest.fail(f"notifier did not start:\n{stage.log_tail()}")
    yield stage
    stage.stop()


def customer_email() -> str:
    return f"buyer-{uuid.uuid4().hex[:12]}@example.com"


async def completed_job(table, storage_dir, **overrides):
    """A completed job whose upscaled file exists under STORAGE_DIR: (job, file bytes)."""
    job = await make_job(table, S.COMPLETED, **{"email": customer_email(), **overrides})
    content = b"\x89PNG\r\n\x1a\n" + os.urandom(4096)
    path = storage_dir / f"{job.job_id}.png"
    path.write_bytes(content)
    await table.update(job.job_id, {"upscaled_file_path": str(path)})
    return await table.get(job.job_id), content


async def publish_completed(producer, job_id: str, event: JobEvent | None = None):
    return await producer.send(JOBS_COMPLETED, job_id, event or JobEvent.new("completed", job_id))


def expiry_warning(job_id: str, expires_at) -> JobEvent:
    """What the janitor publishes: one event per expiry."""
    return JobEvent.new("expiring", job_id, attempt=to_ms(expires_at), data={"expires_at": rfc3339(expires_at)})


def text_of(delivery: Delivery) -> str:
    return delivery.message.get_body(("plain",)).get_content()


def link_in(delivery: Delivery) -> str:
    [link] = [match.group(0) for match in LINK.finditer(text_of(delivery))]
    return link


async def fetch(http, url: str) -> tuple[int, bytes]:
    async with http.get(url) as resp:
        return resp.status, await resp.read()


async def ready_email(producer, sink, job) -> Delivery:
    await publish_completed(producer, job.job_id)
    [delivery] = await sink.wait_for(about_job(job.job_id, "ready"), timeout=30)
    return delivery


async def notifier_lag() -> int:
    """Messages on the notifier's topics that its group (in the session's namespace)
    has not committed.
    (kafka_watch.group_lag reads partitions from metadata that consumer.topics()
    never fills in, so it finds none and always answers 0.)"""
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    consumer = AIOKafkaConsumer(bootstrap_servers=KAFKA)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(KAFKA_NAMES.group("notifier"))
        cluster = await consumer._client.fetch_all_metadata()
        partitions = [TopicPartition(t, p) for t in NOTIFIER_TOPICS for p in cluster.partitions_for_topic(t) or ()]
        assert partitions, "no partitions found for the notifier's topics"
        ends = await consumer.end_offsets(partitions)
        return sum(end - (committed[tp].offset if tp in committed else 0) for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def notifier_drained(*, timeout: float) -> None:
    """Everything on the notifier's topics handled and committed."""
    async def no_lag():
        return await notifier_lag() == 0
    await eventually(no_lag, timeout=timeout, interval=0.5)


def assert_as_the_email_package_composes_it(delivery: Delivery, reference) -> None:
    """The notifier builds its emails' bytes itself (services/notifier/outgoing.py):
    what arrived must be the email services/notifier/emails.py composes with the
    email package from the same inputs, as aiosmtplib would have sent it."""
    expected = email.message_from_bytes(Outgoing.from_message(reference).data, policy=email.policy.default)

    def parts(message):
        boundary = message.get_boundary()
        return [([(name, str(value).replace(boundary, "B")) for name, value in part.items()],
                 None if part.is_multipart() else part.get_content()) for part in message.walk()]
    assert parts(delivery.message) == parts(expected)
    assert delivery.rcpt_tos == tuple(Outgoing.from_message(reference).recipients)


def logged(stage: StageProcess, *fragments: str) -> bool:
    return any(all(f in line for f in fragments) for line in stage.log_tail(2000).splitlines())


async def test_a_completed_job_gets_one_ready_email_whose_link_returns_the_file(
        notifier, gateway, http, sink, producer, table, storage_dir):
    job, content = await completed_job(table, storage_dir)
    event = JobEvent.new("completed", job.job_id)
    await publish_completed(producer, job.job_id, event)
    [delivery] = await sink.wait_for(about_job(job.job_id, "ready"), timeout=30)

    message = delivery.message
    assert message["Subject"] == f"Your high-resolution image is ready - {SHOP}"
    assert (message["To"], message["Reply-To"]) == (job.email, "help@shop.example.com")
    assert message["Message-ID"] == f"<ready.{job.job_id}.1@smi-pipeline>"
    assert delivery.rcpt_tos == (job.email, ADMIN_EMAIL) and message["Bcc"] is None  # a blind copy
    after = await table.get(job.job_id)
    assert after.download_expires_at is not None
    assert timedelta(hours=23, minutes=59) < after.download_expires_at - utcnow() <= timedelta(hours=24)
    assert "4x (8000 × 8000 pixels)" in text_of(delivery) and job.image_url in text_of(delivery)
    assert link_in(delivery).startswith(f"{gateway.url}/downloads/")
    assert await fetch(http, link_in(delivery)) == (200, content)
    assert_as_the_email_package_composes_it(delivery, emails.download_ready(
        LETTERHEAD, job, emails.DownloadLink(link_in(delivery), after.download_expires_at),
        sent_at=parsedate_to_datetime(message["Date"])))

    for _ in range(3):  # redelivered
        await publish_completed(producer, job.job_id, event)
    await notifier_drained(timeout=60)
    assert len(sink.deliveries(about_job(job.job_id))) == 1


async def test_killed_after_the_send_was_recorded_the_restarted_notifier_sends_nothing_more(
        notifier, sink, producer, table, storage_dir):
    job, _ = await completed_job(table, storage_dir)
    notifier.stop()
    notifier.start(SMI_CRASH_AT="notifier.after_send_recorded")
    await publish_completed(producer, job.job_id)
    assert await asyncio.to_thread(notifier.wait_exit, 90) == 137
    assert len(sink.deliveries(about_job(job.job_id))) == 1
    assert await table.is_done(job.job_id, "email:ready")
    assert await notifier_lag() >= 1  # the message is not committed

    notifier.start()  # gets the uncommitted message again
    await notifier_drained(timeout=90)
    assert logged(notifier, job.job_id, "email:ready was sent before")
    assert len(sink.deliveries(about_job(job.job_id))) == 1


async def test_with_the_smtp_server_down_the_email_is_retried_and_sent_once_it_is_back(
        notifier, sink, producer, table, storage_dir):
    job, _ = await completed_job(table, storage_dir)
    sink.stop()
    try:
        sent = await publish_completed(producer, job.job_id)
        # The stage logs the registry name; the producer's answer has the broker's.
        where = f"topic={KAFKA_NAMES.local(sent.topic)} partition={sent.partition} offset={sent.offset}"
        await eventually(lambda: logged(notifier, "retry 2 of", where, "SMTP server unavailable"), timeout=30)
        assert not sink.deliveries(about_job(job.job_id))
    finally:
        sink.start()
    await sink.wait_for(about_job(job.job_id, "ready"), timeout=60)
    await notifier_drained(timeout=60)
    assert len(sink.deliveries(about_job(job.job_id))) == 1


async def test_a_try_later_answer_is_retried(notifier, sink, producer, table, storage_dir):
    job, _ = await completed_job(table, storage_dir)
    sink.refuse_next(2, "451 4.3.0 Mailbox busy, try again later")
    sent = await publish_completed(producer, job.job_id)
    await sink.wait_for(about_job(job.job_id, "ready"), timeout=30)
    assert logged(notifier, f"partition={sent.partition} offset={sent.offset}", "SMTP 451")
    assert len(sink.deliveries(about_job(job.job_id))) == 1


async def test_a_permanent_refusal_is_dead_lettered_with_the_job_and_reason_but_not_the_address(
        notifier, sink, producer, table, storage_dir, watcher):
    job, _ = await completed_job(table, storage_dir)
    sink.refuse_next(1, "550 5.1.1 <{recipient}>: mailbox unavailable")
    await publish_completed(producer, job.job_id)
    [letter] = await watcher.wait_for("jobs.dead_letter", for_job(job.job_id), timeout=30)
    error = letter.json()["error"]
    assert letter.json()["stage"] == "notifier"
    assert job.job_id in error and "SMTP 550" in error and "mailbox unavailable" in error
    assert job.email not in error and not logged(notifier, job.email)
    assert not sink.deliveries(about_job(job.job_id))
    assert not await table.is_done(job.job_id, "email:ready")
    assert (await table.get(job.job_id)).status is S.COMPLETED


async def test_a_refund_gets_one_refund_email_with_the_amount(notifier, sink, producer, table):
    job = await make_job(table, S.FAILED, email=customer_email(), price_cents=384)
    await table.update(job.job_id, {"refund_id": "re_e2e", "refund_amount_cents": 384, "refunded_at": utcnow(),
                                    "payment_status": "refunded"})
    event = JobEvent.new("refunds", job.job_id, data={"refund_id": "re_e2e", "amount_cents": 384})
    for _ in range(2):
        await producer.send(PAYMENTS_REFUNDS, job.job_id, event)
    [delivery] = await sink.wait_for(about_job(job.job_id, "refund"), timeout=30)
    assert delivery.message["Subject"] == f"Refund Processed - {SHOP}"
    assert "$3.84" in text_of(delivery) and "3-5 business days" in text_of(delivery)
    await notifier_drained(timeout=60)
    assert len(sink.deliveries(about_job(job.job_id))) == 1


async def test_an_expiry_warning_brings_a_second_working_link_and_the_first_keeps_working(
        notifier, gateway, http, sink, producer, table, storage_dir):
    job, content = await completed_job(table, storage_dir)
    first = link_in(await ready_email(producer, sink, job))
    expires_at = (await table.get(job.job_id)).download_expires_at

    warning = expiry_warning(job.job_id, expires_at)
    for _ in range(2):
        await producer.send(JOBS_EXPIRING, job.job_id, warning)
    [delivery] = await sink.wait_for(about_job(job.job_id, "expiring"), timeout=30)
    assert delivery.message["Subject"] == f"Your download link expires soon - {SHOP}"
    assert delivery.message["Message-ID"] == f"<expiring.{job.job_id}.{warning.event_id}@smi-pipeline>"
    second = link_in(delivery)
    assert second != first
    assert await fetch(http, second) == (200, content)
    assert await fetch(http, first) == (200, content)
    assert (await table.get(job.job_id)).download_expires_at == expires_at
    await notifier_drained(timeout=60)
    assert len(sink.deliveries(about_job(job.job_id, "expiring"))) == 1


async def test_resend_download_sends_a_new_link_and_the_old_one_stops_working(
        notifier, gateway, http, sink, producer, table, storage_dir):
    job, content = await completed_job(table, storage_dir)
    old = link_in(await ready_email(producer, sink, job))
    expires_before = (await table.get(job.job_id)).download_expires_at

    await producer.send(JOBS_COMMANDS, job.job_id,
                        Command(command="resend_download", job_id=job.job_id, requested_by="e2e-operator"))
    [delivery] = await sink.wait_for(about_job(job.job_id, "resend"), timeout=30)
    assert delivery.message["Subject"] == f"Your new download link - {SHOP}"
    new = link_in(delivery)
    assert (await fetch(http, old))[0] == 404
    assert await fetch(http, new) == (200, content)
    assert (await table.get(job.job_id)).download_expires_at > expires_before

    # A warning about the expiry before the resend is stale: nothing is sent.
    await producer.send(JOBS_EXPIRING, job.job_id, expiry_warning(job.job_id, expires_before))
    await notifier_drained(timeout=60)
    assert not sink.deliveries(about_job(job.job_id, "expiring"))


async def test_what_cannot_be_sent_is_dead_lettered_with_a_reason(notifier, sink, producer, table, storage_dir,
                                                                 watcher):
    pending = await make_job(table, S.PENDING, email=customer_email())
    await producer.send(JOBS_COMMANDS, pending.job_id,
                        Command(command="resend_download", job_id=pending.job_id, requested_by="e2e-operator"))
    no_address, _ = await completed_job(table, storage_dir, email=None)
    await publish_completed(producer, no_address.job_id)

    [refused] = await watcher.wait_for("jobs.dead_letter", for_job(pending.job_id), timeout=30)
    assert refused.json()["stage"] == "notifier"
    assert f"resend refused: job {pending.job_id} is pending, not completed" in refused.json()["error"]
    [unaddressed] = await watcher.wait_for("jobs.dead_letter", for_job(no_address.job_id), timeout=30)
    assert f"job {no_address.job_id} has no email address" in unaddressed.json()["error"]
    assert not sink.deliveries(about_job(pending.job_id)) and not sink.deliveries(about_job(no_address.job_id))


async def test_no_customer_address_or_token_reaches_a_topic_or_the_notifier_log(notifier, sink, watcher, producer,
                                                                                table, storage_dir):
    for _ in range(3):  # its own emails, whatever else this module sent before
        job, _ = await completed_job(table, storage_dir)
        await publish_completed(producer, job.job_id)
        await sink.wait_for(about_job(job.job_id, "ready"))
    deliveries = sink.deliveries()
    addresses = {d.message["To"] for d in deliveries}
    tokens = {token for d in deliveries for token in LINK.findall(text_of(d))}
    assert len(tokens) >= 3 and len(addresses) >= 3
    secrets = [s.encode() for s in addresses | tokens]
    assert not [m for m in watcher.seen if m.value and any(s in m.value for s in secrets)]
    logs = b"".join(path.read_bytes() for path in notifier.logdir.glob("*.log"))
    assert not [s for s in secrets if s in logs]
