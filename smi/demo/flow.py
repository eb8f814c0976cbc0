"""`smi demo`: a real job through the running system. It orders a 4x upscale of the
bundled sample image (served by the gateway), pays it on the local pay page (the
signed-webhook path), and follows the job through its statuses to the emailed
download link, which it fetches. Needs PAYMENTS=local and, since the sample is
served from this machine, URL_ALLOW_HOSTS covering the gateway's address."""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from dataclasses import dataclass, field
from email import policy
from email.parser import BytesParser
from pathlib import Path

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.live import Live
from rich.table import Table

from schemas.topics import JOBS_AWAITING_PAYMENT, JOBS_REQUESTED
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.layout import Layout

SAMPLE = ("sample.png", 320, 240)
FINAL = ("completed", "failed")
DOWNLOAD_LINK = re.compile(r"/downloads/([A-Za-z0-9]{64})")


class DemoFailed(RuntimeError):
    pass


@dataclass
class DemoResult:
    job_id: str = ""
    statuses: list[tuple[str, float]] = field(default_factory=list)
    download_url: str = ""
    email_file: Path | None = None
    download_bytes: int = 0
    transitions: dict[str, float] = field(default_factory=dict)


async def run_demo(settings: Settings, *, timeout: float = 180.0, console: Console | None = None) -> DemoResult:
    console = console or Console()
    base = settings.public_base_url.rstrip("/")
    result = DemoResult()
    started = time.monotonic()
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as http:
        await _wait_healthy(http, base, timeout)
        request_id = f"demo-{uuid.uuid4().hex[:12]}"
        name, width, height = SAMPLE
        request = {"request_id": request_id, "image_url": f"{base}/samples/{name}", "resolution": "4x",
                   "email": "demo.customer@example.com", "post_id": 1, "image_width": width, "image_height": height,
                   "success_url": f"{base}/jobs/", "cancel_url": f"{base}/jobs/"}
        console.print(f"[bold]Ordering[/] a 4x upscale of {request['image_url']} (request {request_id})")
        awaiting = await _publish_and_wait_for_checkout(settings, request, timeout)
        result.job_id = awaiting["job_id"]
        checkout_url = awaiting["data"]["checkout_url"]
        console.print(f"Checkout: {checkout_url}  price ${awaiting['data']['price_cents'] / 100:.2f}")
        async with http.post(checkout_url, allow_redirects=False) as resp:
            if resp.status != 303:
                raise DemoFailed(f"paying on {checkout_url} answered {resp.status}: {await resp.text()}")
        console.print("Paid on the local pay page (a signed checkout.session.completed went through the gateway)")
        await _follow(http, base, result, started, timeout, console)
        if result.statuses[-1][0] != "completed":
            raise DemoFailed(f"job {result.job_id} ended {result.statuses[-1][0]}")
        result.email_file, result.download_url = await _find_email(result.job_id, timeout)
        async with http.get(result.download_url) as resp:
            if resp.status != 200:
                raise DemoFailed(f"the download link answered {resp.status}")
            result.download_bytes = len(await resp.read())
        result.transitions = await _transitions_seen(http, settings)
    path = ["new → awaiting_payment", "awaiting_payment → pending", "pending → processing", "processing → completed"]
    missing = [step for step in path if result.transitions.get(step, 0) < 1]
    if missing:
        raise DemoFailed(f"the stages' /metrics do not show the transitions {missing} (seen: {result.transitions})")
    console.print(f"[green]Completed[/] in {time.monotonic() - started:.1f}s. Email: {result.email_file}")
    console.print("Transitions counted by the stages' /metrics: " + ", ".join(
        f"{step} {result.transitions[step]:g}" for step in path))
    console.print(f"Download ({result.download_bytes} bytes): {result.download_url}")
    return result


