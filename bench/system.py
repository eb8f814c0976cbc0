"""The system under test and what the bench runs beside it: `smi run all` as a
subprocess (its output to a log file), a server of one tiny PNG (so the local
upscaler costs next to nothing), an SMTP sink that notes when each download-ready
email arrives, and a group-less watcher of the status topics; ``surroundings``
starts the last three and the environment a run's stages get."""

from __future__ import annotations

import asyncio
import io
import json
import os
import re
import signal
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiosmtpd.controller import Controller
from PIL import Image

from schemas.topics import JOBS_AWAITING_PAYMENT, JOBS_COMPLETED, JOBS_DEAD_LETTER, JOBS_FAILED, JOBS_PENDING
from smi.kafka.names import DEFAULT, KafkaNames
from smi.ops.lag import STAGE_SOURCE_TOPICS, sample
from smi.settings import Settings

REPO = Path(__file__).resolve().parents[1]
STOP_SECONDS = 60


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class StageGroupsBusy(RuntimeError):
    pass


async def stage_group_members(bootstrap: str, names: KafkaNames = DEFAULT) -> dict[str, int]:
    """stage → the members of its consumer group (in ``names``' KAFKA_NAMESPACE)."""
    groups = await sample(bootstrap, list(STAGE_SOURCE_TOPICS), names=names)
    return {names.local(g.group): g.members for g in groups}


async def require_idle_stage_groups(bootstrap: str, names: KafkaNames = DEFAULT) -> None:
    """The stages' consumer groups are their names (in KAFKA_NAMESPACE): a second
    system on the same broker and namespace (a CI run's e2e stages, someone's `smi
    run all`) would share partitions with ours, handle our messages with its own job
    table, and be disturbed by ours."""
    busy = {names.group(stage): n for stage, n in (await stage_group_members(bootstrap, names)).items() if n}
    if busy:
        raise StageGroupsBusy(
            "consumer groups in use on " + bootstrap + ": " + ", ".join(f"{g} ({n} members)" for g, n in busy.items())
            + ". Another system is running its stages on this broker; wait until it stops, or point "
              "KAFKA_BOOTSTRAP_SERVERS at a broker of your own, or set a KAFKA_NAMESPACE of your own.")


class SystemProcess:
    """`python -m smi.cli run <stage|all>` in its own process group, stopped with
    SIGTERM (the supervisor then stops every stage gracefully)."""

    def __init__(self, stage: str, env: dict[str, str], log_path: Path, options: Sequence[str] = ()):
        self.stage, self.env, self.log_path, self.options = stage, env, log_path, list(options)
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> SystemProcess:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with self.log_path.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "smi.cli", "run", self.stage, *self.options, cwd=REPO,
                env={**os.environ, **self.env},
                stdout=log, stderr=asyncio.subprocess.STDOUT, start_new_session=True)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def stop(self) -> int | None:
        if not self.alive:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(signal.SIGTERM)
        try:
            return await asyncio.wait_for(self.proc.wait(), STOP_SECONDS)
        except TimeoutError:
            os.killpg(self.proc.pid, signal.SIGKILL)  # our own session: the supervisor and its stages
            return await self.proc.wait()


def tiny_png(size: int = 8) -> bytes:
    out = io.BytesIO()
    Image.linear_gradient("L").resize((size, size)).convert("RGB").save(out, format="PNG")
    return out.getvalue()


