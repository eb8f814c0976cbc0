"""The processor with the Upsampler backend, end to end: real checkout, gateway and
processor processes, a faithful fake Upsampler server that really upscales and
calls back through the gateway, real Kafka, Redis and stripe-mock (issue 4)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from PIL import Image

from schemas.events import Command, JobEvent, make_event_id
from schemas.status import JobStatus as S
from schemas.topics import JOBS_COMMANDS, JOBS_PENDING
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, start_stage, wait_status
from tests.e2e.flows import paid_job
from tests.support.fake_upsampler import DEFAULT_API_KEY, FakeUpsampler
from tests.support.image_server import ImageServer
from tests.support.kafka_watch import drained, eventually, for_job

TIMEOUT_SECONDS = 12


@pytest.fixture(scope="module")
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
async def upsampler():
    async with FakeUpsampler() as fake:
        yield fake


@pytest.fixture(scope="module")
async def processor(stage_env, upsampler, tmp_path_factory, checkout, gateway):
    stage = await start_stage("processor", {
        **stage_env, "UPSCALER": "upsampler", "UPSAMPLER_BASE_URL": upsampler.base_url,
        "UPSAMPLER_API_KEY": DEFAULT_API_KEY, "UPSAMPLER_POLL_AFTER_SECONDS": "2",
        "UPSAMPLER_TIMEOUT_MINUTES": str(TIMEOUT_SECONDS / 60), "PROCESSOR_TICK_SECONDS": "0.5",
    }, tmp_path_factory.mktemp("processor-logs"))
    yield stage
    stage.stop()


@pytest.fixture(autouse=True)
def default_script(upsampler):
    upsampler.script(latency=0.05, fail_submits_with=[], outcome="SUCCESS", callback=True, result="normal",
                     callback_first=False, answer_after=0.0)


def submissions_for(upsampler, image_url: str) -> list[dict]:
    return [s for s in upsampler.submissions if (s["body"] or {}).get("input", {}).get("imageUrl") == image_url]


def unique_image(images, w=64, h=48) -> str:
    return f"{images.url}/img/{w}x{h}.png?u={uuid.uuid4().hex[:8]}"


async def test_callback_path_completes_with_a_real_upscaled_file(processor, upsampler, images, producer, table,
                                                                http, gateway, watcher):
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48,
                         resolution="4x")
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    with Image.open(done.upscaled_file_path) as result:
        assert result.size == (256, 192)
    assert (done.credits, done.cost_cents, done.attempts) == (1, 4, 1)
    assert done.upscaled_url and done.completed_at and done.processing_started_at
    [submission] = submissions_for(upsampler, url)
    body = submission["body"]
    assert body["input"] == {"imageUrl": url, "inputImageType": "universal", "upscaleFactor": 4}
    assert body["webhook"].startswith(f"{gateway.url}/webhooks/upsampler/")
    assert done.callback_token_hash and body["webhook"].rsplit("/", 1)[1] not in json.dumps(done.model_dump(mode="json"))
    await watcher.wait_for("jobs.completed", for_job(job.job_id))
    # Announced with the submission's record, and again (the same event id) with the
    # final callback, in case that callback had adopted the job and its worker died
    # before the announcement.
    processing = await watcher.wait_for("jobs.processing", for_job(job.job_id))
    assert {json.loads(p.value)["event_id"] for p in processing} == {make_event_id(job.job_id, "processing", 1)}


async def test_polling_path_completes_a_job_whose_callback_never_comes(processor, upsampler, images, producer, table,
                                                                      http, gateway):
    upsampler.script(callback=False)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    assert upsampler.status_calls.count(done.upsampler_job_id) >= 1
    assert not [c for c in upsampler.callbacks_sent if c["body"]["id"] == done.upsampler_job_id]


async def test_a_job_that_never_finishes_fails_with_upsampler_timeout_and_is_refunded(
        processor, upsampler, images, producer, table, http, gateway, stripe_proxy):
    upsampler.script(latency=600, callback=False)
    job = await paid_job(producer, table, http, gateway, image_url=unique_image(images), image_width=64,
                         image_height=48)
    failed = await wait_status(table, job.job_id, S.FAILED, timeout=TIMEOUT_SECONDS + 30)
    assert failed.failure_reason == "upsampler_timeout"
    refunded = await eventually(lambda: _refund_recorded(table, job.job_id), timeout=30)
    assert refunded.refund_id and refunded.refund_amount_cents  # stripe-mock answers with a fixture amount
    refunds = stripe_proxy.matching("POST", "/v1/refunds", **{"metadata[job_id]": job.job_id})
    assert {r.idempotency_key for r in refunds} == {f"refund-{job.job_id}"}


async def _refund_recorded(table, job_id):
    job = await table.get(job_id)
    return job if job.refund_id else None


async def test_a_500_then_success_is_retried_without_blocking_and_completes(processor, upsampler, images, producer,
                                                                           table, http, gateway):
    upsampler.script(fail_submits_with=[500])
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    await eventually(lambda: submissions_for(upsampler, url), timeout=30)  # the 500
    # While that job waits for its retry, another one goes straight through: the
    # retry is a deadline in Redis, not a sleep in the partition's consumer.
    other_url = unique_image(images)
    other = await paid_job(producer, table, http, gateway, image_url=other_url, image_width=64, image_height=48)
    await wait_status(table, other.job_id, S.COMPLETED, timeout=60)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    assert done.attempts == 1
    answered = [s["answered"] for s in submissions_for(upsampler, url)]
    assert answered == [500, 200]
    assert done.completed_at > (await table.get(other.job_id)).completed_at


async def test_failed_upscale_fails_the_job_and_checkout_refunds_it_once(processor, upsampler, images, producer,
                                                                        table, http, gateway, stripe_proxy, watcher):
    upsampler.script(outcome="FAILED", error="Image format unsupported")
    job = await paid_job(producer, table, http, gateway, image_url=unique_image(images), image_width=64,
                         image_height=48)
    failed = await wait_status(table, job.job_id, S.FAILED, timeout=60)
    assert failed.failure_reason == "upscaler failed: Image format unsupported"
    [message] = await watcher.wait_for("jobs.failed", for_job(job.job_id))
    assert json.loads(message.value)["data"] == {"reason": "upscaler failed: Image format unsupported"}
    await eventually(lambda: _refund_recorded(table, job.job_id), timeout=30)
    await drained(KAFKA, "checkout", ["jobs.failed"], names=KAFKA_NAMES)
    refunds = stripe_proxy.matching("POST", "/v1/refunds", **{"metadata[job_id]": job.job_id})
    assert len(refunds) == 1 and refunds[0].idempotency_key == f"refund-{job.job_id}"


async def test_redelivered_pending_and_duplicate_callbacks_change_nothing(processor, upsampler, images, producer,
                                                                         table, http, gateway, watcher):
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    [submission] = submissions_for(upsampler, url)
    callback = submission["body"]["webhook"]
    body = {"id": done.upsampler_job_id, "status": "SUCCESS", "creditCost": 1,
            "imageUrl": done.upscaled_url}
    for _ in range(3):
        await producer.send(JOBS_PENDING, job.job_id, JobEvent.new("pending", job.job_id))
        async with http.post(callback, json=body) as resp:
            assert resp.status == 200
    await drained(KAFKA, "processor", ["jobs.pending", "upscaler.events"], names=KAFKA_NAMES)
    assert len(submissions_for(upsampler, url)) == 1
    history = await table.history(job.job_id)
    assert [h.target for h in history].count(S.COMPLETED) == 1
    completed = watcher.matching("jobs.completed", for_job(job.job_id))
    assert {json.loads(m.value)["event_id"] for m in completed} == {make_event_id(job.job_id, "completed", 1)}


async def test_killed_after_the_submission_is_recorded_it_completes_once_without_resubmitting(
        processor, upsampler, images, producer, table, http, gateway):
    upsampler.script(latency=3)  # the callback comes while the processor is down
    processor.kill()
    processor.start(SMI_CRASH_AT="processor.after_processing")
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    assert (await table.get(job.job_id)).status is S.PROCESSING
    processor.start()
    await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    assert len(submissions_for(upsampler, url)) == 1


async def test_stopped_while_a_submission_is_unanswered_it_is_never_made_again(
        processor, upsampler, images, producer, table, http, gateway):
    """SIGTERM (a deploy) while Upsampler has accepted a job but not answered yet.
    One worker: its stop waits for the messages in hand (Faust's "wait for
    streams"), so the submission is answered and recorded before it leaves. Two
    workers stopped together: the other's leaving rebalances the group, and Faust
    may then stop without waiting (seen in the scaled-out run), leaving the job
    pending with its submission in doubt. Either way the next owner of jobs.pending
    submits nothing: the job is processing, or it waits for the callback and adopts
    it. Before the in-doubt mark, the cut-off case was submitted again: a second
    paid upscale."""
    upsampler.script(answer_after=5)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    await eventually(lambda: submissions_for(upsampler, url), timeout=60)
    assert submissions_for(upsampler, url)[0]["answered"] is None  # in flight
    await asyncio.to_thread(processor.stop)  # SIGTERM; SIGKILL after 20 s
    left = await table.get(job.job_id)
    if processor.workers == 1:
        assert left.status is S.PROCESSING  # recorded before it left
    else:
        assert left.status is S.PROCESSING or (left.status is S.PENDING and left.submit_started_at is not None)
    upsampler.script(answer_after=0.0)
    processor.start()
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    [submitted] = submissions_for(upsampler, url)
    assert done.upsampler_job_id == submitted["id"]


async def test_killed_before_the_submission_is_answered_it_waits_for_the_callback_and_pays_once(
        processor, upsampler, images, producer, table, http, gateway):
    """SIGKILL right after Upsampler took the job, before the answer was recorded: the
    job stays pending with its submission in doubt. The restarted processor does not
    submit again (a second paid upscale); the callback of the first submission,
    which the gateway knows by its token, completes the job with that upscale."""
    processor.kill()
    processor.start(SMI_CRASH_AT="processor.after_submit", UPSAMPLER_IN_DOUBT_WAIT_SECONDS="120")
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    in_doubt = await table.get(job.job_id)
    assert in_doubt.status is S.PENDING and in_doubt.submit_started_at is not None
    [submitted] = submissions_for(upsampler, url)
    processor.start(UPSAMPLER_IN_DOUBT_WAIT_SECONDS="120")
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    assert len(submissions_for(upsampler, url)) == 1
    assert done.upsampler_job_id == submitted["id"] and done.submit_started_at is None
    assert [h.target for h in await table.history(job.job_id)].count(S.PROCESSING) == 1


async def test_a_callback_taken_while_the_processor_was_down_is_adopted_though_the_wait_is_over(
        processor, upsampler, images, producer, table, http, gateway):
    """SIGKILL right after Upsampler took the job; its callback comes while the
    processor is down, and the gateway records the upscaler id it names. The
    restarted processor's wait is already over, and its jobs.pending may come before
    the callback's event: it adopts the recorded upscale instead of paying again."""
    processor.kill()
    processor.start(SMI_CRASH_AT="processor.after_submit", UPSAMPLER_IN_DOUBT_WAIT_SECONDS="120")
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    [submitted] = submissions_for(upsampler, url)
    async def recorded_callback():
        current = await table.get(job.job_id)
        return current if current.callback_upscaler_id is not None else None
    recorded = await eventually(recorded_callback, timeout=30)
    assert recorded.status is S.PENDING and recorded.callback_upscaler_id == submitted["id"]
    processor.start(UPSAMPLER_IN_DOUBT_WAIT_SECONDS="0.01")
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    assert len(submissions_for(upsampler, url)) == 1
    assert done.upsampler_job_id == submitted["id"] and done.callback_upscaler_id is None
    processor.start()


async def test_killed_before_the_submission_left_it_is_submitted_once_the_wait_is_over(
        processor, upsampler, images, producer, table, http, gateway):
    """SIGKILL after the submission was marked, before it left: Upsampler never saw
    it, so no callback comes. The job waits out the doubt, then is submitted once
    (by the processor's timer) and completes: not stuck, and not paid twice."""
    wait = "15"
    processor.kill()
    processor.start(SMI_CRASH_AT="processor.before_submit", UPSAMPLER_IN_DOUBT_WAIT_SECONDS=wait)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    marked = (await table.get(job.job_id)).submit_started_at
    processor.start(UPSAMPLER_IN_DOUBT_WAIT_SECONDS=wait)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=120)
    [submitted] = submissions_for(upsampler, url)
    # Not before the wait was over (the fake records when each submission came).
    assert submitted["at"] >= marked.timestamp() + float(wait)
    assert done.upsampler_job_id == submitted["id"]


