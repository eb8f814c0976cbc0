"""The processor's handling of an upscaler SUCCESS whose creditCost is no amount, and
of a submission whose record meets a Redis outage (services/processor/handlers.py),
against in-memory stand-ins for the job table and Upsampler."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY
from redis import exceptions as redis_errors

from schemas.events import Command, JobEvent, make_event_id
from schemas.job import Job
from schemas.status import Deadline, JobStatus
from schemas.topics import JOBS_COMPLETED, JOBS_FAILED, JOBS_PROCESSING
from schemas.urls import HostAllowList
from services.processor.handlers import Processor, ProcessorConfig
from smi.errors import PermanentError, TransientError
from smi.jobtable import hash_token
from smi.upscalers.base import Submission, UpscalerUnavailable
from tests.support.one_job_table import OneJobTable, Published

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)
QUOTED_CREDITS = 16  # 2000x2000 at 4x (design.md, "Money")
CREDIT_PRICE = 4


def processing_job() -> Job:
    return Job(job_id=JOB_ID, status=JobStatus.PROCESSING, image_url="https://images.example.com/a.png",
               resolution="4x", image_width=2000, image_height=2000, price_cents=384, credits=QUOTED_CREDITS,
               cost_cents=QUOTED_CREDITS * CREDIT_PRICE, upsampler_job_id="local-1", attempts=1,
               processing_started_at=T0, created_at=T0, updated_at=T0)


@pytest.fixture
def setup(tmp_path: Path):
    table, published = OneJobTable(processing_job()), Published()
    config = ProcessorConfig(storage_dir=tmp_path, allow=None, public_base_url="http://127.0.0.1:8080",
                             credit_price_cents=CREDIT_PRICE, poll_after=timedelta(seconds=30),
                             timeout=timedelta(minutes=10), submit_retries=3, max_result_bytes=10 ** 6)
    # The local backend is never called on this path: any object stands for it.
    processor = Processor(table, published, config, local=object(), clock=lambda: T0 + timedelta(minutes=1))
    result = tmp_path / JOB_ID / "upscaled-4x.png"
    result.parent.mkdir()
    result.write_bytes(b"\x89PNG\r\n\x1a\n")
    return processor, table, published, result


def success(result: Path, cost_json: str) -> bytes:
    # Built as text: ``NaN`` and ``Infinity`` are what json.dumps writes for
    # non-finite floats, and Python's parser (like the gateway's) reads them back.
    return (f'{{"job_id": "{JOB_ID}", "id": "local-1", "status": "SUCCESS", "creditCost": {cost_json}, '
            f'"imageUrl": null, "resultPath": {json.dumps(str(result))}}}').encode()


@pytest.mark.parametrize("cost_json", ["NaN", "Infinity", "-Infinity", '"nan"', '"inf"', "-1", "-0.5e3"])
async def test_a_success_whose_credit_cost_is_no_amount_completes_the_job_at_the_quoted_cost(setup, cost_json,
                                                                                          caplog):
    processor, table, published, result = setup
    outcome = await processor.on_upscaler_event(success(result, cost_json))
    assert outcome.startswith("completed")
    [(target, fields)] = table.transitions
    assert target is JobStatus.COMPLETED
    assert fields["upscaled_file_path"] == str(result.resolve())
    # The figure is informational (the customer paid the quote): the quote's stands.
    assert (fields["credits"], fields["cost_cents"]) == (QUOTED_CREDITS, QUOTED_CREDITS * CREDIT_PRICE)
    [(topic, key, _)] = published
    assert (topic, key) == (JOBS_COMPLETED.name, JOB_ID)
    assert any("which is no cost" in r.getMessage() for r in caplog.records), "a warning names the odd cost"


@pytest.mark.parametrize("cost_json,credits", [("2.5", 3), ("0", 0), ("16", 16), ("null", QUOTED_CREDITS)])
async def test_a_success_with_a_real_credit_cost_records_it(setup, cost_json, credits):
    processor, table, published, result = setup
    assert (await processor.on_upscaler_event(success(result, cost_json))).startswith("completed")
    [(_, fields)] = table.transitions
    assert (fields["credits"], fields["cost_cents"]) == (credits, credits * CREDIT_PRICE)


# -- a submission to Upsampler, then Redis away ------------------------------------

class FlakyTable(OneJobTable):
    """transition raises each error of ``failures`` in turn, then applies."""

    def __init__(self, job: Job, failures: list[Exception]):
        super().__init__(job)
        self.failures = list(failures)
        self.transition_calls = 0

    async def transition(self, job_id, target, **options):
        self.transition_calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return await super().transition(job_id, target, **options)


class CountingUpsampler:
    def __init__(self):
        self.submitted: list[str] = []

    async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
        self.submitted.append(callback_url)
        return Submission(id=f"ups-{len(self.submitted)}", status="IN_QUEUE", credit_cost=None)


async def public_address(host: str) -> list[str]:
    return ["93.184.215.14"]


def remote_processor(tmp_path: Path, table, published, upsampler, submits_in_flight: int = 100,
                     **options) -> Processor:
    config = ProcessorConfig(submits_in_flight=submits_in_flight, storage_dir=tmp_path, allow=HostAllowList(),
                             public_base_url="https://shop.example.com",
                             credit_price_cents=CREDIT_PRICE, poll_after=timedelta(seconds=30),
                             timeout=timedelta(minutes=10), submit_retries=3, max_result_bytes=10 ** 6,
                             in_doubt_wait=IN_DOUBT_WAIT)
    return Processor(table, published, config, remote=upsampler, resolver=public_address, clock=lambda: T0, **options)


IN_DOUBT_WAIT = timedelta(minutes=2)


def pending_job() -> Job:
    return Job(job_id=JOB_ID, status=JobStatus.PENDING, image_url="https://images.example.com/a.png",
               resolution="4x", image_width=2000, image_height=2000, price_cents=384, created_at=T0, updated_at=T0)


async def test_redis_away_after_a_submission_records_it_and_never_submits_again(tmp_path: Path):
    table = FlakyTable(pending_job(), [redis_errors.ConnectionError("Connection refused")] * 3
                       + [redis_errors.BusyLoadingError("loading")])
    published, upsampler, slept = Published(), CountingUpsampler(), []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    processor = remote_processor(tmp_path, table, published, upsampler, sleep=sleep)
    outcome = await processor.on_pending(JobEvent.new("pending", JOB_ID, occurred_at=T0).model_dump_json().encode())
    assert outcome.startswith("processing (applied")
    assert len(upsampler.submitted) == 1  # one paid upscale, though its record failed four times
    assert table.transition_calls == 5 and len(slept) == 4
    [(target, fields)] = table.transitions
    assert target is JobStatus.PROCESSING and fields["upsampler_job_id"] == "ups-1"
    # The callback URL submitted carries the token whose hash is recorded.
    token = upsampler.submitted[0].rsplit("/", 1)[1]
    assert fields["callback_token_hash"] == hash_token(token)
    assert [(topic, key) for topic, key, _ in published] == [(JOBS_PROCESSING.name, JOB_ID)]


@pytest.mark.parametrize("status, outcome", [(JobStatus.PROCESSING, "processing: event published again"),
                                             (JobStatus.COMPLETED, "nothing to do: job is completed")])
async def test_a_redelivered_pending_of_a_started_job_announces_processing_again_and_submits_nothing(
        tmp_path: Path, status, outcome):
    # Completed: the Upsampler callback (another topic) finished the job before the
    # redelivery, and the processing event may still be missing (found by chaos).
    job = pending_job().model_copy(update={"status": status, "attempts": 2, "upsampler_job_id": "ups-7",
                                           "processing_started_at": T0})
    table, published, upsampler = OneJobTable(job), Published(), CountingUpsampler()
    processor = remote_processor(tmp_path, table, published, upsampler)
    assert await processor.on_pending(JobEvent.new("pending", JOB_ID, occurred_at=T0).model_dump_json().encode()) \
        == outcome
    assert upsampler.submitted == [] and table.writes == []
    [(topic, key, event)] = published
    assert (topic, key) == (JOBS_PROCESSING.name, JOB_ID)
    # The first announcement's id and moment: a consumer that got it drops this one.
    assert event.event_id == make_event_id(JOB_ID, "processing", 2) and event.occurred_at == T0
    assert event.data == {"upscaler_job_id": "ups-7", "attempt": 2}


# -- a submission in doubt: cut off by a crash before its answer was recorded -------

def upscaler_count(outcome: str) -> float:
    return REGISTRY.get_sample_value("smi_upscaler_requests_total",
                                     {"backend": "upsampler", "outcome": outcome}) or 0.0


def pending_msg() -> bytes:
    return JobEvent.new("pending", JOB_ID, occurred_at=T0).model_dump_json().encode()


async def test_a_submission_in_doubt_is_waited_for_not_made_again(tmp_path: Path):
    started = T0 - timedelta(seconds=30)
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": started, "callback_token_hash": "h1"}))
    published, upsampler = Published(), CountingUpsampler()
    before = upscaler_count("in_doubt")
    outcome = await remote_processor(tmp_path, table, published, upsampler).on_pending(pending_msg())
    assert outcome.startswith("submission in doubt") and upscaler_count("in_doubt") == before + 1
    assert upsampler.submitted == [] and published == [] and table.transitions == []
    # The processor's timer comes back to it once the wait is over.
    assert table.deadlines == [{Deadline.RETRY: started + IN_DOUBT_WAIT}]


async def test_a_submission_in_doubt_that_never_called_back_is_made_again_after_the_wait(tmp_path: Path):
    started = T0 - IN_DOUBT_WAIT
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": started, "callback_token_hash": "h1"}))
    published, upsampler = Published(), CountingUpsampler()
    outcome = await remote_processor(tmp_path, table, published, upsampler).on_pending(pending_msg())
    assert outcome.startswith("processing (applied")
    assert len(upsampler.submitted) == 1
    # A new token, and a new moment of doubt, written before the submission.
    assert table.writes[0] == ("update", {"callback_token_hash": hash_token(upsampler.submitted[0].rsplit("/", 1)[1]),
                                          "submit_started_at": T0})


def upscaler_event(status: str, upscaler_id: str = "ups-orphan") -> bytes:
    return json.dumps({"job_id": JOB_ID, "id": upscaler_id, "status": status, "error": "it broke"}).encode()


async def test_a_callback_for_a_pending_job_adopts_its_upscaler_job(tmp_path: Path):
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": T0, "callback_token_hash": "h1"}))
    published, upsampler = Published(), CountingUpsampler()
    processor = remote_processor(tmp_path, table, published, upsampler)
    before = upscaler_count("adopted")
    assert await processor.on_upscaler_event(upscaler_event("IN_PROGRESS")) == "upscaler reports IN_PROGRESS"
    assert upscaler_count("adopted") == before + 1
    [(target, fields)] = table.transitions
    assert target is JobStatus.PROCESSING
    assert (fields["upsampler_job_id"], fields["attempts"], fields["callback_token_hash"]) == ("ups-orphan", 1, "h1")
    [(topic, _, event)] = published
    # The event id of attempt 1: the in-flight submission's own record, if it comes,
    # is a duplicate of this transition, not a second one.
    assert topic == JOBS_PROCESSING.name and event.event_id == make_event_id(JOB_ID, "processing", 1)
    # Then the redelivered jobs.pending submits nothing.
    assert await processor.on_pending(pending_msg()) == "processing: event published again"
    assert upsampler.submitted == []


async def test_a_failure_from_an_adopted_upscaler_job_fails_the_job(tmp_path: Path):
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": T0}))
    published = Published()
    processor = remote_processor(tmp_path, table, published, CountingUpsampler())
    assert (await processor.on_upscaler_event(upscaler_event("FAILED"))).startswith("failed")
    assert [target for target, _ in table.transitions] == [JobStatus.PROCESSING, JobStatus.FAILED]
    assert [topic for topic, _, _ in published] == [JOBS_PROCESSING.name, JOBS_FAILED.name]


async def test_a_callback_for_a_failed_job_waits_for_the_operator_retry_being_recorded(tmp_path: Path):
    table = OneJobTable(pending_job().model_copy(update={"status": JobStatus.FAILED, "upsampler_job_id": "ups-1"}))
    processor = remote_processor(tmp_path, table, Published(), CountingUpsampler())
    with pytest.raises(TransientError):
        await processor.on_upscaler_event(upscaler_event("SUCCESS", "ups-2"))
    assert table.writes == []


@pytest.mark.parametrize("force, submitted", [(False, 0), (True, 1)])
async def test_an_operator_retry_of_a_job_in_doubt_submits_again_only_when_forced(tmp_path: Path, force, submitted):
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": T0, "callback_token_hash": "h1"}))
    upsampler = CountingUpsampler()
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    command = Command(command="retry", job_id=JOB_ID, requested_by="ops", force=force)
    outcome = await processor.on_command(command.model_dump_json().encode())
    assert len(upsampler.submitted) == submitted
    assert outcome.startswith("processing (applied" if force else "submission in doubt")


async def test_only_so_many_submissions_are_marked_in_doubt_at_once(tmp_path: Path):
    """A crash leaves in doubt only the submissions that were in flight: the marker is
    written once a submission may leave, not while it waits for its turn."""
    release, entered = asyncio.Event(), []

    class HeldUpsampler(CountingUpsampler):
        async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
            entered.append(callback_url)
            await release.wait()
            return await super().submit(image_url, factor, callback_url)

    class FiveJobsTable(OneJobTable):  # stands in for five jobs: no job's mark is another's
        async def update(self, job_id, fields, *, expect_fields=None, **options):
            return await super().update(job_id, fields, **options)

    table = FiveJobsTable(pending_job())
    processor = remote_processor(tmp_path, table, Published(), HeldUpsampler(), submits_in_flight=2)
    starts = [asyncio.ensure_future(processor.start(pending_job())) for _ in range(5)]
    for _ in range(20):
        await asyncio.sleep(0)
    marked = [w for w in table.writes if w[0] == "update" and "submit_started_at" in w[1]]
    assert len(entered) == 2 and len(marked) == 2
    release.set()
    await asyncio.gather(*starts)
    assert len(entered) == 5


# -- a submission that failed: answered with an error, or unanswered ----------------

class FailingUpsampler(CountingUpsampler):
    """Each submit raises ``error`` (after reaching the server, if it is in doubt)."""

    def __init__(self, error: Exception):
        super().__init__()
        self.error = error

    async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
        self.submitted.append(callback_url)
        raise self.error


async def test_a_submission_answered_with_an_error_is_retried_after_a_backoff_and_not_in_doubt(tmp_path: Path):
    table = OneJobTable(pending_job())
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler HTTP 503", retry_after=7))
    outcome = await remote_processor(tmp_path, table, Published(), upsampler).on_pending(pending_msg())
    assert outcome == "retry 1 scheduled"
    assert table.job.submit_started_at is None and table.job.submit_failures == 1
    [deadlines] = table.deadlines
    # Backoff of 2-4 s for a first failure, stretched to the server's Retry-After.
    assert deadlines[Deadline.RETRY] == T0 + timedelta(seconds=7)


async def test_an_unanswered_submission_stays_in_doubt_and_its_callback_is_adopted(tmp_path: Path):
    """A submit that timed out may have been taken (and paid for): the job keeps its
    mark and its token, its retry waits as long as after a crash, and the callback
    of that submission, when it comes, is adopted rather than a second one paid."""
    table = OneJobTable(pending_job())
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler POST timed out", in_doubt=True))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    before = upscaler_count("unanswered")
    assert await processor.on_pending(pending_msg()) == "retry 1 scheduled"
    assert upscaler_count("unanswered") == before + 1
    token = upsampler.submitted[0].rsplit("/", 1)[1]
    assert table.job.submit_started_at == T0 and table.job.callback_token_hash == hash_token(token)
    assert table.deadlines[-1] == {Deadline.RETRY: T0 + IN_DOUBT_WAIT}
    # The redelivered jobs.pending waits too.
    assert (await processor.on_pending(pending_msg())).startswith("submission in doubt")
    assert (await processor.on_upscaler_event(upscaler_event("IN_PROGRESS"))) == "upscaler reports IN_PROGRESS"
    assert table.job.status is JobStatus.PROCESSING and table.job.upsampler_job_id == "ups-orphan"
    assert len(upsampler.submitted) == 1


async def test_an_unanswered_submission_without_a_callback_is_made_again_once_the_wait_is_over(tmp_path: Path):
    now = [T0]
    table = OneJobTable(pending_job())
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler POST timed out", in_doubt=True))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    processor.clock = lambda: now[0]
    await processor.on_pending(pending_msg())
    upsampler.error = UpscalerUnavailable("Upsampler HTTP 502")
    now[0] = T0 + IN_DOUBT_WAIT
    await processor.start(table.job)  # what the timer does with the due retry
    assert len(upsampler.submitted) == 2
    # Answered with an error this time: no longer in doubt, the next retry after a backoff.
    assert table.job.submit_started_at is None and table.job.submit_failures == 2
    assert table.deadlines[-1][Deadline.RETRY] < now[0] + IN_DOUBT_WAIT


def retry_command(force: bool = False) -> bytes:
    return Command(command="retry", job_id=JOB_ID, requested_by="ops", force=force).model_dump_json().encode()


def failed_job() -> Job:
    return pending_job().model_copy(update={"status": JobStatus.FAILED, "attempts": 1, "upsampler_job_id": "ups-0",
                                            "failure_reason": "upscaler failed: it broke", "failed_at": T0})


async def test_an_operator_retry_left_unanswered_is_adopted_from_its_callback_and_not_made_again(tmp_path: Path):
    table = OneJobTable(failed_job())
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler POST timed out", in_doubt=True))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    assert (await processor.on_command(retry_command())).startswith("retry unanswered")
    assert table.job.status is JobStatus.FAILED and table.job.submit_started_at == T0
    # Sent again (an impatient operator, or the command redelivered): refused while in doubt.
    with pytest.raises(PermanentError, match="in doubt"):
        await processor.on_command(retry_command())
    assert len(upsampler.submitted) == 1
    # The retry's callback: the upscale is adopted, the job processing again.
    assert await processor.on_upscaler_event(upscaler_event("IN_PROGRESS")) == "upscaler reports IN_PROGRESS"
    assert table.job.status is JobStatus.PROCESSING and table.job.upsampler_job_id == "ups-orphan"
    assert table.job.attempts == 2


async def test_an_operator_retry_answered_with_an_error_is_not_in_doubt(tmp_path: Path):
    table = OneJobTable(failed_job())
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler HTTP 503"))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    with pytest.raises(TransientError):  # retried inline by the stage, then dead-lettered
        await processor.on_command(retry_command())
    assert table.job.submit_started_at is None
    upsampler.error = UpscalerUnavailable("Upsampler POST timed out", in_doubt=True)
    await processor.on_command(retry_command())  # not refused: the last one was answered
    assert len(upsampler.submitted) == 2


async def test_a_forced_operator_retry_submits_again_while_the_last_is_in_doubt(tmp_path: Path):
    table = OneJobTable(failed_job().model_copy(update={"submit_started_at": T0 - timedelta(seconds=5)}))
    upsampler = CountingUpsampler()
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    assert (await processor.on_command(retry_command(force=True))).startswith("processing (applied")
    assert len(upsampler.submitted) == 1


async def test_a_last_try_left_unanswered_waits_for_its_callback_before_the_job_fails(tmp_path: Path):
    """Retries used up (3 here), and the last one timed out: failing the job now
    would refund it while Upsampler may be upscaling it. It fails when the wait is
    over without a callback; a callback in time is adopted instead."""
    now = [T0]
    table = OneJobTable(pending_job().model_copy(update={"submit_failures": 3}))
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler POST timed out", in_doubt=True))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    processor.clock = lambda: now[0]
    assert await processor.on_pending(pending_msg()) == "last try in doubt: waiting for its callback"
    assert table.job.status is JobStatus.PENDING and table.deadlines[-1] == {Deadline.RETRY: T0 + IN_DOUBT_WAIT}
    now[0] = T0 + IN_DOUBT_WAIT
    outcome = await processor.start(table.job)  # the due retry, no callback having come
    assert outcome.startswith("failed: upscaler unavailable after 4 attempts, the last unanswered")
    assert len(upsampler.submitted) == 1 and table.job.status is JobStatus.FAILED


async def test_a_worker_that_lost_the_job_to_another_while_waiting_for_a_slot_submits_nothing(tmp_path: Path):
    """After a rebalance the old owner of a partition may still hold a message (read
    before, waiting for a submission slot) while the new owner's submission of the
    job is in flight. The old owner's marker must not replace the new owner's token
    (that callback would be refused) nor submit a second time."""
    release = asyncio.Event()

    class HeldUpsampler(CountingUpsampler):
        async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
            await release.wait()
            return await super().submit(image_url, factor, callback_url)

    table = OneJobTable(pending_job())
    read_by_the_old_owner = await table.get(JOB_ID)
    new_owner_upsampler, old_owner_upsampler = HeldUpsampler(), CountingUpsampler()
    new_owner = remote_processor(tmp_path, table, Published(), new_owner_upsampler)
    in_flight = asyncio.ensure_future(new_owner.start(await table.get(JOB_ID)))
    for _ in range(5):
        await asyncio.sleep(0)
    marked = table.job.callback_token_hash
    assert marked is not None
    old_owner = remote_processor(tmp_path, table, Published(), old_owner_upsampler)
    assert (await old_owner.start(read_by_the_old_owner)).startswith("not submitted")
    assert old_owner_upsampler.submitted == [] and table.job.callback_token_hash == marked
    release.set()
    assert (await in_flight).startswith("processing (applied")


async def test_a_redelivered_callback_that_adopted_its_job_announces_processing_again(tmp_path: Path):
    """A worker adopted the upscale from its callback and died before announcing
    processing; the redelivered callback finds the upscaler id already the job's.
    It announces processing again (the adoption's event id) before completing."""
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": T0, "callback_token_hash": "h1"}))
    first = remote_processor(tmp_path, table, Published(), CountingUpsampler())
    assert await first.on_upscaler_event(upscaler_event("IN_PROGRESS")) == "upscaler reports IN_PROGRESS"
    published = Published()
    redelivered = remote_processor(tmp_path, table, published, CountingUpsampler())
    assert (await redelivered.on_upscaler_event(upscaler_event("FAILED"))).startswith("failed")
    assert [(topic, event.event_id) for topic, _, event in published] == [
        (JOBS_PROCESSING.name, make_event_id(JOB_ID, "processing", 1)), (JOBS_FAILED.name, published[1][2].event_id)]


# -- a callback the gateway took while the job was pending ---------------------------

@pytest.mark.parametrize("case", ["wait not over", "wait over", "last try unanswered", "forced retry"])
async def test_a_callback_the_gateway_recorded_is_adopted_not_submitted_again(tmp_path: Path, case):
    """The gateway took a callback of the submission in doubt and recorded the id it
    names; its event is still queued behind others on upscaler.events. The due retry
    (or redelivery, or a forced retry) adopts that upscale at once: no second paid
    upscale when the wait is over, and no failure (and refund) of a last try."""
    started = T0 - (IN_DOUBT_WAIT if case == "wait over" else timedelta(seconds=30))
    job = pending_job().model_copy(update={"submit_started_at": started, "callback_token_hash": "h1",
                                           "callback_upscaler_id": "ups-late",
                                           "submit_failures": 4 if case == "last try unanswered" else 1})
    table, published, upsampler = OneJobTable(job), Published(), CountingUpsampler()
    processor = remote_processor(tmp_path, table, published, upsampler)
    before = upscaler_count("adopted")
    if case == "forced retry":
        command = Command(command="retry", job_id=JOB_ID, requested_by="ops", force=True)
        outcome = await processor.on_command(command.model_dump_json().encode())
    else:
        outcome = await processor.on_pending(pending_msg())
    assert outcome.startswith("adopted upscaler job ups-late: processing (applied")
    assert upsampler.submitted == [] and upscaler_count("adopted") == before + 1
    [(target, fields)] = table.transitions
    assert target is JobStatus.PROCESSING
    assert (fields["upsampler_job_id"], fields["attempts"], fields["callback_token_hash"]) == ("ups-late", 1, "h1")
    # The same transition as the queued event's own adoption: that one is a duplicate.
    [(topic, _, event)] = published
    assert topic == JOBS_PROCESSING.name and event.event_id == make_event_id(JOB_ID, "processing", 1)
    assert await processor.on_upscaler_event(upscaler_event("IN_PROGRESS", "ups-late")) == \
        "upscaler reports IN_PROGRESS"
    assert upsampler.submitted == []


async def test_a_submission_is_not_made_when_the_gateway_took_a_callback_since_the_job_was_read(tmp_path: Path):
    """The job was read before the gateway recorded a callback of its submission in
    doubt (the wait just over): the marker's compare-and-set refuses, and the
    callback's event adopts the upscale instead of a second one being paid for."""
    table = OneJobTable(pending_job().model_copy(update={"submit_started_at": T0 - IN_DOUBT_WAIT,
                                                         "callback_token_hash": "h1"}))
    read_before = await table.get(JOB_ID)
    await table.update(JOB_ID, {"callback_upscaler_id": "ups-late"})  # the gateway's write
    upsampler = CountingUpsampler()
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    assert (await processor.start(read_before)).startswith("not submitted")
    assert upsampler.submitted == [] and table.job.callback_token_hash == "h1"


async def test_a_new_submission_forgets_the_upscaler_id_an_earlier_token_was_called_back_with(tmp_path: Path):
    """A recorded id belongs to the token it came with. A submission with a new token
    (here after an answered error cleared the doubt) drops it, so that a later wait
    of the new submission never adopts the old upscale."""
    table = OneJobTable(pending_job().model_copy(update={"callback_token_hash": "h1",
                                                         "callback_upscaler_id": "ups-old"}))
    upsampler = FailingUpsampler(UpscalerUnavailable("Upsampler POST timed out", in_doubt=True))
    processor = remote_processor(tmp_path, table, Published(), upsampler)
    assert (await processor.on_pending(pending_msg())).startswith("retry 1 scheduled")
    assert len(upsampler.submitted) == 1
    assert table.job.callback_upscaler_id is None and table.job.callback_token_hash != "h1"
