"""Steps that end-to-end tests share: open a job through checkout, pay it through
the gateway's signed-webhook path."""

from __future__ import annotations

import uuid

from schemas.status import JobStatus
from smi import stripe_webhooks
from tests.support.kafka_watch import eventually
from tests.e2e.conftest import WEBHOOK_SECRET, job_for_request, job_request, publish_request


async def post_webhook(http, gateway, event: dict | bytes, *, secret: str = WEBHOOK_SECRET, timestamp=None,
                       content_type="application/json", signed_body: bytes | None = None):
    body = event if isinstance(event, bytes) else stripe_webhooks.encode(event)
    header = stripe_webhooks.sign(signed_body if signed_body is not None else body, secret, timestamp)
    async with http.post(f"{gateway.url}/webhooks/stripe", data=body,
                         headers={"Content-Type": content_type, "Stripe-Signature": header}) as resp:
        return resp.status, await resp.text()


async def open_job(producer, table, **overrides):
    body = job_request(**overrides)
    await publish_request(producer, body)
    return await job_for_request(table, body["request_id"])


def completed_event(job, payment_intent=None):
    return stripe_webhooks.checkout_session_event(
        "checkout.session.completed", job_id=job.job_id, session_id=job.stripe_checkout_session_id,
        amount_total=job.price_cents, payment_intent=payment_intent or f"pi_{uuid.uuid4().hex[:20]}")


async def paid_job(producer, table, http, gateway, **overrides):
    """A job through checkout and payment: status pending (or later, if a processor runs)."""
    job = await open_job(producer, table, **overrides)
    status, body = await post_webhook(http, gateway, completed_event(job))
    assert status == 200, body
    async def paid():
        current = await table.get(job.job_id)
        return current if current.status is not JobStatus.AWAITING_PAYMENT else None
    return await eventually(paid, timeout=30)
