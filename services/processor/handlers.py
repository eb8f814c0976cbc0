"""Processor's handlers: pending -> processing -> completed | failed.

Idempotent under redelivery, crash and restart:
- a submission is recorded (upscaler id, callback token hash, attempt) in the same
  atomic transition that moves the job to ``processing``; a redelivered
  ``jobs.pending`` finds the job past ``pending`` and submits nothing; Redis away
  between the submission and its record is waited out, not a second submission;
- a submission cut off by a crash before its answer was recorded, or left
  unanswered (a timeout, a connection lost after it left), is in doubt
  (``submit_started_at`` set, the job still ``pending``): Upsampler may have taken
  it, and Upsampler has no idempotency key nor a lookup. The redelivery or the
  retry waits for its callback (``in_doubt_wait``) instead of paying for a second
  upscale, and a callback for a pending job adopts the upscaler job it names (from
  its event, or from the id the gateway recorded when it took the callback, should
  the event still be queued); only when none comes is the job submitted again. An
  operator's retry of a failed job is marked the same way;
- a result completes the job once (compare-and-set on ``processing`` and the event
  id); callbacks for an upscaler job that is not the job's current one are ignored;
- transient errors never block the partition: a failed submit is retried from a
  Redis deadline set (``retry``) by the processor's timer, and a job without a
  callback is polled from another (``poll``) until it finishes or times out;
- the local backend upscales and completes in the handling of ``jobs.pending``
  itself; a redelivery finds the result on disk, or the job completed and
  publishes its event again;
- every write comes before its event, so a redelivered ``jobs.pending`` that finds
  the job started (``processing``, or since then completed or failed) publishes
  ``jobs.processing`` again (same event id): the worker that wrote it may have
  died before announcing it.
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta
from functools import partial
from pathlib import Path
from typing import Any, Awaitable, Callable


from schemas.events import Command, JobEvent, UpscalerEvent, utcnow
from schemas.job import Job
from schemas.money import resolution_factor
from schemas.requests import InvalidMessage, parse_message
from schemas.status import Deadline, JobStatus, Stage
from schemas.topics import JOBS_COMPLETED, JOBS_FAILED, JOBS_PROCESSING, UPSCALER_EVENTS
from schemas.urls import HostAllowList, UnsafeURL
from smi import metrics
from smi.errors import PermanentError, TransientError
from smi.faults import crash_point
from smi.fetch import Resolver, SharedImageSession, fetch_to_file, system_resolver, vet_url
from smi.jobfiles import attempt_dir, job_dir
from smi.jobtable import JobNotFound, JobTable, hash_token
from smi.kafka.handling import record_effect
from smi.kafka.producer import Publisher
from smi.upscalers import FAILED, FINAL_STATUSES, SUCCESS, LocalUpscaler, RemoteUpscaler

log = logging.getLogger(__name__)

TIMEOUT_REASON = "upsampler_timeout"


@dataclass(frozen=True)
class ProcessorConfig:
    storage_dir: Path
    allow: HostAllowList
    public_base_url: str
    credit_price_cents: int
    poll_after: timedelta
    timeout: timedelta
    submit_retries: int
    max_result_bytes: int
    in_doubt_wait: timedelta = timedelta(minutes=2)
    # Submissions made at once (UPSAMPLER_SUBMITS_IN_FLIGHT): by default as many as
    # the Upsampler client's connections (aiohttp's default, 100). Each is marked in
    # doubt before it leaves, so a crash leaves only the submissions that held a slot
    # (and those answered, not yet recorded) waiting for a callback; without a limit
    # a batch of 256 pending jobs was marked while most queued for a connection (a
    # chaos run: 166 jobs waited, 1 had reached Upsampler). A slot is held through
    # the marker's Redis write too, so the limit costs throughput against a server
    # that answers at once: the bench's Upsampler path completed 3-15% fewer jobs a
    # second with 100 than the code before, 6-24% fewer with 16, the same with none.
    # Upsampler allows about 60 submissions a minute, so in production the limit is
    # never reached.
    submits_in_flight: int = 100
    tick_batch: int = 100


class Processor:
    def __init__(self, table: JobTable, publish: Publisher, config: ProcessorConfig, *,
                 remote: RemoteUpscaler | None = None, local: LocalUpscaler | None = None,
                 resolver: Resolver = system_resolver, clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        if (remote is None) == (local is None):
            raise ValueError("exactly one upscaler backend: remote (Upsampler) or local")
        self.table = table
        self.publish = publish
        self.config = config
        self.remote = remote
        self.local = local
        self.resolver = resolver
        self.clock = clock
        self.sleep = sleep
        self._submitting = asyncio.Semaphore(config.submits_in_flight)
        # Upsampler results are downloaded through one session: a session per download
        # cost a new client, connector and TCP connection per job.
        self._results_session = SharedImageSession()

    async def close(self) -> None:
        """The result downloads' session and the backend's own (HTTP session, worker
        processes)."""
        await self._results_session.close()
        await (self.remote or self.local).close()

    # -- jobs.pending ---------------------------------------------------------------

    async def on_pending(self, raw: bytes) -> str:
        event = parse_message(JobEvent, raw)
        return await self.start(await self._job(event.job_id))

    async def start(self, job: Job, *, operator_retry: bool = False, resubmit_in_doubt: bool = False) -> str:
        in_doubt = job.status is JobStatus.PENDING and job.submit_started_at is not None and self.remote is not None
        if in_doubt and job.callback_upscaler_id is not None:
            # The gateway took a callback of the submission in doubt: Upsampler has it,
            # forced or not. Its event may still be queued behind others (a restarted
            # worker's timer runs before its consumer has caught up).
            outcome, _ = await self._adopt(job, job.callback_upscaler_id, "recorded by the gateway")
            return outcome
        if in_doubt and not resubmit_in_doubt:
            waited = await self._wait_for_submission_in_doubt(job)
            if waited:
                return waited
            if job.submit_failures > self.config.submit_retries:  # the last try was left unanswered
                return await self._fail(job, f"upscaler unavailable after {job.submit_failures} attempts, "
                                             "the last unanswered and no callback from it")
        if job.status is JobStatus.PENDING or (operator_retry and job.status is JobStatus.FAILED):
            try:
                await vet_url(job.image_url, self.config.allow, self.resolver)
            except UnsafeURL as exc:
                return await self._fail(job, f"image URL rejected: {exc}")
            if self.local is not None:
                return await self._start_local(job)
            return await self._submit(job, operator_retry=operator_retry)
        if job.processing_started_at is not None and job.status in (
                JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED):
            # Redelivered: the worker that moved the job to processing may have died
            # before announcing it, and the job may have moved on since (an Upsampler
            # callback comes on another topic; the chaos run found 7 of 2,000 so).
            # The same event id lets whoever got it drop the repeat.
            await self.publish(JOBS_PROCESSING, job.job_id, _processing_event(
                job.job_id, job.attempts, job.upsampler_job_id, job.processing_started_at))
        if job.status is JobStatus.PROCESSING:
            if self.local is not None:
                return await self._run_local(job)  # the upscale of a crashed worker, redone
            return "processing: event published again"
        if job.status is JobStatus.FAILED or (job.status is JobStatus.COMPLETED and self.local is not None):
            # It may have failed, or (local backend) completed, right here before a
            # crash between the table write and the publish.
            return await self._announce_again(job)
        return f"nothing to do: job is {job.status}"

    async def _submit(self, job: Job, *, operator_retry: bool) -> str:
        token = secrets.token_urlsafe(32)
        callback = f"{self.config.public_base_url.rstrip('/')}/webhooks/upsampler/{token}"
        # Only the marker and the request hold a slot: a submission waiting for its
        # turn is not in doubt yet, and one answered is what a crash may leave in doubt.
        async with self._submitting:
            # The token's hash is stored before the submission: a fast upscaler may call
            # back before the submission is recorded, and the gateway must know the
            # token. The moment marks the submission in doubt until its answer is recorded.
            # Only if no one marked it since the job was read: after a rebalance, the
            # worker that lost the partition may still hold the message, waiting for a
            # slot, while the new owner submits it; its write would replace the new
            # owner's token (that callback then lost) and submit a second time.
            # Nor if the gateway took a callback since: that event adopts the upscale.
            marked_at = self.clock()
            if not await self.table.update(job.job_id, {"callback_token_hash": hash_token(token),
                                                        "submit_started_at": marked_at},
                                           clear=["callback_upscaler_id"],  # named by an earlier token's callback
                                           expect_status=[job.status],
                                           expect_fields={"submit_started_at": job.submit_started_at,
                                                          "callback_upscaler_id": job.callback_upscaler_id}):
                return "not submitted: the job moved on, was submitted or called back, meanwhile"
            crash_point("processor.before_submit")
            try:
                submission = await self.remote.submit(job.image_url, resolution_factor(job.resolution), callback)
            except PermanentError as exc:
                metrics.upscaler_request("upsampler", "refused")
                if operator_retry:  # answered: not in doubt (the job is failed already)
                    await self._clear_doubt(job)
                return await self._fail(job, f"upscaler refused the job: {exc}")
            except TransientError as exc:
                in_doubt = getattr(exc, "in_doubt", False)
                metrics.upscaler_request("upsampler", "unanswered" if in_doubt else "unavailable")
                if not operator_retry:
                    return await self._retry_later(job, exc, in_doubt_since=marked_at if in_doubt else None)
                if in_doubt:
                    # Its callback is adopted if it comes; another retry is refused
                    # until the wait is over, unless forced (on_command).
                    until = self._doubt_ends(marked_at)
                    return f"retry unanswered ({exc}): in doubt until {until.isoformat()}"
                await self._clear_doubt(job)
                raise  # the command is retried inline, then dead-lettered with the reason
        metrics.upscaler_request("upsampler", "accepted")
        crash_point("processor.after_submit")
        # Submitted, and paid for: an outage now must not have the handler submit
        # again (Upsampler takes no idempotency key). Repeating the record is safe:
        # the same event id makes the transition a duplicate and publishes it again.
        outcome, _ = await record_effect(
            lambda: self._to_processing(job, submission.id, callback_token_hash=hash_token(token),
                                        watch_after=self.config.poll_after),
            what=f"job {job.job_id}: submitted as upscaler job {submission.id}", sleep=self.sleep)
        return outcome

    async def _to_processing(self, job: Job, upscaler_id: str, *, callback_token_hash: str | None,
                             watch_after: timedelta) -> tuple[str, Job | None]:
        """Move the job to processing; returns what happened and, when this call
        applied the move, the job as it now is (None otherwise: read it)."""
        attempt = job.attempts + 1
        now = self.clock()
        event = _processing_event(job.job_id, attempt, upscaler_id, now)
        fields: dict[str, Any] = {"upsampler_job_id": upscaler_id, "attempts": attempt, "processing_started_at": now,
                                  "submit_failures": 0, "callback_token_hash": callback_token_hash}
        result = await self.table.transition(job.job_id, JobStatus.PROCESSING, actor=Stage.PROCESSOR,
                                             event_id=event.event_id, fields=fields,
                                             clear=["failure_reason", "failed_at"],
                                             deadlines={Deadline.POLL: now + watch_after})
        if result.outcome == "rejected":
            return f"not started: job is {result.previous}", None
        crash_point("processor.after_processing_write")
        await self.publish(JOBS_PROCESSING, job.job_id, event)
        crash_point("processor.after_processing")
        moved = job.model_copy(update={**fields, "status": JobStatus.PROCESSING, "failure_reason": None,
                                       "failed_at": None}) if result.applied else None
        return f"processing ({result.outcome}, attempt {attempt})", moved

    async def _adopt(self, job: Job, upscaler_id: str, how: str) -> tuple[str, Job]:
        """Move a job whose submission is in doubt (or not recorded yet) to processing
        with the upscaler job its callback named: the gateway found the job by the
        callback token it was given, so the upscale is this job's; adopt it rather
        than pay for another. The submission's own record, if it comes, is the same
        transition (same attempt and event id). Returns what happened and the job."""
        outcome, moved = await self._to_processing(job, upscaler_id, callback_token_hash=job.callback_token_hash,
                                                   watch_after=self.config.poll_after)
        log.info("job %s: adopted upscaler job %s from its callback, %s (%s)", job.job_id, upscaler_id, how, outcome)
        metrics.upscaler_request("upsampler", "adopted")
        return f"adopted upscaler job {upscaler_id}: {outcome}", moved or await self._job(job.job_id)

    def _doubt_ends(self, marked_at: datetime) -> datetime:
        """When a submission marked at ``marked_at`` and not answered is given up on."""
        return marked_at + self.config.in_doubt_wait

    async def _clear_doubt(self, job: Job) -> None:
        await self.table.update(job.job_id, {}, clear=["submit_started_at"], expect_status=[job.status])

    async def _wait_for_submission_in_doubt(self, job: Job) -> str | None:
        """A redelivered jobs.pending (or a due retry) for a job whose submission was
        cut off before its answer was recorded: Upsampler may have taken it. Until
        ``in_doubt_wait`` after it began, the job waits for that submission's callback
        (on_upscaler_event adopts it) under a retry deadline, and this returns what was
        done; after it, None: submit again."""
        resubmit_at = self._doubt_ends(job.submit_started_at)
        if self.clock() >= resubmit_at:
            log.info("job %s: no callback from the submission in doubt; submitting again", job.job_id)
            return None
        await self.table.update(job.job_id, {}, expect_status=[JobStatus.PENDING],
                                deadlines={Deadline.RETRY: resubmit_at})
        metrics.upscaler_request("upsampler", "in_doubt")
        return f"submission in doubt: waiting for its callback until {resubmit_at.isoformat()}"

    async def _retry_later(self, job: Job, exc: TransientError, *, in_doubt_since: datetime | None = None) -> str:
        """Schedule the next submission of a job whose submission failed. Answered
        with an error, it is not in doubt: the mark goes and the retry submits when
        due. Unanswered (``in_doubt_since``: a timeout, a connection lost after the
        request left), Upsampler may have taken it: the mark stays, so its callback
        is adopted, and the retry comes no sooner than the wait after a crash."""
        failures = job.submit_failures + 1
        exhausted = failures > self.config.submit_retries
        if exhausted and in_doubt_since is None:
            return await self._fail(job, f"upscaler unavailable after {failures} attempts: {exc}")
        backoff = min(300.0, 2.0 * 2 ** failures) * (0.5 + random.random() / 2)
        retry_at = self.clock() + timedelta(seconds=max(backoff, getattr(exc, "retry_after", None) or 0.0))
        if in_doubt_since is not None:
            # The last try, too, waits for its callback: the job fails (and is
            # refunded) only when none came (start).
            doubt_ends = self._doubt_ends(in_doubt_since)
            retry_at = doubt_ends if exhausted else max(retry_at, doubt_ends)
        await self.table.update(job.job_id, {"submit_failures": failures},
                                clear=[] if in_doubt_since is not None else ["submit_started_at"],
                                expect_status=[JobStatus.PENDING], deadlines={Deadline.RETRY: retry_at})
        log.info("job %s: upscaler unavailable (%s)%s; %s at %s", job.job_id, exc,
                 ", the submission in doubt" if in_doubt_since is not None else "",
                 "failing unless it calls back" if exhausted else f"retry {failures}", retry_at.isoformat())
        return "last try in doubt: waiting for its callback" if exhausted else f"retry {failures} scheduled"

    # -- the local backend ------------------------------------------------------------

    async def _start_local(self, job: Job) -> str:
        outcome, moved = await self._to_processing(job, f"local-{job.job_id}-{job.attempts + 1}",
                                                   callback_token_hash=None, watch_after=self.config.timeout)
        if not outcome.startswith("processing"):
            return outcome
        return await self._run_local(moved or await self.table.get(job.job_id))

    async def _run_local(self, job: Job) -> str:
        try:
            path = await self.local.upscale(job.job_id, job.image_url, resolution_factor(job.resolution),
                                            attempt=job.attempts)
        except (PermanentError, UnsafeURL) as exc:
            metrics.upscaler_request("local", "refused")
            return await self._fail(job, f"local upscale failed: {exc}")
        metrics.upscaler_request("local", "accepted")
        # Completed here, by the write an Upsampler callback ends with, not through a
        # round trip over upscaler.events: that hop was a third of the stage's work
        # per job. A crash before the write redoes the upscale (the result is found);
        # one after it announces again (start()). No credits: nothing was bought.
        # absolute(), not resolve(): the stage resolves STORAGE_DIR once at start, and
        # resolve() here made five lstat calls a job (5% of the stage's loop); the
        # gateway and the janitor resolve and check the path when they use it.
        completed = await self._record_completed(job, path.absolute(), credits=0, upscaled_url=None)
        return f"upscaled locally, {completed}"

    # -- upscaler.events --------------------------------------------------------------

    async def on_upscaler_event(self, raw: bytes) -> str:
        event = parse_message(UpscalerEvent, raw)
        job = await self._job(event.job_id)
        adopted = False
        if job.upsampler_job_id != event.id:
            if self.remote is not None and (job.status is JobStatus.PENDING or (
                    job.status is JobStatus.FAILED and job.submit_started_at is not None)):
                # From a submission not recorded yet (for a failed job: an operator's
                # retry): one still in flight (the callback beat its answer), or one in
                # doubt after a crash or a timeout.
                _, job = await self._adopt(job, event.id, "from its event")
                adopted = True
                if job.upsampler_job_id != event.id:
                    return "ignored: not the job's current upscaler job"
            elif job.status is JobStatus.FAILED:
                # An operator's retry may be in flight, its mark not yet read: try again shortly.
                raise TransientError(f"upscaler event {event.id} arrived before its submission was recorded")
            else:
                return "ignored: not the job's current upscaler job"
        if (self.remote is not None and not adopted and event.status in FINAL_STATUSES
                and job.processing_started_at is not None
                and job.status in (JobStatus.PROCESSING, JobStatus.COMPLETED, JobStatus.FAILED)):
            # The job may have been adopted by this very event, delivered before to a
            # worker that died between the transition and its announcement (the chaos
            # run found 6 in 2,000 so): announce it again (same event id) before the
            # job moves on. One more publish a remote upscale, against a lost event.
            await self.publish(JOBS_PROCESSING, job.job_id, _processing_event(
                job.job_id, job.attempts, job.upsampler_job_id, job.processing_started_at))
        if job.status in (JobStatus.COMPLETED, JobStatus.FAILED):
            # This very event may have finished the job, and the worker died between
            # the table write and the publish: the redelivery publishes it.
            return await self._announce_again(job)
        if job.status is not JobStatus.PROCESSING:
            return f"ignored: job is {job.status}"
        if event.status == SUCCESS:
            return await self._complete(job, event)
        if event.status == FAILED:
            return await self._fail(job, f"upscaler failed: {event.error or 'no reason given'}")
        return f"upscaler reports {event.status}"

    async def _complete(self, job: Job, event: UpscalerEvent) -> str:
        try:
            path = await self._store_result(job, event)
        except (PermanentError, UnsafeURL) as exc:
            return await self._fail(job, f"result unusable: {exc}")
        return await self._record_completed(job, path, credits=_credits_used(job, event),
                                            upscaled_url=event.image_url)

    async def _record_completed(self, job: Job, path: Path, *, credits: int | None,
                                upscaled_url: str | None) -> str:
        """Move the job to completed with its stored result, then announce it."""
        now = self.clock()
        completed = _completed_event(job, now)
        result = await self.table.transition(job.job_id, JobStatus.COMPLETED, actor=Stage.PROCESSOR,
                                             event_id=completed.event_id, fields={
                                                 "upscaled_file_path": str(path), "upscaled_url": upscaled_url,
                                                 "credits": credits, "completed_at": now,
                                                 "cost_cents": (credits or 0) * self.config.credit_price_cents})
        if result.outcome == "rejected":
            return f"not completed: job is {result.previous}"
        crash_point("processor.after_completed_write")
        await self.publish(JOBS_COMPLETED, job.job_id, completed)
        return f"completed ({result.outcome})"

    async def _store_result(self, job: Job, event: UpscalerEvent) -> Path:
        local_result = (event.model_extra or {}).get("resultPath")
        if local_result:
            path = Path(local_result).resolve()
            if not path.is_relative_to(job_dir(self.config.storage_dir, job.job_id).resolve()) or not path.is_file():
                raise PermanentError("local result is missing or outside the job's storage directory")
            return path
        if not event.image_url:
            raise PermanentError("SUCCESS without an imageUrl")
        # In this attempt's own directory (smi/jobfiles.py): the janitor may be
        # purging an earlier, failed attempt's files right now. absolute(), not
        # resolve(): STORAGE_DIR is resolved once at start (see _run_local).
        directory = attempt_dir(self.config.storage_dir, job.job_id, job.attempts).absolute()
        download = directory / f"upscaled-{job.resolution}.download"
        fetched = await fetch_to_file(event.image_url, download, max_bytes=self.config.max_result_bytes,
                                      allow=self.config.allow, resolver=self.resolver,
                                      session=self._results_session.get(),
                                      durable=True)  # on disk before the job says completed, as the local backend's
        final = directory / f"upscaled-{job.resolution}.{'jpg' if fetched.kind == 'jpeg' else fetched.kind}"
        fetched.path.replace(final)
        return final

    async def _fail(self, job: Job, reason: str, *, deadlines: dict[Deadline, datetime] | None = None) -> str:
        now = self.clock()
        failed = _failed_event(job, reason, now)
        result = await self.table.transition(job.job_id, JobStatus.FAILED, actor=Stage.PROCESSOR,
                                             event_id=failed.event_id, deadlines=deadlines,
                                             fields={"failure_reason": reason, "failed_at": now})
        if result.outcome == "rejected":
            return f"not failed: job is {result.previous}"
        crash_point("processor.after_failed_write")
        log.warning("job %s failed: %s", job.job_id, reason)
        await self.publish(JOBS_FAILED, job.job_id, failed)
        return f"failed: {reason}"

    async def _announce_again(self, job: Job) -> str:
        """Publish the event of the job's final status once more. Every write here
        comes before its publish, so a worker that dies in between leaves a job
        completed or failed that nobody heard of (no email; no refund): the
        redelivered message that led there publishes it. The event id is the
        first one's, so whoever got it already drops the repeat."""
        if job.status is JobStatus.COMPLETED:
            await self.publish(JOBS_COMPLETED, job.job_id, _completed_event(job, job.completed_at))
        elif job.status is JobStatus.FAILED:
            await self.publish(JOBS_FAILED, job.job_id, _failed_event(job, job.failure_reason or "", job.failed_at))
        else:
            return f"ignored: job is {job.status}"
        return f"already {job.status}: event published again"

    # -- jobs.commands ----------------------------------------------------------------

    async def on_command(self, raw: bytes) -> str:
        command = parse_message(Command, raw)
        if command.command != "retry":
            return "not the processor's command"
        job = await self._job(command.job_id)
        if job.status is JobStatus.PENDING:
            # A stuck pending job, kicked again; one whose submission is in doubt keeps
            # waiting for that submission's callback, unless forced.
            return await self.start(job, resubmit_in_doubt=command.force)
        if job.status is not JobStatus.FAILED:
            raise PermanentError(f"retry refused: job {job.job_id} is {job.status}, not failed")
        if job.refund_id and not command.force:
            raise PermanentError(f"retry refused: job {job.job_id} was refunded ({job.refund_id}); "
                                 "send force=true to retry anyway")
        if job.submit_started_at is not None and not command.force:
            until = self._doubt_ends(job.submit_started_at)
            if self.clock() < until:
                raise PermanentError(f"retry refused: job {job.job_id}'s last retry is in doubt (Upsampler may "
                                     f"have taken it) until {until.isoformat()}; send force=true to submit again")
        log.info("job %s: retry requested by %s", job.job_id, command.requested_by)
        return await self.start(job, operator_retry=True)

    # -- timers -----------------------------------------------------------------------

    async def tick(self) -> int:
        """Due submit retries and polls; several processors may tick at once, each
        due item is claimed by one of them. Returns how many items were handled."""
        handled = 0
        lease = timedelta(minutes=2)
        for item in await self.table.claim_due(Deadline.RETRY, limit=self.config.tick_batch, lease=lease):
            handled += await self._guarded(item.job_id, self._retry_submit)
        now = self.clock()
        claimed_until = self.table.lease_end(now, lease)
        for item in await self.table.claim_due(Deadline.POLL, limit=self.config.tick_batch, lease=lease, now=now):
            handled += await self._guarded(item.job_id, partial(self._poll, claimed_until=claimed_until))
        return handled

    async def _guarded(self, job_id: str, step) -> int:
        try:
            await step(await self.table.get(job_id))
            return 1
        except JobNotFound:
            return 0
        except Exception:  # one bad job must not stop the others; its lease brings it back
            log.exception("timer step failed for job %s", job_id)
            return 0

    async def _retry_submit(self, job: Job) -> None:
        if job.status is JobStatus.PENDING:
            await self.start(job)

    async def _poll(self, job: Job, *, claimed_until: datetime) -> None:
        if job.status is JobStatus.FAILED and job.failure_reason == TIMEOUT_REASON:
            # Timed out by a worker that died before publishing (the item was kept):
            # publish, then let the item go.
            await self._announce_again(job)
            await self.table.clear_deadline(job.job_id, Deadline.POLL, if_due_at=claimed_until)
            return
        if job.status is not JobStatus.PROCESSING:
            return
        now = self.clock()
        if job.processing_started_at and now - job.processing_started_at >= self.config.timeout:
            # No message comes back to a timer's step: the transition (which clears
            # the poll set, then sets) puts its item back under the claim's lease until
            # the failure is published, as the janitor does for abandoned jobs.
            await self._fail(job, TIMEOUT_REASON, deadlines={Deadline.POLL: claimed_until})
            await self.table.clear_deadline(job.job_id, Deadline.POLL, if_due_at=claimed_until)
            return
        if self.local is not None:
            await self._run_local(job)
        else:
            try:
                body = await self.remote.status(job.upsampler_job_id)
            except (TransientError, PermanentError) as exc:
                log.info("job %s: status poll failed: %s", job.job_id, exc)
                body = {}
            if body.get("status") in FINAL_STATUSES:
                # The same path as a callback: the event handler completes or fails it.
                await self.publish(UPSCALER_EVENTS, job.job_id, {**body, "job_id": job.job_id})
        await self.table.update(job.job_id, {}, expect_status=[JobStatus.PROCESSING],
                                deadlines={Deadline.POLL: min(now + self.config.poll_after,
                                                              job.processing_started_at + self.config.timeout)
                                           if job.processing_started_at else now + self.config.poll_after})

    async def _job(self, job_id: str) -> Job:
        try:
            return await self.table.get(job_id)
        except JobNotFound:
            raise InvalidMessage(f"unknown job {job_id}") from None


