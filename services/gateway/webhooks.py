"""POST /webhooks/stripe: verify, then publish the event verbatim to
``payments.events``, and answer 2xx only once Kafka has acknowledged it. Anything
wrong with the request gets a 4xx and publishes nothing; a broker that cannot take
the event gets a 503, so Stripe retries later and nothing is lost. (A 503 is "not
acknowledged": the producer may still deliver the buffered record once the broker is
back, so the event can land twice -- as Stripe's own duplicate deliveries do; the
checkout stage applies each payment once.)"""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web
from pydantic import ValidationError

from schemas.requests import InvalidMessage, decode_json_object
from schemas.stripe_events import StripeEvent
from schemas.topics import PAYMENTS_EVENTS
from services.gateway.bodies import MAX_BODY_BYTES, BadBody, problem, read_body
from services.gateway.context import CONTEXT
from smi.stripe_webhooks import BadSignature, verify

log = logging.getLogger(__name__)
PUBLISH_TIMEOUT_SECONDS = 15.0


async def stripe_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    try:
        payload = await read_body(request)
    except BadBody as exc:
        return problem(exc.status, exc.message)
    try:
        verify(payload, request.headers.get("Stripe-Signature"), ctx.settings.stripe_webhook_secret)
    except BadSignature as exc:
        ctx.metrics.webhooks.labels("stripe", "bad_signature").inc()
        return problem(400, f"signature: {exc}")
    try:
        event = StripeEvent.model_validate(decode_json_object(payload, max_bytes=MAX_BODY_BYTES))
    except (InvalidMessage, ValidationError) as exc:
        ctx.metrics.webhooks.labels("stripe", "bad_body").inc()
        return problem(400, f"not a Stripe event: {getattr(exc, 'reason', None) or 'missing or mistyped fields'}")
    try:
        key = (event.job_id or event.data.object.id).encode()
    except UnicodeEncodeError:  # a "\ud800" escape: valid JSON, but no Unicode to key the record by
        ctx.metrics.webhooks.labels("stripe", "bad_body").inc()
        return problem(400, "not a Stripe event: its job id is not valid Unicode")
    try:
        await asyncio.wait_for(ctx.producer.send_raw(PAYMENTS_EVENTS.name, key, payload),
                               PUBLISH_TIMEOUT_SECONDS)
    except Exception as exc:  # broker away, timeout, producer not started
        log.warning("could not publish Stripe event %s (%s): %s", event.id, event.type, type(exc).__name__)
        ctx.metrics.webhooks.labels("stripe", "unavailable").inc()
        return problem(503, "event log unavailable, retry later")
    ctx.metrics.webhooks.labels("stripe", "published").inc()
    return web.json_response({"received": True})
