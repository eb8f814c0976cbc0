"""Protocol-level checks: each answers "does this address speak the service?" with
a real request, never just an open port. They return False instead of raising so
the manager can poll them while a service starts."""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import aiohttp
import aiosmtplib
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.client import AIOKafkaClient

from smi.stack.topics import create_missing

KAFKA_READY_TOPIC = "__smi_ready"
KAFKA_READY_GROUP = "smi-stack-ready"


async def tcp_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return True


async def kafka_metadata(bootstrap: str, timeout: float = 5.0) -> bool:
    """A Metadata request (what every client sends first)."""
    client = AIOKafkaClient(bootstrap_servers=bootstrap, request_timeout_ms=int(timeout * 1000))
    try:
        await asyncio.wait_for(client.bootstrap(), timeout)
        return bool(client.cluster.brokers())
    except Exception:
        return False
    finally:
        await client.close()


async def kafka_roundtrip(bootstrap: str, timeout: float = 15.0) -> bool:
    """Produce a message with acks=all and read it back, committing the offset in a
    consumer group: proves the broker, the controller, topic creation and the group
    coordinator all work (and creates __consumer_offsets before the first test)."""
    try:
        return await asyncio.wait_for(_roundtrip(bootstrap, int(timeout * 1000)), timeout)
    except Exception:
        return False


async def _roundtrip(bootstrap: str, timeout_ms: int) -> bool:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=timeout_ms)
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", request_timeout_ms=timeout_ms)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=KAFKA_READY_GROUP,
                                enable_auto_commit=False, request_timeout_ms=timeout_ms)
    token = uuid.uuid4().bytes
    tp = TopicPartition(KAFKA_READY_TOPIC, 0)
    try:
        await admin.start()
        await create_missing(admin, [NewTopic(KAFKA_READY_TOPIC, 1, 1)])
        await producer.start()
        sent = await producer.send_and_wait(KAFKA_READY_TOPIC, token, partition=0)
        await consumer.start()
        consumer.assign([tp])
        consumer.seek(tp, sent.offset)
        received = await consumer.getone(tp)
        await consumer.commit({tp: sent.offset + 1})
        return received.value == token
    finally:
        await consumer.stop()
        await producer.stop()
        await admin.close()


async def redis_ping(url: str, timeout: float = 2.0) -> bool:
    client = aioredis.from_url(url, socket_connect_timeout=timeout, socket_timeout=timeout)
    try:
        return bool(await client.ping())
    except Exception:
        return False
    finally:
        await client.aclose()


async def http_ok(url: str, headers: dict[str, str], timeout: float = 2.0) -> bool:
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session:
            async with session.get(url, headers=headers) as response:
                return response.status == 200
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return False


async def smtp_ehlo(host: str, port: int, use_tls: bool = False, timeout: float = 2.0) -> bool:
    smtp = aiosmtplib.SMTP(hostname=host, port=port, use_tls=use_tls, timeout=timeout)
    try:
        await smtp.connect()
        code, _ = await smtp.ehlo()
        await smtp.quit()
        return code == 250
    except (aiosmtplib.SMTPException, OSError, asyncio.TimeoutError):
        return False
