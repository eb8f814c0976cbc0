"""The janitor's handlers: timers that act on due deadlines, and two topics that
trigger or arm them. Plain async code, wired into Faust by services/janitor/app.py.

Every timer step takes its due jobs with ``claim_due`` (atomic, leased), so several
janitor processes share the work and each due item goes to one of them; a janitor
that dies mid-step leaves the item to come due again when its lease runs out, and
every step is idempotent, so the next one finishes it. The deadline sets are sorted
by due time: a pass costs O(due jobs), never a scan of all jobs.

- ABANDON (awaiting_payment past its payment deadline): expire the Stripe session,
  awaiting_payment -> abandoned, ``jobs.abandoned`` once. ``checkout.session.expired``
  on ``payments.events`` runs the same step.
- WARN (the download expires within EXPIRY_WARNING_HOURS): ``jobs.expiring`` once per
  expiry; then the download's EXPIRE item is armed. A download waits in one set at a
  time (WARN, then EXPIRE), which saves Redis an entry per completed job.
- EXPIRE (the download expired): ``download_expired_at`` recorded and the file path
  cleared (compare-and-set on the expiry read, so a resend that lands meanwhile
  wins), then the job's files deleted; the status stays completed.
- PURGE (failed for FAILED_RETENTION_DAYS): the files of the job's failed attempts
  deleted (not those of a retry started meanwhile).
- Customer emails older than PII_RETENTION_DAYS erased (when set).

Retention, and why it works this way:

- Files of failed jobs: a deadline tied to ``failed`` (Deadline.PURGE), set at
  failed_at + retention when ``jobs.failed`` arrives (the processor owns that move,
  the janitor arms the timer). A scan of the failed index by created_at would
  re-read every old failed job on every pass (records are kept for revenue, so that
  set only grows), and a job retried and failed again long after its creation would
  slip behind any cursor. The deadline is exact, and the table drops it when an
  operator retry takes the job out of ``failed``.
- Files of abandoned jobs: there are none. ``abandoned`` is reached only from
  ``awaiting_payment``, before the processor writes anything; a late payment moves
  the job on, and if it then fails its files go as a failed job's.
- Emails: every status qualifies, and a deadline set is tied to one status and
  emptied when the job leaves it, so it cannot carry this. But a job's age never
  changes and jobs are indexed by created_at: a cursor over that index (in Redis,
  shared by all janitors) reads each job once it comes of age, O(due) per pass.

Time comes from the injected clock (smi/clock.py), so tests move it."""

from __future__ import annotations

import asyncio
import logging
import shutil
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from itertools import takewhile
from pathlib import Path
from typing import Awaitable, Callable

from schemas.events import JobEvent, make_event_id, rfc3339, utcnow
from schemas.job import Job, to_ms
from schemas.requests import InvalidMessage, parse_message
from schemas.status import Deadline, JobStatus, Stage
from schemas.stripe_events import StripeEvent
from schemas.topics import JOBS_ABANDONED, JOBS_EXPIRING, TopicSpec
from smi.errors import PermanentError, TransientError
from smi.faults import crash_point
from smi.jobfiles import remove_attempts
from smi.jobtable import JobNotFound, JobTable
from smi.kafka.producer import Publisher
from smi.payments import Payments

log = logging.getLogger(__name__)

SESSION_EXPIRED = "checkout.session.expired"


@dataclass(frozen=True)
class JanitorConfig:
    storage_dir: Path
    expiry_warning: timedelta
    failed_retention: timedelta
    email_retention: timedelta | None  # None: customer emails are kept
    # Due items claimed at a time: small, so janitors running together share a burst.
    batch: int = 5
    # How long a claimed item is held: longer than any one step takes (a Stripe call,
    # a publish), so no second janitor takes it while the first is still at work.
    lease: timedelta = timedelta(minutes=2)


@dataclass
class Handled:
    """What one pass did, for logs and tests."""

    abandoned: int = 0
    warned: int = 0
    expired: int = 0
    purged: int = 0
    emails_erased: int = 0

    def total(self) -> int:
        return sum(getattr(self, f.name) for f in fields(self))


Step = Callable[[Job, datetime], Awaitable[bool]]


