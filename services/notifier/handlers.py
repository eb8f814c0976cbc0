"""Notifier's handlers: the customer emails, and the download tokens they carry.

- ``jobs.completed``: a download token (only its hash is stored; the table arms the
  expiry warning, and the janitor the expiry once it has warned) and the "ready"
  email with its link.
- ``payments.refunds``: the refund email.
- ``jobs.expiring``: a second token with the same expiry (the raw first one is
  stored nowhere, and it keeps working) and the "expires soon" email.
- ``jobs.commands`` ``resend_download``: a new token that revokes the others, the
  expiry pushed out, and the email again.

One email of each kind per job, per expiry warning and per resend command: each
send is recorded as a done marker on the job after it succeeds and checked before
it starts. A redelivery after the record sends nothing; a crash between the send
and the record sends again (at-least-once, never lost), with the same Message-ID.
Redis going away between the two is no crash: the record alone is retried until it
lands, where retrying the whole handling sent the email again.

Raw tokens live only in this process and the email; customer addresses only in
the job table and the email. Neither appears in a log line or an error."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Awaitable, Callable, Protocol

from schemas.events import Command, JobEvent, utcnow
from schemas.job import Job
from schemas.requests import InvalidMessage, parse_message
from schemas.status import JobStatus
from services.notifier import emails, outgoing
from services.notifier.emails import DownloadLink, Letterhead
from smi import metrics
from smi.errors import PermanentError, TransientError
from smi.faults import crash_point
from smi.jobtable import JobNotFound, JobTable
from smi.kafka.handling import SourceMessage, record_effect
from smi.mailer import Outgoing
from smi.settings import Settings

log = logging.getLogger(__name__)


class Sender(Protocol):
    async def send(self, message: Outgoing) -> None: ...


@dataclass(frozen=True)
class NotifierConfig:
    letterhead: Letterhead
    public_base_url: str
    download_ttl_hours: int
    expiry_warning_hours: int

    @classmethod
    def from_settings(cls, settings: Settings) -> NotifierConfig:
        return cls(Letterhead(settings.shop_name, settings.mail_from, settings.reply_to, settings.admin_email),
                   settings.public_base_url, settings.download_ttl_hours, settings.expiry_warning_hours)


class Notifier:
    def __init__(self, table: JobTable, mailer: Sender, config: NotifierConfig, *,
                 clock: Callable[[], datetime] = utcnow,
                 sleep: Callable[[float], Awaitable[object]] = asyncio.sleep):
        self.table = table
        self.mailer = mailer
        self.config = config
        self.clock = clock
        self.sleep = sleep

    # -- jobs.completed -----------------------------------------------------------

    async def on_completed(self, raw: bytes) -> str:
        job = await self._job(parse_message(JobEvent, raw).job_id)
        if job.status is not JobStatus.COMPLETED:
            raise PermanentError(f"job {job.job_id} is {job.status}, not completed: no download to send")

        async def compose() -> Outgoing:
            link = await self._issue(job.job_id, warn_hours=self.config.expiry_warning_hours)
            return outgoing.download_ready(self.config.letterhead, job, link, sent_at=self.clock())
        return await self._send_once(job, "email:ready", compose)

    # -- payments.refunds ---------------------------------------------------------

    async def on_refund(self, raw: bytes) -> str:
        event = parse_message(JobEvent, raw)
        job = await self._job(event.job_id)
        amount = job.refund_amount_cents if job.refund_amount_cents is not None else event.data.get("amount_cents")
        if type(amount) is not int:
            raise PermanentError(f"refund of job {job.job_id} has no amount, on the job or in the event")

        async def compose() -> Outgoing:
            return outgoing.refund_processed(self.config.letterhead, job, amount_cents=amount, sent_at=self.clock())
        return await self._send_once(job, "email:refund", compose)

    # -- jobs.expiring ------------------------------------------------------------

    async def on_expiring(self, raw: bytes) -> str:
        event = parse_message(JobEvent, raw)
        job = await self._job(event.job_id)
        expires_at = job.download_expires_at
        if (job.status is not JobStatus.COMPLETED or expires_at is None or job.download_expired_at is not None
                or expires_at <= self.clock()):
            log.info("job %s: expiry warning for a download that is no longer live; nothing to send", job.job_id)
            return "download not live"
        if _warned_expiry(event) not in (None, expires_at):
            # A resend pushed the expiry out after the janitor warned: not "soon" any more.
            log.info("job %s: expiry warning for an earlier expiry; nothing to send", job.job_id)
            return "stale warning"

        async def compose() -> Outgoing:
            # Same expiry, no revocation: the link of the first email keeps working.
            link = await self._issue(job.job_id, expires_at=expires_at)
            return outgoing.download_expiring(self.config.letterhead, job, link, occurrence=event.event_id,
                                              sent_at=self.clock())
        return await self._send_once(job, f"email:expiring:{event.event_id}", compose)

    # -- jobs.commands ------------------------------------------------------------

    async def on_command(self, message: SourceMessage) -> str:
        command = parse_message(Command, message.value)
        if command.command != "resend_download":
            return "not the notifier's command"  # retry belongs to the processor
        job = await self._job(command.job_id)
        if job.status is not JobStatus.COMPLETED:
            raise PermanentError(f"resend refused: job {job.job_id} is {job.status}, not completed")
        if not job.upscaled_file_path:
            raise PermanentError(f"resend refused: the file of job {job.job_id} is gone (download expired)")
        log.info("job %s: download resend requested by %s", job.job_id, command.requested_by)
        # Once per command message: an operator who asks again sends a new command.
        occurrence = f"{message.partition}-{message.offset}"

        async def compose() -> Outgoing:
            link = await self._issue(job.job_id, warn_hours=self.config.expiry_warning_hours, revoke_others=True)
            return outgoing.download_resent(self.config.letterhead, job, link, occurrence=occurrence,
                                            sent_at=self.clock())
        return await self._send_once(job, f"email:resend:{message.partition}:{message.offset}", compose)

    # -- helpers ------------------------------------------------------------------

    async def _send_once(self, job: Job, marker: str, compose: Callable[[], Awaitable[Outgoing]]) -> str:
        if marker in job.done:  # the job was read by this handling: its markers with it
            log.info("job %s: %s was sent before; not sending it again", job.job_id, marker)
            return "already sent"
        if not job.email:
            raise PermanentError(f"job {job.job_id} has no email address: {marker} not sent")
        message = await compose()
        kind = marker.split(":")[1]
        try:
            await self.mailer.send(message)
        except PermanentError as exc:
            metrics.email(kind, "refused")
            # Nothing is recorded on the job: the dead letter says which job and why,
            # and an operator can resend once the address or server is fixed.
            raise PermanentError(f"job {job.job_id}: {marker} not sent: {exc}") from None
        except TransientError:
            metrics.email(kind, "deferred")
            raise
        metrics.email(kind, "sent")
        # The email is out: an outage now must not have it sent again.
        await record_effect(lambda: self.table.mark_done(job.job_id, marker),
                            what=f"job {job.job_id}: {marker} sent", sleep=self.sleep)
        crash_point("notifier.after_send_recorded")
        # Per email, so DEBUG: an INFO line each was a fifteenth of the stage's CPU; the
        # job's done marker (smi jobs show) and smi_emails_total keep the record.
        log.debug("job %s: %s sent", job.job_id, marker)
        return "sent"

    async def _issue(self, job_id: str, **options: Any) -> DownloadLink:
        token, expires_at = await self.table.issue_download_token(
            job_id, ttl_hours=self.config.download_ttl_hours, now=self.clock(), **options)
        return DownloadLink(emails.download_url(self.config.public_base_url, token), expires_at)

    async def _job(self, job_id: str) -> Job:
        try:
            return await self.table.get(job_id)
        except JobNotFound:
            raise InvalidMessage(f"unknown job {job_id}") from None


def _warned_expiry(event: JobEvent) -> datetime | None:
    """The expiry a ``jobs.expiring`` event warns about, when it names one."""
    value = event.data.get("expires_at")
    if value is None:
        return None
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        raise InvalidMessage(f"jobs.expiring for job {event.job_id}: expires_at is not an RFC 3339 time") from None