def _processing_event(job_id: str, attempt: int, upscaler_id: str | None, at: datetime | None) -> JobEvent:
    return JobEvent.new("processing", job_id, attempt=attempt, occurred_at=at,
                        data={"upscaler_job_id": upscaler_id, "attempt": attempt})


def _completed_event(job: Job, at: datetime | None) -> JobEvent:
    return JobEvent.new("completed", job.job_id, attempt=job.attempts, occurred_at=at,
                        data={"resolution": job.resolution})


def _failed_event(job: Job, reason: str, at: datetime | None) -> JobEvent:
    return JobEvent.new("failed", job.job_id, attempt=job.attempts, occurred_at=at, data={"reason": reason})


def _credits_used(job: Job, event: UpscalerEvent) -> int | None:
    """The credits the upscaler says the job cost, or the quote's when it names none
    it could have meant. The figure is informational (design.md, "Money"): the price
    was charged from the quote, and cost_cents only feeds the revenue report. So a
    cost that is no amount at all (NaN, infinite, negative; JSON parsers let "nan"
    and ``NaN`` through) counts as unknown, like a missing one, and the job completes:
    refusing the event would leave a paid job, whose result is stored, to time out,
    fail and be refunded over an accounting figure."""
    cost = event.credit_cost
    if cost is None:
        return job.credits
    if not math.isfinite(cost) or cost < 0:
        log.warning("job %s: upscaler %s reported creditCost %r, which is no cost; the quoted credits (%s) are "
                    "recorded instead", job.job_id, event.id, cost, job.credits)
        return job.credits
    return math.ceil(cost)


