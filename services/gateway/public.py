"""Routes anyone may call: a job's public status and the liveness probe."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path

from aiohttp import web
from prometheus_client import generate_latest

from schemas.job import Job
import smi.demo
from services.gateway.context import CONTEXT
from smi.jobtable import JobNotFound

JOB_ID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
HEALTH_TIMEOUT_SECONDS = 3.0


async def job_or_404(request: web.Request) -> Job:
    job_id = request.match_info["job_id"]
    if not JOB_ID.match(job_id):
        raise web.HTTPNotFound(text="no such job")
    try:
        return await request.app[CONTEXT].table.get(job_id)
    except JobNotFound:
        raise web.HTTPNotFound(text="no such job") from None


async def job_status(request: web.Request) -> web.Response:
    """job_id, status, resolution, created_at: no email, no token (design.md)."""
    job = await job_or_404(request)
    return web.json_response(job.public_view(), headers={"Cache-Control": "no-store"})


async def healthz(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    checks = {}
    for name, probe in (("redis", ctx.table.redis.ping()), ("kafka", ctx.producer.ping())):
        try:
            await asyncio.wait_for(probe, HEALTH_TIMEOUT_SECONDS)
            checks[name] = "ok"
        except Exception as exc:
            checks[name] = f"unavailable: {type(exc).__name__}"
    healthy = all(v == "ok" for v in checks.values())
    return web.json_response({"status": "ok" if healthy else "unavailable", "checks": checks},
                             status=200 if healthy else 503)


SAMPLES_DIR = Path(smi.demo.__file__).parent
SAMPLE_NAME = re.compile(r"^[a-z0-9-]{1,64}\.png$")


async def sample_image(request: web.Request) -> web.StreamResponse:
    """The bundled sample images (`smi demo` orders an upscale of one)."""
    name = request.match_info["name"]
    path = SAMPLES_DIR / name
    if not SAMPLE_NAME.match(name) or not path.is_file():
        raise web.HTTPNotFound(text="no such sample")
    return web.FileResponse(path, headers={"Content-Type": "image/png", "Cache-Control": "public, max-age=3600"})


async def metrics(request: web.Request) -> web.Response:
    body = generate_latest(request.app[CONTEXT].metrics.registry)
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})
