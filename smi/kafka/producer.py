"""EventProducer: the one way stages, the gateway and tools write to Kafka.

Stages publish through an EventProducer too, not through Faust's producer
(``topic.send``), for two reasons:

- Faust's producer turns on ``enable_idempotence`` only with
  ``processing_guarantee="exactly_once"`` (there is no ``producer_*`` setting for
  it), and exactly-once covers Kafka-to-Kafka only, not our Redis, Stripe and SMTP
  side effects. Without idempotence a retried produce can duplicate or reorder.
- ``await topic.send(...)`` returns once the message is buffered; the broker's ack
  is a second future that is easy to forget. A stage's step is "produce next event,
  then commit the offset", so ``send`` here returns only after the ack.

One producer per process is enough: coroutines share it, and their sends are
batched together. ``smi.kafka.app.attach_producer`` ties its lifetime to a Faust app.
Topics are named as in the registry; the producer puts its deployment's
KAFKA_NAMESPACE in front (smi.kafka.names).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from typing import Any, Protocol

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError
from aiokafka.structs import RecordMetadata
from pydantic import BaseModel

from schemas.topics import TopicSpec
from smi.kafka.names import DEFAULT, KafkaNames
from smi.settings import Settings

log = logging.getLogger(__name__)

Value = BaseModel | dict[str, Any]
Key = str | bytes | None


class Publisher(Protocol):
    """What a stage's handlers publish through (``EventProducer.send``): handlers
    depend on this, not on Kafka, so their tests can pass any callable."""

    async def __call__(self, spec: TopicSpec, key: Key, value: Value) -> Any: ...


def encode_key(key: Key) -> bytes | None:
    return key.encode("utf-8") if isinstance(key, str) else key


def encode_value(spec: TopicSpec, value: Value) -> bytes:
    """UTF-8 JSON for ``spec``; refuses a model that is not the topic's model.

    A dict is sent as it is (the gateway forwards Stripe and Upsampler bodies
    verbatim); the consuming stage validates it and dead-letters what is wrong."""
    if isinstance(value, BaseModel):
        if not isinstance(value, spec.value):
            raise TypeError(f"topic {spec.name} carries {spec.value.__name__}, not {type(value).__name__}")
        # by_alias: models that mirror an external body (UpscalerEvent's creditCost,
        # imageUrl) go out under the external names.
        return value.model_dump_json(by_alias=True).encode("utf-8")
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raise TypeError(f"topic {spec.name} takes a {spec.value.__name__} or a dict, not {type(value).__name__}")


class EventProducer:
    """An idempotent ``acks=all`` producer whose sends return after the broker's ack."""

    def __init__(self, bootstrap_servers: str, *, client_id: str = "smi", linger_ms: int = 5,
                 max_request_size: int = 1024 * 1024, request_timeout_ms: int = 40_000,
                 names: KafkaNames = DEFAULT):
        self.names = names
        self._options = dict(
            bootstrap_servers=bootstrap_servers, client_id=client_id, acks="all",
            enable_idempotence=True, linger_ms=linger_ms, max_request_size=max_request_size,
            request_timeout_ms=request_timeout_ms,
        )
        # aiokafka binds to the running loop on construction, so the producer is
        # built in start(): an EventProducer can be made at import time.
        self._producer: AIOKafkaProducer | None = None
        self._starting = asyncio.Lock()  # two concurrent start() calls make one producer
        self.replaced = 0  # producers replaced after aiokafka's died

    @classmethod
    def from_settings(cls, settings: Settings, *, client_id: str = "smi", **options: Any) -> EventProducer:
        options.setdefault("max_request_size", settings.max_message_bytes)
        options.setdefault("names", settings.kafka_names)
        return cls(settings.kafka_bootstrap_servers, client_id=client_id, **options)

    async def start(self) -> None:
        """Connect; raises if no broker answers, and may then be called again."""
        async with self._starting:
            if self._producer is None:
                producer = AIOKafkaProducer(**self._options)
                try:
                    await producer.start()
                except BaseException:
                    await producer.stop()  # else its connections and tasks leak on every retry
                    raise
                self._producer = producer

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()  # flushes what is still buffered

    async def __aenter__(self) -> EventProducer:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    @property
    def _started(self) -> AIOKafkaProducer:
        if self._producer is None:
            raise RuntimeError("EventProducer is not started")
        return self._producer

    async def ping(self) -> None:
        """A metadata round trip: raises unless a broker answers (health checks)."""
        await self._started.client.fetch_all_metadata()

    async def send(self, spec: TopicSpec, key: Key, value: Value) -> RecordMetadata:
        return await self.send_raw(spec.name, encode_key(key), encode_value(spec, value))

    async def _replace_if_dead(self, producer: AIOKafkaProducer) -> None:
        """aiokafka's sender task dies of a fatal error (OutOfOrderSequenceNumber
        after a broker restart cut off an in-flight batch of this idempotent
        producer, ProducerFenced), and from then on every send fails with it: a
        gateway would answer 503 and a stage would stall until restarted (found by
        the chaos run). Such a producer is replaced by a new one, with a new
        producer id; the failed send is the caller's to retry, as any other."""
        sender = getattr(producer, "_sender", None)
        task = getattr(sender, "sender_task", None)
        if task is None or not task.done():
            return
        async with self._starting:
            if self._producer is not producer:
                return  # another send replaced it already
            log.warning("Kafka producer %s died (%r); starting a new one", self._options["client_id"],
                        task.exception() if not task.cancelled() else "cancelled")
            # Swapped only once the new one runs, so concurrent sends never find
            # none; if no broker answers yet, the next failure tries again.
            new = AIOKafkaProducer(**self._options)
            try:
                await new.start()
            except BaseException:
                await new.stop()
                raise
            self._producer = new
            self.replaced += 1
        try:
            await asyncio.wait_for(producer.stop(), 10)
        except Exception:  # it is dead already; its buffered records failed with it
            pass

    async def send_many(self, messages: Iterable[tuple[TopicSpec, Key, Value]]) -> list[RecordMetadata]:
        """Send a batch and wait for every ack; the results are in input order.

        Every message is encoded first, so a wrong model refuses the whole batch
        before anything is sent. The sends are queued together and travel in
        shared requests (one round trip per partition leader, not per message).
        If one fails the others may already be written: callers retry the batch
        and consumers drop repeats by event id."""
        encoded = [(self.names.topic(spec), encode_key(key), encode_value(spec, value))
                   for spec, key, value in messages]
        producer = self._started
        try:
            acks = [await producer.send(topic, value, key=key) for topic, key, value in encoded]
            return list(await asyncio.gather(*acks))
        except KafkaError:
            await self._replace_if_dead(producer)
            raise

    async def send_raw(self, topic: str, key: bytes | None, value: bytes | None) -> RecordMetadata:
        """Bytes as given, for upstream-simulating tests and verbatim forwarding;
        ``topic`` by its registry name."""
        producer = self._started
        try:
            return await producer.send_and_wait(self.names.topic(topic), value, key=key)
        except KafkaError:
            await self._replace_if_dead(producer)
            raise
