"""The bad-input suite (issue 7): for every topic a stage consumes, generated
malformed messages (tests/support/bad_inputs.py) mixed with valid ones, through
the real stage processes on Kafka and Redis: checkout (the session's), and this
module's processor (UPSCALER=local), notifier (an SMTP sink in this process) and
janitor.

Every bad message must be in ``jobs.dead_letter`` with a reason, from each
consumer group whose business it is; every good one must be processed; no stage
may die, restart or stall (its consumer group drains).

Two groups read ``payments.events`` (checkout, janitor), ``jobs.failed`` (checkout,
janitor) and ``jobs.commands`` (processor, notifier). Each dead-letters what it
cannot parse, so a malformed message there has two dead letters, one per stage. A
well-formed message may be one stage's business and not the other's: a command
is the processor's (retry) or the notifier's (resend_download), a Stripe event
checkout's or, ``checkout.session.expired``, the janitor's; the other stage lets
it pass. Stripe event types neither handles, and events of another shop, are
ignored by both (Stripe sends many types: not a fault). Each message says which
stages must dead-letter it; the others must not.

Sizes: ``BAD_INPUT_COUNT`` bad messages per topic (default 200; the issue's
10,000 is ``BAD_INPUT_COUNT=10000``), one good message per 20 bad ones, and a few
messages that are well-formed but wrong for the job they name."""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any, Awaitable, Callable

import pytest
from pydantic import ValidationError
from redis.exceptions import RedisError

from schemas.events import Command, JobEvent, UpscalerEvent, rfc3339, utcnow
from schemas.job import to_ms
from schemas.requests import InvalidMessage, RequestPolicy, decode_json_object, parse_job_request
from schemas.status import Deadline, JobStatus as S
from schemas.stripe_events import HANDLED_TYPES, StripeEvent
from schemas.topics import JOBS_COMPLETED, JOBS_PENDING
from schemas.urls import HostAllowList
from smi import stripe_webhooks
from smi.jobtable.keys import shard_of
from smi.kafka.dead_letter import kept_value
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, joined, job_request, stage_process
from tests.support import bad_inputs
from tests.support.bad_inputs import CONSUMERS, INPUT_TOPICS, BadMessage, sample_bad_messages
from tests.support.image_server import ImageServer
from tests.support.jobs import make_job
from tests.support.kafka_watch import drained, eventually
from tests.support.processes import StageProcess
from tests.support.smtp_sink import SmtpSink, about_job

