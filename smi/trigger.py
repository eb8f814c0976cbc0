"""`smi stripe trigger <event-type> --job ID`: send a correctly signed Stripe-format
webhook for one job to the gateway, as Stripe's own CLI does for test events."""

from __future__ import annotations

from typing import Any

import aiohttp

from schemas.job import Job
from smi import stripe_webhooks
from smi.ops.jobs import opened_table
from smi.payments import local_id
from smi.settings import Settings

SESSION_EVENTS = ("checkout.session.completed", "checkout.session.async_payment_succeeded",
                  "checkout.session.async_payment_failed", "checkout.session.expired")
EVENT_TYPES = SESSION_EVENTS + ("payment_intent.payment_failed", "charge.refunded")


def build_event(event_type: str, job: Job) -> dict[str, Any]:
    amount = job.price_cents or 0
    payment_intent = job.stripe_payment_intent_id or local_id("pi", job.job_id)
    if event_type in SESSION_EVENTS:
        unpaid = event_type in ("checkout.session.expired", "checkout.session.async_payment_failed")
        return stripe_webhooks.checkout_session_event(
            event_type, job_id=job.job_id, session_id=job.stripe_checkout_session_id or local_id("cs", job.job_id),
            amount_total=amount, payment_intent=payment_intent, payment_status="unpaid" if unpaid else "paid")
    if event_type == "payment_intent.payment_failed":
        return stripe_webhooks.payment_intent_event(event_type, job_id=job.job_id, payment_intent=payment_intent,
                                                    amount=amount)
    if event_type == "charge.refunded":
        return stripe_webhooks.charge_refunded_event(job_id=job.job_id, payment_intent=payment_intent, amount=amount)
    raise ValueError(f"unsupported event type {event_type!r}; one of {', '.join(EVENT_TYPES)}")


async def trigger(settings: Settings, event_type: str, job_id: str, gateway_url: str | None = None) -> tuple[int, str]:
    """Returns the gateway's HTTP status and body. Raises JobNotFound."""
    async with opened_table(settings) as table:
        job = await table.get(job_id)
    body = stripe_webhooks.encode(build_event(event_type, job))
    headers = {"Content-Type": "application/json",
               "Stripe-Signature": stripe_webhooks.sign(body, settings.stripe_webhook_secret)}
    url = (gateway_url or settings.public_base_url).rstrip("/") + "/webhooks/stripe"
    async with aiohttp.ClientSession() as http, http.post(url, data=body, headers=headers) as resp:
        return resp.status, await resp.text()
