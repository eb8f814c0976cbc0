"""Consumer lag per group, topic and partition, and a status per group by Burrow's
evaluation rules without thresholds (`smi lag`, issue 6).

Everything is read from the brokers: committed offsets through the admin client, log
start and end offsets through a consumer that joins no group, so reading lag never
disturbs the groups being read. A status needs movement, so it needs several samples
over a window: ``sample`` reads once, ``measure`` reads a window and judges it, ``watch``
judges a sliding window again and again."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from itertools import pairwise

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import (JOBS_COMMANDS, JOBS_COMPLETED, JOBS_EXPIRING, JOBS_FAILED, JOBS_PENDING, JOBS_REQUESTED,
                            PAYMENTS_EVENTS, PAYMENTS_REFUNDS, UPSCALER_EVENTS)
from smi.kafka.names import DEFAULT, KafkaNames

# The consumer group of each stage (its Faust app id) and the topics it reads, so a
# stage that has not committed anything yet still shows what waits for it.
STAGE_SOURCE_TOPICS: dict[str, tuple[str, ...]] = {
    "checkout": (JOBS_REQUESTED.name, PAYMENTS_EVENTS.name, JOBS_FAILED.name),
    "processor": (JOBS_PENDING.name, UPSCALER_EVENTS.name, JOBS_COMMANDS.name),
    "notifier": (JOBS_COMPLETED.name, PAYMENTS_REFUNDS.name, JOBS_EXPIRING.name, JOBS_COMMANDS.name),
    "janitor": (PAYMENTS_EVENTS.name, JOBS_FAILED.name),
}

OK, LAGGING, STALLED, STOPPED = "ok", "lagging", "stalled", "stopped"
_SEVERITY = (OK, LAGGING, STALLED, STOPPED)


@dataclass(frozen=True)
class PartitionLag:
    topic: str
    partition: int
    committed: int | None  # None: the group has no offset on this partition
    end: int  # the offset the next message will get
    lag: int  # messages the group has still to handle


@dataclass(frozen=True)
class GroupSample:
    """One reading of a group: a GroupLag without the status, which needs a window."""

    group: str
    members: int
    total_lag: int
    partitions: list[PartitionLag]


@dataclass(frozen=True)
class GroupLag:
    group: str
    status: str  # ok | lagging | stalled | stopped
    members: int
    total_lag: int
    partitions: list[PartitionLag]


def status_of(window: Sequence[GroupSample]) -> str:
    """Burrow's rules over samples of one group, oldest first, without thresholds:

    - stopped: the group has no members now;
    - per partition of the latest sample: ok if its lag was 0 at any point of the
      window (it caught up); stalled if its lag stayed above 0 and its committed
      offset never moved; lagging if its commits moved but its lag grew over the
      window and never shrank between two samples; ok otherwise;
    - the group takes the worst status of its partitions.

    One sample shows no movement, so it is never judged stalled or lagging."""
    if not window:
        raise ValueError("a status needs at least one sample")
    latest = window[-1]
    if latest.members == 0:
        return STOPPED
    histories: dict[tuple[str, int], list[PartitionLag]] = {}
    for reading in window:
        for p in reading.partitions:
            histories.setdefault((p.topic, p.partition), []).append(p)
    statuses = [_partition_status(histories[p.topic, p.partition]) for p in latest.partitions]
    return max(statuses, key=_SEVERITY.index, default=OK)


def _partition_status(history: list[PartitionLag]) -> str:
    if len(history) < 2 or any(p.lag == 0 for p in history):
        return OK
    if len({p.committed for p in history}) == 1:
        return STALLED
    steps = list(pairwise(p.lag for p in history))
    if all(after >= before for before, after in steps) and history[-1].lag > history[0].lag:
        return LAGGING
    return OK


class OffsetReader:
    """Admin and group-less consumer clients, kept open across the samples of a window.
    Groups are asked for by stage name and reported, with their topics, by the
    broker's names (in ``names``' KAFKA_NAMESPACE)."""

    def __init__(self, bootstrap: str, names: KafkaNames = DEFAULT):
        self.names = names
        self._admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        self._consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)

    async def __aenter__(self) -> OffsetReader:
        await self._admin.start()
        try:
            await self._consumer.start()
        except BaseException:
            await self._admin.close()
            raise
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        try:
            await self._consumer.stop()
        finally:
            await self._admin.close()

    async def read(self, stages: Sequence[str]) -> list[GroupSample]:
        """One sample of each stage's group, in the order given."""
        groups = {stage: self.names.group(stage) for stage in stages}
        committed = {stage: await self._committed(groups[stage]) for stage in stages}
        topics = {stage: {tp.topic for tp in committed[stage]}
                  | {self.names.topic(t) for t in STAGE_SOURCE_TOPICS.get(stage, ())}
                  for stage in stages}
        partitions = await self._partitions(set().union(*topics.values()))
        every = [tp for tps in partitions.values() for tp in tps]
        starts = await self._consumer.beginning_offsets(every) if every else {}
        ends = await self._consumer.end_offsets(every) if every else {}
        samples = []
        for stage in stages:
            rows = []
            for topic in sorted(topics[stage]):
                for tp in partitions.get(topic, []):
                    offset = committed[stage].get(tp)
                    # Where the group reads next: its commit, or the log start when it has
                    # none or its commit fell off the log (stages reset to earliest).
                    position = max(offset, starts[tp]) if offset is not None else starts[tp]
                    rows.append(PartitionLag(tp.topic, tp.partition, offset, ends[tp], max(0, ends[tp] - position)))
            group = groups[stage]
            samples.append(GroupSample(group, await self._members(group), sum(r.lag for r in rows), rows))
        return samples

    async def _committed(self, group: str) -> dict[TopicPartition, int]:
        offsets = await self._admin.list_consumer_group_offsets(group)
        return {tp: meta.offset for tp, meta in offsets.items() if meta.offset >= 0}

    async def _members(self, group: str) -> int:
        # One group per request: aiokafka (0.14) misreads a DescribeGroups response
        # that carries several groups with members, and the broker connection drops.
        [response] = await self._admin.describe_consumer_groups([group])
        for error_code, group_id, _state, _protocol_type, _protocol, members, *_ in response.groups:
            if group_id == group and error_code == 0:
                return len(members)
        return 0

    async def _partitions(self, topics: set[str]) -> dict[str, list[TopicPartition]]:
        """Every partition of the topics that exist (a stage's source topic may not yet)."""
        if not topics:
            return {}
        described = await self._admin.describe_topics(sorted(topics))
        return {d["topic"]: [TopicPartition(d["topic"], n) for n in sorted(p["partition"] for p in d["partitions"])]
                for d in described if d["error_code"] == 0}


