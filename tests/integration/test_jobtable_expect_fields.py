"""JobTable.update with ``expect_fields`` (single Redis and Cluster): a
compare-and-set on field values, as stored, beside ``expect_status``. The janitor
records an expired download only while the expiry it read is still the job's."""

from __future__ import annotations

from datetime import timedelta

import pytest

from schemas.status import Deadline, JobStatus as S
from tests.support.jobs import make_job


async def test_update_applies_only_while_the_expected_fields_hold_their_values(table):
    job = await make_job(table, S.COMPLETED)
    _, expires = await table.issue_download_token(job.job_id, ttl_hours=24, now=job.updated_at)
    moment = job.updated_at + timedelta(hours=25)

    # A different expiry (a resend moved it): nothing written.
    assert not await table.update(job.job_id, {"download_expired_at": moment},
                                  expect_fields={"download_expires_at": expires + timedelta(milliseconds=1)})
    # Expected absent, but present: nothing written.
    assert not await table.update(job.job_id, {"download_expired_at": moment},
                                  expect_fields={"download_expires_at": None})
    assert (await table.get(job.job_id)).download_expired_at is None

    # The expiry read (compared to the millisecond), and no expiry recorded yet.
    assert await table.update(job.job_id, {"download_expired_at": moment}, expect_status=[S.COMPLETED],
                              expect_fields={"download_expires_at": expires, "download_expired_at": None},
                              clear_deadlines=[Deadline.WARN])
    assert (await table.get(job.job_id)).download_expired_at == moment
    # Recorded once: the same write again finds download_expired_at set.
    assert not await table.update(job.job_id, {"download_expired_at": moment + timedelta(hours=1)},
                                  expect_fields={"download_expires_at": expires, "download_expired_at": None})
    assert (await table.get(job.job_id)).download_expired_at == moment


async def test_expected_fields_and_status_must_both_hold_and_names_are_checked(table):
    job = await make_job(table, S.FAILED)
    await table.update(job.job_id, {"attempts": 2})
    assert not await table.update(job.job_id, {"failure_reason": "x"}, expect_status=[S.PENDING],
                                  expect_fields={"attempts": 2})
    assert not await table.update(job.job_id, {"failure_reason": "x"}, expect_status=[S.FAILED],
                                  expect_fields={"attempts": 1})
    assert await table.update(job.job_id, {"failure_reason": "x"}, expect_status=[S.FAILED],
                              expect_fields={"attempts": 2, "refund_id": None})
    assert (await table.get(job.job_id)).failure_reason == "x"
    with pytest.raises(ValueError, match="unknown job fields"):
        await table.update(job.job_id, {}, expect_fields={"no_such_field": "1"})