async def _transitions_seen(http: aiohttp.ClientSession, settings: Settings) -> dict[str, float]:
    """Applied transitions summed over the stages' Prometheus endpoints."""
    seen: dict[str, float] = {}
    for stage in ("checkout", "processor"):
        async with http.get(f"http://127.0.0.1:{settings.metrics_port_for(stage)}/metrics") as resp:
            text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "smi_transitions_total" and sample.labels.get("outcome") == "applied":
                    step = f"{sample.labels['source']} → {sample.labels['target']}"
                    seen[step] = seen.get(step, 0) + sample.value
    return seen


async def _wait_healthy(http: aiohttp.ClientSession, base: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            async with http.get(f"{base}/healthz") as resp:
                if resp.status == 200:
                    return
        except aiohttp.ClientError:
            pass
        if time.monotonic() > deadline:
            raise DemoFailed(f"the gateway at {base} is not healthy (is `smi run all` running?)")
        await asyncio.sleep(0.5)


async def _publish_and_wait_for_checkout(settings: Settings, request: dict, timeout: float) -> dict:
    """Publish the request, then read its jobs.awaiting_payment event (watched from
    the end offsets taken before publishing, so no earlier event is mistaken for it)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=settings.kafka_bootstrap_servers, enable_auto_commit=False)
    await consumer.start()
    try:
        # consumer.topics() returns metadata without keeping it; ask the client directly.
        cluster = await consumer._client.fetch_all_metadata()
        topic = settings.kafka_names.topic(JOBS_AWAITING_PAYMENT)
        partitions = [TopicPartition(topic, p) for p in cluster.partitions_for_topic(topic) or ()]
        if not partitions:
            raise DemoFailed(f"topic {topic} does not exist (run `smi topics create`)")
        consumer.assign(partitions)
        for tp, end in (await consumer.end_offsets(partitions)).items():
            consumer.seek(tp, end)
        async with EventProducer.from_settings(settings, client_id="smi-demo") as producer:
            await producer.send(JOBS_REQUESTED, request["request_id"], request)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for messages in (await consumer.getmany(timeout_ms=500)).values():
                for message in messages:
                    event = json.loads(message.value)
                    if event.get("data", {}).get("request_id") == request["request_id"]:
                        return event
        raise DemoFailed("checkout did not open a checkout session (is the checkout stage running?)")
    finally:
        await consumer.stop()


async def _follow(http, base, result: DemoResult, started: float, timeout: float, console: Console) -> None:
    def table() -> Table:
        view = Table(title=f"job {result.job_id}")
        view.add_column("status")
        view.add_column("after", justify="right")
        for status, at in result.statuses:
            view.add_row(status, f"{at:.1f}s")
        return view

    deadline = time.monotonic() + timeout
    with Live(table(), console=console, refresh_per_second=8, transient=False) as live:
        while time.monotonic() < deadline:
            async with http.get(f"{base}/jobs/{result.job_id}") as resp:
                status = (await resp.json())["status"] if resp.status == 200 else None
            if status and (not result.statuses or result.statuses[-1][0] != status):
                result.statuses.append((status, time.monotonic() - started))
                live.update(table())
            if status in FINAL:
                return
            await asyncio.sleep(0.2)
    raise DemoFailed(f"job {result.job_id} did not finish within {timeout:.0f}s "
                     f"(statuses seen: {[s for s, _ in result.statuses]})")


async def _find_email(job_id: str, timeout: float) -> tuple[Path, str]:
    """The download-ready email in the local mail sink (var/mail): the notifier's
    Message-ID names the job; the link is in the body."""
    mail_dir = Layout.from_env().data_dir("mail")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(mail_dir.glob("*.eml"), key=lambda p: p.stat().st_mtime, reverse=True):
            message = BytesParser(policy=policy.default).parse(path.open("rb"))
            if job_id in (message.get("Message-ID") or ""):
                body = message.get_body(preferencelist=("plain", "html")).get_content()
                link = DOWNLOAD_LINK.search(body)
                if link:
                    return path, body[body.rfind("http", 0, link.start()):link.end()]
        await asyncio.sleep(0.5)
    raise DemoFailed(f"no download-ready email for job {job_id} in {mail_dir} (is the notifier running?)")

