"""Payment providers behind one interface (PAYMENTS): Stripe Checkout through
stripe-python's async client, or the built-in local test provider whose pay page
the gateway serves. Every call that moves money carries an idempotency key derived
from the job id, so a retry after a crash never pays or refunds twice."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Protocol

import stripe

from schemas.job import Job
from schemas.stripe_events import SOURCE
from smi.errors import PermanentError, TransientError
from smi.settings import Settings


@dataclass(frozen=True)
class CheckoutSession:
    id: str
    url: str
    expires_at: datetime


@dataclass(frozen=True)
class Refund:
    id: str
    amount_cents: int


class Payments(Protocol):
    async def create_checkout_session(self, job: Job) -> CheckoutSession: ...
    async def refund(self, job: Job) -> Refund: ...
    async def expire_session(self, job: Job) -> None: ...


def session_expiry(job: Job, settings: Settings) -> datetime:
    # From created_at, not "now": a retried create must send the very same
    # parameters, or Stripe answers the reused idempotency key with an error.
    return job.created_at + timedelta(minutes=settings.checkout_session_ttl_minutes)


def product_name(job: Job) -> str:
    return f"High-Resolution Image ({job.resolution})"


def product_description(job: Job) -> str:
    factor = int(job.resolution.rstrip("x"))
    return (f"Upscaled from {job.image_width}×{job.image_height} to "
            f"{job.image_width * factor}×{job.image_height * factor} pixels")


def job_page(settings: Settings, job: Job) -> str:
    return f"{settings.public_base_url.rstrip('/')}/jobs/{job.job_id}"


class StripePayments:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.client = stripe.StripeClient(
            settings.stripe_api_key,
            base_addresses={"api": settings.stripe_api_base},
            http_client=stripe.HTTPXClient(allow_sync_methods=False),
            max_network_retries=0,  # retries are ours, with backoff, so they show in metrics
        )

    async def create_checkout_session(self, job: Job) -> CheckoutSession:
        if job.price_cents is None:
            raise PermanentError(f"job {job.job_id} has no price")
        expires_at = session_expiry(job, self.settings)
        metadata = {"job_id": job.job_id, "source": SOURCE}
        params = {
            "mode": "payment",
            "line_items": [{"quantity": 1, "price_data": {
                "currency": "usd", "unit_amount": job.price_cents,
                "product_data": {"name": product_name(job), "description": product_description(job)}}}],
            "client_reference_id": job.job_id,
            "metadata": metadata,
            "payment_intent_data": {"metadata": metadata},
            "expires_at": int(expires_at.timestamp()),
            "success_url": job.success_url or job_page(self.settings, job),
            "cancel_url": job.cancel_url or job_page(self.settings, job),
        }
        if job.email:
            params["customer_email"] = job.email
        session = await self._call(self.client.v1.checkout.sessions.create_async, params=params,
                                   options={"idempotency_key": f"checkout-{job.job_id}"})
        return CheckoutSession(session.id, session.url, expires_at)

    async def refund(self, job: Job) -> Refund:
        if not job.stripe_payment_intent_id:
            raise PermanentError(f"job {job.job_id} has no payment intent to refund")
        refund = await self._call(self.client.v1.refunds.create_async,
                                  params={"payment_intent": job.stripe_payment_intent_id,
                                          "metadata": {"job_id": job.job_id, "source": SOURCE}},
                                  options={"idempotency_key": f"refund-{job.job_id}"})
        return Refund(refund.id, refund.amount)

    async def expire_session(self, job: Job) -> None:
        if job.stripe_checkout_session_id:
            await self._call(self.client.v1.checkout.sessions.expire_async, job.stripe_checkout_session_id,
                             options={"idempotency_key": f"expire-{job.job_id}"})

    @staticmethod
    async def _call(method, *args, **kwargs):
        try:
            return await method(*args, **kwargs)
        except (stripe.APIConnectionError, stripe.RateLimitError) as exc:
            raise TransientError(f"stripe: {type(exc).__name__}: {exc.user_message or exc}") from exc
        except stripe.StripeError as exc:
            if exc.http_status is not None and exc.http_status >= 500:
                raise TransientError(f"stripe: HTTP {exc.http_status}: {exc.user_message or exc}") from exc
            raise PermanentError(f"stripe: {type(exc).__name__} (HTTP {exc.http_status}): {exc.user_message or exc}") from exc


class LocalPayments:
    """The built-in test provider (like a dummy gateway): no money moves. Its checkout
    URL is the gateway's pay page, which sends a signed Stripe-format webhook."""

    def __init__(self, settings: Settings):
        self.settings = settings

    async def create_checkout_session(self, job: Job) -> CheckoutSession:
        url = f"{self.settings.public_base_url.rstrip('/')}/pay/{job.job_id}"
        return CheckoutSession(local_id("cs", job.job_id), url, session_expiry(job, self.settings))

    async def refund(self, job: Job) -> Refund:
        return Refund(local_id("re", job.job_id), job.price_cents or 0)

    async def expire_session(self, job: Job) -> None:
        return None


def local_id(prefix: str, job_id: str) -> str:
    return f"{prefix}_local_{job_id.replace('-', '')}"


def payments_for(settings: Settings) -> Payments:
    return LocalPayments(settings) if settings.payments == "local" else StripePayments(settings)
