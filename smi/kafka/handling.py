"""The body of every stage agent: handle a message, retry it, or dead-letter it;
never lose it and never ack it silently.

The Faust pitfalls this module exists for (notes.md):

- An exception that escapes an agent body still acks its message (the stream's
  ``finally``) and ``on_task_error`` commits it (faust #527, #315): the message is
  gone without a trace. So nothing escapes ``handle_safely``; every failure ends in
  a dead letter.
- ``concurrency > 1`` can commit past a message that is still being handled
  (faust #606): stage agents run with ``concurrency=1`` and scale out as more
  processes in the consumer group.
- Acks are manual (``stream.noack()``): a message is acked only once it has been
  handled or its dead letter acknowledged by the broker, so a worker stopped in the
  middle (a cancelled retry, a crash) leaves it uncommitted and it is redelivered.
"""

from __future__ import annotations

import asyncio
import collections
import enum
import functools
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, TypeVar

from aiokafka.errors import KafkaError, KafkaTimeoutError, OutOfOrderSequenceNumber
from pydantic import ValidationError
from redis import exceptions as redis_errors

from schemas.requests import InvalidMessage, describe_validation_error
from schemas.topics import JOBS_DEAD_LETTER, TopicSpec
from schemas.urls import UnsafeURL
from smi import metrics
from smi.kafka.app import stage_topic
from smi.kafka.names import DEFAULT, KafkaNames
from smi.errors import PermanentError, TransientError
from smi.kafka.dead_letter import dead_letter

if TYPE_CHECKING:
    import faust
    from faust.types import AgentT, EventT, StreamT

    from smi.kafka.producer import EventProducer

logger = logging.getLogger(__name__)


# Timeouts and refused or reset connections (built-in, or Redis's own) are transient
# by nature, so a handler need not wrap every socket call.
TRANSIENT_ERRORS = (TransientError, TimeoutError, ConnectionError, redis_errors.ConnectionError,
                    redis_errors.TimeoutError, redis_errors.BusyLoadingError)
# Our own Kafka and Redis away (a broker restarting, Redis loading its AOF): every
# message of the stage would fail alike, whatever it holds.
REDIS_OUTAGE = (redis_errors.ConnectionError, redis_errors.TimeoutError, redis_errors.BusyLoadingError)
# Sends that timed out, or a producer aiokafka gave up on (EventProducer replaces it).
KAFKA_OUTAGE = (KafkaTimeoutError, OutOfOrderSequenceNumber)


def is_outage(exc: BaseException) -> bool:
    """True if ``exc`` says Kafka or Redis is unavailable, not that the message is
    wrong: retried without limit. A Kafka error that no retry fixes (a record too
    large, a missing right) is not an outage."""
    if isinstance(exc, REDIS_OUTAGE) or isinstance(exc, KAFKA_OUTAGE):
        return True
    return isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))


# Messages a stage agent takes at once (a busy stage; an idle one takes what is there).
DEFAULT_BATCH_SIZE = 256
# Batches a stage agent has in hand at once (_BatchWindow).
DEFAULT_BATCHES_IN_FLIGHT = 2
# Seconds a batch is in hand before the next may be taken though no whole one waits.
DEFAULT_SECOND_BATCH_AFTER = 0.01


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 5  # after the first attempt
    backoff: float = 0.5  # seconds before the first retry
    max_backoff: float = 30.0

    def delay(self, retry: int, jitter: float) -> float:
        """Seconds before retry number ``retry`` (0 = the first): exponential, capped,
        then scaled by 0.5 + jitter/2 for jitter in [0, 1], so workers that failed
        together do not retry together, yet never sooner than half the backoff."""
        ceiling = min(self.max_backoff, self.backoff * 2 ** min(retry, 64))
        return ceiling * (0.5 + jitter / 2)


