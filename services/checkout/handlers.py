"""Checkout's handlers: plain async functions of (message) -> side effects, wired
into Faust by services/checkout/app.py. Each is idempotent under redelivery,
crash and restart:

- a job request makes one job (request id, or the message's offset, as the key),
  one checkout session (Stripe idempotency key ``checkout-<job_id>``) and one
  ``awaiting_payment`` event (deterministic event id);
- a payment moves its job to ``pending`` once (compare-and-set + event id);
- a failed paid job is refunded once (idempotency key ``refund-<job_id>``, and the
  refund recorded on the job before ``payments.refunds`` is published).

Order of steps everywhere: table write, then publish. A crash between the two is
repaired by the redelivery, which finds the write done and publishes again with
the same event id; consumers drop the repeat."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Callable

from schemas.events import JobEvent, make_event_id, utcnow
from schemas.job import Job, from_ms, to_ms
from schemas.money import quote
from schemas.requests import InvalidMessage, RequestPolicy, parse_job_request, parse_message
from schemas.status import Deadline, JobStatus, Stage
from schemas.stripe_events import HANDLED_TYPES, StripeEvent
from schemas.topics import JOBS_AWAITING_PAYMENT, JOBS_PENDING, PAYMENTS_REFUNDS
from smi import metrics
from smi.errors import TransientError
from smi.faults import crash_point
from smi.jobtable import JobNotFound, JobTable
from smi.kafka.producer import Publisher
from smi.payments import Payments

log = logging.getLogger(__name__)

PAID_EVENTS = frozenset({"checkout.session.completed", "checkout.session.async_payment_succeeded"})
PAYMENT_FAILED_EVENTS = frozenset({"checkout.session.async_payment_failed", "payment_intent.payment_failed"})


@dataclass(frozen=True)
class Source:
    """Where a message came from: the fallback idempotency key of a request that
    carries no request_id (a redelivered message has the same offset)."""

    topic: str
    partition: int
    offset: int


@dataclass
class Counters:
    ignored_foreign: int = 0
    ignored_type: int = 0


class Checkout:
    def __init__(self, table: JobTable, payments: Payments, publish: Publisher, *,
                 policy: RequestPolicy, markup_percent: int, credit_price_cents: int,
                 clock: Callable[[], datetime] = utcnow):
        self.table = table
        self.payments = payments
        self.publish = publish
        self.policy = policy
        self.markup_percent = markup_percent
        self.credit_price_cents = credit_price_cents
        self.clock = clock
        self.counters = Counters()

    # -- jobs.requested -----------------------------------------------------------

    async def on_job_request(self, raw: bytes, source: Source) -> Job:
        request = parse_job_request(raw, self.policy)
        price = quote(request.image_width, request.image_height, request.resolution,
                      credit_price_cents=self.credit_price_cents, markup_percent=self.markup_percent)
        request_key = request.request_id or f"offset:{source.topic}:{source.partition}:{source.offset}"
        job, created = await self.table.create({
            "image_url": request.image_url, "resolution": request.resolution, "email": request.email,
            "post_id": request.post_id, "attachment_id": request.attachment_id,
            "image_width": request.image_width, "image_height": request.image_height,
            "success_url": request.success_url, "cancel_url": request.cancel_url,
            "price_cents": price.price_cents, "cost_cents": price.cost_cents, "credits": price.credits,
            "markup_percent": price.markup_percent,
        }, request_id=request_key, actor=Stage.CHECKOUT)
        if not created:
            log.info("request %s seen before: job %s (%s)", request_key, job.job_id, job.status)
        if job.status is JobStatus.NEW:
            job = await self._open_checkout(job)
        if job.stripe_checkout_session_id:
            # First time, or a repeat: the same event (same id) is published again so a
            # requester that lost it can recover; consumers drop the duplicate.
            await self.publish(JOBS_AWAITING_PAYMENT, job.job_id, self._awaiting_payment_event(job, request.request_id))
        return job

    async def _open_checkout(self, job: Job) -> Job:
        session = await self.payments.create_checkout_session(job)
        now = self.clock()
        fields = {"stripe_checkout_session_id": session.id, "checkout_url": session.url, "payment_status": "unpaid"}
        result = await self.table.transition(
            job.job_id, JobStatus.AWAITING_PAYMENT, actor=Stage.CHECKOUT,
            event_id=make_event_id(job.job_id, "awaiting_payment"), fields=fields,
            deadlines={Deadline.ABANDON: session.expires_at}, now=now)
        # Per job, so DEBUG: at thousands of jobs a second an INFO line each was a twentieth
        # of the stage's CPU; the history in the table and the metrics keep the record.
        log.debug("job %s: checkout session opened (%s)", job.job_id, result.outcome)
        if result.outcome != "applied":
            return await self.table.get(job.job_id)  # another delivery moved it: read what it is
        # Applied: the job is what was just written, no second read on the hot path.
        return job.model_copy(update={**fields, "status": JobStatus.AWAITING_PAYMENT,
                                      "updated_at": from_ms(to_ms(now))})  # as stored: milliseconds

    @staticmethod
    def _awaiting_payment_event(job: Job, request_id: str | None) -> JobEvent:
        request = None if (request_id or "").startswith("offset:") else request_id
        return JobEvent.new("awaiting_payment", job.job_id, occurred_at=job.created_at, data={
            "request_id": request, "checkout_url": job.checkout_url,
            "checkout_session_id": job.stripe_checkout_session_id, "price_cents": job.price_cents})

    # -- payments.events ----------------------------------------------------------

    async def on_payment_event(self, raw: bytes) -> str:
        """Returns what was done, for logs and tests."""
        event = parse_message(StripeEvent, raw, what="Stripe event")
        if event.type not in HANDLED_TYPES or event.type == "checkout.session.expired":
            self.counters.ignored_type += 1  # expiry belongs to the janitor
            return "ignored: type"
        if not event.is_ours:
            self.counters.ignored_foreign += 1
            return "ignored: not ours"
        if not event.job_id:
            raise InvalidMessage(f"{event.type} {event.id} carries no job id")
        try:
            job = await self.table.get(event.job_id)
        except JobNotFound:
            raise InvalidMessage(f"{event.type} {event.id} names unknown job {event.job_id}") from None

        if event.type in PAID_EVENTS:
            return await self._paid(job, event)
        if event.type in PAYMENT_FAILED_EVENTS:
            await self.table.update(job.job_id, {"payment_status": "failed",
                                                 "payment_failed_at": _moment(event)},
                                    expect_status=[JobStatus.AWAITING_PAYMENT, JobStatus.NEW])
            return "payment failed recorded"
        return await self._refunded_in_dashboard(job, event)

    async def _paid(self, job: Job, event: StripeEvent) -> str:
        obj = event.data.object
        if event.type == "checkout.session.completed" and obj.payment_status != "paid":
            return "ignored: not paid yet"  # an async method (e.g. a bank debit) settles later
        if job.status is JobStatus.NEW:
            # The session exists but its creation is not recorded yet (checkout is
            # between the two steps): try again shortly rather than lose the payment.
            raise TransientError(f"payment for job {job.job_id} arrived before its session was recorded")
        if obj.amount_total is not None and job.price_cents is not None and obj.amount_total != job.price_cents:
            log.warning("job %s: paid %s cents, price was %s", job.job_id, obj.amount_total, job.price_cents)
        paid_at = _moment(event)
        fields: dict[str, Any] = {"payment_status": "paid", "paid_at": paid_at,
                                  "stripe_payment_intent_id": obj.payment_intent_id}
        if not job.email and obj.email:
            fields["email"] = obj.email
        pending = JobEvent.new("pending", job.job_id, occurred_at=paid_at)
        result = await self.table.transition(job.job_id, JobStatus.PENDING, actor=Stage.CHECKOUT,
                                             event_id=pending.event_id, fields=fields)
        if result.outcome == "rejected":
            return f"rejected: job is {result.previous}"
        await self.publish(JOBS_PENDING, job.job_id, pending)
        return f"pending ({result.outcome})"

    async def _refunded_in_dashboard(self, job: Job, event: StripeEvent) -> str:
        obj = event.data.object
        if job.refund_id:
            return "refund already recorded"
        await self.table.update(job.job_id, {"refund_id": obj.first_refund_id or f"dashboard:{obj.id}",
                                             "refund_amount_cents": obj.amount_refunded,
                                             "refunded_at": _moment(event)})
        return "refund recorded"

    # -- jobs.failed --------------------------------------------------------------

    async def on_job_failed(self, raw: bytes) -> str:
        failed = parse_message(JobEvent, raw)
        try:
            job = await self.table.get(failed.job_id)
        except JobNotFound:
            raise InvalidMessage(f"jobs.failed names unknown job {failed.job_id}") from None
        if not job.refund_id:
            # A job refunded already (refund_id set, payment_status "refunded") goes on
            # to the publish below: a crash between the record and the publish left
            # its payments.refunds event, and so the customer's refund email, unsent
            # (found by the chaos run).
            if job.payment_status != "paid" or job.paid_at is None:
                return "not paid: nothing to refund"
            refund = await self.payments.refund(job)  # idempotency key refund-<job_id>
            crash_point("checkout.after_refund")
            metrics.refund()
            await self.table.update(job.job_id, {"refund_id": refund.id, "refund_amount_cents": refund.amount_cents,
                                                 "refunded_at": self.clock(), "payment_status": "refunded"})
            crash_point("checkout.after_refund_recorded")
            job = await self.table.get(job.job_id)
        # Published after the refund is on the job: a redelivery publishes the same
        # event again (same id) and never refunds twice.
        await self.publish(PAYMENTS_REFUNDS, job.job_id, JobEvent.new(
            "refunds", job.job_id, occurred_at=job.refunded_at,
            data={"refund_id": job.refund_id, "amount_cents": job.refund_amount_cents}))
        return "refunded"


# Stripe's ``created`` is Unix seconds. The schema takes any integer (bounding it
# there made the janitor, which never reads it, dead-letter paid events); checkout
# records it, so checkout refuses what is no moment: before the epoch, or past 2**33
# (the year 2242; 10**13 would be the year 318857, beyond what datetime holds).
MAX_STRIPE_CREATED = 2 ** 33


def _moment(event: StripeEvent) -> datetime:
    if not 0 <= event.created <= MAX_STRIPE_CREATED:
        shown = str(event.created)
        if len(shown) > 24:
            shown = f"{shown[:20]}... ({len(shown)} digits)"
        raise InvalidMessage(f"{event.type} {event.id}: created={shown} is no plausible moment "
                             f"(Unix seconds, 0..{MAX_STRIPE_CREATED} expected)")
    return datetime.fromtimestamp(event.created, UTC)
