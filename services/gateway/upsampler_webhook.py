"""POST /webhooks/upsampler/{callback_token}: the Upsampler API signs nothing, so the
per-job secret in the URL is the authentication. The job table holds only its
SHA-256 (``callback_token_hash``). The callback body, plus the job id of the job
the token belongs to, goes to ``upscaler.events``; 200 only once Kafka has
acknowledged it, 503 while it cannot, so the callback is retried, not lost.

A callback for a job still ``pending`` (its submission in doubt, or not answered
yet) also has the upscaler id it names recorded in the job, once published: the
processor then adopts that upscale rather than submit the job again, even while
the event waits behind others on ``upscaler.events``. A job past pending (the
usual case: the submission's answer came first) costs no write."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from typing import Any

from aiohttp import web

from pydantic import ValidationError

from schemas.events import UpscalerEvent
from schemas.job import Job
from schemas.requests import InvalidMessage, decode_json_object
from schemas.status import JobStatus
from schemas.topics import UPSCALER_EVENTS
from services.gateway.context import CONTEXT
from services.gateway.bodies import MAX_BODY_BYTES, BadBody, problem, read_body
from services.gateway.webhooks import PUBLISH_TIMEOUT_SECONDS
from smi.jobtable import JobTable, hash_token

log = logging.getLogger(__name__)
CALLBACK_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,128}")  # URL-safe base64 alphabet


async def read_json_object(request: web.Request) -> dict[str, Any]:
    payload = await read_body(request)
    try:
        body = decode_json_object(payload, max_bytes=MAX_BODY_BYTES)
    except InvalidMessage as exc:
        raise BadBody(400, exc.reason) from None
    try:
        # Re-encoded when published: a "\ud800" escape decodes to a code point UTF-8
        # cannot encode, and would fail the publish (a 503 the caller retries forever).
        json.dumps(body, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise BadBody(400, "body holds a lone surrogate escape: not valid Unicode") from None
    return body


async def upsampler_webhook(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    outcomes = ctx.metrics.webhooks
    token = request.match_info["callback_token"]
    # The token is checked before the body is read: a caller without one learns nothing.
    job = (await ctx.table.find_by("callback_token", hash_token(token))
           if CALLBACK_TOKEN.fullmatch(token) else None)
    if job is None:
        outcomes.labels("upsampler", "unknown_token").inc()
        return problem(404, "no such callback")
    try:
        body = await read_json_object(request)
    except BadBody as exc:
        outcomes.labels("upsampler", "bad_body").inc()
        return problem(exc.status, exc.message)
    # The job is the one the token names, whatever the body claims.
    event = {**body, "job_id": job.job_id}
    try:
        await asyncio.wait_for(ctx.producer.send(UPSCALER_EVENTS, job.job_id, event), PUBLISH_TIMEOUT_SECONDS)
    except Exception as exc:  # broker away, timeout, producer not started
        log.warning("could not publish the Upsampler callback for job %s: %s", job.job_id, type(exc).__name__)
        outcomes.labels("upsampler", "unavailable").inc()
        return problem(503, "event log unavailable, retry later")
    outcomes.labels("upsampler", "published").inc()
    if job.status is JobStatus.PENDING:
        result = await record_callback(ctx.table, job, event)
        ctx.metrics.callbacks_recorded.labels(result).inc()
    return web.json_response({"received": True})


async def record_callback(table: JobTable, job: Job, event: dict[str, Any]) -> str:
    """Record the upscaler id the callback names in its pending job, only while the
    job is pending and holds the token this callback came with (a submission made
    since has a new token, and its own callback). Best effort: the event is in
    Kafka, and its consumer adopts the upscale too. Returns what became of it."""
    try:
        upscaler_id = UpscalerEvent.model_validate(event).id
    except ValidationError:
        return "unreadable"  # the processor dead-letters the event with the reason
    try:
        written = await table.update(job.job_id, {"callback_upscaler_id": upscaler_id},
                                     expect_status=[JobStatus.PENDING],
                                     expect_fields={"callback_token_hash": job.callback_token_hash})
    except Exception as exc:  # Redis away: the published event still adopts it
        log.warning("could not record the Upsampler callback for job %s: %s", job.job_id, type(exc).__name__)
        return "error"
    # Not written: the job left pending (the submission's answer was recorded
    # meanwhile) or was submitted again with a new token.
    return "recorded" if written else "moved_on"
