"""The janitor end to end: real janitor processes (two, for the race) with the
session's checkout and gateway, on Kafka, Redis and stripe-mock behind the
recording proxy (issue 5).

Time is moved, not waited for: the janitor reads its clock's offset from a file
(smi/clock.py) that ``move_clock`` rewrites. Every test starts at real time."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import timedelta

import pytest

from schemas.events import JobEvent, make_event_id, rfc3339, utcnow
from schemas.job import to_ms
from schemas.status import Deadline, JobStatus as S
from schemas.topics import JOBS_FAILED
from smi import stripe_webhooks
from smi.clock import set_offset
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, start_stage, wait_status
from tests.e2e.flows import completed_event, open_job, post_webhook
from tests.support.jobs import make_job
from tests.support.kafka_watch import drained, eventually, for_job
from tests.support.processes import StageProcess

PII_RETENTION_DAYS = 30
PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
SEVERAL_TICKS = 1.5  # seconds: three janitor passes at the 0.5 s interval


@pytest.fixture(scope="module")
def clock_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("janitor-clock") / "offset"
    set_offset(path, 0)
    return path


@pytest.fixture(scope="module")
def janitor_env(stage_env, clock_file) -> dict[str, str]:
    return {**stage_env, "JANITOR_INTERVAL_SECONDS": "0.5", "SMI_CLOCK_OFFSET_FILE": str(clock_file),
            "PII_RETENTION_DAYS": str(PII_RETENTION_DAYS)}


@pytest.fixture(scope="module")
async def janitor(janitor_env, tmp_path_factory, table, topics_ready):
    """A janitor process, ready: it has abandoned a job whose payment deadline passed."""
    stage = await start_stage("janitor", janitor_env, tmp_path_factory.mktemp("janitor-logs"))
    probe = await make_job(table, S.AWAITING_PAYMENT)
    await table.update(probe.job_id, {}, deadlines={Deadline.ABANDON: probe.created_at})
    try:
        await wait_status(table, probe.job_id, S.ABANDONED, timeout=90)
    except AssertionError:
        pytest.fail(f"janitor did not start:\n{stage.log_tail()}")
    yield stage
    stage.stop()


@pytest.fixture
def move_clock(clock_file):
    """move_clock(delta): the janitors' clocks read real time + delta from then on."""
    set_offset(clock_file, 0)
    yield lambda delta: set_offset(clock_file, delta.total_seconds())
    set_offset(clock_file, 0)


def expire_calls(stripe_proxy, job):
    # stripe-mock gives every session the same id: the idempotency key names the job.
    return [r for r in stripe_proxy.matching("POST", f"/v1/checkout/sessions/{job.stripe_checkout_session_id}/expire")
            if r.idempotency_key == f"expire-{job.job_id}"]


def log_text(stage: StageProcess) -> str:
    path = stage.logdir / f"{stage.stage}-{stage.starts}.log"
    return path.read_text(errors="replace") if path.exists() else ""


def abandoned_in_log(stage: StageProcess, job_ids) -> int:
    text = log_text(stage)
    return sum(f"job {job_id}: abandoned" in text for job_id in job_ids)


async def test_an_unpaid_job_is_abandoned_after_the_timeout_and_a_late_payment_is_still_honoured(
        janitor, checkout, gateway, http, producer, table, stripe_proxy, watcher, move_clock):
    job = await open_job(producer, table)  # its session expires 60 minutes after creation

    move_clock(timedelta(minutes=59))
    await asyncio.sleep(SEVERAL_TICKS)
    assert (await table.get(job.job_id)).status is S.AWAITING_PAYMENT
    assert expire_calls(stripe_proxy, job) == []

    move_clock(timedelta(minutes=61))
    abandoned = await wait_status(table, job.job_id, S.ABANDONED)
    [expire] = expire_calls(stripe_proxy, job)
    assert expire.status == 200
    last = (await table.history(job.job_id))[-1]
    assert (last.source, last.target, last.actor) == (S.AWAITING_PAYMENT, S.ABANDONED, "janitor")
    assert last.event_id == make_event_id(job.job_id, "abandoned")
    assert abandoned.abandoned_at > job.created_at + timedelta(minutes=60)
    [message] = await watcher.wait_for("jobs.abandoned", for_job(job.job_id))
    event = JobEvent.model_validate_json(message.value)
    assert (event.type, event.event_id) == ("abandoned", make_event_id(job.job_id, "abandoned"))
    assert event.occurred_at == abandoned.abandoned_at
    assert b"buyer@example.com" not in message.value

    await asyncio.sleep(SEVERAL_TICKS)
    assert len(watcher.matching("jobs.abandoned", for_job(job.job_id))) == 1
    assert len(expire_calls(stripe_proxy, job)) == 1

    # The customer paid on a page opened before the expiry: checkout honours it.
    assert (await post_webhook(http, gateway, completed_event(job)))[0] == 200
    await wait_status(table, job.job_id, S.PENDING)
    assert [h.target for h in await table.history(job.job_id)][-2:] == [S.ABANDONED, S.PENDING]