COUNT = int(os.environ.get("BAD_INPUT_COUNT", "200"))
GOOD_EVERY = 20
# The suite's timeout (pyproject: 300 s a test, fixtures included) grows with the
# count: drawing 10,000 messages a topic alone takes minutes.
pytestmark = pytest.mark.timeout(max(300, COUNT // 4))
# Each consumer group (the stage's name) and the topics it reads.
GROUP_TOPICS = {stage: [topic for topic, stages in CONSUMERS.items() if stage in stages]
                for stage in ("checkout", "processor", "notifier", "janitor")}
PNG = b"\x89PNG\r\n\x1a\n" + bytes(64)


@cache
def bad_sample(topic: str) -> tuple[BadMessage, ...]:
    return tuple(sample_bad_messages(topic, COUNT))


# -- the generator holds to its labels (no processes needed) -----------------------------

POLICY = RequestPolicy(allow_hosts=HostAllowList.parse("127.0.0.0/8"))  # as stage_env's URL_ALLOW_HOSTS
MODELS = {"payments.events": StripeEvent, "upscaler.events": UpscalerEvent, "jobs.commands": Command}


def parsed(topic: str, raw: bytes | None):
    """The message as its stages parse it, or None if they cannot."""
    try:
        if topic == "jobs.requested":
            return parse_job_request(raw, POLICY)
        return MODELS.get(topic, JobEvent).model_validate(decode_json_object(raw, max_bytes=1024 * 1024))
    except (InvalidMessage, ValidationError):
        return None


def owners(topic: str, message) -> frozenset[str]:
    """Who must dead-letter a well-formed message naming an unknown job."""
    if topic == "jobs.commands":
        return frozenset({"processor" if message.command == "retry" else "notifier"})
    if topic == "payments.events":
        if message.type not in HANDLED_TYPES or not message.is_ours:
            return frozenset()
        return frozenset({"janitor" if message.type == "checkout.session.expired" else "checkout"})
    return frozenset(CONSUMERS[topic])


@pytest.mark.parametrize("topic", INPUT_TOPICS)
def test_the_generated_messages_are_what_they_say(topic):
    assert set(bad_inputs.HANDLED_STRIPE_TYPES) | {bad_inputs.SESSION_EXPIRED} == HANDLED_TYPES
    wrong = []
    for message in bad_sample(topic):
        model = parsed(topic, message.value)
        if message.invalid is None:
            continue
        if message.invalid:
            if model is not None:
                wrong.append((message.kind, "parses", message.value[:300]))
        elif model is None:
            wrong.append((message.kind, "does not parse", message.value[:300]))
        elif owners(topic, model) != message.dead_letter_by:
            wrong.append((message.kind, f"owners {sorted(owners(topic, model))}", message.value[:300]))
    assert not wrong, wrong[:10]
    kinds = Counter(message.kind for message in bad_sample(topic))
    assert kinds["tombstone"] and any(k.startswith("nested") for k in kinds), kinds


# -- the stages ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
def sink():
    server = SmtpSink().start()
    yield server
    server.stop()


@dataclass
class Stages:
    by_name: dict[str, StageProcess]
    starts: dict[str, int]  # at the start of the module (the session's checkout may have restarted before)

    def log(self, name: str) -> str:
        stage = self.by_name[name]
        path = Path(stage.logdir) / f"{stage.stage}-{stage.starts}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def image_url(images: ImageServer) -> str:
    return f"{images.url}/img/64x48.png?u={uuid.uuid4().hex[:8]}"


async def completed_job(table, storage_dir: Path, **overrides):
    job = await make_job(table, S.COMPLETED, **overrides)
    path = storage_dir / f"{job.job_id}.png"
    path.write_bytes(PNG)
    await table.update(job.job_id, {"upscaled_file_path": str(path)})
    return await table.get(job.job_id)


async def wait_status(table, job_id: str, status: S, timeout: float = 60):
    async def reached():
        return (await table.get(job_id)).status is status
    await eventually(reached, timeout=timeout, interval=0.25)


@pytest.fixture(scope="module")
async def stages(checkout, stage_env, tmp_path_factory, producer, table, images, sink, storage_dir, watcher):
    """Processor, notifier and janitor processes, each ready: it has consumed a probe."""
    logs = tmp_path_factory.mktemp("bad-input-stages")
    own = {
        "processor": stage_process("processor", {**stage_env, "UPSCALER": "local", "PROCESSOR_TICK_SECONDS": "0.5"},
                                   logs),
        "notifier": stage_process("notifier", {**stage_env, "SMTP_URL": sink.url}, logs),
        "janitor": stage_process("janitor", {**stage_env, "JANITOR_INTERVAL_SECONDS": "1"}, logs),
    }
    for stage in own.values():
        stage.start()

    async def processor_ready():
        job = await make_job(table, S.PENDING, image_url=image_url(images), image_width=64, image_height=48)
        await producer.send(JOBS_PENDING, job.job_id, JobEvent.new("pending", job.job_id))
        await wait_status(table, job.job_id, S.COMPLETED, timeout=120)

    async def notifier_ready():
        job = await completed_job(table, storage_dir)
        await producer.send(JOBS_COMPLETED, job.job_id, JobEvent.new("completed", job.job_id))
        await sink.wait_for(about_job(job.job_id, "ready"), timeout=120)

    async def janitor_ready():
        job = await make_job(table, S.AWAITING_PAYMENT)
        await publish_json(producer, "payments.events", job.job_id, expired_event(job))
        await wait_status(table, job.job_id, S.ABANDONED, timeout=120)

    try:
        await asyncio.gather(*(joined(stage) for stage in own.values()))  # every worker in its group
        await asyncio.gather(processor_ready(), notifier_ready(), janitor_ready())
    except (AssertionError, pytest.fail.Exception):
        tails = "\n".join(f"--- {name}\n{stage.log_tail()}" for name, stage in own.items())
        for stage in own.values():
            stage.stop()
        pytest.fail(f"a stage did not start:\n{tails}")
    by_name = {"checkout": checkout, **own}
    yield Stages(by_name, {name: stage.starts for name, stage in by_name.items()})
    for stage in own.values():
        stage.stop()


async def publish_json(producer, topic: str, key: str, value: dict):
    return await producer.send_raw(topic, key.encode(), json.dumps(value).encode())


def expired_event(job) -> dict:
    return stripe_webhooks.checkout_session_event("checkout.session.expired", job_id=job.job_id, session_id="cs_bad",
                                                  amount_total=job.price_cents, payment_status="unpaid")


# -- what is sent ---------------------------------------------------------------------------


@dataclass
class Sent:
    topic: str
    key: bytes
    value: bytes | None
    kind: str
    dead_letter_by: frozenset[str]
    partition: int | None = None
    offset: int | None = None

    @property
    def passed_by(self) -> frozenset[str]:
        return frozenset(CONSUMERS[self.topic]) - self.dead_letter_by


@dataclass
class Good:
    topic: str
    key: bytes
    value: bytes
    what: str
    processed: Callable[[], Awaitable[Any]]  # truthy once the message has had its effect


def good_from(topic: str, key: str, value: dict | JobEvent, what: str, processed) -> Good:
    raw = value.model_dump_json().encode() if isinstance(value, JobEvent) else json.dumps(value).encode()
    return Good(topic, key.encode(), raw, what, processed)


class AwaitingIndex:
    """Request ids of the ``jobs.awaiting_payment`` events the watcher has seen."""

    def __init__(self, watcher):
        self.watcher = watcher
        self.read = 0
        self.request_ids: set[str] = set()

    def has(self, request_id: str) -> bool:
        seen = self.watcher.seen
        for message in seen[self.read:]:
            if message.topic == "jobs.awaiting_payment":
                self.request_ids.add(json.loads(message.value)["data"].get("request_id"))
        self.read = len(seen)
        return request_id in self.request_ids


class MailIndex:
    """The (kind, job id) of every email the sink received, read once each: parsing
    every delivery's Message-ID for every check is quadratic, and slow at 10,000."""

    def __init__(self, sink: SmtpSink):
        self.sink = sink
        self.read = 0
        self.seen: set[tuple[str, str]] = set()

    def has(self, job_id: str, kind: str) -> bool:
        deliveries = self.sink.deliveries()
        for delivery in deliveries[self.read:]:
            # <kind.job_id.occurrence@domain>
            kind_, _, rest = delivery.message["Message-ID"].strip().strip("<>").partition(".")
            self.seen.add((kind_, rest[:36]))
        self.read = len(deliveries)
        return (kind, job_id) in self.seen


async def good_messages(topic: str, count: int, *, table, images, mail: MailIndex, storage_dir,
                        watcher) -> list[Good]:
    """``count`` valid messages for ``topic``, each about a job made for it, and how to
    tell it was processed."""

    def status_is(job_id, *statuses):
        async def check():
            return (await table.get(job_id)).status in statuses
        return check

    def emailed(job_id, kind):
        return lambda: mail.has(job_id, kind)

    goods = []
    awaiting = AwaitingIndex(watcher)
    for i in range(count):
        if topic == "jobs.requested":
            body = job_request(request_id=f"good-{uuid.uuid4().hex}")
            rid = body["request_id"]
            goods.append(good_from(topic, rid, body, "request", lambda rid=rid: awaiting.has(rid)))
        elif topic == "payments.events":
            job = await make_job(table, S.AWAITING_PAYMENT, image_url=image_url(images), image_width=64,
                                 image_height=48)
            if i % 2:  # the janitor's
                goods.append(good_from(topic, job.job_id, expired_event(job), "session expired",
                                       status_is(job.job_id, S.ABANDONED)))
            else:  # checkout's: pending, then on through the processor
                paid = stripe_webhooks.checkout_session_event(
                    "checkout.session.completed", job_id=job.job_id, session_id="cs_good",
                    amount_total=job.price_cents, payment_intent=f"pi_{uuid.uuid4().hex[:16]}")
                goods.append(good_from(topic, job.job_id, paid, "paid",
                                       status_is(job.job_id, S.PENDING, S.PROCESSING, S.COMPLETED)))
        elif topic == "upscaler.events":
            job = await make_job(table, S.PROCESSING)
            upscaler_id = f"local-good-{uuid.uuid4().hex[:8]}"
            await table.update(job.job_id, {"upsampler_job_id": upscaler_id})
            if i % 2:
                body = {"job_id": job.job_id, "id": upscaler_id, "status": "FAILED", "error": "bad-input suite"}
                goods.append(good_from(topic, job.job_id, body, "upscaler FAILED", status_is(job.job_id, S.FAILED)))
            else:
                result = storage_dir / job.job_id / "upscaled-4x.png"
                result.parent.mkdir(parents=True, exist_ok=True)
                result.write_bytes(PNG)
                body = {"job_id": job.job_id, "id": upscaler_id, "status": "SUCCESS", "creditCost": 0,
                        "imageUrl": None, "resultPath": str(result)}
                goods.append(good_from(topic, job.job_id, body, "upscaler SUCCESS",
                                       status_is(job.job_id, S.COMPLETED)))
        elif topic == "jobs.pending":
            job = await make_job(table, S.PENDING, image_url=image_url(images), image_width=64, image_height=48)
            goods.append(good_from(topic, job.job_id, JobEvent.new("pending", job.job_id), "pending",
                                   status_is(job.job_id, S.COMPLETED)))
        elif topic == "jobs.failed":
            # Paid: checkout refunds it; the janitor arms its purge.
            job = await make_job(table, S.FAILED)
            await table.update(job.job_id, {"payment_status": "paid", "paid_at": utcnow(),
                                            "stripe_payment_intent_id": f"pi_{uuid.uuid4().hex[:16]}"})

            async def refunded_and_purge_armed(job_id=job.job_id):
                if not (await table.get(job_id)).refund_id:
                    return False
                purge = table.keys.deadline(shard_of(job_id, table.keys.shards), Deadline.PURGE)
                return await table.redis.zscore(purge, table.keys.stored_id(job_id)) is not None
            goods.append(good_from(topic, job.job_id, JobEvent.new("failed", job.job_id, data={"reason": "x"}),
                                   "failed (paid)", refunded_and_purge_armed))
        elif topic == "jobs.completed":
            job = await completed_job(table, storage_dir)
            goods.append(good_from(topic, job.job_id, JobEvent.new("completed", job.job_id), "completed",
                                   emailed(job.job_id, "ready")))
        elif topic == "payments.refunds":
            job = await make_job(table, S.FAILED)
            await table.update(job.job_id, {"refund_id": "re_good", "refund_amount_cents": 384,
                                            "refunded_at": utcnow(), "payment_status": "refunded"})
            event = JobEvent.new("refunds", job.job_id, data={"refund_id": "re_good", "amount_cents": 384})
            goods.append(good_from(topic, job.job_id, event, "refund", emailed(job.job_id, "refund")))
        elif topic == "jobs.expiring":
            job = await completed_job(table, storage_dir)
            _, expires = await table.issue_download_token(job.job_id, ttl_hours=24)
            event = JobEvent.new("expiring", job.job_id, attempt=to_ms(expires), data={"expires_at": rfc3339(expires)})
            goods.append(good_from(topic, job.job_id, event, "expiring", emailed(job.job_id, "expiring")))
        elif topic == "jobs.commands":
            if i % 2:  # the processor's
                job = await make_job(table, S.FAILED, image_url=image_url(images), image_width=64, image_height=48)
                command = {"command": "retry", "job_id": job.job_id, "requested_by": "bad-input suite"}
                goods.append(good_from(topic, job.job_id, command, "retry", status_is(job.job_id, S.COMPLETED)))
            else:  # the notifier's
                job = await completed_job(table, storage_dir)
                command = {"command": "resend_download", "job_id": job.job_id, "requested_by": "bad-input suite"}
                goods.append(good_from(topic, job.job_id, command, "resend", emailed(job.job_id, "resend")))
    return goods


async def wrong_for_their_job(runid: str, *, table, storage_dir) -> list[Sent]:
    """Well-formed messages that are wrong for the job they name: refused by its
    state, or by a value only that job shows to be wrong."""
    sent = []

    def add(topic, name, value: dict | JobEvent, by):
        raw = value.model_dump_json().encode() if isinstance(value, JobEvent) else json.dumps(value).encode()
        sent.append(Sent(topic, f"badjob:{runid}:{name}".encode(), raw, name, frozenset(by)))

    awaiting = await make_job(table, S.AWAITING_PAYMENT)
    paid = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=awaiting.job_id,
                                                  session_id="cs_bad", amount_total=awaiting.price_cents,
                                                  created=10 ** 13)  # the year 318857
    add("payments.events", "paid in the year 318857", paid, {"checkout"})
    pending = await make_job(table, S.PENDING)
    add("jobs.completed", "completed for a pending job", JobEvent.new("completed", pending.job_id), {"notifier"})
    add("jobs.commands", "resend for a pending job",
        {"command": "resend_download", "job_id": pending.job_id, "requested_by": "t"}, {"notifier"})
    done = await completed_job(table, storage_dir)
    add("jobs.commands", "retry of a completed job",
        {"command": "retry", "job_id": done.job_id, "requested_by": "t"}, {"processor"})
    no_amount = await make_job(table, S.FAILED)
    add("payments.refunds", "refund without an amount", JobEvent.new("refunds", no_amount.job_id), {"notifier"})
    live = await completed_job(table, storage_dir)
    await table.issue_download_token(live.job_id, ttl_hours=24)
    add("jobs.expiring", "expiring at no time",
        JobEvent.new("expiring", live.job_id, data={"expires_at": "not a time"}), {"notifier"})
    processing = await make_job(table, S.PROCESSING)
    await table.update(processing.job_id, {"upsampler_job_id": "local-nan"})
    result = storage_dir / processing.job_id / "upscaled-4x.png"
    result.parent.mkdir(parents=True, exist_ok=True)
    result.write_bytes(PNG)
    # Not dead-lettered: the cost only feeds the revenue report, so the processor
    # completes the job at its quoted credits (a poll would report the same cost).
    add("upscaler.events", "SUCCESS costing NaN credits",
        {"job_id": processing.job_id, "id": "local-nan", "status": "SUCCESS", "creditCost": float("nan"),
         "resultPath": str(result)}, set())
    return sent


# -- the run ------------------------------------------------------------------------------


@dataclass
class Run:
    sent: list[Sent]
    goods: list[Good]
    letters: dict[bytes, list[dict]]  # dead letters by the original key
    missing_letters: set[tuple[bytes, str]]
    drain_errors: dict[str, str]
    unprocessed: list[Good]
    timings: dict[str, float] = field(default_factory=dict)

    def of(self, topic: str) -> list[Sent]:
        return [s for s in self.sent if s.topic == topic]


class DeadLetterIndex:
    """Dead letters the session's watcher has seen, by key, for the keys asked about."""

    def __init__(self, watcher, keys: set[bytes]):
        self.watcher = watcher
        self.keys = keys
        self.position = 0
        self.by_key: dict[bytes, list[dict]] = defaultdict(list)

    def refresh(self) -> None:
        seen = self.watcher.seen
        while self.position < len(seen):
            message = seen[self.position]
            self.position += 1
            if message.topic == "jobs.dead_letter" and message.key in self.keys:
                self.by_key[message.key].append(json.loads(message.value))

    def has(self, key: bytes, stage: str) -> bool:
        return any(letter["stage"] == stage for letter in self.by_key.get(key, ()))


def interleave(per_topic: list[list]) -> list:
    """Round robin over the topics, so every stage works at once."""
    out = []
    for i in range(max(map(len, per_topic))):
        out += [items[i] for items in per_topic if i < len(items)]
    return out


@pytest.fixture(scope="module")
async def run(stages, producer, table, images, sink, storage_dir, watcher) -> Run:
    timings = {}
    began = time.monotonic()
    runid = uuid.uuid4().hex[:8]
    mail = MailIndex(sink)
    per_topic, goods = [], []
    for topic in INPUT_TOPICS:
        topic_goods = await good_messages(topic, max(2, COUNT // GOOD_EVERY), table=table, images=images, mail=mail,
                                          storage_dir=storage_dir, watcher=watcher)
        goods += topic_goods
        sequence: list[Sent | Good] = []
        for i, bad in enumerate(bad_sample(topic)):
            # Keys are unique, to find each message's dead letters; every 7th is not
            # UTF-8 (a key is bytes; the dead letter keeps it as it came).
            key = f"bad:{runid}:{topic}:{i}:{bad.kind[:40]}".encode() + (b"\xff" if i % 7 == 3 else b"")
            sequence.append(Sent(topic, key, bad.value, bad.kind, bad.dead_letter_by))
            if i % GOOD_EVERY == GOOD_EVERY - 1 and topic_goods:
                sequence.append(topic_goods.pop(0))
        per_topic.append(sequence + topic_goods)
    plan = interleave(per_topic) + await wrong_for_their_job(runid, table=table, storage_dir=storage_dir)
    timings["generate and prepare"] = time.monotonic() - began

    began = time.monotonic()
    for start in range(0, len(plan), 500):
        chunk = plan[start:start + 500]
        results = await asyncio.gather(*[producer.send_raw(item.topic, item.key, item.value) for item in chunk])
        for item, meta in zip(chunk, results):
            if isinstance(item, Sent):
                item.partition, item.offset = meta.partition, meta.offset
    timings["publish"] = time.monotonic() - began
    sent = [item for item in plan if isinstance(item, Sent)]

    began = time.monotonic()
    index = DeadLetterIndex(watcher, {s.key for s in sent} | {g.key for g in goods})
    missing = {(s.key, stage) for s in sent for stage in s.dead_letter_by}
    deadline = time.monotonic() + 90 + 0.01 * len(missing)
    while missing and time.monotonic() < deadline:
        await asyncio.sleep(0.25)
        index.refresh()
        missing = {(key, stage) for key, stage in missing if not index.has(key, stage)}
    timings["dead letters"] = time.monotonic() - began
    print(f"\n{len(missing)} dead letters missing after {timings['dead letters']:.0f}s", flush=True)

    began = time.monotonic()
    drain_errors = await drain_all()
    timings["drain"] = time.monotonic() - began
    print(f"drained in {timings['drain']:.0f}s: {drain_errors}", flush=True)

    began = time.monotonic()
    unprocessed = await wait_processed(goods, timeout=90 + 0.05 * len(goods))
    # What the good messages set off downstream (a paid job's processing and email)
    # is done too before dead letters of good keys are looked for.
    drain_errors.update({f"{k} (after the good ones)": v for k, v in (await drain_all()).items()})
    index.refresh()
    timings["good ones"] = time.monotonic() - began
    print(f"\nbad-input run: {len(sent)} bad messages, {len(goods)} good, {COUNT} per topic; "
          + ", ".join(f"{k} {v:.1f}s" for k, v in timings.items()))
    return Run(sent, goods, index.by_key, missing, drain_errors, unprocessed, timings)


async def wait_processed(goods: list[Good], *, timeout: float) -> list[Good]:
    """The good messages not processed by the deadline (all are checked each round)."""
    limit = asyncio.Semaphore(20)

    async def done(good: Good) -> bool:
        async with limit:
            try:
                return bool(await good.processed() if asyncio.iscoroutinefunction(good.processed)
                            else good.processed())
            except RedisError:  # a slow reply to the test's own client: ask again
                return False

    pending = list(goods)
    deadline = time.monotonic() + timeout
    while pending and time.monotonic() < deadline:
        results = await asyncio.gather(*map(done, pending))
        pending = [good for good, ok in zip(pending, results) if not ok]
        if pending:
            await asyncio.sleep(0.5)
    return pending


async def drain_all() -> dict[str, str]:
    async def one(group, topics):
        try:
            await drained(KAFKA, group, topics, timeout=120, names=KAFKA_NAMES)
        except AssertionError as exc:
            return group, str(exc)
        return group, None
    results = await asyncio.gather(*[one(g, t) for g, t in GROUP_TOPICS.items()])
    return {group: error for group, error in results if error}


# -- the checks ---------------------------------------------------------------------------


def describe(sent: Sent) -> str:
    value = "tombstone" if sent.value is None else repr(sent.value[:120])
    return f"{sent.kind} @ {sent.topic}[{sent.partition}]:{sent.offset} {value}"


@pytest.mark.parametrize("topic", INPUT_TOPICS)
def test_every_bad_message_is_dead_lettered_with_a_reason_by_each_stage_whose_business_it_is(run, stages, topic):
    problems = []
    missing_by_stage = defaultdict(list)
    for sent in run.of(topic):
        letters = run.letters.get(sent.key, [])
        for stage in sent.dead_letter_by:
            mine = [letter for letter in letters if letter["stage"] == stage]
            if not mine:
                missing_by_stage[stage].append(sent)
                continue
            for letter in mine:
                if (letter["source_topic"], letter["partition"], letter["offset"]) != (topic, sent.partition,
                                                                                    sent.offset):
                    problems.append(f"{stage}: dead letter points elsewhere: {letter['source_topic']}"
                                    f"[{letter['partition']}]:{letter['offset']} for {describe(sent)}")
                if not letter["error"].strip():
                    problems.append(f"{stage}: no reason for {describe(sent)}")
                if "buyer@example.com" in letter["error"]:  # never the input's values (design.md)
                    problems.append(f"{stage}: the reason quotes the customer's email: {describe(sent)}")
                if letter["key"] != sent.key.decode("utf-8", "replace"):
                    problems.append(f"{stage}: key {letter['key']!r} for {describe(sent)}")
                if letter["value"] != kept_value(sent.value) and not (
                        letter["value"] is None and "left out" in letter["error"]):
                    problems.append(f"{stage}: value not kept for {describe(sent)}")
        # Not this stage's business: passed on, no dead letter.
        for stage in sent.passed_by:
            if any(letter["stage"] == stage for letter in letters):
                reason = next(letter["error"] for letter in letters if letter["stage"] == stage)
                problems.append(f"{stage}: dead-lettered what is not its business ({reason[:120]}): "
                                f"{describe(sent)}")
    for stage, lost in missing_by_stage.items():
        first = sorted(lost, key=lambda s: (s.partition, s.offset))
        partitions = Counter(s.partition for s in lost)
        problems.append(f"{stage}: {len(lost)} of {len([s for s in run.of(topic) if stage in s.dead_letter_by])} "
                        f"bad messages never dead-lettered (by partition: {dict(partitions)}); the first: "
                        + "; ".join(describe(s) for s in first[:3])
                        + f"\n{stage} log:\n{tail_of(stages, stage)}")
    assert not problems, "\n".join(problems[:20])


def tail_of(stages: Stages, name: str, lines: int = 30) -> str:
    return "\n".join(stages.log(name).splitlines()[-lines:])


@pytest.mark.parametrize("topic", INPUT_TOPICS)
def test_every_good_message_is_processed_and_none_is_dead_lettered(run, topic):
    unprocessed = [g for g in run.unprocessed if g.topic == topic]
    assert not unprocessed, [(g.what, g.key) for g in unprocessed]
    goods = [g for g in run.goods if g.topic == topic]
    lettered = {g.key: [(x["stage"], x["source_topic"], x["error"][:200]) for x in run.letters[g.key]]
                for g in goods if run.letters.get(g.key)}
    assert not lettered, lettered


def test_every_consumer_group_drained(run):
    assert not run.drain_errors, run.drain_errors


def test_no_stage_died_or_restarted(run, stages):
    for name, stage in stages.by_name.items():
        assert stage.alive, f"{name} died:\n{tail_of(stages, name)}"
        assert stage.starts == stages.starts[name], f"{name} was restarted"


def test_no_agent_crashed_or_stalled_on_a_dead_letter(run, stages):
    """An agent that crashed, or a dead letter that could not be published (the
    partition stalls while it is retried), shows in the stage's log."""
    problems = {}
    for name in stages.by_name:
        lines = [line for line in stages.log(name).splitlines()
                 if "could not publish a dead letter" in line or "Crashed reason" in line]
        if lines:
            problems[name] = lines[:5]
    assert not problems, problems
