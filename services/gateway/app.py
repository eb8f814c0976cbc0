"""The HTTP gateway: routes, and a runner that owns the process's resources."""

from __future__ import annotations

import asyncio
import logging
import signal

import aiohttp
from aiohttp import web
from redis.exceptions import RedisError

from services.gateway import bodies, downloads, pay, public, upsampler_webhook, webhooks
from services.gateway import admin_api, admin_page
from services.gateway.context import CONTEXT, GatewayContext
from services.gateway.ratelimit import FailedAttemptLimiter
from smi.jobtable import open_table
from smi.kafka.producer import EventProducer
from smi.settings import Settings

log = logging.getLogger(__name__)


@web.middleware
async def job_table_unavailable_is_503(request: web.Request, handler) -> web.StreamResponse:
    """Redis away (restarting, failing over): a 503 the client may retry, not a 500.
    Lookups, job status and the shared rate limits all need it."""
    try:
        return await handler(request)
    except RedisError as exc:
        log.warning("%s %s: the job table is unavailable (%s)", request.method, request.rel_url.path.split("/")[1],
                    type(exc).__name__)
        response = bodies.problem(503, "the job table is unavailable, retry later")
        response.headers.update({"Retry-After": "5", "Cache-Control": "no-store"})
        return response


def create_app(ctx: GatewayContext) -> web.Application:
    # aiohttp answers 413 itself past client_max_size; the webhook checks too, so its
    # reply is a JSON error like every other refusal.
    app = web.Application(client_max_size=bodies.MAX_BODY_BYTES, middlewares=[job_table_unavailable_is_503])
    app[CONTEXT] = ctx
    app[downloads.FAILED_LOOKUPS] = FailedAttemptLimiter(ctx.table.redis, "downloads",
                                                         namespace=ctx.table.keys.namespace)
    app.router.add_post("/webhooks/stripe", webhooks.stripe_webhook)
    app.router.add_post("/webhooks/upsampler/{callback_token}", upsampler_webhook.upsampler_webhook)
    app.router.add_get("/downloads/{token}", downloads.download)  # HEAD too
    app.router.add_get("/jobs/{job_id}", public.job_status)
    app.router.add_get("/healthz", public.healthz)
    app.router.add_get("/samples/{name}", public.sample_image)
    app.router.add_get("/metrics", public.metrics)
    if ctx.settings.payments == "local":
        app.router.add_get("/pay/{job_id}", pay.pay_page)
        app.router.add_post("/pay/{job_id}", pay.pay)
    admin_api.register(app)
    admin_page.register(app)
    app.cleanup_ctx.append(_http_client)
    return app


async def _http_client(app: web.Application):
    ctx = app[CONTEXT]
    ctx.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30))
    yield
    await ctx.http.close()


async def start_gateway(settings: Settings) -> tuple[web.AppRunner, GatewayContext]:
    """Start listening; returns the runner (``await runner.cleanup()`` to stop)."""
    table = open_table(settings)
    producer = EventProducer.from_settings(settings, client_id="gateway", request_timeout_ms=10_000)
    ctx = GatewayContext(settings=settings, table=table, producer=producer)
    runner = web.AppRunner(create_app(ctx), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.gateway_host, settings.gateway_port, reuse_port=settings.gateway_reuse_port)
    await site.start()
    if settings.gateway_reuse_port:
        ctx.background.append(asyncio.create_task(_serve_own_metrics(ctx)))
    host, port = runner.addresses[0][:2]
    ctx.self_url = f"http://{'127.0.0.1' if host in ('0.0.0.0', '::') else host}:{port}"
    # The gateway answers (503 for webhooks) even while Kafka is away; the producer
    # connects as soon as the broker is back.
    ctx.background.append(asyncio.create_task(_keep_starting(producer)))
    log.info("gateway listening on %s", ctx.self_url)
    return runner, ctx


async def _serve_own_metrics(ctx: GatewayContext) -> None:
    """While several processes share the gateway port, a scrape of it reaches
    whichever one the kernel picks: each also serves its own /metrics on a port
    of its own (9105 + 100 x (worker - 1), as the stages step theirs)."""
    metrics_only = web.Application()
    metrics_only[CONTEXT] = ctx
    metrics_only.router.add_get("/metrics", public.metrics)
    runner = web.AppRunner(metrics_only, access_log=None)
    await runner.setup()
    port = ctx.settings.metrics_port_for("gateway")
    try:
        await web.TCPSite(runner, ctx.settings.metrics_host, port).start()
        log.info("this worker's metrics on %s:%d", ctx.settings.metrics_host, runner.addresses[0][1])
        await asyncio.Event().wait()
    except OSError as exc:  # the gateway serves on; only its own scrape target is missing
        log.warning("this worker's metrics port %d: %s; scrape the shared port instead", port, exc)
    finally:
        await runner.cleanup()


async def stop_gateway(runner: web.AppRunner, ctx: GatewayContext) -> None:
    for task in ctx.background:
        task.cancel()
    await runner.cleanup()
    await ctx.producer.stop()
    await ctx.table.redis.aclose()


async def _keep_starting(producer: EventProducer) -> None:
    delay = 0.5
    while True:
        try:
            await producer.start()
            return
        except Exception as exc:
            log.warning("Kafka not reachable yet (%s); retrying in %.1fs", type(exc).__name__, delay)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 10.0)


async def serve(settings: Settings) -> None:
    """Until SIGTERM or SIGINT; then requests in flight are answered (a webhook's
    event still reaches Kafka) before the process exits 0."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner, ctx = await start_gateway(settings)
    try:
        await stop.wait()
        log.info("stopping: answering the requests in flight")
    finally:
        await stop_gateway(runner, ctx)