def _groups_or_stages(groups: Sequence[str] | None) -> list[str]:
    return list(groups) if groups else list(STAGE_SOURCE_TOPICS)


async def sample(bootstrap: str, groups: Sequence[str] | None = None, *,
                 names: KafkaNames = DEFAULT) -> list[GroupSample]:
    """One reading of the groups of the stages ``groups`` (default: the four)."""
    async with OffsetReader(bootstrap, names) as reader:
        return await reader.read(_groups_or_stages(groups))


async def measure(bootstrap: str, groups: Sequence[str] | None = None, *, window_seconds: float = 2.0,
                  samples: int = 3, names: KafkaNames = DEFAULT) -> list[GroupLag]:
    """``samples`` readings spread evenly over ``window_seconds``, judged by status_of;
    offsets and lag are those of the last reading."""
    if samples < 2:
        raise ValueError("a status needs movement: take at least 2 samples")
    if window_seconds <= 0:
        raise ValueError("the window must be longer than 0 seconds")
    stages = _groups_or_stages(groups)
    readings: list[list[GroupSample]] = []
    async with OffsetReader(bootstrap, names) as reader:
        for index in range(samples):
            if index:
                await asyncio.sleep(window_seconds / (samples - 1))
            readings.append(await reader.read(stages))
    return [_judged(list(window)) for window in zip(*readings)]


def _judged(window: list[GroupSample]) -> GroupLag:
    latest = window[-1]
    return GroupLag(latest.group, status_of(window), latest.members, latest.total_lag, latest.partitions)


async def watch(bootstrap: str, groups: Sequence[str] | None = None, *, every_seconds: float = 2.0,
                samples: int = 3, names: KafkaNames = DEFAULT) -> AsyncIterator[list[GroupLag]]:
    """A reading every ``every_seconds``, each judged over the last ``samples`` readings
    (one client connection for the whole watch); the first result comes with the
    second reading. Runs until cancelled."""
    if samples < 2:
        raise ValueError("a status needs movement: take at least 2 samples")
    stages = _groups_or_stages(groups)
    recent: deque[list[GroupSample]] = deque(maxlen=samples)
    async with OffsetReader(bootstrap, names) as reader:
        while True:
            recent.append(await reader.read(stages))
            if len(recent) > 1:
                yield [_judged(list(window)) for window in zip(*recent)]
            await asyncio.sleep(every_seconds)
