"""The local payment provider's checkout page (PAYMENTS=local): the job's image,
resolution and price, and a "Pay (test mode)" button whose POST sends a correctly
signed ``checkout.session.completed`` through POST /webhooks/stripe -- the very
path Stripe's webhooks take."""

from __future__ import annotations

import html

from aiohttp import web

from schemas.money import format_usd
from schemas.status import JobStatus
from services.gateway.context import CONTEXT
from services.gateway.public import job_or_404
from smi.payments import job_page, local_id
from smi.stripe_webhooks import checkout_session_event, encode, sign

PAYABLE = (JobStatus.AWAITING_PAYMENT, JobStatus.ABANDONED)  # a late payment is honoured

PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>Pay (test mode) - {shop}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>body{{font-family:system-ui,sans-serif;max-width:34rem;margin:3rem auto;padding:0 1rem}}
img{{max-width:100%;border:1px solid #ddd}}.price{{font-size:2rem;font-weight:600}}
button{{font-size:1.1rem;padding:.6rem 1.4rem}}.note{{color:#666}}</style></head>
<body><h1>{shop}</h1>
<p class="note">Test mode: no money moves.</p>
<img src="{image_url}" alt="The original image">
<p>{description}</p>
<p class="price">{price}</p>
{action}
</body></html>"""


async def pay_page(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    job = await job_or_404(request)
    factor = int(job.resolution.rstrip("x"))
    if job.status in PAYABLE:
        action = (f'<form method="post"><button type="submit">Pay (test mode)</button></form>'
                  f'<p><a href="{html.escape(job.cancel_url or job_page(ctx.settings, job))}">Cancel</a></p>')
    else:
        action = f"<p>This order is <strong>{html.escape(job.status.value.replace('_', ' '))}</strong>.</p>"
    body = PAGE.format(
        shop=html.escape(ctx.settings.shop_name), image_url=html.escape(job.image_url),
        description=html.escape(f"High-Resolution Image ({job.resolution}): {job.image_width}×{job.image_height} → "
                                f"{job.image_width * factor}×{job.image_height * factor} pixels"),
        price=format_usd(job.price_cents or 0), action=action)
    return web.Response(text=body, content_type="text/html", headers={"Cache-Control": "no-store"})


async def pay(request: web.Request) -> web.Response:
    ctx = request.app[CONTEXT]
    job = await job_or_404(request)
    if job.status not in PAYABLE or not job.stripe_checkout_session_id:
        raise web.HTTPConflict(text=f"job is {job.status.value}, not awaiting payment")
    event = checkout_session_event("checkout.session.completed", job_id=job.job_id,
                                   session_id=job.stripe_checkout_session_id, amount_total=job.price_cents or 0,
                                   payment_intent=local_id("pi", job.job_id))
    payload = encode(event)
    headers = {"Content-Type": "application/json",
               "Stripe-Signature": sign(payload, ctx.settings.stripe_webhook_secret)}
    async with ctx.http.post(f"{ctx.self_url}/webhooks/stripe", data=payload, headers=headers) as resp:
        if resp.status != 200:
            raise web.HTTPServiceUnavailable(text=f"payment could not be recorded ({resp.status}), try again")
    raise web.HTTPSeeOther(job.success_url or job_page(ctx.settings, job))
