"""smi.ops.lag against the real broker (KAFKA_BOOTSTRAP_SERVERS): a topic and a
consumer group of this run only, moved through stalled, ok and stopped by hand, so
every status is known in advance."""

from __future__ import annotations

import asyncio
import os
import uuid

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from smi.ops.lag import STAGE_SOURCE_TOPICS, GroupLag, measure, sample
from smi.settings import Settings
from smi.stack.topics import ensure_topics

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
WINDOW = dict(window_seconds=1.0, samples=2)


@pytest.fixture
async def topic():
    name = f"test.lag.{uuid.uuid4().hex[:10]}"
    admin = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, 2, 1)])
        yield name
        await admin.delete_topics([name])
    finally:
        await admin.close()


@pytest.fixture
async def producer():
    producer = AIOKafkaProducer(bootstrap_servers=BOOTSTRAP, acks="all")
    await producer.start()
    yield producer
    await producer.stop()


async def publish(producer: AIOKafkaProducer, topic: str, partition: int, count: int) -> None:
    for n in range(count):
        await producer.send_and_wait(topic, f"m{n}".encode(), partition=partition)


async def consume_and_commit(consumer: AIOKafkaConsumer, count: int) -> None:
    got = 0
    while got < count:
        batches = await asyncio.wait_for(consumer.getmany(timeout_ms=500), timeout=30)
        got += sum(len(messages) for messages in batches.values())
    assert got == count
    await consumer.commit()


def by_partition(group: GroupLag, topic: str) -> dict[int, tuple[int | None, int, int]]:
    return {p.partition: (p.committed, p.end, p.lag) for p in group.partitions if p.topic == topic}


async def test_lag_and_status_follow_the_group(topic, producer):
    group = f"test-lag-{uuid.uuid4().hex[:10]}"
    await publish(producer, topic, 0, 3)
    await publish(producer, topic, 1, 2)
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=BOOTSTRAP, group_id=group, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        await consume_and_commit(consumer, 5)

        # A member that has committed and then handles nothing while 4 arrive: stalled.
        await publish(producer, topic, 0, 4)
        [stalled] = await measure(BOOTSTRAP, [group], **WINDOW)
        assert (stalled.group, stalled.status, stalled.members, stalled.total_lag) == (group, "stalled", 1, 4)
        assert by_partition(stalled, topic) == {0: (3, 7, 4), 1: (2, 2, 0)}

        # It catches up and commits: no lag, ok.
        await consume_and_commit(consumer, 4)
        [caught_up] = await measure(BOOTSTRAP, [group], **WINDOW)
        assert (caught_up.status, caught_up.members, caught_up.total_lag) == ("ok", 1, 0)
        assert by_partition(caught_up, topic) == {0: (7, 7, 0), 1: (2, 2, 0)}
    finally:
        await consumer.stop()  # leaves the group

    # No member left while 6 more arrive: stopped, and the lag says what waits.
    await publish(producer, topic, 1, 6)
    [stopped] = await measure(BOOTSTRAP, [group], **WINDOW)
    assert (stopped.status, stopped.members, stopped.total_lag) == ("stopped", 0, 6)
    assert by_partition(stopped, topic) == {0: (7, 7, 0), 1: (2, 8, 6)}


async def test_a_group_that_never_committed_has_no_partitions_and_no_members():
    [unknown] = await sample(BOOTSTRAP, [f"test-lag-none-{uuid.uuid4().hex[:10]}"])
    assert (unknown.members, unknown.total_lag, unknown.partitions) == (0, 0, [])


async def test_by_default_the_stage_groups_are_read_with_their_source_topics():
    await ensure_topics(Settings(kafka_bootstrap_servers=BOOTSTRAP))  # what `smi stack up` creates
    readings = await sample(BOOTSTRAP)
    assert [r.group for r in readings] == list(STAGE_SOURCE_TOPICS)
    for reading in readings:
        topics = {p.topic for p in reading.partitions}
        assert set(STAGE_SOURCE_TOPICS[reading.group]) <= topics, reading.group
        assert reading.total_lag == sum(p.lag for p in reading.partitions)
