"""Dead letters: a message a stage could not handle goes to ``jobs.dead_letter``
with the reason and its raw bytes, so an operator can see why and replay it."""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING

from aiokafka.errors import MessageSizeTooLargeError, RecordTooLargeError

from schemas.events import DeadLetter
from schemas.topics import JOBS_DEAD_LETTER, TopicSpec

if TYPE_CHECKING:
    from faust.types import EventT

    from smi.kafka.producer import EventProducer

logger = logging.getLogger(__name__)

# The dead letter must itself fit under the broker's record limit (1 MiB by
# default) although it wraps a value that may be almost that large, and decoding
# with replacement characters and JSON escaping make text longer. Half the limit
# keeps ordinary values whole; dead_letter() drops the value if it still fails.
MAX_KEPT_VALUE_BYTES = 512 * 1024
MAX_ERROR_CHARS = 2000


def _text(raw: bytes | None) -> str | None:
    return None if raw is None else raw.decode("utf-8", errors="replace")


def _encodable(text: str) -> str:
    """``text`` with every lone surrogate as its escape (``\\ud800``). A reason may quote
    the input (a Stripe event id, a type), and JSON's ``"\\ud800"`` decodes to a code
    point UTF-8 cannot encode: the dead letter could never be serialized, and the
    partition would stall on it, retrying forever."""
    return text.encode("utf-8", errors="backslashreplace").decode("utf-8")


def kept_value(value: bytes | None, max_bytes: int = MAX_KEPT_VALUE_BYTES) -> str | None:
    """The raw value as text (undecodable bytes become U+FFFD), cut to max_bytes
    with a marker that says so and gives the original length."""
    if value is None or len(value) <= max_bytes:
        return _text(value)
    return (_text(value[:max_bytes])
            + f"\n[truncated: the original value was {len(value)} bytes; the first {max_bytes} are kept]")


def build_dead_letter(*, stage: str, source_topic: str, partition: int | None, offset: int | None,
                      key: bytes | None, value: bytes | None, error: str,
                      max_value_bytes: int = MAX_KEPT_VALUE_BYTES) -> DeadLetter:
    return DeadLetter(source_topic=source_topic, partition=partition, offset=offset, key=_text(key),
                      value=kept_value(value, max_value_bytes), error=_encodable(error)[:MAX_ERROR_CHARS],
                      stage=stage)


def dead_letter_spec(topic: str) -> TopicSpec:
    """The registry's dead-letter topic, or one by another name with the same model (tests)."""
    return JOBS_DEAD_LETTER if topic == JOBS_DEAD_LETTER.name else dataclasses.replace(JOBS_DEAD_LETTER, name=topic)


async def dead_letter(producer: EventProducer, *, stage: str, source_topic: str, partition: int | None,
                      offset: int | None, key: bytes | None, value: bytes | None, error: str,
                      topic: str = JOBS_DEAD_LETTER.name) -> None:
    """Publish a DeadLetter keyed by the original key and wait for the broker's ack.

    Logs where the message came from and why, never its value or key: a value may
    hold a customer's email address (design.md: never in logs)."""
    letter = build_dead_letter(stage=stage, source_topic=source_topic, partition=partition, offset=offset,
                               key=key, value=value, error=error)
    logger.warning("dead letter: stage=%s topic=%s partition=%s offset=%s error=%s",
                   stage, source_topic, partition, offset, letter.error)
    spec = dead_letter_spec(topic)
    try:
        await producer.send(spec, key, letter)
    except (MessageSizeTooLargeError, RecordTooLargeError):
        # Not retriable: retrying the same record fails forever and stalls the stage.
        # The source topic, partition and offset still locate the original.
        logger.warning("dead letter too large, sent without its value: stage=%s topic=%s partition=%s offset=%s",
                       stage, source_topic, partition, offset)
        note = f" [value of {len(value or b'')} bytes left out: the dead letter exceeded the record size limit]"
        await producer.send(spec, key, letter.model_copy(update={"value": None, "error": letter.error + note}))


async def dead_letter_from_event(producer: EventProducer, event: EventT, *, stage: str, error: str,
                                 topic: str = JOBS_DEAD_LETTER.name) -> None:
    """``dead_letter`` for a Faust event: its raw key and value, where it was read from."""
    message = event.message
    await dead_letter(producer, stage=stage, source_topic=message.topic, partition=message.partition,
                      offset=message.offset, key=message.key, value=message.value, error=error, topic=topic)
