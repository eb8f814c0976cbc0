"""A side effect done, then Redis gone before its record (record_effect in
smi/kafka/handling.py), each handler run by the stage's own retry loop
(run_with_retries) against the real job table, reached through a relay that the
test cuts at that moment:

- the notifier's email, over a real SMTP exchange, cut as the sink accepts it;
- the processor's submission to the fake Upsampler server (a paid upscale, with
  no idempotency key), cut as the answer arrives.

Each effect must happen once and be recorded once Redis is back. Before
record_effect the retry loop ran the whole handler again, which found no record
and did it again (chaos runs showed 100 repeated emails of 2,000 in one).
Publishing is an in-memory stand-in here: not the step under test."""

from __future__ import annotations

import asyncio
import logging
import threading
from urllib.parse import urlsplit

import pytest
from redis import exceptions as redis_errors

from datetime import timedelta

from schemas.events import JobEvent
from schemas.status import JobStatus as S
from schemas.topics import JOBS_COMPLETED, JOBS_PENDING, JOBS_PROCESSING
from schemas.urls import HostAllowList
from services.notifier.emails import Letterhead
from services.notifier.handlers import Notifier, NotifierConfig
from services.processor.handlers import Processor, ProcessorConfig
from smi.jobtable import JobTable, connect
from smi.kafka.handling import RetryPolicy, SourceMessage, run_with_retries, value_of
from smi.mailer import Mailer
from smi.upscalers import UpsamplerClient
from tests.integration.conftest import REDIS_URL
from tests.support.fake_upsampler import DEFAULT_API_KEY, FakeUpsampler
from tests.support.image_server import ImageServer
from tests.support.jobs import make_job
from tests.support.one_job_table import Published
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


async def handled_as_a_stage_would(stage: str, topic: str, event: JobEvent, handle) -> str | None:
    """``handle`` (a stage method taking the message's value) run on ``event`` by the
    stage's own retry loop: None if handled, else why it would be dead-lettered."""
    message = SourceMessage(topic, 0, 1, event.job_id.encode(), event.model_dump_json().encode())
    return await asyncio.wait_for(run_with_retries(stage, message, value_of(handle), RetryPolicy()), timeout=60)


async def test_redis_cut_as_the_email_is_accepted_sends_it_once_and_records_it_when_back(
        relay, table, sink, caplog):
    job = await make_job(table, S.COMPLETED)
    cut = cut_redis_once_accepted(sink, relay)
    mailer = Mailer.from_url(sink.url)
    notifier = Notifier(table, mailer, CONFIG)
    caplog.set_level(logging.INFO)
    try:
        reason = await handled_as_a_stage_would("notifier", JOBS_COMPLETED.name,
                                                JobEvent.new("completed", job.job_id, attempt=1), notifier.on_completed)
    finally:
        await mailer.close()
    assert reason is None  # handled, not dead-lettered
    assert cut.is_set() and relay.cut_count >= 1  # the record really met a cut connection
    assert len(sink.deliveries(about_job(job.job_id, "ready"))) == 1
    assert "email:ready" in (await table.get(job.job_id)).done
    assert any("but its record failed" in r.getMessage() for r in caplog.records)


async def test_redis_cut_as_upsampler_answers_the_job_is_submitted_once_and_recorded_when_back(
        relay, table, tmp_path, caplog):
    loopback = HostAllowList.parse("127.0.0.1/32")
    job = await make_job(table, S.PENDING)
    async with FakeUpsampler() as upsampler:
        images = await ImageServer().start()
        await table.update(job.job_id, {"image_url": f"{images.url}/img/16x12.png"})
        client = UpsamplerClient(upsampler.base_url, DEFAULT_API_KEY, timeout=10)
        submit = client.submit

        async def submit_then_cut(*args):
            submission = await submit(*args)
            if relay.cut_count == 0:  # the first answer only
                relay.cut()
                asyncio.get_running_loop().call_later(OUTAGE_SECONDS, relay.mend)
            return submission
        client.submit = submit_then_cut
        config = ProcessorConfig(storage_dir=tmp_path, allow=loopback, public_base_url="http://127.0.0.1:9",
                                 credit_price_cents=4, poll_after=timedelta(minutes=5),
                                 timeout=timedelta(minutes=10), submit_retries=3, max_result_bytes=10 ** 6)
        published = Published()
        processor = Processor(table, published, config, remote=client)
        caplog.set_level(logging.INFO)
        try:
            reason = await handled_as_a_stage_would("processor", JOBS_PENDING.name,
                                                    JobEvent.new("pending", job.job_id), processor.on_pending)
        finally:
            await processor.close()
            await images.stop()
    assert reason is None
    assert relay.cut_count >= 1  # the record really met a cut connection
    assert len(upsampler.submissions) == 1  # one paid upscale
    stored = await table.get(job.job_id)
    assert stored.status is S.PROCESSING and stored.upsampler_job_id == next(iter(upsampler.jobs))
    assert [(topic, key) for topic, key, _ in published] == [(JOBS_PROCESSING.name, job.job_id)]
    assert any("but its record failed" in r.getMessage() for r in caplog.records)


async def test_the_relay_passes_commands_until_cut_and_after_it_is_mended(relay, table):
    # The instrument itself: what the test above relies on.
    job = await make_job(table, S.NEW)
    relay.cut()
    with pytest.raises(redis_errors.ConnectionError):
        await table.get(job.job_id)
    relay.mend()
    assert (await table.get(job.job_id)).job_id == job.job_id
