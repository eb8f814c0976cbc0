"""KAFKA_NAMESPACE on the real broker: a real checkout process of a namespace of its
own creates, reads and writes only that namespace's topics and joins only its own
consumer group, so two deployments share a broker without touching each other.

The namespaced checkout runs next to whatever else uses the broker (the e2e
session's checkout, on the plain names, may be running): each side is told apart
by its topics and groups, never by timing."""

from __future__ import annotations

import os
import uuid

import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.events import DeadLetter, JobEvent
from schemas.status import JobStatus
from schemas.topics import ALL_TOPICS, JOBS_REQUESTED
from smi.jobtable import JobTable, connect
from smi.kafka.producer import EventProducer
from smi.ops.lag import sample
from smi.settings import Settings
from smi.stack.topics import delete_namespace, ensure_topics
from tests.support.kafka_watch import TopicWatcher, drained, eventually
from tests.support.processes import StageProcess

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")

pytestmark = pytest.mark.timeout(120)


def job_request(**changes) -> dict:
    return {"request_id": f"ns-{uuid.uuid4().hex}", "image_url": "https://images.example.com/photo.jpg",
            "resolution": "2x", "email": "buyer@example.com", "post_id": 7, "image_width": 800,
            "image_height": 600, **changes}


async def job_of(table: JobTable, request_id: str):
    """The job of a request in the test's table, once checkout has opened its session."""
    page = await table.get_jobs(limit=1000)
    return next((j for j in page.jobs if j.request_id == request_id and j.stripe_checkout_session_id), None)


@pytest.fixture
async def deployment(tmp_path):
    """Settings of a namespace of this test only, its topics created; deleted after
    (delete_namespace, which also takes the topic Faust made for the group)."""
    settings = Settings(kafka_bootstrap_servers=KAFKA, kafka_namespace=f"t{uuid.uuid4().hex[:8]}.",
                        redis_url=REDIS_URL, redis_namespace=f"kns{uuid.uuid4().hex[:8]}:")
    created = await ensure_topics(settings)
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        yield settings, created, admin
    finally:
        await admin.close()
        deleted = await delete_namespace(settings)
        assert set(created) <= set(deleted)
        assert all(topic.startswith(settings.kafka_namespace) for topic in deleted)


async def test_a_namespaced_deployment_keeps_to_its_own_topics_and_group(deployment, tmp_path):
    settings, created, admin = deployment
    names = settings.kafka_names
    ns = settings.kafka_namespace
    assert sorted(created) == sorted(ns + spec.name for spec in ALL_TOPICS)
    assert await ensure_topics(settings) == []  # the second time: all exist

    watcher = await TopicWatcher(KAFKA, [names.topic("jobs.awaiting_payment"), names.topic("jobs.dead_letter"),
                                         "jobs.awaiting_payment"]).start()
    env = {"KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_NAMESPACE": ns, "REDIS_URL": REDIS_URL,
           "REDIS_NAMESPACE": settings.redis_namespace, "PAYMENTS": "local", "METRICS_PORT": "0",
           "URL_ALLOW_HOSTS": "0.0.0.0/0", "KAFKA_SESSION_TIMEOUT_SECONDS": "8", "PYTHONUNBUFFERED": "1"}
    checkout = StageProcess("checkout", env, tmp_path).start()
    redis = connect(REDIS_URL)
    table = JobTable(redis, shards=settings.redis_shards, namespace=settings.redis_namespace)
    try:
        ours, theirs = job_request(), job_request()
        async with EventProducer.from_settings(settings, client_id="test-namespace") as producer:
            await producer.send(JOBS_REQUESTED, ours["request_id"], ours)
            await producer.send_raw(JOBS_REQUESTED.name, b"ns-bad", b"{not json")
        # The same request topic by its plain name: another deployment's.
        async with EventProducer(KAFKA, client_id="test-namespace-plain") as plain:
            await plain.send(JOBS_REQUESTED, theirs["request_id"], theirs)

        async def our_job():
            assert checkout.alive, checkout.log_tail()
            return await job_of(table, ours["request_id"])

        job = await eventually(our_job, timeout=60, interval=0.2)
        assert job.status is JobStatus.AWAITING_PAYMENT
        [event] = await watcher.wait_for(names.topic("jobs.awaiting_payment"),
                                         lambda s: s.key == job.job_id.encode())
        assert JobEvent.model_validate_json(event.value).type == "awaiting_payment"
        assert not watcher.matching("jobs.awaiting_payment", lambda s: s.key == job.job_id.encode())

        # The malformed request is dead-lettered in the namespace, its source by registry name.
        [letter] = await watcher.wait_for(names.topic("jobs.dead_letter"), lambda s: s.key == b"ns-bad")
        dead = DeadLetter.model_validate_json(letter.value)
        assert (dead.stage, dead.source_topic) == ("checkout", "jobs.requested")

        # Its group is the namespaced one, it has committed only namespaced topics, and
        # it never saw the plain topic's request.
        group = names.group("checkout")
        await drained(KAFKA, group, [names.topic(JOBS_REQUESTED)])
        committed = await admin.list_consumer_group_offsets(group)
        assert committed and {tp.topic for tp in committed} <= set(created)
        assert await job_of(table, theirs["request_id"]) is None

        # The lag reader names the group and topics as the broker has them.
        [reading] = await sample(KAFKA, ["checkout"], names=names)
        assert reading.group == group and reading.members == 1
        assert {p.topic for p in reading.partitions} >= {names.topic(JOBS_REQUESTED)}
        assert all(p.topic.startswith(ns) for p in reading.partitions)
    finally:
        checkout.stop()
        await watcher.stop()
        await redis.aclose()
