"""A real checkout stage process (`python -m services.checkout`) exports Prometheus
metrics on its own port (METRICS_PORT=0: a free one, named in its log) and logs JSON
lines with LOG_FORMAT=json.

The process joins the shared consumer group ``checkout`` on the dev broker, so other
members may hold some partitions of jobs.requested: once it has joined, the test
sends a valid request (each its own job) and a malformed one to every partition, so
whichever partitions this process holds carry one of each. Its jobs go to a Redis
namespace of its own."""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid

import aiohttp
import pytest
from aiokafka import AIOKafkaProducer
from prometheus_client.parser import text_string_to_metric_families

from schemas.topics import JOBS_REQUESTED
from smi.metrics import start_metrics_server
from smi.settings import Settings
from smi.stack.topics import ensure_topics
from tests.support.kafka_watch import eventually
from tests.support.processes import StageProcess

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
METRICS_LINE = re.compile(r"metrics on http://([\d.]+):(\d+)/metrics")
WORKER_READY = "[^Worker]: Ready"  # faust's: the group has been joined and partitions assigned

EXPECTED_FAMILIES = {
    "smi_messages": "counter", "smi_handler_duration_seconds": "histogram", "smi_transitions": "counter",
    "smi_dead_letters": "counter", "smi_refunds": "counter", "smi_emails": "counter",
    "smi_upscaler_requests": "counter", "smi_jobs": "gauge", "smi_consumer_lag": "gauge",
    "smi_last_processed_timestamp_seconds": "gauge", "smi_gc_pause_seconds": "histogram",
    "smi_gc_frozen_objects": "gauge",
}

pytestmark = pytest.mark.timeout(75)


def job_request() -> dict:
    return {"request_id": f"metrics-{uuid.uuid4().hex}", "image_url": "https://images.example.com/photo.jpg",
            "resolution": "4x", "email": "buyer@example.com", "post_id": 42, "image_width": 2000,
            "image_height": 2000}


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """Every sample of an exposition, by name and labels; parsing it at all checks the format."""
    return {(s.name, frozenset(s.labels.items())): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0.0)


@pytest.fixture
async def checkout_stage(tmp_path):
    await ensure_topics(Settings(kafka_bootstrap_servers=KAFKA))
    env = {"KAFKA_BOOTSTRAP_SERVERS": KAFKA, "REDIS_URL": REDIS_URL,
           "REDIS_NAMESPACE": f"metrics{uuid.uuid4().hex[:10]}:", "PAYMENTS": "local", "METRICS_PORT": "0",
           "URL_ALLOW_HOSTS": "127.0.0.0/8", "LOG_FORMAT": "json", "KAFKA_SESSION_TIMEOUT_SECONDS": "8",
           "PYTHONUNBUFFERED": "1"}
    stage = StageProcess("checkout", env, tmp_path).start()
    yield stage
    stage.stop()


async def send_to_every_partition() -> None:
    """A valid request and a malformed one on every partition of jobs.requested."""
    producer = AIOKafkaProducer(bootstrap_servers=KAFKA, acks="all")
    await producer.start()
    try:
        for partition in sorted(await producer.partitions_for(JOBS_REQUESTED.name)):
            request = job_request()
            await producer.send_and_wait(JOBS_REQUESTED.name, json.dumps(request).encode(),
                                         key=request["request_id"].encode(), partition=partition)
            await producer.send_and_wait(JOBS_REQUESTED.name, b"{not json",
                                         key=f"metrics-bad-{uuid.uuid4().hex}".encode(), partition=partition)
    finally:
        await producer.stop()


async def test_checkout_stage_exports_metrics_and_logs_json(checkout_stage):
    def metrics_url_once_ready():
        log = checkout_stage.log_tail(lines=500)
        assert checkout_stage.alive, log
        found = METRICS_LINE.search(log)
        return found and WORKER_READY in log and f"http://{found[1]}:{found[2]}/metrics"

    url = await eventually(metrics_url_once_ready, timeout=30, interval=0.2)
    await send_to_every_partition()

    async with aiohttp.ClientSession() as http:
        async def handled_both() -> str | None:
            async with http.get(url) as resp:
                assert resp.status == 200
                text = await resp.text()
            found = samples(text)
            return text if all(value(found, "smi_messages_total", stage="checkout", topic=JOBS_REQUESTED.name,
                                     outcome=outcome) >= 1 for outcome in ("handled", "dead_lettered")) else None

        try:
            text = await eventually(handled_both, timeout=25, interval=0.5)
        except AssertionError:
            pytest.fail(f"checkout did not handle the requests:\n{checkout_stage.log_tail()}")

    found = samples(text)
    assert value(found, "smi_dead_letters_total", stage="checkout", topic=JOBS_REQUESTED.name) >= 1
    assert value(found, "smi_transitions_total", source="new", target="awaiting_payment", outcome="applied") >= 1
    assert value(found, "smi_handler_duration_seconds_count", stage="checkout", topic=JOBS_REQUESTED.name) >= 2
    assert abs(time.time() - value(found, "smi_last_processed_timestamp_seconds", stage="checkout")) < 60
    # The gauges are refreshed at start (so every status has a sample), then every 15 s.
    assert ("smi_jobs", frozenset({("status", "awaiting_payment")})) in found
    # The startup heap is frozen (smi.heap), by a full pass observed like any other.
    assert value(found, "smi_gc_frozen_objects") > 50_000
    assert value(found, "smi_gc_pause_seconds_count", generation="2") >= 1
    # Every metric is declared at import, so even those no call site has used yet parse with their type.
    families = {family.name: family.type for family in text_string_to_metric_families(text)}
    assert {name: families.get(name) for name in EXPECTED_FAMILIES} == EXPECTED_FAMILIES

    lines = (checkout_stage.logdir / "checkout-1.log").read_text().splitlines()
    assert lines and all(json.loads(line)["stage"] == "checkout" for line in lines), "LOG_FORMAT=json: JSON lines only"


def test_a_taken_metrics_port_gives_a_free_one():
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        port = start_metrics_server(taken)
    assert port not in (0, taken)
    with socket.create_connection(("127.0.0.1", port), timeout=5):
        pass
