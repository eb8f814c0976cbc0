"""Dead letters that cannot be sent as they are (smi/kafka/dead_letter.py): what
fails the same way on every try is sent smaller, so handle_safely's "retry the dead
letter until Kafka takes it" cannot loop forever on it; what may pass is retried."""

from __future__ import annotations

import json

import pytest
from aiokafka.errors import KafkaConnectionError, MessageSizeTooLargeError

from smi.kafka.dead_letter import LAST_RESORT_KEY_BYTES, dead_letter
from smi.kafka.handling import Outcome, RetryPolicy, SourceMessage, handle_safely
from smi.kafka.producer import encode_key, encode_value
from schemas.requests import InvalidMessage

LIMIT = 1024 * 1024  # the broker's and the producer's default record limit


class Producer:
    """Encodes as EventProducer does and refuses a record over the limit, as
    aiokafka does before sending; or fails every send with ``failure``."""

    def __init__(self, limit: int = LIMIT, failure: BaseException | None = None):
        self.limit = limit
        self.failure = failure
        self.sent: list[tuple[str, bytes | None, dict]] = []
        self.tries = 0

    async def send(self, spec, key, value):
        self.tries += 1
        if self.failure is not None:
            raise self.failure
        raw_key, raw_value = encode_key(key), encode_value(spec, value)
        if len(raw_key or b"") + len(raw_value) > self.limit:
            raise MessageSizeTooLargeError(f"record of {len(raw_key or b'') + len(raw_value)} bytes")
        self.sent.append((spec.name, raw_key, json.loads(raw_value)))


def where(**overrides) -> dict:
    return dict(stage="checkout", source_topic="jobs.requested", partition=2, offset=41, **overrides)


@pytest.mark.parametrize("key", [b"k" * 600_000, b"\xff" * 350_000], ids=["600 KB key", "350 KB of non-UTF-8"])
async def test_a_key_too_large_to_go_twice_gives_a_reduced_dead_letter_not_an_endless_retry(key):
    # The original fits (key + value < 1 MiB); its dead letter carries the key twice
    # (as the record's key and as text, where each bad byte becomes 3), and even
    # without the value does not fit.
    value = b'{"image_url": "' + b"x" * 300_000 + b'"}'
    producer = Producer()
    await dead_letter(producer, **where(), key=key, value=value, error="not a JobRequest: email: field required")
    [(topic, record_key, letter)] = producer.sent
    assert topic == "jobs.dead_letter" and record_key == key[:LAST_RESORT_KEY_BYTES]
    assert (letter["source_topic"], letter["partition"], letter["offset"], letter["stage"]) == (
        "jobs.requested", 2, 41, "checkout")
    assert letter["value"] is None
    assert letter["error"].startswith("not a JobRequest: email: field required [reduced dead letter (")
    assert f"value of {len(value)} bytes left out" in letter["error"]
    assert f"key cut from {len(key)} to {LAST_RESORT_KEY_BYTES} bytes" in letter["error"]
    assert "MessageSizeTooLargeError" in letter["error"]


async def test_a_value_too_large_is_still_left_out_and_the_key_kept():
    # 30 KB fit under a 32 KiB limit; as JSON text (every quote escaped) they do not.
    producer = Producer(limit=32 * 1024)
    await dead_letter(producer, **where(), key=b"job-1", value=b'"' * 30_000, error="not JSON")
    [(_, record_key, letter)] = producer.sent
    assert (record_key, letter["key"], letter["value"]) == (b"job-1", "job-1", None)
    assert letter["error"] == ("not JSON [value of 30000 bytes left out: the dead letter exceeded the record "
                               "size limit]")


async def test_a_dead_letter_that_cannot_be_encoded_is_sent_with_its_text_escaped():
    # A lone surrogate cannot be encoded as UTF-8: pydantic refuses to serialize it,
    # the same way on every try.
    producer = Producer()
    await dead_letter(producer, stage="checkout\ud800", source_topic="jobs.requested\udcff", partition=0,
                      offset=1, key=b"job-1", value=b"{}", error="why \ud83d")
    [(_, record_key, letter)] = producer.sent
    assert (letter["stage"], letter["source_topic"], letter["key"]) == ("checkout\\ud800", "jobs.requested\\udcff",
                                                                        "job-1")
    assert letter["error"].startswith("why \\ud83d [reduced dead letter (value of 2 bytes left out")
    assert "PydanticSerializationError" in letter["error"]


async def test_a_failure_that_may_pass_is_raised_for_the_caller_to_retry():
    producer = Producer(failure=KafkaConnectionError("broker away"))
    with pytest.raises(KafkaConnectionError):
        await dead_letter(producer, **where(), key=b"job-1", value=b"{}", error="x")
    assert producer.tries == 1 and producer.sent == []


async def test_handle_safely_settles_a_message_whose_dead_letter_is_too_large_at_once():
    class NoEndlessRetry:
        calls = 0

        async def __call__(self, delay: float) -> None:
            self.calls += 1
            if self.calls > 3:
                raise RuntimeError("the dead letter is being retried forever")

    async def refuse(message: SourceMessage) -> None:
        raise InvalidMessage("not a JobRequest")

    sleep, producer = NoEndlessRetry(), Producer()
    message = SourceMessage("jobs.requested", 0, 7, b"k" * 600_000, b"x" * 300_000)
    outcome = await handle_safely("checkout", message, refuse, producer, policy=RetryPolicy(), sleep=sleep)
    assert outcome is Outcome.DEAD_LETTERED and sleep.calls == 0
    [(_, _, letter)] = producer.sent
    assert letter["error"].startswith("not a JobRequest [reduced dead letter")
