"""The Faust app of a stage and its source topics."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Awaitable, Callable

import faust
from faust.types import TopicT
from mode import Service

from schemas.topics import TopicSpec
from smi.kafka.names import DEFAULT, KafkaNames
from smi.kafka.producer import EventProducer
from smi.settings import Settings


METADATA_MAX_AGE_MS = 10_000


def broker_urls(bootstrap_servers: str) -> list[str]:
    """``KAFKA_BOOTSTRAP_SERVERS`` (``host:port,host:port``) as Faust broker URLs."""
    hosts = [host.strip() for host in bootstrap_servers.split(",") if host.strip()]
    if not hosts:
        raise ValueError("KAFKA_BOOTSTRAP_SERVERS names no broker")
    return [f"kafka://{host}" for host in hosts]


def create_app(stage: str, settings: Settings, **overrides: Any) -> faust.App:
    """The Faust app of one stage; its id, and so its consumer group, is the stage
    name in the deployment's KAFKA_NAMESPACE."""
    options: dict[str, Any] = dict(
        broker=broker_urls(settings.kafka_bootstrap_servers),
        # The job table lives in Redis: no Faust tables, so no RocksDB and no
        # changelog topics. Faust still creates its data directory on start; keep
        # it out of the working directory.
        store="memory://",
        datadir=Path(tempfile.gettempdir()) / f"smi-faust-{stage}",
        # Every worker would bind 6066 and several stage processes on one host
        # collide; metrics are served by smi's own exporter.
        web_enabled=False,
        topic_partitions=settings.topic_partitions,
        topic_replication_factor=settings.topic_replication,
        # acks=all. Faust offers no setting for an idempotent producer (it enables
        # one only for processing_guarantee="exactly_once"), which is one reason
        # stages publish through EventProducer (see smi.kafka.producer).
        producer_acks=-1,
        # Offsets of handled messages are committed this often (Faust's default is
        # 2.8 s): a smaller window means fewer redeliveries after a crash.
        broker_commit_interval=1.0,
        broker_session_timeout=settings.kafka_session_timeout_seconds,
        broker_heartbeat_interval=settings.kafka_session_timeout_seconds / 10,
        consumer_auto_offset_reset="earliest",
        # A worker that joins its group while the broker is still loading its topics
        # (just after a restart) is assigned no partitions; it sees the topics, and
        # rejoins with them, at its next metadata refresh: 10 s, not the default
        # 5 minutes of an idle stage (found by the chaos run).
        consumer_metadata_max_age_ms=METADATA_MAX_AGE_MS,
        # Bytes in, bytes out: stages parse JSON themselves so a bad message becomes a
        # dead letter with a reason instead of a decode error inside Faust.
        key_serializer="raw",
        value_serializer="raw",
    )
    options.update(overrides)
    return faust.App(settings.kafka_names.group(stage), **options)


def stage_topic(app: faust.App, spec: TopicSpec, names: KafkaNames = DEFAULT) -> TopicT:
    """A registry topic as raw bytes, declared by whoever owns the cluster, not by Faust."""
    return app.topic(
        names.topic(spec), key_type=bytes, value_type=bytes, key_serializer="raw", value_serializer="raw",
        internal=False,
        # Without it Faust drops a record whose value is null (a tombstone) before
        # the agent sees it: a silent skip. With it the handler sees None and the
        # message is dead-lettered as empty.
        allow_empty=True,
    )


class _ProducerLifetime(Service):
    def __init__(self, producer: EventProducer, **kwargs: Any):
        super().__init__(**kwargs)
        self.producer = producer

    async def on_start(self) -> None:
        await self.producer.start()

    async def on_stop(self) -> None:
        await self.producer.stop()


def attach_producer(app: faust.App, producer: EventProducer) -> EventProducer:
    """Start ``producer`` with ``app`` and stop it with it. Call before the app starts:
    added first, it starts before the agents and stops after them (Mode stops
    children in reverse), so no agent ever publishes through a stopped producer."""
    app.add_dependency(_ProducerLifetime(producer))
    return producer


class _ClosedOnStop(Service):
    def __init__(self, close: Callable[[], Awaitable[None]], **kwargs: Any):
        super().__init__(**kwargs)
        self.close = close

    async def on_stop(self) -> None:
        await self.close()


def close_on_stop(app: faust.App, close: Callable[[], Awaitable[None]]) -> None:
    """Call ``close`` when ``app`` stops (a pool, a session: what the handlers hold)."""
    app.add_dependency(_ClosedOnStop(close))
