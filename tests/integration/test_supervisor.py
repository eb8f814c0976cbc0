"""`smi run all --workers`: the supervisor runs several processes of one stage,
real ones, on the real broker and Redis (in namespaces of the test's own). A Faust
stage's workers all join the stage's consumer group, each serves its metrics on a
port of its own (the second 100 above the stage's), a killed worker is started
again under its own name, and a stop stops them all. The gateway's workers share
its port and count a guesser's failures together."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import socket
import uuid

import aiohttp
import pytest

from smi.kafka.names import KafkaNames
from smi.ops.lag import sample
from smi.settings import Settings
from smi.stack.topics import delete_namespace, ensure_topics
from smi.supervisor import Supervisor
from tests.support.kafka_watch import eventually
from smi.jobtable.table import new_download_token
from tests.support.ports import free_port

KAFKA = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture
async def namespace():
    name = f"sup{uuid.uuid4().hex[:8]}."
    settings = Settings(kafka_bootstrap_servers=KAFKA, kafka_namespace=name)
    await ensure_topics(settings)
    yield name
    await delete_namespace(settings)


async def test_two_workers_of_a_stage_share_its_group_and_restart_on_their_own(namespace, capsys):
    metrics_port = free_port()
    while not port_is_free(metrics_port + 100):
        metrics_port = free_port()
    env = {"KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_NAMESPACE": namespace, "REDIS_URL": REDIS_URL,
           "REDIS_NAMESPACE": namespace.rstrip(".") + ":", "PAYMENTS": "local", "METRICS_PORT": str(metrics_port)}
    # One stage: METRICS_PORT is every stage's port, so another stage would contend for it.
    supervisor = Supervisor(["checkout"], env=env, workers={"checkout": 2})
    running = asyncio.create_task(supervisor.run())
    try:
        await eventually(lambda: has_members(namespace, "checkout", 2), timeout=120, interval=0.5)
        assert set(supervisor.procs) == {"checkout", "checkout.2"}
        first, second = supervisor.procs["checkout"], supervisor.procs["checkout.2"]
        assert first.pid != second.pid

        output = Output(capsys)
        await eventually(lambda: output.says("checkout.2 | ", "[^Worker]: Ready"), timeout=120)

        # The first worker serves the configured port, the second 100 above it (no
        # "in use" fallback to a free one): each has a port a scrape can name.
        out = output.text
        assert "is in use" not in out, out
        ports = dict(re.findall(r"^\s*(checkout(?:\.2)?) \| .*metrics on http://[\d.]+:(\d+)/metrics", out, re.M))
        assert ports == {"checkout": str(metrics_port), "checkout.2": str(metrics_port + 100)}

        # A killed worker comes back under its own name; the other keeps running.
        output.mark()
        second.send_signal(signal.SIGKILL)
        restarted = await eventually(lambda: _new_process(supervisor, "checkout.2", second.pid), timeout=60)
        assert supervisor.procs["checkout"] is first and first.returncode is None
        await eventually(lambda: output.says("checkout.2 | ", "[^Worker]: Ready"), timeout=120)
        # (The dead worker counts as a member until its session times out, so the
        # count alone could not say that the new one joined.)
        await eventually(lambda: has_members(namespace, "checkout", 2), timeout=120, interval=0.5)
    finally:
        supervisor.stopping.set()
        await asyncio.wait_for(running, 60)
    # Every worker was stopped (SIGTERM), none left behind.
    assert all(proc.returncode is not None for proc in supervisor.procs.values())
    assert restarted.returncode == 0 and first.returncode == 0
    # And the loop's signals are the test run's again (Ctrl-C interrupts it).
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


async def test_two_gateway_workers_share_the_port_and_a_guessers_limit(namespace, capsys):
    gateway_port = free_port()
    metrics_port = free_port()
    while not port_is_free(metrics_port + 100):
        metrics_port = free_port()
    env = {"KAFKA_BOOTSTRAP_SERVERS": KAFKA, "KAFKA_NAMESPACE": namespace, "REDIS_URL": REDIS_URL,
           "REDIS_NAMESPACE": namespace.rstrip(".") + ":", "GATEWAY_PORT": str(gateway_port),
           "METRICS_PORT": str(metrics_port)}
    supervisor = Supervisor(["gateway"], env=env, workers={"gateway": 2})
    running = asyncio.create_task(supervisor.run())
    output = Output(capsys)
    try:
        for label in ("gateway", "gateway.2"):
            await eventually(lambda: output.says(f"{label} | ", "this worker's metrics on"), timeout=60)
        assert "Address already in use" not in output.text, output.text
        worker_ports = (metrics_port, metrics_port + 100)

        # Each guess on a fresh connection, so the kernel spreads them over the two.
        connector = aiohttp.TCPConnector(force_close=True, local_addr=("127.0.0.57", 0))
        async with aiohttp.ClientSession(connector=connector) as http:
            statuses = []
            for _ in range(30):
                async with http.get(f"http://127.0.0.1:{gateway_port}/downloads/{new_download_token()}") as resp:
                    statuses.append(resp.status)
            # 20 failures a minute per client, wherever they land: not 20 per process.
            assert statuses[:20] == [404] * 20 and statuses[20:] == [429] * 10, statuses
            answered = [await downloads_answered(http, port) for port in worker_ports]
    finally:
        supervisor.stopping.set()
        await asyncio.wait_for(running, 60)
    assert all(counts.get("404", 0) > 0 for counts in answered), answered  # both took guesses
    assert sum(counts.get("404", 0) for counts in answered) == 20, answered
    assert sum(counts.get("429", 0) for counts in answered) == 10, answered
    assert all(proc.returncode == 0 for proc in supervisor.procs.values())


async def downloads_answered(http: aiohttp.ClientSession, metrics_port: int) -> dict[str, float]:
    """One worker's smi_gateway_downloads_total, by status, from its own metrics port."""
    async with http.get(f"http://127.0.0.1:{metrics_port}/metrics") as resp:
        text = await resp.text()
    return {status: float(n) for status, n in re.findall(r'smi_gateway_downloads_total\{status="(\d+)"\} (\S+)', text)}


class Output:
    """What the supervisor printed (its workers' lines, each after its label)."""

    def __init__(self, capsys):
        self.capsys = capsys
        self.text = ""
        self._since = 0

    def mark(self) -> None:
        """Later ``says`` look only at what is printed from now on."""
        self.text += self.capsys.readouterr().out
        self._since = len(self.text)

    async def says(self, prefix: str, text: str) -> bool:
        self.text += self.capsys.readouterr().out
        return any(line.lstrip().startswith(prefix.lstrip()) and text in line
                   for line in self.text[self._since:].splitlines())


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
            return True
        except OSError:
            return False


async def has_members(namespace: str, stage: str, expected: int) -> bool:
    """Whether the stage's group has ``expected`` members, as `smi lag` reads them."""
    [group] = await sample(KAFKA, [stage], names=KafkaNames(namespace))
    return group.members == expected


async def _new_process(supervisor: Supervisor, label: str, old_pid: int):
    proc = supervisor.procs.get(label)
    return proc if proc is not None and proc.pid != old_pid and proc.returncode is None else None