@dataclass(frozen=True)
class SourceMessage:
    """One Kafka record as a handler receives it: raw bytes and where it came from."""

    topic: str
    partition: int | None
    offset: int | None
    key: bytes | None
    value: bytes | None

    @classmethod
    def from_event(cls, event: EventT, names: KafkaNames = DEFAULT) -> SourceMessage:
        """The record of ``event``, its topic by its registry name (without the namespace)."""
        message = event.message
        return cls(names.local(message.topic), message.partition, message.offset, message.key, message.value)


Handler = Callable[[SourceMessage], Awaitable[object]]


def value_of(handle: Callable[[bytes | None], Awaitable[object]]) -> Handler:
    """A Handler for a stage method that needs only the message's value."""
    async def handler(message: SourceMessage) -> None:
        await handle(message.value)
    handler.__name__ = getattr(handle, "__name__", "handler")
    return handler


class Outcome(enum.Enum):
    HANDLED = "handled"
    DEAD_LETTERED = "dead_lettered"


def failure_reason(exc: BaseException) -> str:
    if isinstance(exc, InvalidMessage):
        return exc.reason
    if isinstance(exc, ValidationError):
        # Never the input values: they may hold a customer's email address.
        return describe_validation_error(exc)
    return f"{type(exc).__name__}: {exc}"


async def run_with_retries(stage: str, message: SourceMessage, handler: Handler, policy: RetryPolicy, *,
                           sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                           jitter: Callable[[], float] = random.random) -> str | None:
    """Run ``handler`` on ``message``: None if it succeeded, else why to dead-letter it.

    Invalid messages fail at once (retrying cannot fix them), an outage of our own
    Kafka or Redis is waited out however long it lasts, other transient errors are
    retried ``policy.retries`` times with backoff, anything else fails at once and
    is logged with its traceback (a bug or an unforeseen case, worth a look)."""
    attempt = outages = 0
    while True:
        try:
            await handler(message)
            return None
        except (InvalidMessage, ValidationError, PermanentError, UnsafeURL) as exc:
            return failure_reason(exc)
        except Exception as exc:
            error = exc
        if is_outage(error):
            # Without limit: the message is fine, and dead-lettering it would drop a
            # good message from the flow for as long as the outage lasts. The
            # partition waits instead (it shows as lag), as every other one does.
            delay = policy.delay(min(outages, 16), jitter())
            log = logger.warning if outages % 10 == 0 else logger.info
            log("Kafka or Redis unavailable, attempt %d, again in %.2fs: stage=%s topic=%s partition=%s "
                "offset=%s error=%s", outages + 1, delay, stage, message.topic, message.partition, message.offset,
                failure_reason(error))
            outages += 1
        elif isinstance(error, TRANSIENT_ERRORS):
            if attempt >= policy.retries:
                return f"gave up after {attempt + 1} attempts: {failure_reason(error)}"
            delay = policy.delay(attempt, jitter())
            logger.info("transient error, retry %d of %d in %.2fs: stage=%s topic=%s partition=%s offset=%s "
                        "error=%s", attempt + 1, policy.retries, delay, stage, message.topic,
                        message.partition, message.offset, failure_reason(error))
            attempt += 1
        else:
            logger.error("unexpected error: stage=%s topic=%s partition=%s offset=%s",
                         stage, message.topic, message.partition, message.offset, exc_info=error)
            return failure_reason(error)
        metrics.message(stage, message.topic, "retried")
        await sleep(delay)


T = TypeVar("T")

# Backoff of a side effect's record while Redis is away (record_effect): short, since
# the outage is usually a restart of seconds and the effect has happened already.
RECORD_RETRY = RetryPolicy(backoff=0.1, max_backoff=2.0)