class ImageServer:
    """GET /tiny.png: an 8×8 PNG, the input of every bench job."""

    def __init__(self) -> None:
        self.body = tiny_png()
        self.runner: web.AppRunner | None = None
        self.port = 0

    @property
    def image_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/tiny.png"

    async def start(self) -> ImageServer:
        app = web.Application()
        app.router.add_get("/tiny.png", lambda _: web.Response(body=self.body, content_type="image/png"))
        self.runner = web.AppRunner(app, access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        if self.runner:
            await self.runner.cleanup()


READY_ID = re.compile(rb"^Message-ID:\s*<ready\.([0-9a-f-]{36})\.", re.IGNORECASE | re.MULTILINE)


class MailSink:
    """An SMTP server (aiosmtpd, in its own thread) that keeps, per job, the moment
    its first download-ready email (Message-ID <ready.<job_id>...>) arrived."""

    def __init__(self) -> None:
        self.port = free_port()
        self.ready: dict[str, float] = {}
        self.messages = 0
        self._lock = threading.Lock()
        self._controller: Controller | None = None

    @property
    def url(self) -> str:
        return f"smtp://127.0.0.1:{self.port}"

    async def handle_DATA(self, server, session, envelope) -> str:
        now = time.time()
        found = READY_ID.search(envelope.original_content or b"")
        with self._lock:
            self.messages += 1
            if found:
                self.ready.setdefault(found.group(1).decode(), now)
        return "250 Message accepted for delivery"

    def start(self) -> MailSink:
        self._controller = Controller(self, hostname="127.0.0.1", port=self.port, server_hostname="bench-sink")
        self._controller.start()
        return self

    def stop(self) -> None:
        if self._controller:
            self._controller.stop()

    def emails(self) -> dict[str, float]:
        with self._lock:
            return dict(self.ready)


class EventWatch:
    """Reads ``topics`` from their end offsets at start() on, without a consumer
    group, and keeps the first event per job: ``first[topic][job_id] = (Kafka
    timestamp in epoch seconds, event)``, topics by their registry names (read in
    ``names``' KAFKA_NAMESPACE). Events of other systems are kept too; callers look
    up their own job ids."""

    def __init__(self, bootstrap: str, topics: Sequence[str], names: KafkaNames = DEFAULT):
        self.bootstrap, self.topics, self.names = bootstrap, list(topics), names
        self.first: dict[str, dict[str, tuple[float, dict]]] = {t: {} for t in self.topics}
        self.by_request: dict[str, tuple[float, dict]] = {}  # jobs.awaiting_payment by data.request_id
        self.dead_letters: list[dict] = []
        self._consumer: AIOKafkaConsumer | None = None
        self._task: asyncio.Task | None = None

    async def start(self) -> EventWatch:
        self._consumer = AIOKafkaConsumer(bootstrap_servers=self.bootstrap, enable_auto_commit=False,
                                          fetch_max_wait_ms=20, max_partition_fetch_bytes=8 * 1024 * 1024)
        await self._consumer.start()
        cluster = await self._consumer._client.fetch_all_metadata()
        topics = [self.names.topic(t) for t in self.topics]
        partitions = [TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t) or ()]
        self._consumer.assign(partitions)
        for tp, end in (await self._consumer.end_offsets(partitions)).items():
            self._consumer.seek(tp, end)
        self._task = asyncio.create_task(self._run())
        return self

    async def _run(self) -> None:
        while True:
            batches = await self._consumer.getmany(timeout_ms=100, max_records=5000)
            for tp, messages in batches.items():
                for m in messages:
                    self._keep(self.names.local(tp.topic), m.timestamp / 1000, m.value)

    def _keep(self, topic: str, at: float, raw: bytes | None) -> None:
        try:
            event = json.loads(raw)
        except (TypeError, ValueError):
            return
        if not isinstance(event, dict):
            return
        if topic == "jobs.dead_letter":
            self.dead_letters.append(event)
            return
        job_id = event.get("job_id")
        if isinstance(job_id, str):
            self.first[topic].setdefault(job_id, (at, event))
        request_id = (event.get("data") or {}).get("request_id")
        if topic == "jobs.awaiting_payment" and isinstance(request_id, str):
            self.by_request.setdefault(request_id, (at, event))

    def times(self, topic: str, job_ids: Sequence[str] | set[str]) -> dict[str, float]:
        seen = self.first[topic]
        return {j: seen[j][0] for j in job_ids if j in seen}

    async def wait(self, check, *, timeout: float, what: str) -> bool:
        """Poll ``check()`` until true or ``timeout`` seconds; False on timeout."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                print(f"  timed out after {timeout:.0f}s waiting for {what}", flush=True)
                return False
            await asyncio.sleep(0.05)
        return True

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):
                pass
        if self._consumer:
            await self._consumer.stop()


@dataclass
class Surroundings:
    """What the system under test is run with: the environment of its stages (its
    own REDIS_NAMESPACE and STORAGE_DIR, PAYMENTS=local, the gateway's port and
    webhook secret), the image server, the mail sink and the watcher."""
    namespace: str  # REDIS_NAMESPACE
    gateway: str  # the gateway's base URL
    secret: str  # STRIPE_WEBHOOK_SECRET
    env: dict[str, str]
    images: ImageServer
    sink: MailSink
    watch: EventWatch


@asynccontextmanager
async def surroundings(settings: Settings, *, namespace: str, upscaler: str,
                       on_exit: Callable[[], Awaitable[None]] | None = None) -> AsyncIterator[Surroundings]:
    """Starts what a run needs around the system and takes it all down afterwards
    (``on_exit``, awaited last: e.g. deleting the namespace's Redis keys). With
    ``upscaler="upsampler"``, the fake Upsampler server of tests/support, answering
    at once, its callbacks through the gateway."""
    port = free_port()
    gateway, secret = f"http://127.0.0.1:{port}", f"whsec_bench_{uuid.uuid4().hex}"
    storage = Path(tempfile.mkdtemp(prefix="smi-bench-storage-"))
    images = await ImageServer().start()
    sink = MailSink().start()
    watch = await EventWatch(settings.kafka_bootstrap_servers, [
        JOBS_AWAITING_PAYMENT.name, JOBS_PENDING.name, JOBS_COMPLETED.name, JOBS_FAILED.name,
        JOBS_DEAD_LETTER.name], settings.kafka_names).start()
    env = {"PAYMENTS": "local", "UPSCALER": upscaler, "REDIS_NAMESPACE": namespace,
           "KAFKA_NAMESPACE": settings.kafka_namespace,
           "URL_ALLOW_HOSTS": "127.0.0.1/32", "STRIPE_WEBHOOK_SECRET": secret, "GATEWAY_PORT": str(port),
           "PUBLIC_BASE_URL": gateway, "METRICS_PORT": "0", "SMTP_URL": sink.url, "STORAGE_DIR": str(storage)}
    upsampler = None
    try:
        if upscaler == "upsampler":
            # Test support, not a dependency of smi: the bench runs from a checkout.
            from tests.support.fake_upsampler import DEFAULT_API_KEY, FakeUpsampler

            upsampler = await FakeUpsampler().start()
            upsampler.script(latency=0.0)
            env |= {"UPSAMPLER_API_KEY": DEFAULT_API_KEY, "UPSAMPLER_BASE_URL": upsampler.base_url}
        yield Surroundings(namespace, gateway, secret, env, images, sink, watch)
    finally:
        await watch.stop()
        sink.stop()
        await images.stop()
        if upsampler is not None:
            await upsampler.stop()
        shutil.rmtree(storage, ignore_errors=True)
        if on_exit is not None:
            await on_exit()