class Janitor:
    def __init__(self, table: JobTable, payments: Payments, publish: Publisher, config: JanitorConfig,
                 clock: Callable[[], datetime] = utcnow):
        self.table = table
        self.payments = payments
        self.publish = publish
        self.config = config
        self.clock = clock
        # Beside the table's keys, with its namespace: one cursor per table.
        self.email_cursor_key = f"janitor:{table.keys.namespace}email-cursor"

    # -- timers -------------------------------------------------------------------

    async def tick(self, now: datetime | None = None) -> Handled:
        """One pass over every due set. ``now`` pins the time (tests); by default each
        claim reads the clock, so a long pass never leases from a stale moment."""
        handled = Handled()
        handled.abandoned = await self._each_due(Deadline.ABANDON, self._abandon_due, now)
        handled.warned = await self._each_due(Deadline.WARN, self._warn, now)
        handled.expired = await self._each_due(Deadline.EXPIRE, self._expire, now)
        handled.purged = await self._each_due(Deadline.PURGE, self._purge, now)
        if self.config.email_retention is not None:
            moment = now or self.clock()
            handled.emails_erased = await self._erase_old_emails(moment - self.config.email_retention, moment)
        return handled

    async def _each_due(self, kind: Deadline, step: Step, now: datetime | None) -> int:
        """Claim and handle due items of one set until none are left. Each claim
        leases its items, so the loop ends: nothing is claimed twice in one pass."""
        done = 0
        while True:
            moment = now or self.clock()
            items = await self.table.claim_due(kind, limit=self.config.batch, lease=self.config.lease, now=moment)
            for item in items:
                done += await self._guarded(kind, item.job_id, step, moment)
            if len(items) < self.config.batch:
                return done

    async def _guarded(self, kind: Deadline, job_id: str, step: Step, now: datetime) -> int:
        # One job's failure must not stop the others; its lease brings it back.
        try:
            return int(await step(await self.table.get(job_id), now))
        except JobNotFound:
            await self.table.clear_deadline(job_id, kind)
        except TransientError as exc:
            log.warning("job %s: %s step failed, due again when its lease runs out: %s", job_id, kind, exc)
        except Exception:
            log.exception("job %s: %s step failed, due again when its lease runs out", job_id, kind)
        return 0

    async def _abandon_due(self, job: Job, now: datetime) -> bool:
        return await self.abandon(job, now=now, expire_session=True)

    async def _warn(self, job: Job, now: datetime) -> bool:
        expires = job.download_expires_at
        if (job.status is not JobStatus.COMPLETED or expires is None or job.download_expired_at is not None
                or expires <= now):
            await self._end_warning(job, now)  # no live download to warn about
            return False
        warn_at = expires - self.config.expiry_warning
        if warn_at > now:
            return False  # a resend pushed the expiry out; its new token set the warning anew
        expires_ms = to_ms(expires)
        # One event per expiry: its id and its moment derive from the expiry, so a
        # repeat (a re-claim after a crash) is the same event.
        event = JobEvent.new("expiring", job.job_id, attempt=expires_ms, occurred_at=warn_at,
                             data={"expires_at": rfc3339(expires)})
        await self._publish_once(JOBS_EXPIRING, event, f"expiring:{expires_ms}")
        # A resend may have armed the warning for its new expiry since the claim:
        # that one stays.
        await self._end_warning(job, now)
        return True

    async def _expire(self, job: Job, now: datetime) -> bool:
        """Three steps, each safe to repeat, so a resend (the notifier issues a new
        token and pushes the expiry out) either wins or is refused, never leaving a
        live link to a deleted file:

        1. Compare-and-set: record ``download_expired_at`` and clear
           ``upscaled_file_path``, only while the job is completed, not expired yet,
           and ``download_expires_at`` still holds the expiry read here. A resend
           that landed since the read moved the expiry: nothing is written and its
           new deadline stands (resend wins). From this write on, the gateway
           answers 410 and the notifier refuses a resend: it needs the file path
           (resend loses). The path goes in this same write, not after the
           deletion, because the path is what the notifier checks: kept until
           later, a resend during the deletion would pass that check, and its new
           token would clear ``download_expired_at`` again (issue_token.lua).
           The EXPIRE item stays armed (at its claim's lease end) until step 3.
        2. Delete the files. Everything the processor writes is under
           STORAGE_DIR/<job_id> (smi/jobfiles.py), so a re-claim after a crash
           between 1 and 2 finds the job expired and deletes by the job's
           directory, without the path.
        3. Take the item out of the EXPIRE set (only while it still has this
           claim's lease end)."""
        if job.status is not JobStatus.COMPLETED:
            await self._release(job, Deadline.EXPIRE, now)
            return False
        expired_here = job.download_expired_at is None
        if expired_here:
            if job.download_expires_at and job.download_expires_at > now:
                return False  # a resend pushed the expiry out; its new token set the deadline anew
            recorded = await self.table.update(
                job.job_id, {"download_expired_at": now}, clear=["upscaled_file_path"],
                expect_status=[JobStatus.COMPLETED],
                expect_fields={"download_expires_at": job.download_expires_at, "download_expired_at": None},
                clear_deadlines=[Deadline.WARN], now=now)
            if not recorded:
                # A resend moved the expiry since the read: its token re-armed the
                # deadline for the new expiry; the files stay.
                log.info("job %s: download renewed meanwhile; not expired", job.job_id)
                return False
            crash_point("janitor.after_expiry_recorded")
        # Step 2, and the finish of a step 1 whose janitor died before its deletion.
        await asyncio.to_thread(delete_job_files, self.config.storage_dir, job)
        await self._release(job, Deadline.EXPIRE, now)
        if expired_here:
            log.info("job %s: download expired, files deleted", job.job_id)
        return expired_here

    async def _purge(self, job: Job, now: datetime) -> bool:
        # A failed job never had upscaled_file_path set (that comes with completed):
        # its files are what its processing attempts left. Only attempts up to the
        # one read here are over: an operator retry may have started attempt N+1
        # since the read, and it writes under its own directory, which stays
        # (smi/jobfiles.py says why per-attempt directories, not a marker).
        failed = job.status is JobStatus.FAILED
        if failed:
            await asyncio.to_thread(remove_attempts, self.config.storage_dir, job.job_id, job.attempts)
            log.info("job %s: failed job's files deleted after retention", job.job_id)
        await self._release(job, Deadline.PURGE, now)  # kept if a later failure armed it anew
        return failed

    async def _release(self, job: Job, kind: Deadline, now: datetime) -> None:
        """Take a handled item out of its set, only while it still has the lease end
        its claim (made at ``now``) gave it. Between the claim and this, another
        writer may arm the deadline again (a resend issues a new token and sets the
        warning for its expiry): a plain ZREM would drop that new deadline too."""
        await self.table.clear_deadline(job.job_id, kind, if_due_at=self.table.lease_end(now, self.config.lease))

    async def _end_warning(self, job: Job, now: datetime) -> None:
        """Release a handled WARN item as _release does, and arm the download's
        EXPIRE item, which waits for its warning (lua/end_warning.lua)."""
        await self.table.end_warning(job.job_id, if_due_at=self.table.lease_end(now, self.config.lease))

    async def _erase_old_emails(self, cutoff: datetime, now: datetime) -> int:
        """Erase the email of every job created before ``cutoff``, oldest first, from
        the cursor on. The cursor only passes whole pages of old jobs, so the page
        where the old jobs end is read again next pass (at most ``batch`` jobs, their
        emails gone already). Two janitors may go over the same page: erasing is
        idempotent, and a cursor set back by the slower one costs a page re-read."""
        raw = await self.table.redis.get(self.email_cursor_key)
        cursor = raw.decode() if raw else None
        erased = 0
        while True:
            page = await self.table.get_jobs(None, limit=self.config.batch, order_by="created_at",
                                             descending=False, cursor=cursor)
            old = list(takewhile(lambda job: job.created_at < cutoff, page.jobs))
            for job in old:
                if job.email:
                    await self.table.update(job.job_id, {}, clear=["email"], now=now)
                    erased += 1
            if page.next_cursor is None or len(old) < len(page.jobs):
                return erased
            cursor = page.next_cursor
            await self.table.redis.set(self.email_cursor_key, cursor)

    # -- abandonment (timer and payments.events) ------------------------------------

    async def abandon(self, job: Job, *, now: datetime, expire_session: bool) -> bool:
        """awaiting_payment -> abandoned, and ``jobs.abandoned`` published once. True if
        the job is abandoned (now or before); False if it moved on (paid meanwhile)."""
        if job.status is JobStatus.AWAITING_PAYMENT:
            if expire_session:
                await self._expire_session(job)
            result = await self.table.transition(
                job.job_id, JobStatus.ABANDONED, actor=Stage.JANITOR,
                event_id=make_event_id(job.job_id, "abandoned"), fields={"abandoned_at": now},
                # Leaving awaiting_payment drops the job from the abandon set (the
                # table clears before it sets): put it back under a lease until the
                # event is out, so a janitor that dies in between leaves it due
                # again and the next one publishes.
                deadlines={Deadline.ABANDON: now + self.config.lease}, now=now)
            if result.applied:
                log.info("job %s: abandoned (%s)", job.job_id,
                         "payment deadline passed" if expire_session else "session expired at Stripe")
            crash_point("janitor.after_abandon")
            job = await self.table.get(job.job_id)
        if job.status is not JobStatus.ABANDONED:
            return False
        event = JobEvent.new("abandoned", job.job_id, occurred_at=job.abandoned_at or now)
        await self._publish_once(JOBS_ABANDONED, event, "abandoned")
        await self.table.clear_deadline(job.job_id, Deadline.ABANDON)
        return True

    async def _expire_session(self, job: Job) -> None:
        try:
            await self.payments.expire_session(job)  # idempotency key expire-<job_id>
        except PermanentError as exc:
            # Stripe refuses (4xx) to expire a session that is expired already or
            # complete: it takes no payment any more, or checkout honours the one it took.
            log.info("job %s: checkout session not expired at Stripe: %s", job.job_id, exc)

    async def _publish_once(self, spec: TopicSpec, event: JobEvent, step: str) -> None:
        # Marked after the send: a crash in between sends it again with the same
        # event id (at-least-once, consumers drop the repeat); a later trigger
        # (Stripe's expiry webhook after our own expiry, a re-claim) does not.
        if await self.table.is_done(event.job_id, step):
            return
        await self.publish(spec, event.job_id, event)
        await self.table.mark_done(event.job_id, step)

    # -- payments.events ----------------------------------------------------------

    async def on_payment_event(self, raw: bytes | None) -> str:
        event = parse_message(StripeEvent, raw)
        if event.type != SESSION_EXPIRED:
            return "ignored: type"  # payments are checkout's
        if not event.is_ours:
            return "ignored: not ours"
        if not event.job_id:
            raise InvalidMessage(f"{event.type} {event.id} carries no job id")
        job = await self._job(event.job_id, f"{event.type} {event.id}")
        # Stripe expired the session itself: nothing to ask it.
        abandoned = await self.abandon(job, now=self.clock(), expire_session=False)
        return "abandoned" if abandoned else f"ignored: job was {job.status}"

    # -- jobs.failed --------------------------------------------------------------

    async def on_job_failed(self, raw: bytes | None) -> str:
        event = parse_message(JobEvent, raw)
        job = await self._job(event.job_id, "jobs.failed")
        if job.status is not JobStatus.FAILED:
            return f"ignored: job is {job.status}"  # retried since; the next failure arms it again
        # From the record, not from "now": a redelivered message arms the same moment.
        purge_at = (job.failed_at or event.occurred_at) + self.config.failed_retention
        await self.table.update(job.job_id, {}, expect_status=[JobStatus.FAILED],
                                deadlines={Deadline.PURGE: purge_at}, now=self.clock())
        return "purge armed"

    async def _job(self, job_id: str, what: str) -> Job:
        try:
            return await self.table.get(job_id)
        except JobNotFound:
            raise InvalidMessage(f"{what} names unknown job {job_id}") from None


def delete_job_files(storage_dir: Path, job: Job) -> None:
    """Delete the job's result file and its directory STORAGE_DIR/<job_id>, where
    the processor keeps its files, every attempt's: for a completed job only, a
    status no job leaves, so no attempt can be writing there. Nothing outside
    STORAGE_DIR is touched: a path
    that resolves elsewhere (a symlink, a bad record) is left alone and logged.
    Blocking: run it in a thread."""
    root = storage_dir.resolve()
    if job.upscaled_file_path:
        path = Path(job.upscaled_file_path).resolve()
        if path.is_relative_to(root) and path != root:
            path.unlink(missing_ok=True)
        else:
            log.warning("job %s: file path resolves outside STORAGE_DIR; not deleted", job.job_id)
    job_dir = (root / job.job_id).resolve()
    if job_dir.parent == root:
        shutil.rmtree(job_dir, ignore_errors=True)