async def record_effect(write: Callable[[], Awaitable[T]], *, what: str,
                        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
                        policy: RetryPolicy = RECORD_RETRY, jitter: Callable[[], float] = random.random) -> T:
    """``write()``, the record of a side effect that has happened and that no key
    makes safe to repeat (an email sent, a paid upscale submitted), retried through
    transient errors and outages for as long as they last. Left to the stage's
    retry (run_with_retries), such an error would run the whole handler again, which
    finds no record and repeats the effect: 4 repeated emails of 2,000 in a chaos run
    that only restarted Redis. A crash meanwhile still repeats it (at-least-once);
    any other error escapes. ``what`` names the effect in the log, never a secret."""
    failures = 0
    while True:
        try:
            return await write()
        except Exception as exc:
            if not (isinstance(exc, TRANSIENT_ERRORS) or is_outage(exc)):
                raise
            error = exc
        delay = policy.delay(min(failures, 16), jitter())
        log = logger.warning if failures % 10 == 0 else logger.info
        log("%s, but its record failed (%s); again in %.2fs", what, failure_reason(error), delay)
        failures += 1
        await sleep(delay)


async def handle_safely(stage: str, message: SourceMessage, handler: Handler, producer: EventProducer, *,
                        policy: RetryPolicy = RetryPolicy(), dead_letter_topic: str = JOBS_DEAD_LETTER.name,
                        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep) -> Outcome:
    """Handle one message; what cannot be handled is dead-lettered, never dropped.

    Returns only when the message may be acked: the handler succeeded, or the dead
    letter is on the broker. While Kafka cannot take the dead letter this keeps
    trying (the partition stalls, which shows as lag) rather than lose the message."""
    reason = await run_with_retries(stage, message, handler, policy, sleep=sleep)
    if reason is None:
        return Outcome.HANDLED
    attempt = 0
    while True:
        try:
            await dead_letter(producer, stage=stage, source_topic=message.topic, partition=message.partition,
                              offset=message.offset, key=message.key, value=message.value, error=reason,
                              topic=dead_letter_topic)
            metrics.dead_letter(stage, message.topic)
            return Outcome.DEAD_LETTERED
        except Exception:
            delay = policy.delay(attempt, random.random())
            logger.exception("could not publish a dead letter, trying again in %.2fs: stage=%s topic=%s "
                             "partition=%s offset=%s", delay, stage, message.topic, message.partition,
                             message.offset)
            await sleep(delay)
            attempt += 1


def add_stage_agents(app: faust.App, producer: EventProducer, handlers: Mapping[TopicSpec, Handler], *,
                     batch_size: int = DEFAULT_BATCH_SIZE, batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
                     second_batch_after: float | None = DEFAULT_SECOND_BATCH_AFTER,
                     policy: RetryPolicy = RetryPolicy()) -> None:
    """One agent per source topic of a stage (see ``add_stage_agent``)."""
    for spec, handler in handlers.items():
        add_stage_agent(app, spec, handler, producer, policy=policy, batch_size=batch_size,
                        batches_in_flight=batches_in_flight, second_batch_after=second_batch_after)


def add_stage_agent(app: faust.App, spec: TopicSpec, handler: Handler, producer: EventProducer, *,
                    policy: RetryPolicy = RetryPolicy(), dead_letter_topic: str = JOBS_DEAD_LETTER.name,
                    batch_size: int = DEFAULT_BATCH_SIZE,
                    batches_in_flight: int = DEFAULT_BATCHES_IN_FLIGHT,
                    second_batch_after: float | None = DEFAULT_SECOND_BATCH_AFTER) -> AgentT:
    """Register the agent that feeds ``spec``'s messages to ``handler`` in batches.

    A batch is what has arrived, up to ``batch_size`` messages (a busy stage takes
    full batches, an idle one handles a lone message at once). Its messages are
    handled concurrently, except that messages with the same key (one job's events)
    go one after another in offset order; so one batch's Redis calls and produces
    travel together instead of one round trip after another. Every message of the
    batch is acked only after the whole batch, and every batch taken before it, has
    settled (handled, or its dead letter on the broker), so a commit never passes a
    message still in hand. A stage that is behind, or whose batch in hand is older
    than ``second_batch_after`` seconds, has up to ``batches_in_flight`` batches in
    hand at once (_BatchWindow)."""
    names = producer.names
    stage = names.local(app.conf.name)  # the stage, without the deployment's namespace

    async def settle(message: SourceMessage) -> None:
        started = time.monotonic()
        outcome = await handle_safely(stage, message, handler, producer, policy=policy,
                                      dead_letter_topic=dead_letter_topic)
        metrics.message_settled(stage, message.topic, outcome.value, time.monotonic() - started)

    async def consume(stream: StreamT) -> None:
        manual = stream.noack()

        async def ack(batch: list[EventT]) -> None:
            metrics.batch(stage, spec.name, len(batch))
            for event in batch:
                await manual.ack(event)

        async with _Intake(manual.events(), batch_size) as intake, \
                _BatchWindow(settle, ack, names, batches_in_flight, second_batch_after) as window:
            while True:
                await window.turn(intake.full)
                batch = await intake.take()
                if batch is None:  # the stream ended: ack what is in hand, then stop with it
                    await window.drained()
                    return
                window.launch(batch)

    return app.agent(stage_topic(app, spec, names), name=f"{stage}.{spec.name}", concurrency=1)(consume)


