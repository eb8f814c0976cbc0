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
import enum
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from pydantic import ValidationError
from redis import exceptions as redis_errors

from schemas.requests import InvalidMessage, describe_validation_error
from schemas.topics import JOBS_DEAD_LETTER, TopicSpec
from schemas.urls import UnsafeURL
from smi import metrics
from smi.kafka.app import stage_topic
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
    def from_event(cls, event: EventT) -> SourceMessage:
        message = event.message
        return cls(message.topic, message.partition, message.offset, message.key, message.value)


Handler = Callable[[SourceMessage], Awaitable[None]]


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

    Invalid messages fail at once (retrying cannot fix them), transient errors are
    retried ``policy.retries`` times with backoff, anything else fails at once and
    is logged with its traceback (a bug or an unforeseen case, worth a look)."""
    attempt = 0
    while True:
        try:
            await handler(message)
            return None
        except (InvalidMessage, ValidationError, PermanentError, UnsafeURL) as exc:
            return failure_reason(exc)
        except TRANSIENT_ERRORS as exc:
            if attempt >= policy.retries:
                return f"gave up after {attempt + 1} attempts: {failure_reason(exc)}"
            delay = policy.delay(attempt, jitter())
            logger.info("transient error, retry %d of %d in %.2fs: stage=%s topic=%s partition=%s offset=%s "
                        "error=%s", attempt + 1, policy.retries, delay, stage, message.topic,
                        message.partition, message.offset, failure_reason(exc))
            metrics.message(stage, message.topic, "retried")
            await sleep(delay)
            attempt += 1
        except Exception as exc:
            logger.exception("unexpected error: stage=%s topic=%s partition=%s offset=%s",
                             stage, message.topic, message.partition, message.offset)
            return failure_reason(exc)


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


def add_stage_agent(app: faust.App, spec: TopicSpec, handler: Handler, producer: EventProducer, *,
                    policy: RetryPolicy = RetryPolicy(),
                    dead_letter_topic: str = JOBS_DEAD_LETTER.name) -> AgentT:
    """Register the agent that feeds ``spec``'s messages, one at a time, to ``handler``."""
    stage = app.conf.name

    async def consume(stream: StreamT) -> None:
        manual = stream.noack()
        async for event in manual.events():
            message, started = SourceMessage.from_event(event), time.monotonic()
            outcome = await handle_safely(stage, message, handler, producer, policy=policy,
                                          dead_letter_topic=dead_letter_topic)
            metrics.message_settled(stage, message.topic, outcome.value, time.monotonic() - started)
            await manual.ack(event)

    return app.agent(stage_topic(app, spec), name=f"{stage}.{spec.name}", concurrency=1)(consume)