async def test_a_janitor_killed_between_abandoning_and_publishing_leaves_the_event_to_the_next(
        janitor, table, watcher, move_clock):
    janitor.kill()
    janitor.start(SMI_CRASH_AT="janitor.after_abandon")
    # Due now, at real time: the only due job, so the crash is at this one.
    job = await make_job(table, S.AWAITING_PAYMENT)
    await table.update(job.job_id, {}, deadlines={Deadline.ABANDON: job.created_at})
    assert await asyncio.to_thread(janitor.wait_exit, 90) == 137
    abandoned = await table.get(job.job_id)
    assert abandoned.status is S.ABANDONED
    assert watcher.matching("jobs.abandoned", for_job(job.job_id)) == []

    janitor.start()
    move_clock(timedelta(minutes=3))  # past the dead janitor's lease on the job
    [message] = await watcher.wait_for("jobs.abandoned", for_job(job.job_id), timeout=60)
    event = JobEvent.model_validate_json(message.value)
    assert (event.event_id, event.occurred_at) == (make_event_id(job.job_id, "abandoned"), abandoned.abandoned_at)
    await asyncio.sleep(SEVERAL_TICKS)
    assert len(watcher.matching("jobs.abandoned", for_job(job.job_id))) == 1


async def test_a_session_expired_webhook_abandons_the_job_once(janitor, checkout, gateway, http, producer, table,
                                                               stripe_proxy, watcher):
    job = await open_job(producer, table)
    expired = stripe_webhooks.checkout_session_event(
        "checkout.session.expired", job_id=job.job_id, session_id=job.stripe_checkout_session_id,
        amount_total=job.price_cents, payment_status="unpaid")
    foreign_job = await open_job(producer, table)
    foreign = stripe_webhooks.checkout_session_event(
        "checkout.session.expired", job_id=foreign_job.job_id, session_id=foreign_job.stripe_checkout_session_id,
        amount_total=foreign_job.price_cents, payment_status="unpaid")
    foreign["data"]["object"]["metadata"]["source"] = "another-shop"
    unknown = str(uuid.uuid4())
    ghost = stripe_webhooks.checkout_session_event("checkout.session.expired", job_id=unknown, session_id="cs_ghost",
                                                   amount_total=100, payment_status="unpaid")
    for event in (expired, expired, foreign, ghost, expired):  # Stripe redelivers
        assert (await post_webhook(http, gateway, event))[0] == 200

    abandoned = await wait_status(table, job.job_id, S.ABANDONED)
    await drained(KAFKA, "janitor", ["payments.events"], names=KAFKA_NAMES)
    messages = watcher.matching("jobs.abandoned", for_job(job.job_id))
    assert [json.loads(m.value)["event_id"] for m in messages] == [make_event_id(job.job_id, "abandoned")]
    assert expire_calls(stripe_proxy, job) == []  # Stripe expired the session itself
    assert abandoned.abandoned_at is not None
    assert (await table.get(foreign_job.job_id)).status is S.AWAITING_PAYMENT  # not ours: untouched
    [letter] = await watcher.wait_for("jobs.dead_letter", for_job(unknown))
    dead = json.loads(letter.value)
    assert dead["stage"] == "janitor" and "unknown job" in dead["error"]


async def test_one_expiry_warning_per_expiry_then_the_file_is_deleted_and_the_link_answers_410(
        janitor, gateway, http, table, storage_dir, watcher, move_clock):
    job = await make_job(table, S.COMPLETED)
    path = storage_dir / job.job_id / "upscaled-4x.png"
    path.parent.mkdir()
    path.write_bytes(PNG)
    await table.update(job.job_id, {"upscaled_file_path": str(path)})
    token, expires = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4)
    async with http.get(f"{gateway.url}/downloads/{token}") as resp:
        assert resp.status == 200 and await resp.read() == PNG

    move_clock(timedelta(hours=20, minutes=1))
    [message] = await watcher.wait_for("jobs.expiring", for_job(job.job_id))
    event = JobEvent.model_validate_json(message.value)
    assert event.event_id == make_event_id(job.job_id, "expiring", to_ms(expires))
    assert event.data == {"expires_at": rfc3339(expires)}

    # The notifier answers a warning with a second link of the same expiry; should
    # that arm the warning again, the janitor still warns once per expiry.
    second, _ = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, expires_at=expires)

    async def warning_handled():
        due = await table.due(Deadline.WARN, limit=10_000, now=utcnow() + timedelta(days=2))
        return job.job_id not in {item.job_id for item in due}
    await eventually(warning_handled)
    await asyncio.sleep(SEVERAL_TICKS)
    assert len(watcher.matching("jobs.expiring", for_job(job.job_id))) == 1

    move_clock(timedelta(hours=24, minutes=1))

    async def expired():
        current = await table.get(job.job_id)
        return current if current.download_expired_at else None
    after = await eventually(expired)
    assert after.status is S.COMPLETED and after.upscaled_file_path is None
    # The janitor deletes the files after recording the expiry (in a thread): wait
    # for them to go rather than race the deletion.
    await eventually(lambda: not path.parent.exists())
    for link in (token, second):
        async with http.get(f"{gateway.url}/downloads/{link}") as resp:
            assert resp.status == 410
    assert len(watcher.matching("jobs.expiring", for_job(job.job_id))) == 1