class _Intake:
    """What the stream has delivered so far, up to ``batch_size`` at a time.

    A reader task keeps a queue of up to ``batch_size`` events filled while batches
    are handled. Not Faust's ``take_events``: it acks a batch in a ``finally``, so a
    worker stopped (cancelled) halfway through a batch would ack, and then commit,
    messages it never finished."""

    def __init__(self, events: AsyncIterator[EventT], batch_size: int):
        self._events = events
        self._queue: asyncio.Queue[EventT] = asyncio.Queue(maxsize=batch_size)
        self.full = asyncio.Event()  # a whole batch waits: the stage is behind
        self._reader: asyncio.Task | None = None

    async def __aenter__(self) -> _Intake:
        self._reader = asyncio.ensure_future(self._read())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self._reader.cancel()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        async for event in self._events:
            await self._queue.put(event)
            if self._queue.full():
                self.full.set()

    async def take(self) -> list[EventT] | None:
        """The events waiting, at least one; None once the stream has ended."""
        first = asyncio.ensure_future(self._queue.get())
        await asyncio.wait({first, self._reader}, return_when=asyncio.FIRST_COMPLETED)
        if not first.done():  # the stream ended (or its reader failed): stop with it
            first.cancel()
            self._reader.result()
            return None
        batch = [first.result()]
        while len(batch) < self._queue.maxsize and not self._queue.empty():
            batch.append(self._queue.get_nowait())
        self.full.clear()
        return batch


