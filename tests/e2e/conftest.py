"""End-to-end fixtures: real stage processes (`python -m services.<stage>`) on the
real Kafka, Redis and stripe-mock (behind a recording proxy).

One set of processes serves the whole session: stages of one consumer group share
the contract's topics, so every test works on its own jobs (unique request ids)
in a session-wide Redis namespace, and asserts on those jobs only.

The session's Kafka topics and consumer groups are in a namespace of its own too
(KAFKA_NAMES, smi/kafka/names.py), created at its start and deleted at its end: two
sessions on one broker, or a session next to a bench or a dev's `smi run all`,
never take each other's messages nor join each other's groups. Tests speak of
topics by their registry names and of groups by stage names, and pass KAFKA_NAMES
wherever they reach the broker themselves (drained, group_lag, raw aiokafka).

Scale-out mode (issue 7, `make test-scale`), switched by the environment:
E2E_WORKERS=N runs every Faust stage (checkout, processor, notifier, janitor) as N
processes in its consumer group (a stage fixture is then one StageProcess of N
workers, ready once all N have joined the group), and the session's gateway as N
processes on its one port (GATEWAY_REUSE_PORT; they share their rate limits in
Redis); E2E_REDIS_CLUSTER=1 puts the
job table, the stages' and the tests' own, on a throwaway 3-node Redis Cluster
started for the session (REDIS_URL is then not used)."""

from __future__ import annotations

import json
import os
import uuid

import aiohttp
import pytest
from aiokafka.admin import AIOKafkaAdminClient

from schemas.topics import ALL_TOPICS, JOBS_REQUESTED
from smi.jobtable import JobTable, connect
from smi.kafka.names import KafkaNames
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.topics import delete_namespace, ensure_topics
from tests.support.kafka_watch import TopicWatcher, eventually
from tests.support.ports import free_port
from tests.support.processes import StageProcess
from tests.support.redis_cluster import LocalRedisCluster
from tests.support.stripe_proxy import RecordingStripeProxy

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
STRIPE_MOCK = os.environ.get("STRIPE_API_BASE", "http://127.0.0.1:12111")
WEBHOOK_SECRET = "whsec_e2e_" + uuid.uuid4().hex
SHARDS = 8
WORKERS = int(os.environ.get("E2E_WORKERS", "1"))  # processes per Faust stage
REDIS_CLUSTER = os.environ.get("E2E_REDIS_CLUSTER", "").strip() not in ("", "0")
SESSION = uuid.uuid4().hex[:10]  # names the session's Redis and Kafka namespaces alike
# Immutable and e2e's own: integration tests in the same pytest process keep the
# plain names (kafka_watch's default).
KAFKA_NAMES = KafkaNames(f"e2e{SESSION}.")


@pytest.fixture(scope="session")
def namespace() -> str:
    return f"e2e{SESSION}:"


@pytest.fixture(scope="session")
async def stripe_proxy():
    proxy = RecordingStripeProxy(STRIPE_MOCK)
    await proxy.start()
    yield proxy
    await proxy.stop()


@pytest.fixture(scope="session")
def gateway_port() -> int:
    return free_port()


@pytest.fixture(scope="session")
def storage_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory):
    """The seed nodes of the session's Redis Cluster (E2E_REDIS_CLUSTER=1), else ""."""
    if not REDIS_CLUSTER:
        yield ""
        return
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    try:
        cluster.start()
    except BaseException:
        cluster.stop()
        raise
    yield cluster.nodes
    cluster.stop()


@pytest.fixture(scope="session")
def stage_env(namespace, stripe_proxy, gateway_port, storage_dir, redis_cluster_nodes,
              topics_ready) -> dict[str, str]:
    """Every stage process's environment. After topics_ready, so the namespace's topics
    exist before a stage starts and are deleted only once every stage has stopped."""
    return {"STORAGE_DIR": str(storage_dir),
        "KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_NAMESPACE": KAFKA_NAMES.namespace,
        "REDIS_URL": REDIS_URL, "REDIS_CLUSTER_NODES": redis_cluster_nodes,
        "REDIS_NAMESPACE": namespace,
        "REDIS_SHARDS": str(SHARDS), "PAYMENTS": "stripe", "STRIPE_API_BASE": stripe_proxy.url,
        "STRIPE_API_KEY": "sk_test_123", "STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GATEWAY_PORT": str(gateway_port), "PUBLIC_BASE_URL": f"http://127.0.0.1:{gateway_port}",
        "URL_ALLOW_HOSTS": "127.0.0.0/8", "KAFKA_SESSION_TIMEOUT_SECONDS": "8", "PYTHONUNBUFFERED": "1",
    }


@pytest.fixture(scope="session")
async def topics_ready():
    """The session's topics; deleted at its end (with the leader topics Faust made for
    its groups)."""
    settings = Settings(kafka_bootstrap_servers=KAFKA, kafka_namespace=KAFKA_NAMES.namespace)
    await ensure_topics(settings)
    yield
    await delete_namespace(settings)


@pytest.fixture(scope="session")
async def watcher(topics_ready):
    """Sees every message produced on the contract's topics from session start."""
    w = await TopicWatcher(KAFKA, [t.name for t in ALL_TOPICS], names=KAFKA_NAMES).start()
    yield w
    await w.stop()


@pytest.fixture(scope="session")
async def redis_client(redis_cluster_nodes):
    client = connect(REDIS_URL, redis_cluster_nodes)
    await client.ping()
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
def table(redis_client, namespace) -> JobTable:
    return JobTable(redis_client, shards=SHARDS, namespace=namespace)


