"""The webhook path when Kafka is away: the gateway answers 503 (so Stripe retries);
once the broker is back the retried delivery lands. A 503 means "not acknowledged",
not "never published": the producer may still deliver the buffered record when the
broker returns (at-least-once, like Stripe's own duplicate deliveries), and the
checkout stage applies a payment once however often it arrives (see
test_checkout's five-deliveries test). The test runs its own broker (through
`smi stack`) so stopping it disturbs no one."""

from __future__ import annotations

import asyncio
import os
import random
import socket
import sys
import uuid

from aiokafka import AIOKafkaConsumer

from smi import stripe_webhooks
from tests.e2e.conftest import KAFKA_NAMES, WEBHOOK_SECRET, start_gateway
from tests.support.kafka_watch import eventually


def free_port_pair() -> int:
    """A port whose successor is free too (the broker's controller listener).

    Below the kernel's ephemeral range (32768 and up here): a port from that range
    can be taken by any outgoing connection before the broker binds it."""
    while True:
        port = random.randrange(20000, 32000, 2)
        try:
            with socket.socket() as first, socket.socket() as second:
                first.bind(("127.0.0.1", port))
                second.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue


async def smi(env: dict, *args: str) -> str:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "smi.cli", *args, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await proc.communicate()
    assert proc.returncode == 0, out.decode()
    return out.decode()


async def post(http, url: str, event: dict) -> int:
    body = stripe_webhooks.encode(event)
    headers = {"Content-Type": "application/json", "Stripe-Signature": stripe_webhooks.sign(body, WEBHOOK_SECRET)}
    async with http.post(f"{url}/webhooks/stripe", data=body, headers=headers) as resp:
        return resp.status


async def records_on(bootstrap: str, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest",
                                enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=3000)
        return [m.value for msgs in batches.values() for m in msgs]
    finally:
        await consumer.stop()


async def test_broker_down_gives_503_and_the_retry_lands_once(stage_env, http, tmp_path):
    kafka_port = free_port_pair()
    bootstrap = f"127.0.0.1:{kafka_port}"
    # The stack creates the topics of the session's namespace, which the gateway writes to.
    env = {**os.environ, "SMI_VAR_DIR": str(tmp_path / "var"), "KAFKA_BOOTSTRAP_SERVERS": bootstrap,
           "KAFKA_NAMESPACE": KAFKA_NAMES.namespace}
    await smi(env, "stack", "up", "--only", "kafka")
    gateway = await start_gateway(http, {**stage_env, "KAFKA_BOOTSTRAP_SERVERS": bootstrap}, tmp_path)
    url = gateway.url
    try:
        job_id = str(uuid.uuid4())
        before = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=job_id,
                                                        session_id="cs_outage", amount_total=384)
        assert await post(http, url, before) == 200

        await smi(env, "stack", "down", "--only", "kafka")
        during = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=job_id,
                                                        session_id="cs_outage", amount_total=384)
        assert await post(http, url, during) == 503
        async with http.get(f"{url}/healthz") as resp:
            assert resp.status == 503

        await smi(env, "stack", "up", "--only", "kafka")

        async def delivered():  # what Stripe does: retry until a 2xx
            return await post(http, url, during) == 200
        await eventually(delivered, timeout=90, interval=1.0)

        records = await records_on(bootstrap, KAFKA_NAMES.topic("payments.events"))
        assert [r for r in records if r == stripe_webhooks.encode(before)] == [stripe_webhooks.encode(before)]
        copies = [r for r in records if b'"id":"' + during["id"].encode() + b'"' in r]
        assert 1 <= len(copies) <= 2  # the retry, and maybe the 503'd attempt delivered late
        assert set(copies) == {stripe_webhooks.encode(during)}  # verbatim, whatever the path
    finally:
        gateway.stop()
        await smi(env, "stack", "down", "--only", "kafka")
