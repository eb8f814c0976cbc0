"""Stripe's webhook signature scheme and Stripe-format events, for the gateway (to
verify) and for the local payment provider, `smi stripe trigger` and tests (to
sign). Header: ``t=<unix>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>``."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import time
from typing import Any

import stripe

from schemas.stripe_events import SOURCE

TOLERANCE_SECONDS = 300


class BadSignature(ValueError):
    pass


def sign(payload: bytes, secret: str, timestamp: int | None = None) -> str:
    t = int(time.time()) if timestamp is None else timestamp
    mac = hmac.new(secret.encode(), f"{t}.".encode() + payload, hashlib.sha256).hexdigest()
    return f"t={t},v1={mac}"


def verify(payload: bytes, header: str | None, secret: str, tolerance: int = TOLERANCE_SECONDS) -> None:
    """stripe-python's own check (constant-time compare, timestamp tolerance).

    Two inputs make stripe-python raise something other than its
    SignatureVerificationError, which would escape as a 500: a body that is not
    UTF-8 (it decodes the body first) and a header with non-ASCII characters
    (``hmac.compare_digest`` refuses to compare them). Neither can carry a valid
    signature: both are refused here."""
    try:
        payload.decode("utf-8")
    except UnicodeDecodeError:
        raise BadSignature("the body is not UTF-8") from None
    if header is not None and not header.isascii():
        raise BadSignature("the Stripe-Signature header is not ASCII")
    try:
        stripe.WebhookSignature.verify_header(payload, header, secret, tolerance)
    except stripe.SignatureVerificationError as exc:
        raise BadSignature(str(exc.user_message or exc)) from None


def _id(prefix: str) -> str:
    return f"{prefix}_{secrets.token_hex(12)}"


def checkout_session_event(event_type: str, *, job_id: str, session_id: str, amount_total: int,
                           payment_intent: str | None = None, payment_status: str = "paid",
                           email: str | None = None, created: int | None = None) -> dict[str, Any]:
    """A ``checkout.session.*`` event as Stripe sends it (the fields we read, and the
    shape around them)."""
    status = "expired" if event_type.endswith("expired") else "complete"
    obj = {
        "id": session_id, "object": "checkout.session", "mode": "payment", "currency": "usd",
        "amount_total": amount_total, "client_reference_id": job_id, "status": status,
        "payment_status": payment_status, "payment_intent": payment_intent,
        "metadata": {"job_id": job_id, "source": SOURCE},
        "customer_details": {"email": email} if email else None,
    }
    return _event(event_type, obj, created)


def payment_intent_event(event_type: str, *, job_id: str, payment_intent: str, amount: int,
                         created: int | None = None) -> dict[str, Any]:
    obj = {"id": payment_intent, "object": "payment_intent", "amount": amount, "currency": "usd",
           "status": "requires_payment_method", "metadata": {"job_id": job_id, "source": SOURCE}}
    return _event(event_type, obj, created)


def charge_refunded_event(*, job_id: str, payment_intent: str, amount: int, refund_id: str | None = None,
                          created: int | None = None) -> dict[str, Any]:
    obj = {"id": _id("ch"), "object": "charge", "amount": amount, "amount_refunded": amount, "currency": "usd",
           "payment_intent": payment_intent, "refunded": True, "metadata": {"job_id": job_id, "source": SOURCE},
           "refunds": {"object": "list", "data": [{"id": refund_id or _id("re"), "amount": amount}]}}
    return _event("charge.refunded", obj, created)


def _event(event_type: str, obj: dict[str, Any], created: int | None) -> dict[str, Any]:
    return {"id": _id("evt"), "object": "event", "api_version": "2024-06-20", "type": event_type,
            "created": int(time.time()) if created is None else created, "livemode": False,
            "pending_webhooks": 1, "request": {"id": None, "idempotency_key": None}, "data": {"object": obj}}


def encode(event: dict[str, Any]) -> bytes:
    return json.dumps(event, separators=(",", ":")).encode()
