"""record_effect (smi/kafka/handling.py): the record of a side effect already done
is retried through transient errors and outages, and only those."""

from __future__ import annotations

import pytest
from aiokafka.errors import KafkaTimeoutError, RecordTooLargeError
from redis import exceptions as redis_errors

from smi.kafka.handling import record_effect


def flaky(errors: list[Exception], result: str = "recorded"):
    calls = []

    async def write() -> str:
        calls.append(len(calls))
        if errors:
            raise errors.pop(0)
        return result
    return write, calls


async def test_outages_and_transient_errors_are_retried_until_the_record_lands():
    errors = [redis_errors.ConnectionError("refused"), KafkaTimeoutError(), TimeoutError(),
              redis_errors.BusyLoadingError("loading")] + [redis_errors.ConnectionError("refused")] * 20
    write, calls = flaky(errors)
    slept = []

    async def sleep(seconds: float) -> None:
        slept.append(seconds)
    assert await record_effect(write, what="job x: email:ready sent", sleep=sleep, jitter=lambda: 1.0) == "recorded"
    assert len(calls) == 25 and len(slept) == 24
    assert slept[:6] == [0.1, 0.2, 0.4, 0.8, 1.6, 2.0] and max(slept) == 2.0  # backoff, capped


@pytest.mark.parametrize("error", [ValueError("a bug"), redis_errors.ResponseError("NOSCRIPT"),
                                   RecordTooLargeError()], ids=["bug", "refused-script", "kafka-not-retriable"])
async def test_other_errors_escape_at_once(error):
    write, calls = flaky([error])

    async def sleep(seconds: float) -> None:
        raise AssertionError("no wait for an error that no wait fixes")
    with pytest.raises(type(error)):
        await record_effect(write, what="job x: email:ready sent", sleep=sleep)
    assert len(calls) == 1
