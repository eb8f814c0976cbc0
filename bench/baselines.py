"""What the broker and Redis give without the pipeline, measured in the same run:

- a raw aiokafka consume→produce pass-through: a group-less consumer reads N
  messages from a scratch topic and produces each to a second one with the stages'
  producer settings (acks=all, idempotent), waiting for the acks of every fetched
  batch before the next fetch (as a stage must before committing);
- a raw redis-py compare-and-set: a five-line Lua CAS over N hashes, in pipelines
  of 100;
- the floor under every stage, in a Faust app with the stages' settings
  (smi.kafka.app.create_app): an agent that only acks each message (Faust's own
  cost per message), and smi's stage agent (smi.kafka.handling: batches, retries,
  dead letters, metrics, acks after the batch) whose handler only forwards each
  message to a second topic. No stage can beat the second: a stage's own work
  comes on top of it.
The scratch topics and keys are deleted afterwards."""

from __future__ import annotations

import asyncio
import dataclasses
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from bench.report import rate_figures
from schemas.topics import JOBS_REQUESTED
from smi.kafka.app import attach_producer, create_app, stage_topic
from smi.kafka.handling import SourceMessage, add_stage_agent
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.topics import delete_namespace

PARTITIONS = 6  # as the stage topics (TOPIC_PARTITIONS)
MESSAGE = b'{"request_id":"%d","image_url":"http://127.0.0.1/tiny.png","resolution":"2x",' \
          b'"email":"bench@example.com","post_id":1,"image_width":8,"image_height":8}'
CAS = """
if redis.call('HGET', KEYS[1], 's') == ARGV[1] then
  redis.call('HSET', KEYS[1], 's', ARGV[2])
  return 1
end
return 0
"""


def _producer(bootstrap: str) -> AIOKafkaProducer:
    return AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all", enable_idempotence=True, linger_ms=5)


@asynccontextmanager
async def _scratch_topics(bootstrap: str, count: int) -> AsyncIterator[tuple[AIOKafkaProducer, str, str]]:
    """A source topic holding ``count`` messages and an empty sink topic (the input
    is written here, untimed), deleted afterwards; with a started producer."""
    run = uuid.uuid4().hex[:8]
    source, sink = f"bench.{run}.in", f"bench.{run}.out"
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in (source, sink)])
        producer = _producer(bootstrap)
        await producer.start()
        try:
            await _leaders_elected(producer, [source, sink])
            acks = [await producer.send(source, MESSAGE % i, key=str(i).encode()) for i in range(count)]
            await asyncio.gather(*acks)
            yield producer, source, sink
        finally:
            await producer.stop()
    finally:
        try:
            await admin.delete_topics([source, sink])
        finally:
            await admin.close()


async def kafka_passthrough(bootstrap: str, count: int) -> dict:
    async with _scratch_topics(bootstrap, count) as (producer, source, sink):
        consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False,
                                    max_partition_fetch_bytes=8 * 1024 * 1024)
        await consumer.start()
        try:
            partitions = [TopicPartition(source, p) for p in range(PARTITIONS)]
            consumer.assign(partitions)
            await consumer.seek_to_beginning(*partitions)
            moved, started = 0, time.perf_counter()
            while moved < count:
                batches = await consumer.getmany(timeout_ms=1000, max_records=1000)
                acks = [await producer.send(sink, m.value, key=m.key)
                        for messages in batches.values() for m in messages]
                await asyncio.gather(*acks)
                moved += len(acks)
            seconds = time.perf_counter() - started
        finally:
            await consumer.stop()
        forwarded = await _messages_in(bootstrap, sink)
    if forwarded != count:
        raise RuntimeError(f"the pass-through forwarded {forwarded} of {count} messages")
    return rate_figures(count, seconds)


async def faust_floor(bootstrap: str, count: int, *, stage_agent: bool, timeout: float = 600) -> dict:
    """``count`` messages through a Faust agent of a fresh group, timed from the
    first message handled to the last: acked only, or (``stage_agent``) forwarded
    by smi's stage agent to a second topic, every send acked by the broker."""
    async with _scratch_topics(bootstrap, count) as (_, source, sink):
        # A namespace of its own, so the topic Faust makes for the group goes afterwards.
        settings = Settings(kafka_bootstrap_servers=bootstrap, kafka_namespace=f"bench-floor-{uuid.uuid4().hex[:8]}.")
        app = create_app("floor", settings, datadir=tempfile.mkdtemp(prefix="smi-bench-faust-"))
        handled, first, all_handled = 0, 0.0, asyncio.Event()

        def one_more() -> None:
            nonlocal handled, first
            first = first or time.perf_counter()
            handled += 1
            if handled == count:
                all_handled.set()

        if stage_agent:
            forward = attach_producer(app, EventProducer(bootstrap, client_id="smi-bench-floor"))

            async def handler(message: SourceMessage) -> None:
                await forward.send_raw(sink, message.key, message.value)
                one_more()

            add_stage_agent(app, dataclasses.replace(JOBS_REQUESTED, name=source), handler, forward)
        else:
            async def ack_only(stream) -> None:
                events = stream.noack()
                async for event in events.events():
                    one_more()
                    await events.ack(event)

            app.agent(stage_topic(app, dataclasses.replace(JOBS_REQUESTED, name=source)), name="bench-floor",
                      concurrency=1)(ack_only)
        await app.start()
        try:
            await asyncio.wait_for(all_handled.wait(), timeout)
            seconds = time.perf_counter() - first
        finally:
            await app.stop()
            await delete_namespace(settings)
        forwarded = await _messages_in(bootstrap, sink)
    if stage_agent and forwarded != count:
        raise RuntimeError(f"the stage agent forwarded {forwarded} of {count} messages")
    return rate_figures(count, seconds)


async def _messages_in(bootstrap: str, topic: str) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    try:
        ends = await consumer.end_offsets([TopicPartition(topic, p) for p in range(PARTITIONS)])
        return sum(ends.values())
    finally:
        await consumer.stop()


async def _leaders_elected(producer: AIOKafkaProducer, topics: list[str], timeout: float = 30) -> None:
    """New topics answer NotLeaderForPartition until their leaders are elected."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        cluster = await producer.client.fetch_all_metadata()
        if all(cluster.leader_for_partition(TopicPartition(t, p)) not in (None, -1)
               for t in topics for p in range(PARTITIONS)):
            return
        await asyncio.sleep(0.2)
    raise TimeoutError(f"no leaders for {topics} after {timeout}s")


async def redis_cas(redis, count: int, pipeline_size: int = 100) -> dict:
    prefix = f"bench:{uuid.uuid4().hex[:8]}:cas:"
    keys = [f"{prefix}{i}" for i in range(count)]
    script = redis.register_script(CAS)
    try:
        for start in range(0, count, 1000):
            pipe = redis.pipeline(transaction=False)
            for key in keys[start:start + 1000]:
                pipe.hset(key, "s", "a")
            await pipe.execute()
        await script(keys=[keys[0]], args=["x", "x"])  # loads the script; EVALSHA from here on
        started = time.perf_counter()
        swapped = 0
        for start in range(0, count, pipeline_size):
            pipe = redis.pipeline(transaction=False)
            for key in keys[start:start + pipeline_size]:
                await script(keys=[key], args=["a", "b"], client=pipe)
            swapped += sum(await pipe.execute())
        seconds = time.perf_counter() - started
    finally:
        for start in range(0, count, 1000):
            await redis.unlink(*keys[start:start + 1000])
    if swapped != count:
        raise RuntimeError(f"compare-and-set swapped {swapped} of {count}")
    return rate_figures(count, seconds)
