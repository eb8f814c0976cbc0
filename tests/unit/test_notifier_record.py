"""The notifier's record of a sent email (services/notifier/handlers.py
``_record_sent``), against in-memory stand-ins for the job table and the mailer:
once an email is out, an error recording it must not send it again."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from redis import exceptions as redis_errors

from schemas.events import JobEvent
from schemas.job import Job
from schemas.status import JobStatus
from services.notifier.emails import Letterhead
from services.notifier.handlers import Notifier, NotifierConfig
from tests.support.one_job_table import OneJobTable

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
CONFIG = NotifierConfig(Letterhead("Pixel & Co", "Pixel & Co <shop@example.com>"), "https://shop.example.com",
                        download_ttl_hours=72, expiry_warning_hours=24)


class RecordingTable(OneJobTable):
    """mark_done raises each error of ``failures`` in turn, then records the step."""

    def __init__(self, job: Job, failures: list[Exception]):
        super().__init__(job)
        self.failures = list(failures)
        self.mark_calls = 0

    async def mark_done(self, job_id: str, step: str) -> bool:
        assert job_id == self.job.job_id
        self.mark_calls += 1
        if self.failures:
            raise self.failures.pop(0)
        fresh = step not in self.job.done
        done = self.job.done | {step}
        self.job = self.job.model_copy()
        self.job._done = done  # as Job.from_redis reads the job's "done:<step>" fields
        return fresh


class Outbox(list):
    async def send(self, message) -> None:
        self.append(message)


def refunded_job() -> Job:
    return Job(job_id=JOB_ID, status=JobStatus.FAILED, image_url="https://images.example.com/a.png",
               resolution="4x", image_width=2000, image_height=2000, price_cents=384, email="ada@example.com",
               refund_amount_cents=384, created_at=T0, updated_at=T0)


def refund_event() -> bytes:
    return JobEvent.new("refunded", JOB_ID, occurred_at=T0).model_dump_json().encode()


def notifier(table, outbox, slept: list[float]) -> Notifier:
    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    return Notifier(table, outbox, CONFIG, clock=lambda: T0, sleep=sleep)


@pytest.mark.parametrize("error", [redis_errors.ConnectionError("Connection refused"),
                                   redis_errors.TimeoutError("Timeout reading from socket"),
                                   redis_errors.BusyLoadingError("Redis is loading the dataset in memory")],
                         ids=["connection", "timeout", "loading"])
async def test_redis_away_after_the_send_retries_the_record_not_the_email(error):
    table, outbox, slept = RecordingTable(refunded_job(), [error] * 12), Outbox(), []
    outcome = await notifier(table, outbox, slept).on_refund(refund_event())
    assert outcome == "sent"
    assert len(outbox) == 1  # sent once, though the record failed twelve times
    assert table.mark_calls == 13 and "email:refund" in table.job.done
    assert len(slept) == 12 and all(0.05 <= s <= 2.0 for s in slept)  # backoff, capped


async def test_the_recorded_email_is_not_sent_on_redelivery():
    table, outbox, slept = RecordingTable(refunded_job(), [redis_errors.ConnectionError("gone")]), Outbox(), []
    handler = notifier(table, outbox, slept)
    assert await handler.on_refund(refund_event()) == "sent"
    assert await handler.on_refund(refund_event()) == "already sent"
    assert len(outbox) == 1


async def test_an_error_that_is_no_outage_escapes_the_record():
    # A bug (or a refused script) is not waited on for ever: the stage dead-letters it.
    table, outbox, slept = RecordingTable(refunded_job(), [redis_errors.ResponseError("NOSCRIPT")]), Outbox(), []
    with pytest.raises(redis_errors.ResponseError):
        await notifier(table, outbox, slept).on_refund(refund_event())
    assert len(outbox) == 1 and slept == [] and "email:refund" not in table.job.done
