"""Checkout's handling of a Stripe event whose ``created`` is no moment, and of a
failed job's refund (services/checkout/handlers.py), against an in-memory
stand-in for the job table."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import pytest

from schemas.events import JobEvent, make_event_id
from schemas.job import Job
from schemas.requests import InvalidMessage
from schemas.status import JobStatus
from services.checkout.handlers import MAX_STRIPE_CREATED, Checkout
from smi import stripe_webhooks
from tests.support.one_job_table import OneJobTable, Published

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
T0 = datetime(2025, 1, 2, 3, 4, 5, tzinfo=UTC)


def checkout(status: JobStatus = JobStatus.AWAITING_PAYMENT, **fields) -> tuple[Checkout, OneJobTable, Published]:
    job = Job(job_id=JOB_ID, status=status, image_url="https://images.example.com/a.png", resolution="4x",
              image_width=2000, image_height=2000, price_cents=384, stripe_checkout_session_id="cs_1",
              created_at=T0, updated_at=T0, **fields)
    table, published = OneJobTable(job), Published()
    # Payments are never called on these paths.
    return Checkout(table, None, published, policy=None, markup_percent=500, credit_price_cents=4), table, published


def events(created: int) -> dict[str, dict]:
    return {
        "paid": stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=JOB_ID,
                                                       session_id="cs_1", amount_total=384, created=created),
        "async paid": stripe_webhooks.checkout_session_event("checkout.session.async_payment_succeeded",
                                                             job_id=JOB_ID, session_id="cs_1", amount_total=384,
                                                             created=created),
        "payment failed": stripe_webhooks.payment_intent_event("payment_intent.payment_failed", job_id=JOB_ID,
                                                               payment_intent="pi_1", amount=384, created=created),
        "refunded in the dashboard": stripe_webhooks.charge_refunded_event(job_id=JOB_ID, payment_intent="pi_1",
                                                                           amount=384, created=created),
    }


@pytest.mark.parametrize("created", [10 ** 13, MAX_STRIPE_CREATED + 1, 10 ** 400, -1, -(10 ** 13)],
                         ids=["1e13", "2**33+1", "1e400", "-1", "-1e13"])
@pytest.mark.parametrize("kind", list(events(0)))
async def test_an_event_created_at_no_plausible_moment_is_an_invalid_message_and_changes_nothing(kind, created):
    handler, table, published = checkout()
    raw = json.dumps(events(created)[kind]).encode()
    with pytest.raises(InvalidMessage) as caught:
        await handler.on_payment_event(raw)
    assert "is no plausible moment" in caught.value.reason
    assert len(caught.value.reason) < 300  # a 400-digit number is not quoted whole
    assert table.writes == [] and published == []


@pytest.mark.parametrize("created", [0, 1_700_000_000, MAX_STRIPE_CREATED])
async def test_a_payment_at_a_plausible_moment_is_recorded_at_that_moment(created):
    handler, table, published = checkout()
    raw = json.dumps(events(created)["paid"]).encode()
    assert (await handler.on_payment_event(raw)).startswith("pending")
    [(write, target, fields)] = table.writes
    assert (write, target) == ("transition", JobStatus.PENDING)
    assert fields["paid_at"] == datetime.fromtimestamp(created, UTC)
    [(topic, key, event)] = published
    assert (topic, key, event.occurred_at) == ("jobs.pending", JOB_ID, datetime.fromtimestamp(created, UTC))


def failed_event() -> bytes:
    return JobEvent.new("failed", JOB_ID, data={"reason": "upscaler refused the image"}).model_dump_json().encode()


@pytest.mark.parametrize("payment_status", ["refunded", "paid"])  # refunded by us; in the dashboard
async def test_a_refunded_job_failing_again_publishes_its_refund_and_refunds_nothing(payment_status):
    # payments is None in these handlers: a refund call would raise.
    handler, table, published = checkout(JobStatus.FAILED, payment_status=payment_status, paid_at=T0,
                                         refund_id="re_1", refund_amount_cents=384, refunded_at=T0)
    assert await handler.on_job_failed(failed_event()) == "refunded"
    assert table.writes == []
    [(topic, key, event)] = published
    assert (topic, key, event.event_id) == ("payments.refunds", JOB_ID, make_event_id(JOB_ID, "refunds"))
    assert event.data == {"refund_id": "re_1", "amount_cents": 384}


@pytest.mark.parametrize("fields", [{}, {"payment_status": "unpaid"}, {"payment_status": "paid"}],
                         ids=["no payment", "unpaid", "paid without a time"])
async def test_a_failed_job_that_was_not_paid_is_neither_refunded_nor_announced(fields):
    handler, table, published = checkout(JobStatus.FAILED, **fields)
    assert await handler.on_job_failed(failed_event()) == "not paid: nothing to refund"
    assert table.writes == [] and published == []
