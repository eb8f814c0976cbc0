"""The money path end to end: real checkout and gateway processes, Kafka, Redis and
stripe-mock behind a recording proxy (issue 3)."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections import Counter
from datetime import timedelta

import aiohttp

from schemas.events import JobEvent, make_event_id
from schemas.status import JobStatus as S, Stage
from schemas.topics import JOBS_FAILED
from smi import stripe_webhooks
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, job_for_request, job_request, publish_request, wait_status
from tests.e2e.flows import completed_event, open_job, post_webhook
from tests.support.kafka_watch import drained, eventually, for_job


async def test_request_opens_one_checkout_session_with_the_contract_parameters(checkout, producer, table,
                                                                                stripe_proxy, watcher):
    job = await open_job(producer, table, image_width=2000, image_height=2000, resolution="4x")
    assert job.status is S.AWAITING_PAYMENT
    assert (job.price_cents, job.cost_cents, job.credits, job.markup_percent) == (384, 64, 16, 500)

    [request] = stripe_proxy.matching("POST", "/v1/checkout/sessions", client_reference_id=job.job_id)
    form = request.form
    assert form["mode"] == "payment"
    assert form["line_items[0][quantity]"] == "1"
    assert form["line_items[0][price_data][currency]"] == "usd"
    assert form["line_items[0][price_data][unit_amount]"] == "384"
    assert form["line_items[0][price_data][product_data][name]"] == "High-Resolution Image (4x)"
    assert form["line_items[0][price_data][product_data][description]"] == \
        "Upscaled from 2000×2000 to 8000×8000 pixels"
    for prefix in ("metadata", "payment_intent_data[metadata]"):
        assert form[f"{prefix}[job_id]"] == job.job_id and form[f"{prefix}[source]"] == "smi-pipeline"
    assert form["customer_email"] == "buyer@example.com"
    assert int(form["expires_at"]) == int((job.created_at + timedelta(minutes=60)).timestamp())
    assert form["success_url"] == "https://shop.example.com/thanks"
    assert request.idempotency_key == f"checkout-{job.job_id}"

    [message] = await watcher.wait_for("jobs.awaiting_payment", for_job(job.job_id))
    event = JobEvent.model_validate_json(message.value)
    assert event.type == "awaiting_payment" and event.event_id == make_event_id(job.job_id, "awaiting_payment")
    assert event.data == {"request_id": job.request_id, "checkout_url": job.checkout_url,
                          "checkout_session_id": job.stripe_checkout_session_id, "price_cents": 384}
    assert b"buyer@example.com" not in message.value  # no customer email on status topics


async def test_the_same_request_ten_times_at_once_makes_one_job_and_one_session(checkout, producer, table,
                                                                                 stripe_proxy, watcher):
    body = job_request()
    await asyncio.gather(*[publish_request(producer, body) for _ in range(10)])
    job = await job_for_request(table, body["request_id"])
    await drained(KAFKA, "checkout", ["jobs.requested"], names=KAFKA_NAMES)
    page = await table.get_jobs(limit=10_000)
    assert [j.job_id for j in page.jobs if j.request_id == body["request_id"]] == [job.job_id]
    assert len(stripe_proxy.matching("POST", "/v1/checkout/sessions", client_reference_id=job.job_id)) == 1
    # Each repeat re-publishes the same event (a requester that lost it recovers it).
    events = await watcher.wait_for("jobs.awaiting_payment", for_job(job.job_id), count=10)
    assert {json.loads(e.value)["event_id"] for e in events} == {make_event_id(job.job_id, "awaiting_payment")}


async def test_a_payment_delivered_five_times_among_expiries_moves_the_job_once(checkout, gateway, http, producer,
                                                                                table, watcher):
    job = await open_job(producer, table)
    paid = completed_event(job, payment_intent="pi_e2e_once")
    expired = stripe_webhooks.checkout_session_event("checkout.session.expired", job_id=job.job_id,
                                                     session_id=job.stripe_checkout_session_id,
                                                     amount_total=job.price_cents, payment_status="unpaid")
    for _ in range(5):
        assert (await post_webhook(http, gateway, paid))[0] == 200
        assert (await post_webhook(http, gateway, expired))[0] == 200
    await wait_status(table, job.job_id, S.PENDING)
    await drained(KAFKA, "checkout", ["payments.events"], names=KAFKA_NAMES)
    after = await table.get(job.job_id)
    assert (after.payment_status, after.stripe_payment_intent_id) == ("paid", "pi_e2e_once")
    assert after.paid_at is not None
    assert job.checkout_url and after.checkout_url is None  # dead once paid: the table drops it
    assert [h.target for h in await table.history(job.job_id)].count(S.PENDING) == 1
    pending = await watcher.wait_for("jobs.pending", for_job(job.job_id))
    assert {json.loads(m.value)["event_id"] for m in pending} == {make_event_id(job.job_id, "pending")}


async def test_a_payment_after_abandonment_is_honoured(checkout, gateway, http, producer, table):
    job = await open_job(producer, table)
    # The janitor's move (the janitor stage itself comes later).
    assert (await table.transition(job.job_id, S.ABANDONED, actor=Stage.JANITOR, event_id="abandon-test")).applied
    assert (await post_webhook(http, gateway, completed_event(job)))[0] == 200
    await wait_status(table, job.job_id, S.PENDING)
    assert [h.target for h in await table.history(job.job_id)][-2:] == [S.ABANDONED, S.PENDING]


async def test_bad_webhooks_get_4xx_and_publish_nothing(gateway, http, producer, table, watcher):
    job_ids = [str(uuid.uuid4()) for _ in range(7)]
    events = [stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=j, session_id="cs_x",
                                                     amount_total=384) for j in job_ids]
    now = int(time.time())
    body = [stripe_webhooks.encode(e) for e in events]
    cases = [
        await post_webhook(http, gateway, events[0], secret="whsec_wrong"),
        await post_webhook(http, gateway, events[1], timestamp=now - 301),
        await post_webhook(http, gateway, body[2][:-20], signed_body=body[2]),  # truncated in transit
        await post_webhook(http, gateway, body[3][:-20]),  # truncated, then signed: not JSON
        await post_webhook(http, gateway, events[4], content_type="text/plain"),
        await post_webhook(http, gateway, body[5] + b" " * (2 * 1024 * 1024)),
        await post_webhook(http, gateway, json.dumps({"hello": job_ids[6]}).encode()),
    ]
    statuses = [status for status, _ in cases]
    assert statuses == [400, 400, 400, 400, 415, 413, 400], cases
    async with http.post(f"{gateway.url}/webhooks/stripe", data=body[0],
                         headers={"Content-Type": "application/json"}) as resp:
        assert resp.status == 400  # no signature header at all
    # A good webhook sent after them is published; none of the bad ones ever is.
    marker = str(uuid.uuid4())
    good = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=marker, session_id="cs_y",
                                                  amount_total=384)
    assert (await post_webhook(http, gateway, good))[0] == 200
    await watcher.wait_for("payments.events", for_job(marker))
    assert not [m for m in watcher.matching("payments.events") if m.key and m.key.decode(errors="replace") in job_ids]


async def test_a_failed_paid_job_is_refunded_exactly_once_across_a_crash_and_redelivery(
        checkout, gateway, http, producer, table, stripe_proxy, watcher):
    job, failed = await _paid_then_failed(producer, table, http, gateway, payment_intent="pi_refund_me")

    # Killed right after Stripe made the refund, before it is recorded or committed.
    checkout.kill()
    checkout.start(SMI_CRASH_AT="checkout.after_refund")
    await producer.send(JOBS_FAILED, job.job_id, failed)
    assert await asyncio.to_thread(checkout.wait_exit, 120) == 137
    assert (await table.get(job.job_id)).refund_id is None

    checkout.start()
    refunded = await eventually(lambda: _refunded(table, job.job_id), timeout=90)
    await producer.send(JOBS_FAILED, job.job_id, failed)  # and a plain redelivery
    await drained(KAFKA, "checkout", ["jobs.failed"], timeout=90, names=KAFKA_NAMES)

    refunds = stripe_proxy.matching("POST", "/v1/refunds", **{"metadata[job_id]": job.job_id})
    assert len(refunds) == 2  # the crashed attempt and its retry...
    assert {r.idempotency_key for r in refunds} == {f"refund-{job.job_id}"}  # ...one refund at Stripe
    assert {r.form["payment_intent"] for r in refunds} == {"pi_refund_me"}
    after = await table.get(job.job_id)
    assert (after.refund_id, after.refund_amount_cents) == (refunded.refund_id, refunded.refund_amount_cents)
    assert after.payment_status == "refunded" and after.refunded_at is not None
    messages = await watcher.wait_for("payments.refunds", for_job(job.job_id))
    assert {json.loads(m.value)["event_id"] for m in messages} == {make_event_id(job.job_id, "refunds")}
    data = json.loads(messages[0].value)["data"]
    assert data == {"refund_id": after.refund_id, "amount_cents": after.refund_amount_cents}


async def test_a_refund_recorded_but_not_announced_before_a_crash_is_announced_after_it(
        checkout, gateway, http, producer, table, stripe_proxy, watcher):
    # Found by the chaos run: the redelivered jobs.failed found the job "refunded",
    # not "paid", and returned without publishing: the customer got no refund email.
    job, failed = await _paid_then_failed(producer, table, http, gateway, payment_intent="pi_refund_later")

    checkout.kill()
    checkout.start(SMI_CRASH_AT="checkout.after_refund_recorded")  # killed after the record, before the publish
    await producer.send(JOBS_FAILED, job.job_id, failed)
    assert await asyncio.to_thread(checkout.wait_exit, 120) == 137
    recorded = await table.get(job.job_id)
    assert recorded.payment_status == "refunded" and recorded.refund_id is not None
    assert watcher.matching("payments.refunds", for_job(job.job_id)) == []

    checkout.start()
    messages = await watcher.wait_for("payments.refunds", for_job(job.job_id), timeout=90)
    assert {json.loads(m.value)["event_id"] for m in messages} == {make_event_id(job.job_id, "refunds")}
    assert json.loads(messages[0].value)["data"] == {"refund_id": recorded.refund_id,
                                                     "amount_cents": recorded.refund_amount_cents}
    refunds = stripe_proxy.matching("POST", "/v1/refunds", **{"metadata[job_id]": job.job_id})
    assert len(refunds) == 1  # the redelivery refunded nothing more


async def _paid_then_failed(producer, table, http, gateway, *, payment_intent: str):
    """A job paid through the gateway, then failed by the processor: the job and its
    jobs.failed event (not sent yet)."""
    job = await open_job(producer, table)
    assert (await post_webhook(http, gateway, completed_event(job, payment_intent=payment_intent)))[0] == 200
    await wait_status(table, job.job_id, S.PENDING)
    failed = JobEvent.new("failed", job.job_id, data={"reason": "upscaler refused the image"})
    await table.transition(job.job_id, S.FAILED, actor=Stage.PROCESSOR, event_id=failed.event_id,
                           fields={"failure_reason": "upscaler refused the image"})
    return job, failed


async def _refunded(table, job_id):
    job = await table.get(job_id)
    return job if job.refund_id else None


async def test_an_unpaid_failed_job_is_not_refunded(checkout, producer, table, stripe_proxy):
    job = await open_job(producer, table)
    await table.transition(job.job_id, S.ABANDONED, actor=Stage.JANITOR, event_id="abandon")
    await producer.send(JOBS_FAILED, job.job_id, JobEvent.new("failed", job.job_id, data={"reason": "x"}))
    await drained(KAFKA, "checkout", ["jobs.failed"], names=KAFKA_NAMES)
    assert stripe_proxy.matching("POST", "/v1/refunds", **{"metadata[job_id]": job.job_id}) == []
    assert (await table.get(job.job_id)).refund_id is None


BAD_REQUESTS = {
    "not-json": (b"this is not json", "not JSON"),
    "not-utf8": (b'{"image_url": "\xff\xfe"}', "not UTF-8"),
    "a-list": (b"[1, 2, 3]", "expected a JSON object"),
    "wrong-types": (job_request(image_width="2000", post_id=1.5), "image_width"),
    "missing-email": ({k: v for k, v in job_request().items() if k != "email"}, "email"),
    "bad-email": (job_request(email="not-an-email"), "email"),
    "file-url": (job_request(image_url="file:///etc/passwd"), "scheme must be http or https"),
    "private-ip": (job_request(image_url="http://10.0.0.1/a.png"), "not public"),
    "metadata-ip": (job_request(image_url="http://169.254.169.254/latest/meta-data"), "not public"),
    "resolution": (job_request(resolution="3x"), "resolution"),
    "zero-width": (job_request(image_width=0), "image_width"),
    "long-request-id": (job_request(request_id="r" * 129), "request_id"),
    "five-mib": (json.dumps(job_request(image_url="https://e.com/" + "a" * (5 * 1024 * 1024))).encode(),
                 "exceeds the limit"),
}


async def test_invalid_requests_are_dead_lettered_with_reasons_and_the_next_one_is_processed(
        checkout, producer, table, watcher):
    keys = {}
    for name, (body, _) in BAD_REQUESTS.items():
        keys[name] = f"bad-{name}-{uuid.uuid4().hex[:8]}"
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        await publish_request(producer, raw, key=keys[name])
    good = job_request()
    await publish_request(producer, good)
    await job_for_request(table, good["request_id"])
    for name, (_, reason) in BAD_REQUESTS.items():
        [letter] = await watcher.wait_for("jobs.dead_letter", lambda m, k=keys[name]: m.key == k.encode())
        dead = json.loads(letter.value)
        assert dead["stage"] == "checkout" and dead["source_topic"] == "jobs.requested"
        assert isinstance(dead["partition"], int) and isinstance(dead["offset"], int)
        assert reason in dead["error"], (name, dead["error"])
        assert "buyer@example.com" not in dead["error"]


async def test_local_pay_page_renders_the_price_and_pays_through_the_signed_webhook(
        checkout, stage_env, tmp_path_factory, producer, table, http, watcher):
    from tests.e2e.conftest import start_gateway

    local = await start_gateway(http, {**stage_env, "PAYMENTS": "local"}, tmp_path_factory.mktemp("local-gateway"))
    url = local.url
    try:
        job = await open_job(producer, table, image_width=1000, image_height=500, resolution="8x")
        async with http.get(f"{url}/pay/{job.job_id}") as resp:
            page = await resp.text()
            assert resp.status == 200 and resp.content_type == "text/html"
        assert f"${job.price_cents // 100}.{job.price_cents % 100:02d}" in page
        assert "Pay (test mode)" in page and "1000×500 → 8000×4000" in page
        async with http.post(f"{url}/pay/{job.job_id}", allow_redirects=False) as resp:
            assert resp.status == 303 and resp.headers["Location"] == "https://shop.example.com/thanks"
        await wait_status(table, job.job_id, S.PENDING)
        [message] = await watcher.wait_for("payments.events", for_job(job.job_id))
        assert json.loads(message.value)["type"] == "checkout.session.completed"
        async with http.post(f"{url}/pay/{job.job_id}", allow_redirects=False) as resp:
            assert resp.status == 409  # paid already: nothing more to pay
        async with http.get(f"{url}/pay/{uuid.uuid4()}") as resp:
            assert resp.status == 404
    finally:
        local.stop()


async def test_public_job_status_shows_no_email_or_token(checkout, gateway, producer, table, http):
    job = await open_job(producer, table)
    async with http.get(f"{gateway.url}/jobs/{job.job_id}") as resp:
        assert resp.status == 200
        body = await resp.json()
    assert body == {"job_id": job.job_id, "status": "awaiting_payment", "resolution": "4x",
                    "created_at": job.created_at.isoformat()}
    async with http.get(f"{gateway.url}/jobs/not-a-job") as resp:
        assert resp.status == 404


async def test_a_burst_of_status_requests_is_answered_not_refused(checkout, gateway, producer, table):
    # More requests at once than the gateway has Redis connections (100): they wait
    # for one. On Redis Cluster (the scale-out run) redis-py's pool raised instead,
    # and the gateway answered 503 as if Redis were away.
    job = await open_job(producer, table)
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as burst:
        async def status() -> int:
            async with burst.get(f"{gateway.url}/jobs/{job.job_id}") as resp:
                await resp.read()
                return resp.status
        answers = await asyncio.gather(*(status() for _ in range(400)))
    assert Counter(answers) == {200: 400}


async def test_other_payment_events_are_recorded_ignored_or_dead_lettered(checkout, gateway, http, producer, table,
                                                                         watcher):
    failed_payment = await open_job(producer, table)
    event = stripe_webhooks.payment_intent_event("payment_intent.payment_failed", job_id=failed_payment.job_id,
                                                 payment_intent="pi_declined", amount=failed_payment.price_cents)
    assert (await post_webhook(http, gateway, event))[0] == 200

    refunded = await open_job(producer, table)
    assert (await post_webhook(http, gateway, completed_event(refunded, payment_intent="pi_dash")))[0] == 200
    await wait_status(table, refunded.job_id, S.PENDING)
    dashboard = stripe_webhooks.charge_refunded_event(job_id=refunded.job_id, payment_intent="pi_dash",
                                                      amount=refunded.price_cents, refund_id="re_dashboard_1")
    assert (await post_webhook(http, gateway, dashboard))[0] == 200

    foreign = await open_job(producer, table)
    not_ours = completed_event(foreign)
    not_ours["data"]["object"]["metadata"]["source"] = "another-shop"
    assert (await post_webhook(http, gateway, not_ours))[0] == 200

    unknown = str(uuid.uuid4())
    ghost = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=unknown, session_id="cs_g",
                                                   amount_total=100)
    assert (await post_webhook(http, gateway, ghost))[0] == 200

    await drained(KAFKA, "checkout", ["payments.events"], names=KAFKA_NAMES)
    after_failed = await table.get(failed_payment.job_id)
    assert after_failed.payment_status == "failed" and after_failed.payment_failed_at is not None
    assert after_failed.status is S.AWAITING_PAYMENT  # the janitor abandons it later
    after_refund = await table.get(refunded.job_id)
    assert (after_refund.refund_id, after_refund.refund_amount_cents) == ("re_dashboard_1", refunded.price_cents)
    assert (await table.get(foreign.job_id)).status is S.AWAITING_PAYMENT  # not ours: untouched
    [letter] = await watcher.wait_for("jobs.dead_letter", for_job(unknown))
    assert "unknown job" in json.loads(letter.value)["error"]


async def test_smi_stripe_trigger_sends_a_signed_event_through_the_gateway(checkout, gateway, stage_env, producer,
                                                                           table):
    import os
    import sys

    job = await open_job(producer, table)
    env = {**os.environ, **stage_env}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smi.cli", "stripe", "trigger", "checkout.session.completed", "--job", job.job_id,
        "--url", gateway.url, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out
    await wait_status(table, job.job_id, S.PENDING)

    missing = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "smi.cli", "stripe", "trigger", "charge.refunded", "--job", str(uuid.uuid4()),
        "--url", gateway.url, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await missing.communicate()
    assert missing.returncode == 1 and b"no job" in out
