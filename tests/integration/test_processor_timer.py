"""The processor's poll timer on the real job table (single Redis and Cluster): a
job timed out by a worker that died before publishing jobs.failed is announced
by the next tick, so its refund is not lost (a timer step has no message to be
redelivered; its deadline item is what comes back)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from schemas.events import make_event_id
from schemas.status import Deadline, JobStatus as S
from services.processor.handlers import TIMEOUT_REASON, Processor, ProcessorConfig
from tests.support.jobs import make_job

pytestmark = pytest.mark.usefixtures("redis")


class Clock:
    def __init__(self) -> None:
        self.now = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.now


class Publisher(list):
    """Records what is published; ``broken`` makes it die like a killed worker."""

    broken = False

    async def __call__(self, spec, key, value) -> None:
        if self.broken:
            raise SystemExit("killed between the write and the publish")
        self.append((spec.name, key, value))


def a_processor(table, publish, clock, tmp_path) -> Processor:
    config = ProcessorConfig(storage_dir=tmp_path, allow=None, public_base_url="http://127.0.0.1:8080",
                             credit_price_cents=4, poll_after=timedelta(seconds=30),
                             timeout=timedelta(minutes=10), submit_retries=3, max_result_bytes=10 ** 6)
    return Processor(table, publish, config, remote=object(), clock=clock)  # the timeout needs no upscaler


async def test_a_timeout_whose_event_was_lost_is_published_by_the_next_tick(table, tmp_path):
    clock = Clock()
    job = await make_job(table, S.PROCESSING)
    await table.update(job.job_id, {"processing_started_at": clock.now - timedelta(minutes=11),
                                    "attempts": 1}, deadlines={Deadline.POLL: clock.now})
    publish = Publisher()
    processor = a_processor(table, publish, clock, tmp_path)

    publish.broken = True
    with pytest.raises(SystemExit):
        await processor._poll(await table.get(job.job_id),
                              claimed_until=table.lease_end(clock.now, timedelta(minutes=2)))
    failed = await table.get(job.job_id)
    assert failed.status is S.FAILED and failed.failure_reason == TIMEOUT_REASON
    assert publish == []
    # The item is still in the poll set: once the lease ends, a tick takes it again.
    assert [d.job_id for d in await table.due(Deadline.POLL, limit=10, now=clock.now + timedelta(hours=1))] == [
        job.job_id]

    publish.broken = False
    clock.now += timedelta(minutes=3)
    assert await processor.tick() == 1
    [(topic, key, event)] = publish
    assert (topic, key) == ("jobs.failed", job.job_id)
    assert event.event_id == make_event_id(job.job_id, "failed", 1)
    assert event.data == {"reason": TIMEOUT_REASON}
    assert await table.due(Deadline.POLL, limit=10, now=clock.now + timedelta(hours=1)) == []
    assert [h.target for h in await table.history(job.job_id)].count(S.FAILED) == 1

    clock.now += timedelta(minutes=3)
    assert await processor.tick() == 0  # nothing left to announce


async def test_an_undisturbed_timeout_publishes_once_and_lets_the_item_go(table, tmp_path):
    clock = Clock()
    job = await make_job(table, S.PROCESSING)
    await table.update(job.job_id, {"processing_started_at": clock.now - timedelta(minutes=11), "attempts": 1},
                       deadlines={Deadline.POLL: clock.now})
    publish = Publisher()
    processor = a_processor(table, publish, clock, tmp_path)
    assert await processor.tick() == 1
    assert [(topic, key) for topic, key, _ in publish] == [("jobs.failed", job.job_id)]
    assert await table.due(Deadline.POLL, limit=10, now=clock.now + timedelta(hours=1)) == []
