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


# Failures that the same dead letter meets on every try, so sending it again can
# never succeed: too large for the record size limit, or not encodable (pydantic's
# serialization errors are ValueErrors, a wrong type a TypeError; both are raised
# before anything reaches Kafka). Anything else (a broker away, a timeout, missing
# rights) may pass, and the caller keeps trying: a message is never dropped.
_TOO_LARGE = (MessageSizeTooLargeError, RecordTooLargeError)
_DETERMINISTIC = (*_TOO_LARGE, ValueError, TypeError)
# The last resort is small whatever came in: a key cut to this (a key of several
# hundred KB is sent twice, as the record's key and in the letter, and alone can
# exceed the limit), the reason cut and in ASCII, no value.
LAST_RESORT_KEY_BYTES = 256
LAST_RESORT_ERROR_CHARS = 500


def _ascii(text: str, limit: int) -> str:
    return text.encode("ascii", errors="backslashreplace").decode("ascii")[:limit]


def last_resort_dead_letter(*, stage: str, source_topic: str, partition: int | None, offset: int | None,
                            key: bytes | None, value: bytes | None, error: str,
                            failure: BaseException) -> tuple[bytes | None, DeadLetter]:
    """(record key, letter) when the dead letter proper cannot be sent for good: its
    reason in ASCII and cut short, its key cut to LAST_RESORT_KEY_BYTES, no value.
    Where it came from (topic, partition, offset) still locates the original."""
    if isinstance(key, str):  # typed bytes; a str with a lone surrogate would not encode
        key = key.encode("utf-8", errors="backslashreplace")
    if isinstance(value, str):
        value = value.encode("utf-8", errors="backslashreplace")
    short_key = key if key is None or len(key) <= LAST_RESORT_KEY_BYTES else key[:LAST_RESORT_KEY_BYTES]
    cut = [f"value of {len(value)} bytes left out"] if value is not None else []
    if short_key is not key:
        cut.append(f"key cut from {len(key)} to {LAST_RESORT_KEY_BYTES} bytes")
    cut.append("reason in ASCII")
    note = f" [reduced dead letter ({'; '.join(cut)}): the whole one could not be sent: {type(failure).__name__}]"
    letter = DeadLetter(source_topic=_ascii(str(source_topic), 300),
                        partition=partition if isinstance(partition, int) else None,
                        offset=offset if isinstance(offset, int) else None,
                        key=None if short_key is None else _ascii(_text(short_key), 4 * LAST_RESORT_KEY_BYTES),
                        value=None, error=_ascii(str(error), LAST_RESORT_ERROR_CHARS) + note,
                        stage=_ascii(str(stage), 100))
    return short_key, letter


async def dead_letter(producer: EventProducer, *, stage: str, source_topic: str, partition: int | None,
                      offset: int | None, key: bytes | None, value: bytes | None, error: str,
                      topic: str = JOBS_DEAD_LETTER.name) -> None:
    """Publish a DeadLetter keyed by the original key and wait for the broker's ack.

    What fails the same way on every try (see ``_DETERMINISTIC``) is sent smaller:
    first without the value, then as ``last_resort_dead_letter``, so a dead letter
    can stall its partition only while Kafka is away, never for good. Other errors
    are raised for the caller to retry.

    Logs where the message came from and why, never its value or key: a value may
    hold a customer's email address (design.md: never in logs)."""
    where = dict(stage=stage, source_topic=source_topic, partition=partition, offset=offset)
    spec = dead_letter_spec(topic)
    try:
        letter = build_dead_letter(**where, key=key, value=value, error=error)
        logger.warning("dead letter: stage=%s topic=%s partition=%s offset=%s error=%s",
                       stage, source_topic, partition, offset, letter.error)
        try:
            await producer.send(spec, key, letter)
            return
        except _TOO_LARGE:
            # Retrying the same record fails forever and stalls the stage. The source
            # topic, partition and offset still locate the original.
            logger.warning("dead letter too large, sent without its value: stage=%s topic=%s partition=%s "
                           "offset=%s", stage, source_topic, partition, offset)
            note = f" [value of {len(value or b'')} bytes left out: the dead letter exceeded the record size limit]"
            await producer.send(spec, key, letter.model_copy(update={"value": None, "error": letter.error + note}))
            return
    except _DETERMINISTIC as exc:
        failure = exc
    logger.warning("dead letter cannot be sent whole (%s), sending a reduced one: stage=%r topic=%r partition=%s "
                   "offset=%s", type(failure).__name__, stage, source_topic, partition, offset)
    short_key, letter = last_resort_dead_letter(**where, key=key, value=value, error=error, failure=failure)
    await producer.send(spec, short_key, letter)