async def test_a_submission_that_timed_out_is_not_made_again_and_its_callback_completes_the_job(
        processor, upsampler, images, producer, table, http, gateway):
    """Upsampler takes the job but answers after the processor gave up waiting (its
    request timeout): the submission may have been paid for, so the job keeps its
    mark and waits for the callback, which completes it. Before, a timeout counted
    as an error answer: the retry (2-4 s later) submitted again, a second paid
    upscale, and the first one's callback met a replaced token."""
    processor.start(UPSAMPLER_REQUEST_TIMEOUT_SECONDS="1", UPSAMPLER_IN_DOUBT_WAIT_SECONDS="120")
    upsampler.script(answer_after=8)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    [submitted] = submissions_for(upsampler, url)
    assert done.upsampler_job_id == submitted["id"]
    upsampler.script(answer_after=0.0)
    processor.start()


@pytest.mark.parametrize("outcome, crash_at, status, topic", [
    ("SUCCESS", "processor.after_completed_write", S.COMPLETED, "jobs.completed"),
    ("FAILED", "processor.after_failed_write", S.FAILED, "jobs.failed"),
])
async def test_killed_between_the_final_write_and_its_event_the_event_is_still_published_once(
        processor, upsampler, images, producer, table, http, gateway, watcher, outcome, crash_at, status, topic):
    """Found by the chaos run: the job was completed in the table, the processor died
    before publishing jobs.completed, and the redelivered callback was ignored, so
    no email was ever sent (for a failure: no refund)."""
    upsampler.script(outcome=outcome, error="it broke")
    processor.kill()
    processor.start(SMI_CRASH_AT=crash_at)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    assert (await table.get(job.job_id)).status is status
    assert not watcher.matching(topic, for_job(job.job_id))  # written, not announced
    processor.start()
    try:
        event_id = make_event_id(job.job_id, status.value, 1)
        await watcher.wait_for(topic, lambda m: for_job(job.job_id)(m) and json.loads(m.value)["event_id"] == event_id,
                               timeout=90)
        await drained(KAFKA, "processor", ["jobs.pending", "upscaler.events"], names=KAFKA_NAMES)
        assert {json.loads(m.value)["event_id"] for m in watcher.matching(topic, for_job(job.job_id))} == {event_id}
        assert [h.target for h in await table.history(job.job_id)].count(status) == 1
        assert len(submissions_for(upsampler, url)) == 1
    finally:
        upsampler.script(outcome="SUCCESS")


