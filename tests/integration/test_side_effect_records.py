"""An email sent, then Redis gone before its record (record_effect in
smi/kafka/handling.py): the notifier's handling of jobs.completed, run by the
stage's own retry loop (run_with_retries), against the real job table reached
through a relay that the test cuts the moment the SMTP sink accepts the email,
over a real SMTP exchange. The email must go out once, and be recorded once
Redis is back. Before record_effect, the retry loop ran the whole handler again,
found no record and sent a second email (as chaos runs showed: 100 repeats of
2,000 in one)."""

from __future__ import annotations

import asyncio
import logging
import threading
from urllib.parse import urlsplit

import pytest
from redis import exceptions as redis_errors

from schemas.events import JobEvent
from schemas.status import JobStatus as S
from schemas.topics import JOBS_COMPLETED
from services.notifier.emails import Letterhead
from services.notifier.handlers import Notifier, NotifierConfig
from smi.jobtable import JobTable, connect
from smi.kafka.handling import RetryPolicy, SourceMessage, run_with_retries, value_of
from smi.mailer import Mailer
from tests.integration.conftest import REDIS_URL
from tests.support.jobs import make_job
from tests.support.smtp_sink import SmtpSink, about_job
from tests.support.tcp_relay import CuttableRelay

CONFIG = NotifierConfig(Letterhead("Relay Shop", "shop@example.com"), "http://127.0.0.1:8080",
                        download_ttl_hours=24, expiry_warning_hours=4)
OUTAGE_SECONDS = 1.0


@pytest.fixture
async def relay():
    target = urlsplit(REDIS_URL)
    relay = await CuttableRelay(target.hostname or "127.0.0.1", target.port or 6379).start()
    yield relay
    await relay.stop()


@pytest.fixture
async def table(relay, namespace):
    # REDIS_URL with the relay in place of the server (credentials and database kept).
    target = urlsplit(REDIS_URL)
    userinfo = target.netloc.rpartition("@")[0]
    client = connect(target._replace(netloc=f"{userinfo + '@' if userinfo else ''}127.0.0.1:{relay.port}").geturl())
    yield JobTable(client, shards=4, namespace=namespace)
    await client.aclose()


@pytest.fixture
def sink():
    server = SmtpSink().start()
    yield server
    server.stop()


def cut_redis_once_accepted(sink: SmtpSink, relay: CuttableRelay) -> threading.Event:
    """At the first email the sink accepts, before the client hears "250": cut the
    relay (in the test's loop, waited for), and mend it OUTAGE_SECONDS later."""
    loop = asyncio.get_running_loop()
    done = threading.Event()

    def cut() -> None:
        relay.cut()
        loop.call_later(OUTAGE_SECONDS, relay.mend)
        done.set()

    def on_accept(delivery) -> None:  # the sink's thread
        if not done.is_set():
            loop.call_soon_threadsafe(cut)
            assert done.wait(10), "the relay was not cut"
    sink.on_accept(on_accept)
    return done


async def test_redis_cut_as_the_email_is_accepted_sends_it_once_and_records_it_when_back(
        relay, table, sink, caplog):
    job = await make_job(table, S.COMPLETED)
    cut = cut_redis_once_accepted(sink, relay)
    mailer = Mailer.from_url(sink.url)
    notifier = Notifier(table, mailer, CONFIG)
    event = JobEvent.new("completed", job.job_id, attempt=1)
    message = SourceMessage(JOBS_COMPLETED.name, 0, 1, job.job_id.encode(), event.model_dump_json().encode())
    caplog.set_level(logging.INFO)
    try:
        reason = await asyncio.wait_for(
            run_with_retries("notifier", message, value_of(notifier.on_completed), RetryPolicy()), timeout=60)
    finally:
        await mailer.close()
    assert reason is None  # handled, not dead-lettered
    assert cut.is_set() and relay.cut_count >= 1  # the record really met a cut connection
    assert len(sink.deliveries(about_job(job.job_id, "ready"))) == 1
    assert "email:ready" in (await table.get(job.job_id)).done
    assert any("but its record failed" in r.getMessage() for r in caplog.records)


async def test_the_relay_passes_commands_until_cut_and_after_it_is_mended(relay, table):
    # The instrument itself: what the test above relies on.
    job = await make_job(table, S.NEW)
    relay.cut()
    with pytest.raises(redis_errors.ConnectionError):
        await table.get(job.job_id)
    relay.mend()
    assert (await table.get(job.job_id)).job_id == job.job_id