async def test_a_janitor_killed_between_recording_an_expiry_and_deleting_the_files_leaves_them_to_the_next(
        janitor, gateway, http, table, storage_dir, move_clock):
    janitor.kill()
    janitor.start(SMI_CRASH_AT="janitor.after_expiry_recorded")
    job = await make_job(table, S.COMPLETED)
    path = storage_dir / job.job_id / "attempt-1" / "upscaled-4x.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(PNG)
    await table.update(job.job_id, {"upscaled_file_path": str(path), "attempts": 1})
    # Expired an hour ago, at real time: the only due download, so the crash is at this one.
    token, _ = await table.issue_download_token(job.job_id, ttl_hours=1, now=utcnow() - timedelta(hours=2))
    assert await asyncio.to_thread(janitor.wait_exit, 90) == 137

    # The expiry is on record before any file goes: the link answers 410 at once
    # (and the notifier refuses a resend: the file path is gone with it).
    recorded = await table.get(job.job_id)
    assert recorded.download_expired_at is not None and recorded.upscaled_file_path is None
    assert path.exists()
    async with http.get(f"{gateway.url}/downloads/{token}") as resp:
        assert resp.status == 410

    janitor.start()
    move_clock(timedelta(minutes=3))  # past the dead janitor's lease on the item
    await eventually(lambda: not (storage_dir / job.job_id).exists(), timeout=60)

    async def released():
        due = await table.due(Deadline.EXPIRE, limit=10_000, now=utcnow() + timedelta(days=2))
        return job.job_id not in {item.job_id for item in due}
    await eventually(released)
    assert (await table.get(job.job_id)).download_expired_at == recorded.download_expired_at


async def test_two_janitors_at_once_abandon_each_due_job_once(janitor, janitor_env, checkout, producer, table,
                                                              stripe_proxy, watcher, move_clock, tmp_path_factory):
    jobs = await asyncio.gather(*[open_job(producer, table) for _ in range(20)])
    job_ids = [job.job_id for job in jobs]
    second = StageProcess("janitor", janitor_env, tmp_path_factory.mktemp("janitor-2-logs")).start()
    try:
        await eventually(lambda: "janitor timers running" in log_text(second), timeout=90)
        move_clock(timedelta(minutes=61))
        for job in jobs:
            await wait_status(table, job.job_id, S.ABANDONED)
        await asyncio.sleep(SEVERAL_TICKS)  # a late duplicate would show by now
        for job in jobs:
            assert len(watcher.matching("jobs.abandoned", for_job(job.job_id))) == 1
            assert len(expire_calls(stripe_proxy, job)) == 1
        split = (abandoned_in_log(janitor, job_ids), abandoned_in_log(second, job_ids))
        print(f"\njobs abandoned by janitor 1 / janitor 2: {split[0]} / {split[1]}")
        assert sum(split) == len(jobs)
    finally:
        second.stop()


async def test_failed_jobs_files_go_after_their_retention_and_emails_after_theirs(
        janitor, producer, table, storage_dir, move_clock):
    failed = await make_job(table, S.FAILED)
    leftovers = storage_dir / failed.job_id
    leftovers.mkdir()
    (leftovers / "upscaled-4x.download").write_bytes(b"partial")
    await producer.send(JOBS_FAILED, failed.job_id, JobEvent.new("failed", failed.job_id, data={"reason": "test"}))

    async def purge_armed():  # the janitor has read jobs.failed
        due = await table.due(Deadline.PURGE, limit=10_000, now=utcnow() + timedelta(days=8))
        return failed.job_id in {item.job_id for item in due}
    await eventually(purge_armed)
    sold = await make_job(table, S.COMPLETED)

    move_clock(timedelta(days=6))
    await asyncio.sleep(SEVERAL_TICKS)
    assert leftovers.exists()

    move_clock(timedelta(days=7, minutes=1))
    await eventually(lambda: not leftovers.exists())
    assert (await table.get(sold.job_id)).email == "buyer@example.com"

    move_clock(timedelta(days=PII_RETENTION_DAYS, minutes=1))

    async def erased():
        return (await table.get(sold.job_id)).email is None
    await eventually(erased)
    assert (await table.get(failed.job_id)).email is None
    after = await table.get(sold.job_id)  # the record stays, for revenue figures
    assert (after.status, after.price_cents) == (S.COMPLETED, sold.price_cents)