@pytest.fixture(scope="session")
async def producer(topics_ready):
    async with EventProducer(KAFKA, client_id="e2e-tests", max_request_size=16 * 1024 * 1024,
                             names=KAFKA_NAMES) as p:
        yield p


@pytest.fixture(scope="session")
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def job_request(**overrides) -> dict:
    body = {"request_id": f"req-{uuid.uuid4().hex}", "image_url": "https://images.example.com/photo.jpg",
            "resolution": "4x", "email": "buyer@example.com", "post_id": 42, "attachment_id": 7,
            "image_width": 2000, "image_height": 2000, "success_url": "https://shop.example.com/thanks",
            "cancel_url": "https://shop.example.com/cancel"}
    body.update(overrides)
    return body


async def publish_request(producer: EventProducer, body: dict | bytes, key: str | None = None) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    if key is None and isinstance(body, dict):
        key = body.get("request_id")
    await producer.send_raw(JOBS_REQUESTED.name, key.encode() if key else None, raw)


async def job_for_request(table: JobTable, request_id: str, *, timeout: float = 30.0):
    """The job a request made, once checkout has opened its checkout session."""
    async def find():
        page = await table.get_jobs(limit=10_000)
        for job in page.jobs:
            if job.request_id == request_id and job.stripe_checkout_session_id:
                return job
        return None
    return await eventually(find, timeout=timeout)


def stage_process(stage: str, env: dict[str, str], logdir) -> StageProcess:
    """A Faust stage of the session's E2E_WORKERS processes (not started)."""
    return StageProcess(stage, env, logdir, workers=WORKERS)


async def group_members(stage: str) -> tuple[str, int]:
    """The state of a stage's consumer group (in the session's namespace) and its
    number of members, as the broker has them."""
    group = KAFKA_NAMES.group(stage)
    admin = AIOKafkaAdminClient(bootstrap_servers=KAFKA)
    await admin.start()
    try:
        # One group per request (see smi/ops/lag.py: aiokafka misreads several).
        [response] = await admin.describe_consumer_groups([group])
    finally:
        await admin.close()
    for error_code, group_id, state, _protocol_type, _protocol, members, *_ in response.groups:
        if group_id == group and error_code == 0:
            return state, len(members)
    return "Dead", 0


async def joined(stage: StageProcess, *, timeout: float = 90) -> None:
    """Wait until every worker of ``stage`` is in its consumer group (named after the
    stage, in the session's namespace) and the group is stable with exactly them: no
    rebalance to come from their start, nor a member left over from a killed process
    (one leaves when its session times out)."""
    async def settled():
        if not stage.alive:
            raise AssertionError(f"{stage.stage} exited while joining:\n{stage.log_tail()}")
        return await group_members(stage.stage) == ("Stable", stage.workers)
    try:
        await eventually(settled, timeout=timeout, interval=0.5)
    except AssertionError as exc:
        pytest.fail(f"{stage.stage}: {stage.workers} worker(s) did not join the group "
                    f"{KAFKA_NAMES.group(stage.stage)} "
                    f"(state and members: {await group_members(stage.stage)}): {exc}\n{stage.log_tail()}")


async def start_stage(stage: str, env: dict[str, str], logdir) -> StageProcess:
    """A Faust stage started and joined (its fixture's probe then shows it working)."""
    process = stage_process(stage, env, logdir).start()
    try:
        await joined(process)
    except BaseException:
        process.stop()
        raise
    return process


@pytest.fixture(scope="session")
async def checkout(stage_env, tmp_path_factory, producer, table, watcher):
    """The checkout stage, ready: it has turned a probe request into a job."""
    stage = await start_stage("checkout", stage_env, tmp_path_factory.mktemp("checkout-logs"))
    probe = job_request()
    await publish_request(producer, probe)
    try:
        await job_for_request(table, probe["request_id"], timeout=90)
    except AssertionError:
        pytest.fail(f"checkout did not start:\n{stage.log_tail()}")
    yield stage
    stage.stop()


async def start_gateway(http, env: dict[str, str], logdir, *, port: int | None = None, workers: int = 1,
                        ready=lambda status: status == 200) -> StageProcess:
    """A gateway of ``workers`` processes on one port, once its /healthz answers as
    ``ready`` wants."""
    port = port or free_port()
    shared = {"GATEWAY_REUSE_PORT": "1"} if workers > 1 else {}
    stage = StageProcess("gateway", {**env, "GATEWAY_PORT": str(port), **shared}, logdir, workers=workers).start()
    stage.url = f"http://127.0.0.1:{port}"

    async def up():
        try:
            async with http.get(f"{stage.url}/healthz") as resp:
                return ready(resp.status)
        except aiohttp.ClientError:
            return False
    try:
        await eventually(up, timeout=60)
    except AssertionError:
        stage.stop()
        pytest.fail(f"gateway did not come up:\n{stage.log_tail()}")
    return stage


@pytest.fixture(scope="session")
async def gateway(stage_env, gateway_port, tmp_path_factory, http, topics_ready):
    stage = await start_gateway(http, stage_env, tmp_path_factory.mktemp("gateway-logs"), port=gateway_port,
                                workers=WORKERS)
    yield stage
    stage.stop()


async def wait_status(table: JobTable, job_id: str, status, *, timeout: float = 30.0):
    async def reached():
        job = await table.get(job_id)
        return job if job.status == status else None
    return await eventually(reached, timeout=timeout)