async def test_retry_command_is_refused_after_a_refund_unless_forced(processor, upsampler, images, producer, table,
                                                                    http, gateway, watcher):
    upsampler.script(outcome="FAILED", error="temporary glitch")
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    await wait_status(table, job.job_id, S.FAILED, timeout=60)
    await eventually(lambda: _refund_recorded(table, job.job_id), timeout=30)
    upsampler.script(outcome="SUCCESS")

    await producer.send(JOBS_COMMANDS, job.job_id, Command(command="retry", job_id=job.job_id, requested_by="ops"))
    [letter] = await watcher.wait_for("jobs.dead_letter", lambda m: m.key == job.job_id.encode()
                                      and json.loads(m.value)["source_topic"] == "jobs.commands")
    assert "refunded" in json.loads(letter.value)["error"]
    assert (await table.get(job.job_id)).status is S.FAILED

    await producer.send(JOBS_COMMANDS, job.job_id,
                        Command(command="retry", job_id=job.job_id, requested_by="ops", force=True))
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    assert done.attempts == 2 and done.failure_reason is None
    assert [h.target for h in await table.history(job.job_id)][-3:] == [S.FAILED, S.PROCESSING, S.COMPLETED]
    assert len(submissions_for(upsampler, url)) == 2


@pytest.mark.parametrize("image_url,reason", [
    ("http://10.0.0.1/a.png", "not public"),
    ("http://169.254.169.254/latest/meta-data", "not public"),
    ("http://[::1]/a.png", "not public"),
    ("file:///etc/passwd", "scheme"),
    ("gopher://example.com/a", "scheme"),
])
async def test_urls_that_are_not_public_fail_the_job_before_any_request(processor, upsampler, table, producer,
                                                                       image_url, reason):
    from tests.support.jobs import make_job

    # Straight into the table: checkout's own validation would stop these earlier.
    job = await make_job(table, S.PENDING, image_url=image_url)
    before = len(upsampler.submissions)
    await producer.send(JOBS_PENDING, job.job_id, JobEvent.new("pending", job.job_id))
    failed = await wait_status(table, job.job_id, S.FAILED, timeout=30)
    assert reason in failed.failure_reason and failed.failure_reason.startswith("image URL rejected")
    assert len(upsampler.submissions) == before



@pytest.mark.parametrize("result,reason", [("not_image", "not an image"), ("bad_url", "404")])
async def test_an_unusable_result_fails_the_job_with_the_reason(processor, upsampler, images, producer, table, http,
                                                               gateway, result, reason):
    upsampler.script(result=result)
    job = await paid_job(producer, table, http, gateway, image_url=unique_image(images), image_width=64,
                         image_height=48)
    failed = await wait_status(table, job.job_id, S.FAILED, timeout=60)
    assert failed.failure_reason.startswith("result unusable") and reason in failed.failure_reason, \
        failed.failure_reason


async def test_a_callback_that_beats_the_submit_response_is_not_lost(processor, upsampler, images, producer, table,
                                                                    http, gateway):
    upsampler.script(latency=0, callback_first=True)
    url = unique_image(images)
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    [callback] = [c for c in upsampler.callbacks_sent if c["body"]["id"] == done.upsampler_job_id]
    assert callback.get("status") == 200  # the gateway knew the token before the submission returned
    assert done.upsampler_job_id not in upsampler.status_calls  # completed by the callback, not by a poll
