"""smi.kafka against a real broker (KAFKA_BOOTSTRAP_SERVERS, default 127.0.0.1:9092),
plus the pure retry and dead-letter logic. Every run uses its own topics and
consumer group (names carry a random run id) and deletes its topics afterwards."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import json
import logging
import os
import time
import uuid
from collections import Counter

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import (KafkaConnectionError, KafkaTimeoutError, MessageSizeTooLargeError, NodeNotReadyError,
                             OutOfOrderSequenceNumber, TopicAuthorizationFailedError)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from aiokafka.structs import TopicPartition
from pydantic import BaseModel

from schemas.events import Command, DeadLetter, JobEvent
from schemas.requests import InvalidMessage, JobRequest, RequestPolicy, parse_job_request
from schemas.topics import JOBS_PENDING, JOBS_REQUESTED
from smi.kafka.app import attach_producer, create_app
from smi.kafka.dead_letter import build_dead_letter, kept_value
from smi.errors import TransientError
from smi.kafka.handling import RetryPolicy, SourceMessage, add_stage_agent, is_outage, run_with_retries
from smi.kafka.producer import EventProducer, encode_value
from smi.settings import Settings

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
RUN = uuid.uuid4().hex[:10]

# ---------------------------------------------------------------- pure logic


def job_event(event_type: str = "pending", **data: object) -> JobEvent:
    return JobEvent.new(event_type, str(uuid.uuid4()), data=dict(data))


def a_message(value: bytes | None = b"{}") -> SourceMessage:
    return SourceMessage("jobs.requested", 3, 42, b"key", value)


class FakeSleep:
    def __init__(self) -> None:
        self.delays: list[float] = []

    async def __call__(self, delay: float) -> None:
        self.delays.append(delay)


class ScriptedHandler:
    """Raises the given exceptions in turn, then succeeds."""

    def __init__(self, *failures: BaseException):
        self.failures = list(failures)
        self.calls = 0

    async def __call__(self, message: SourceMessage) -> None:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)


def test_retry_delay_is_exponential_capped_and_jittered():
    policy = RetryPolicy(retries=10, backoff=0.5, max_backoff=4.0)
    assert [policy.delay(n, jitter=1.0) for n in range(5)] == [0.5, 1.0, 2.0, 4.0, 4.0]
    assert [policy.delay(n, jitter=0.0) for n in range(5)] == [0.25, 0.5, 1.0, 2.0, 2.0]
    assert policy.delay(10_000, jitter=1.0) == 4.0  # no overflow after a long outage


async def test_transient_errors_are_retried_with_backoff_until_success():
    handler, sleep = ScriptedHandler(TransientError("503"), TimeoutError()), FakeSleep()
    reason = await run_with_retries("test", a_message(), handler, RetryPolicy(retries=3, backoff=0.1),
                                    sleep=sleep, jitter=lambda: 1.0)
    assert reason is None
    assert handler.calls == 3
    assert sleep.delays == [0.1, 0.2]


async def test_transient_errors_give_up_after_the_retries():
    handler = ScriptedHandler(*[TransientError("upscaler answered 503")] * 5)
    sleep = FakeSleep()
    reason = await run_with_retries("test", a_message(), handler, RetryPolicy(retries=2, backoff=0.1), sleep=sleep)
    assert handler.calls == 3
    assert len(sleep.delays) == 2
    assert reason == "gave up after 3 attempts: TransientError: upscaler answered 503"


async def test_an_outage_of_kafka_or_redis_is_waited_out_however_long_it_lasts():
    """A valid message must not become a dead letter because the broker or Redis
    was away for longer than the retry budget (5 retries, some 15 s)."""
    outage = [KafkaTimeoutError(), RedisConnectionError("Connection refused"), NodeNotReadyError(),
              OutOfOrderSequenceNumber()] * 10
    handler, sleep = ScriptedHandler(*outage, TransientError("503")), FakeSleep()
    policy = RetryPolicy(retries=2, backoff=0.5, max_backoff=30.0)
    reason = await run_with_retries("test", a_message(), handler, policy, sleep=sleep, jitter=lambda: 1.0)
    assert reason is None
    assert handler.calls == 42  # 40 outage errors, then one transient error, then success
    assert max(sleep.delays) == 30.0  # capped, not growing without end


async def test_a_kafka_error_no_retry_fixes_is_no_outage():
    handler, sleep = ScriptedHandler(MessageSizeTooLargeError(), TopicAuthorizationFailedError()), FakeSleep()
    reason = await run_with_retries("test", a_message(), handler, RetryPolicy(), sleep=sleep)
    assert reason.startswith("MessageSizeTooLargeError") and sleep.delays == []
    assert not is_outage(TopicAuthorizationFailedError()) and not is_outage(TransientError("503"))
    assert is_outage(KafkaConnectionError()) and is_outage(RedisTimeoutError())


async def test_an_invalid_message_fails_at_once_with_its_reason():
    handler, sleep = ScriptedHandler(InvalidMessage("not JSON: Expecting value")), FakeSleep()
    reason = await run_with_retries("test", a_message(), handler, RetryPolicy(), sleep=sleep)
    assert (reason, handler.calls, sleep.delays) == ("not JSON: Expecting value", 1, [])


async def test_a_validation_error_fails_at_once_without_echoing_the_input():
    class Strict(BaseModel):
        count: int

    async def handler(message: SourceMessage) -> None:
        Strict.model_validate({"count": "customer@example.com"})

    reason = await run_with_retries("test", a_message(), handler, RetryPolicy(), sleep=FakeSleep())
    assert reason is not None and reason.startswith("count: ")
    assert "customer@example.com" not in reason


async def test_an_unexpected_error_fails_at_once_and_is_logged_with_its_traceback(caplog):
    handler, sleep = ScriptedHandler(KeyError("price_cents")), FakeSleep()
    reason = await run_with_retries("checkout", a_message(), handler, RetryPolicy(), sleep=sleep)
    assert (reason, handler.calls, sleep.delays) == ("KeyError: 'price_cents'", 1, [])
    [record] = [r for r in caplog.records if r.name == "smi.kafka.handling"]
    assert record.levelno == logging.ERROR and record.exc_info is not None
    assert "stage=checkout topic=jobs.requested partition=3 offset=42" in record.getMessage()


def test_a_dead_letter_keeps_the_raw_value_readable_and_bounded():
    letter = build_dead_letter(stage="checkout", source_topic="jobs.requested", partition=1, offset=7,
                               key=b"req-\xff", value=b'{"a": "\xff"}', error="not UTF-8")
    assert letter.key == "req-\ufffd" and letter.value == '{"a": "\ufffd"}'
    assert (letter.source_topic, letter.partition, letter.offset, letter.stage) == ("jobs.requested", 1, 7, "checkout")

    big = b"x" * 2000
    kept = kept_value(big, max_bytes=1000)
    assert kept.startswith("x" * 1000 + "\n[truncated: the original value was 2000 bytes")
    assert kept.count("x") == 1000
    assert kept_value(b"x" * 1000, max_bytes=1000) == "x" * 1000
    assert kept_value(None) is None


def test_a_wrong_model_is_refused():
    with pytest.raises(TypeError, match="jobs.pending carries JobEvent, not Command"):
        encode_value(JOBS_PENDING, Command(command="retry", job_id=str(uuid.uuid4()), requested_by="ops"))
    with pytest.raises(TypeError):
        encode_value(JOBS_PENDING, "a string")  # type: ignore[arg-type]
    assert json.loads(encode_value(JOBS_PENDING, {"b": 1, "a": "é"})) == {"b": 1, "a": "é"}


# ---------------------------------------------------------------- real broker


@pytest.fixture
async def admin():
    client = AIOKafkaAdminClient(bootstrap_servers=BOOTSTRAP)
    try:
        await client.start()
    except Exception as exc:  # a clear message instead of a connection traceback
        pytest.fail(f"no Kafka at {BOOTSTRAP} ({exc!r}); run `smi stack up` or set KAFKA_BOOTSTRAP_SERVERS")
    yield client
    await client.close()


@pytest.fixture
async def new_topics(admin):
    """new_topics(*names, partitions=1) creates topics that are deleted after the test."""
    created: list[str] = []

    async def create(*names: str, partitions: int = 1) -> None:
        response = await admin.create_topics([NewTopic(name, partitions, 1) for name in names])
        assert [result[1] for result in response.topic_errors] == [0] * len(names), response
        created.extend(names)

    yield create
    # Faust's leader topic (<app id>-__assignor-__leader) is created by the app.
    leftovers = [t for t in await admin.list_topics() if t.startswith(f"test-plumbing-{RUN}")]
    await admin.delete_topics(sorted(set(created) | set(leftovers)))


@pytest.fixture
async def producer():
    async with EventProducer(BOOTSTRAP, client_id="test-plumbing") as started:
        yield started


def unique(name: str) -> str:
    return f"test-plumbing-{RUN}-{uuid.uuid4().hex[:6]}.{name}"


async def read_records(topic: str, count: int, *, within: float = 20.0) -> list:
    """The first ``count`` records of ``topic``; fails if they do not arrive in time."""
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=BOOTSTRAP, group_id=None,
                                auto_offset_reset="earliest", enable_auto_commit=False)
    await consumer.start()
    records: list = []
    try:
        deadline = time.monotonic() + within
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    assert len(records) >= count, f"{len(records)} of {count} records arrived on {topic} within {within} s"
    return sorted(records, key=lambda r: (r.partition, r.offset))


async def end_offset(topic: str, partition: int = 0) -> int:
    consumer = AIOKafkaConsumer(bootstrap_servers=BOOTSTRAP, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, partition)
        return (await consumer.end_offsets([tp]))[tp]
    finally:
        await consumer.stop()


async def wait_for(condition, what: str, *, within: float = 30.0) -> None:
    """Polls ``condition``, a function returning a bool or an awaitable bool."""
    deadline = time.monotonic() + within
    while True:
        done = condition()
        if inspect.isawaitable(done):
            done = await done
        if done:
            return
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {within} s waiting for {what}")
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
async def test_a_producer_that_aiokafka_gave_up_on_is_replaced(new_topics):
    """After a broker restart cuts off an in-flight batch, aiokafka's idempotent
    sender can die of OutOfOrderSequenceNumber, and every later send then fails
    with it (the chaos run saw exactly this). Here its sender is made to die the
    same way; the failed send is reported, the next one goes through."""
    topic = unique("replaced")
    await new_topics(topic)
    async with EventProducer(BOOTSTRAP, client_id=f"test-plumbing-{RUN}") as producer:
        await producer.send_raw(topic, b"k", b"before")
        inner = producer._producer
        sender = inner._sender
        sender.sender_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sender.sender_task  # its routine swallows the cancellation

        async def died() -> None:
            raise OutOfOrderSequenceNumber()
        sender._sender_task = asyncio.ensure_future(died())
        await asyncio.sleep(0)
        inner._message_accumulator.fail_all(OutOfOrderSequenceNumber())  # what aiokafka's _fail_all does

        with pytest.raises(OutOfOrderSequenceNumber):
            await producer.send_raw(topic, b"k", b"lost")  # the caller retries this one
        assert producer.replaced == 1 and producer._producer is not inner
        await producer.send_raw(topic, b"k", b"after")
    assert [r.value for r in await read_records(topic, 2)] == [b"before", b"after"]


@pytest.mark.timeout(60)
async def test_a_typed_event_arrives_as_sent(new_topics, producer):
    spec = dataclasses.replace(JOBS_PENDING, name=unique("pending"))
    await new_topics(spec.name, partitions=3)
    event = job_event(price_cents=384)

    sent = await producer.send(spec, event.job_id, event)

    [record] = await read_records(spec.name, 1)
    assert record.key == event.job_id.encode()
    assert JobEvent.model_validate_json(record.value) == event
    assert (record.partition, record.offset) == (sent.partition, sent.offset)


@pytest.mark.timeout(60)
async def test_a_batch_is_acked_as_a_whole_and_keeps_per_key_order(new_topics, producer):
    spec = dataclasses.replace(JOBS_PENDING, name=unique("pending"))
    await new_topics(spec.name, partitions=3)
    events = [job_event(n=n) for n in range(10)] * 3  # three events per key, in order

    acks = await producer.send_many((spec, event.job_id, event) for event in events)

    assert len(acks) == len(events)
    records = await read_records(spec.name, len(events))
    by_key: dict[str, list[JobEvent]] = {}
    for record in sorted(records, key=lambda r: r.offset):
        by_key.setdefault(record.key.decode(), []).append(JobEvent.model_validate_json(record.value))
    assert by_key == {event.job_id: [event] * 3 for event in events[:10]}


@pytest.mark.timeout(60)
async def test_a_wrong_model_is_refused_before_anything_is_sent(new_topics, producer):
    spec = dataclasses.replace(JOBS_PENDING, name=unique("pending"))
    await new_topics(spec.name)
    event = job_event()
    command = Command(command="retry", job_id=event.job_id, requested_by="ops")

    with pytest.raises(TypeError, match="carries JobEvent, not Command"):
        await producer.send(spec, event.job_id, command)
    with pytest.raises(TypeError):
        await producer.send_many([(spec, event.job_id, event), (spec, event.job_id, command)])

    assert await end_offset(spec.name) == 0
    await producer.send(spec, event.job_id, event)
    [record] = await read_records(spec.name, 1)
    assert record.offset == 0  # the refused batch's valid event was not sent either


def job_request(request_id: str, **changes: object) -> dict:
    return dict(request_id=request_id, image_url="https://images.example.com/cat.jpg", resolution="4x",
                email="leak@example.com", post_id=7, image_width=2000, image_height=2000) | changes


@pytest.mark.timeout(60)
async def test_a_faust_stage_dead_letters_bad_messages_and_handles_good_ones(new_topics, producer, admin, caplog,
                                                                           tmp_path):
    caplog.set_level(logging.INFO, logger="smi.kafka")
    app_id = f"test-plumbing-{RUN}-stage"
    source = dataclasses.replace(JOBS_REQUESTED, name=unique("requested"))
    dead_letters = unique("dead_letter")
    await new_topics(source.name, dead_letters)

    # The upstream: offsets 0-3 cannot be handled, 4 and 5 can (5 after one transient error).
    await producer.send_raw(source.name, b"bad-json", b"{not json")
    await producer.send_raw(source.name, b"bad-utf8", b'{"email": "\xff"}')
    await producer.send_raw(source.name, b"tombstone", None)
    await producer.send(source, "bad-field", job_request("bad-field", resolution="3x"))
    await producer.send(source, "ok", JobRequest(**job_request("ok")))
    await producer.send(source, "flaky", job_request("flaky"))

    handled: list[tuple[bytes, JobRequest]] = []
    attempts: Counter[str] = Counter()

    async def handle_request(message: SourceMessage) -> None:
        request = parse_job_request(message.value, RequestPolicy())
        attempts[request.request_id] += 1
        if request.request_id == "flaky" and attempts["flaky"] == 1:
            raise TransientError("upscaler answered 503")
        handled.append((message.key, request))

    app = create_app(app_id, Settings(kafka_bootstrap_servers=BOOTSTRAP),
                     datadir=tmp_path, broker_session_timeout=6, broker_heartbeat_interval=1,
                     broker_commit_interval=0.2,
                     # Stop without waiting for unacked messages: an agent that never
                     # acks must fail this test, not hang it in app.stop().
                     stream_wait_empty=False)
    stage_producer = attach_producer(app, EventProducer(BOOTSTRAP, client_id=app_id))
    add_stage_agent(app, source, handle_request, stage_producer,
                    policy=RetryPolicy(retries=2, backoff=0.01), dead_letter_topic=dead_letters)

    async def all_six_committed() -> bool:
        offsets = await admin.list_consumer_group_offsets(app_id)
        committed = offsets.get(TopicPartition(source.name, 0))
        return committed is not None and committed.offset == 6

    await app.start()
    try:
        await wait_for(lambda: len(handled) == 2, "the agent to handle both valid requests")
        await wait_for(all_six_committed, "the group to commit offsets 0-5")
    finally:
        await app.stop()

    with pytest.raises(RuntimeError, match="not started"):  # stopped together with the app
        await stage_producer.send_raw(dead_letters, None, b"{}")

    assert [(key, request.request_id) for key, request in handled] == [(b"ok", "ok"), (b"flaky", "flaky")]
    assert attempts == {"ok": 1, "flaky": 2}

    records = await read_records(dead_letters, 4)
    assert await end_offset(dead_letters) == 4  # nothing for the valid requests
    # Messages of different keys carry no order among them (two batches are in hand
    # at once), so the dead letters are compared in their sources' order.
    records.sort(key=lambda record: DeadLetter.model_validate_json(record.value).offset)
    letters = [DeadLetter.model_validate_json(record.value) for record in records]
    assert [record.key for record in records] == [b"bad-json", b"bad-utf8", b"tombstone", b"bad-field"]
    assert [(d.source_topic, d.partition, d.offset, d.stage) for d in letters] == [
        (source.name, 0, offset, app_id) for offset in range(4)]
    assert letters[0].error.startswith("not JSON: ") and letters[0].value == "{not json"
    assert letters[1].error.startswith("not UTF-8: ") and letters[1].value == '{"email": "\ufffd"}'
    assert (letters[2].error, letters[2].value) == ("empty message (tombstone)", None)
    assert letters[3].error == "resolution: Value error, resolution must be one of 2x, 4x, 8x"
    assert "leak@example.com" in letters[3].value  # the raw value is kept for replay ...
    assert "leak@example.com" not in caplog.text  # ... but never logged
    warnings = [r.getMessage() for r in caplog.records
                if r.name == "smi.kafka.dead_letter" and r.levelno == logging.WARNING]
    assert len(warnings) == 4
    assert warnings[3].startswith(f"dead letter: stage={app_id} topic={source.name} partition=0 offset=3 "
                                  "error=resolution: ")


def plumbing_app(app_id: str, tmp_path):
    return create_app(app_id, Settings(kafka_bootstrap_servers=BOOTSTRAP), datadir=tmp_path,
                      broker_session_timeout=6, broker_heartbeat_interval=1, broker_commit_interval=0.2,
                      stream_wait_empty=False)


async def committed_offset(admin, group: str, topic: str) -> int | None:
    offsets = await admin.list_consumer_group_offsets(group)
    committed = offsets.get(TopicPartition(topic, 0))
    return None if committed is None else committed.offset


@pytest.mark.timeout(90)
async def test_a_batch_runs_keys_concurrently_in_key_order_and_commits_only_once_settled(
        new_topics, producer, admin, tmp_path):
    """Ten messages, five keys (a0 a1 b0 b1 ...): a key's messages are handled in
    offset order, different keys at once; while one message is stuck the group
    commits nothing of its batch; stopping the worker then (a crash or a
    rebalance) leaves the whole batch to be redelivered, the finished ones too."""
    app_id = f"test-plumbing-{RUN}-batch"
    source = dataclasses.replace(JOBS_REQUESTED, name=unique("batch"))
    await new_topics(source.name)
    keys = [k for k in "abcde" for _ in range(2)]
    for index, key in enumerate(keys):
        await producer.send_raw(source.name, key.encode(), json.dumps({"n": index}).encode())

    started: list[int] = []
    finished: list[int] = []
    release = asyncio.Event()
    in_flight = 0
    most_in_flight = 0

    async def handler(message: SourceMessage) -> None:
        nonlocal in_flight, most_in_flight
        n = json.loads(message.value)["n"]
        started.append(n)
        in_flight += 1
        most_in_flight = max(most_in_flight, in_flight)
        try:
            await asyncio.sleep(0.05)
            if n == 4 and not release.is_set():  # c0 is stuck; c1 waits behind it
                await release.wait()
        finally:
            in_flight -= 1
        finished.append(n)

    app = plumbing_app(app_id, tmp_path)
    add_stage_agent(app, source, handler, attach_producer(app, EventProducer(BOOTSTRAP, client_id=app_id)),
                    batch_size=10)
    await app.start()
    try:
        await wait_for(lambda: len(finished) == 8, "every message but c0 and c1 to finish")
        assert 5 not in started  # c1 waits for c0 ...
        assert most_in_flight > 1  # ... while other keys ran at once
        for key in "abde":  # each key's two messages in offset order
            first, second = (i for i, k in enumerate(keys) if k == key)
            assert finished.index(first) < finished.index(second)
        await asyncio.sleep(1.0)  # five commit intervals
        # Earlier batches (the first message may have come alone) are committed;
        # c0's batch, with d0..e1 finished, is not.
        committed = await committed_offset(admin, app_id, source.name) or 0
        assert committed <= 4
    finally:
        await app.stop()  # with c0 still in hand

    # A new worker of the group gets the whole batch again, finished messages too.
    finished.clear()
    release.set()
    again = plumbing_app(app_id, tmp_path)
    add_stage_agent(again, source, handler, attach_producer(again, EventProducer(BOOTSTRAP, client_id=app_id)),
                    batch_size=10)
    await again.start()
    try:
        await wait_for(lambda: sorted(finished) == list(range(committed, 10)), "the redelivered batch to finish")

        async def all_committed() -> bool:
            return await committed_offset(admin, app_id, source.name) == 10
        await wait_for(all_committed, "the group to commit offsets 0-9")
    finally:
        await again.stop()


def test_a_stage_sees_topics_that_appear_after_it_joined_within_seconds(tmp_path):
    """After a broker restart a worker can join before the topics are loaded and get
    no partitions; it rejoins at its next metadata refresh (the chaos run found a
    notifier idle for minutes with Faust's default of 5)."""
    app = create_app("test-plumbing-metadata", Settings(kafka_bootstrap_servers=BOOTSTRAP), datadir=tmp_path)
    assert app.conf.consumer_metadata_max_age_ms <= 10_000
