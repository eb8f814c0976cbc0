"""The admin API (design.md, "HTTP gateway"): the CLI's operations over HTTP, for
holders of ADMIN_TOKEN (auth.py). Jobs leave here redacted -- no customer email,
no token hashes, ``has_email`` instead -- like everything operators see.

The helpers below (status parsing, publishing a command, measuring lag) are
shared with the admin page, so both answer alike."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging

from aiohttp import web

from schemas.events import Command
from schemas.status import JobStatus
from services.gateway import auth
from services.gateway.bodies import problem
from services.gateway.context import CONTEXT, GatewayContext
from services.gateway.webhooks import PUBLISH_TIMEOUT_SECONDS
from smi.jobtable import JobNotFound
from smi.ops import commands, jobs, lag, revenue

log = logging.getLogger(__name__)

DEFAULT_LIMIT = 50
# Offsets are read over a window, so an answer takes that long at least.
LAG_WINDOW_SECONDS = 2.0
LAG_TIMEOUT_SECONDS = 20.0


class Unavailable(Exception):
    """Kafka could not take or answer the request; the operator may retry."""


def register(app: web.Application) -> None:
    auth.setup(app)
    app.router.add_get("/admin/jobs", auth.bearer_required(list_jobs))
    app.router.add_get("/admin/jobs/{job_id}", auth.bearer_required(show_job))
    app.router.add_post("/admin/jobs/{job_id}/retry", auth.bearer_required(retry))
    app.router.add_post("/admin/jobs/{job_id}/resend", auth.bearer_required(resend))
    app.router.add_get("/admin/revenue", auth.bearer_required(show_revenue))
    app.router.add_get("/admin/lag", auth.bearer_required(show_lag))


# -- shared with the page ----------------------------------------------------------

def parse_statuses(raw: str) -> list[JobStatus] | None:
    """``"failed,pending"`` -> those statuses; empty -> None (every status)."""
    names = [name.strip() for name in raw.split(",") if name.strip()]
    known = {status.value for status in JobStatus}
    for name in names:
        if name not in known:
            raise ValueError(f"unknown status {name!r}; one of {', '.join(sorted(known))}")
    return [JobStatus(name) for name in names] or None


def parse_limit(raw: str | None, default: int) -> int:
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError:
        raise ValueError(f"limit must be a whole number, got {raw!r}") from None


async def publish_command(ctx: GatewayContext, command: str, job_id: str, *, requested_by: str,
                          force: bool = False) -> Command:
    """Send ``command`` for an existing job; JobNotFound for an unknown one,
    Unavailable when Kafka does not acknowledge in time."""
    await jobs.require_job(ctx.table, job_id)
    try:
        return await asyncio.wait_for(
            commands.send_command(ctx.producer, command, job_id, requested_by=requested_by, force=force),
            PUBLISH_TIMEOUT_SECONDS)
    except Exception as exc:  # broker away, timeout, producer not started yet
        log.warning("could not publish %s for job %s: %s", command, job_id, type(exc).__name__)
        raise Unavailable("event log unavailable, retry later") from exc


async def measure_lag(ctx: GatewayContext) -> list[lag.GroupLag]:
    try:
        return await asyncio.wait_for(lag.measure(ctx.settings.kafka_bootstrap_servers,
                                                  window_seconds=LAG_WINDOW_SECONDS, names=ctx.settings.kafka_names),
                                      LAG_TIMEOUT_SECONDS)
    except Exception as exc:
        log.warning("could not measure consumer lag: %s", type(exc).__name__)
        raise Unavailable("Kafka unavailable, retry later") from exc


# -- routes ------------------------------------------------------------------------

async def list_jobs(request: web.Request) -> web.Response:
    query = request.query
    lookups = [kind for kind in jobs.FIND_BY if kind in query]
    if lookups:
        return await _find_job(request, lookups)
    try:
        page = await jobs.list_jobs(request.app[CONTEXT].table, statuses=parse_statuses(query.get("status", "")),
                                    limit=parse_limit(query.get("limit"), DEFAULT_LIMIT),
                                    order_by=query.get("order_by") or "created_at", cursor=query.get("cursor") or None)
    except ValueError as exc:
        return problem(400, str(exc))
    return web.json_response({"jobs": [job.redacted() for job in page.jobs], "next_cursor": page.next_cursor})


async def _find_job(request: web.Request, lookups: list[str]) -> web.Response:
    """``?checkout_session=`` / ``payment_intent=`` / ``upsampler_job=``: the one job
    that id belongs to, as a listing of one (or none), narrowed by ``status`` too."""
    if len(lookups) > 1:
        return problem(400, f"find by one of {', '.join(jobs.FIND_BY)} at a time, not {', '.join(lookups)}")
    try:
        statuses = parse_statuses(request.query.get("status", ""))
        job = await jobs.find_job(request.app[CONTEXT].table, lookups[0], request.query[lookups[0]])
    except ValueError as exc:
        return problem(400, str(exc))
    except JobNotFound:
        job = None
    found = [job.redacted()] if job and (statuses is None or job.status in statuses) else []
    return web.json_response({"jobs": found, "next_cursor": None})


async def show_job(request: web.Request) -> web.Response:
    try:
        view = await jobs.show_job(request.app[CONTEXT].table, request.match_info["job_id"])
    except JobNotFound:
        return problem(404, "no such job")
    return web.json_response(view)


async def retry(request: web.Request) -> web.Response:
    try:
        force = await _force_flag(request)
    except ValueError as exc:
        return problem(400, str(exc))
    return await _command(request, "retry", force=force)


async def resend(request: web.Request) -> web.Response:
    return await _command(request, "resend_download")


async def show_revenue(request: web.Request) -> web.Response:
    totals = await revenue.revenue(request.app[CONTEXT].table)
    return web.json_response(dataclasses.asdict(totals))


async def show_lag(request: web.Request) -> web.Response:
    try:
        groups = await measure_lag(request.app[CONTEXT])
    except Unavailable as exc:
        return problem(503, str(exc))
    return web.json_response({"groups": [dataclasses.asdict(group) for group in groups]})


async def _command(request: web.Request, command: str, *, force: bool = False) -> web.Response:
    try:
        sent = await publish_command(request.app[CONTEXT], command, request.match_info["job_id"],
                                     requested_by="admin-api", force=force)
    except JobNotFound:
        return problem(404, "no such job")
    except Unavailable as exc:
        return problem(503, str(exc))
    return web.json_response(sent.model_dump(mode="json"), status=202)


async def _force_flag(request: web.Request) -> bool:
    """The optional body ``{"force": true}`` of a retry; no body means False."""
    raw = await request.read()
    if not raw.strip():
        return False
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("body must be JSON") from None
    if not isinstance(body, dict) or set(body) - {"force"} or not isinstance(body.get("force", False), bool):
        raise ValueError('body must be {"force": true|false}')
    return body.get("force", False)