class _BatchWindow:
    """Up to ``size`` batches in hand at once, acked in the order they were taken.

    Why more than one: a handler waits on two or three round trips (Redis, then the
    broker's ack), and with one batch in hand a stage that is behind sits idle
    through each of them. A second batch fills those waits. It is taken when a whole
    batch waits, or once the batch in hand is ``second_after`` seconds old (10 ms in
    the stages). Not at once: splitting the work into smaller batches costs CPU per
    message (smaller Redis pipelines and produce requests; a per-message window was
    measured at twice the CPU per message), so what arrives during a short batch is
    taken together after it. Nor only when a whole batch waits: a batch in hand
    takes its round trips and its share of a busy machine's cores, tens of
    milliseconds, and a message arriving meanwhile waited all of it before it even
    started, the tail of the latency at 1,000 requests/s (README, Performance).

    The guarantees of one batch at a time hold: a key's messages run one after
    another in offset order, also across batches (a group waits for the key's
    group of the batch before); a batch is acked only after it and every batch
    before it have settled, so acks, and hence commits, follow offsets."""

    def __init__(self, settle: Callable[[SourceMessage], Awaitable[None]],
                 ack: Callable[[list[EventT]], Awaitable[None]], names: KafkaNames, size: int,
                 second_after: float | None = None):
        self._settle = settle
        self._second_after = second_after  # None: only when a whole batch waits
        self._ack = ack
        self._names = names
        self._slots = asyncio.Semaphore(size)
        self._settling: asyncio.Queue[tuple[list[EventT], asyncio.Future]] = asyncio.Queue()
        self._last_of_key: dict[object, asyncio.Task] = {}
        self._running: set[asyncio.Task] = set()
        # When each batch taken and not yet acked was launched, oldest first.
        self._launched_at: collections.deque[float] = collections.deque()
        self._acker: asyncio.Task | None = None

    async def __aenter__(self) -> _BatchWindow:
        self._acker = asyncio.ensure_future(self._ack_in_order())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        # A stopped worker (cancelled) drops what is in hand unacked: redelivered.
        tasks = [self._acker, *self._running]
        for task in tasks:
            task.cancel()
        # The batches not yet taken by the acker end cancelled too; awaited here, or
        # asyncio logs each as an exception never retrieved.
        settlings = []
        while not self._settling.empty():
            settlings.append(self._settling.get_nowait()[1])
        await asyncio.gather(*tasks, *settlings, return_exceptions=True)

    async def turn(self, full: asyncio.Event) -> None:
        """Wait until the next batch may be taken: at once with none in hand; else
        once there is room and a whole batch waits (``full``), the oldest batch in
        hand is ``second_after`` old, or none is in hand."""
        await self._until(self._slots.acquire())
        if self._launched_at:
            waits: list[Awaitable[object]] = [full.wait(), self._settling.join()]
            if self._second_after is not None:
                aged = self._launched_at[0] + self._second_after - time.monotonic()
                waits.append(asyncio.sleep(max(0.0, aged)))
            await self._until(*waits)

    async def drained(self) -> None:
        """Wait until every batch taken is acked."""
        await self._until(self._settling.join())

    def launch(self, batch: list[EventT]) -> None:
        groups = []
        for key, messages in _by_key(batch, self._names).items():
            group = asyncio.ensure_future(_in_order(self._settle, messages, after=self._last_of_key.get(key)))
            self._last_of_key[key] = group
            self._running.add(group)
            group.add_done_callback(functools.partial(self._forget, key))
            groups.append(group)
        self._settling.put_nowait((batch, asyncio.gather(*groups)))
        self._launched_at.append(time.monotonic())

    def _forget(self, key: object, group: asyncio.Task) -> None:
        self._running.discard(group)
        if self._last_of_key.get(key) is group:
            del self._last_of_key[key]

    async def _ack_in_order(self) -> None:
        while True:
            batch, settling = await self._settling.get()
            await settling
            await self._ack(batch)
            self._launched_at.popleft()
            self._slots.release()
            self._settling.task_done()

    async def _until(self, *awaitables: Awaitable[object]) -> None:
        """Wait for the first of ``awaitables``; raises if the acker stops meanwhile."""
        waiting = [asyncio.ensure_future(a) for a in awaitables]
        try:
            done, _ = await asyncio.wait({*waiting, self._acker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in waiting:
                task.cancel()
        if not done.intersection(waiting):
            self._acker.result()  # raises what stopped it
            raise RuntimeError("the acker of a stage agent stopped")


def _by_key(batch: list[EventT], names: KafkaNames) -> dict[object, list[SourceMessage]]:
    """The batch's messages grouped by key, each group in offset order; a message
    without a key is a group of its own."""
    groups: dict[object, list[SourceMessage]] = {}
    for event in batch:
        message = SourceMessage.from_event(event, names)
        groups.setdefault(message.key if message.key is not None else object(), []).append(message)
    return groups


async def _in_order(settle: Callable[[SourceMessage], Awaitable[None]], messages: list[SourceMessage], *,
                    after: asyncio.Future | None = None) -> None:
    if after is not None:
        await asyncio.wait({after})  # not ``await after``: cancelling this must not cancel that
    for message in messages:
        await settle(message)
