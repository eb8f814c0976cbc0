"""A stage started before its broker waits for it (smi/kafka/startup.py) instead
of exiting: a real stage process whose only bootstrap address opens late."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

from smi.kafka.startup import wait_for_kafka
from tests.support.ports import free_port
from tests.support.processes import StageProcess

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092").split(",")[0]
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


async def test_the_wait_backs_off_and_ends_when_a_broker_answers():
    answers = iter([False, False, False, False, False, True])
    slept: list[float] = []

    async def probe(_: str) -> bool:
        return next(answers)

    async def sleep(seconds: float) -> None:
        slept.append(seconds)

    assert await wait_for_kafka("b:9092", probe=probe, sleep=sleep) == 5
    assert slept == [1, 2, 4, 8, 15]


async def test_a_closed_port_is_no_broker():
    from smi.kafka.startup import broker_answers

    assert await broker_answers(f"127.0.0.1:{free_port()}", timeout_ms=1000) is False
    assert await broker_answers(KAFKA) is True


async def forward(port: int, target: str) -> asyncio.base_events.Server:
    """A TCP forwarder on ``port`` to the real broker: the stage's bootstrap address.
    The broker's metadata then names its own address, so only the first contact
    goes through here."""
    host, _, target_port = target.rpartition(":")

    async def pipe(reader, writer):
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    async def handle(client_reader, client_writer):
        broker_reader, broker_writer = await asyncio.open_connection(host, int(target_port))
        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    return await asyncio.start_server(handle, "127.0.0.1", port)


async def wait_for_log(stage: StageProcess, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in stage.log_text():
        assert stage.alive, f"the stage exited:\n{stage.log_tail()}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s:\n{stage.log_tail()}"
        await asyncio.sleep(0.2)


@pytest.mark.timeout(120)
async def test_a_stage_started_before_its_broker_waits_and_then_runs(tmp_path):
    port = free_port()
    stage = StageProcess("janitor", {
        "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{port}", "REDIS_URL": REDIS_URL,
        "REDIS_NAMESPACE": f"startup{uuid.uuid4().hex[:8]}", "METRICS_PORT": "0",
        "STORAGE_DIR": str(tmp_path / "storage"),
    }, tmp_path)
    stage.start()
    server = None
    try:
        await wait_for_log(stage, "does not answer", timeout=60)
        await asyncio.sleep(3)  # a few tries: Faust alone would have exited by now
        assert stage.alive and "Worker]: Ready" not in stage.log_text()
        server = await forward(port, KAFKA)
        await wait_for_log(stage, "Worker]: Ready", timeout=90)
        assert "answers after" in stage.log_text()
    finally:
        stage.stop()  # a graceful leave: the group does not wait out a dead member
        if server is not None:
            server.close()
