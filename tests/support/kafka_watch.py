"""Watches topics from "now" on, without a consumer group, so tests can wait for the
messages a stage produced (and check that nothing was produced).

Topics and groups are named as the code names them (registry topic names, stage
names); ``names`` (a KAFKA_NAMESPACE, smi.kafka.names) turns them into the broker's.
It is passed, never set here: the e2e session runs in a namespace of its own while
integration tests in the same process keep the plain names."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass
from typing import Any, Callable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from smi.kafka.names import DEFAULT, KafkaNames


@dataclass(frozen=True)
class Seen:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None

    def json(self) -> Any:
        return json.loads(self.value)


class TopicWatcher:
    """Reads ``topics`` in ``names``' namespace; a Seen carries the registry name, so
    tests match on it whatever the namespace."""

    def __init__(self, bootstrap: str, topics: list[str], *, names: KafkaNames = DEFAULT):
        self.bootstrap = bootstrap
        self.topics = topics
        self.names = names
        self.seen: list[Seen] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> "TopicWatcher":
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=50, max_partition_fetch_bytes=16 * 1024 * 1024)
        await self._consumer.start()
        partitions = []
        deadline = time.monotonic() + 30
        for topic in map(self.names.topic, self.topics):
            # A topic created a moment ago (the e2e session's own) can be missing from
            # the broker's metadata for a while; watching none of its partitions would
            # see nothing and say nothing, so wait for them, and fail if they never come.
            while not (parts := self._consumer.partitions_for_topic(topic)):
                if time.monotonic() > deadline:
                    await self._consumer.stop()
                    raise AssertionError(f"topic {topic} has no partitions on {self.bootstrap}")
                await self._consumer._client.force_metadata_update()
                if not self._consumer.partitions_for_topic(topic):
                    await asyncio.sleep(0.2)
            partitions += [TopicPartition(topic, p) for p in parts]
        self._consumer.assign(partitions)
        ends = await self._consumer.end_offsets(partitions)
        for tp, end in ends.items():
            self._consumer.seek(tp, end)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        async for msg in self._consumer:
            self.seen.append(Seen(self.names.local(msg.topic), msg.partition, msg.offset, msg.key, msg.value))

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        if self._consumer:
            await self._consumer.stop()

    def matching(self, topic: str, predicate: Callable[[Seen], bool] = lambda s: True) -> list[Seen]:
        return [s for s in self.seen if s.topic == topic and predicate(s)]

    async def wait_for(self, topic: str, predicate: Callable[[Seen], bool] = lambda s: True, *,
                       count: int = 1, timeout: float = 30.0) -> list[Seen]:
        deadline = time.monotonic() + timeout
        while True:
            found = self.matching(topic, predicate)
            if len(found) >= count:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(found)} of {count} expected messages on {topic} after {timeout}s")
            await asyncio.sleep(0.05)


def for_job(job_id: str) -> Callable[[Seen], bool]:
    return lambda s: s.key == job_id.encode()


async def eventually(check: Callable[[], Any], *, timeout: float = 30.0, interval: float = 0.1) -> Any:
    """Poll an async or sync check until it returns a truthy value; fail with the last
    value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s (last value: {value!r})")
        await asyncio.sleep(interval)


async def group_lag(bootstrap: str, group: str, topics: list[str], *, names: KafkaNames = DEFAULT) -> int:
    """Messages on ``topics`` that ``group`` has not committed yet (both in ``names``'
    namespace)."""
    group, topics = names.group(group), [names.topic(t) for t in topics]
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap)
    await admin.start()
    await consumer.start()
    try:
        committed = await admin.list_consumer_group_offsets(group)
        cluster = await consumer._client.fetch_all_metadata()  # consumer.topics() leaves its own metadata empty
        partitions = [TopicPartition(t, p) for t in topics for p in (cluster.partitions_for_topic(t) or ())]
        assert partitions, f"no partitions found for {topics}"
        ends = await consumer.end_offsets(partitions)
        return sum(max(0, end - (committed[tp].offset if tp in committed else 0)) for tp, end in ends.items())
    finally:
        await consumer.stop()
        await admin.close()


async def drained(bootstrap: str, group: str, topics: list[str], *, timeout: float = 60.0,
                  names: KafkaNames = DEFAULT) -> None:
    """Wait until ``group`` has handled and committed everything on ``topics``."""
    async def no_lag():
        return await group_lag(bootstrap, group, topics, names=names) == 0
    await eventually(no_lag, timeout=timeout, interval=0.5)
