"""The upscalers over real HTTP on loopback: LocalUpscaler (fetch, Pillow in worker
processes, idempotent results) and UpsamplerClient against FakeUpsampler, which
fetches, upscales, serves results and sends callbacks like the real API."""

from __future__ import annotations

import asyncio
import os
import socket
import time
import uuid
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
from aiohttp import web

from tests.support.loopback import serve_on_loopback
from PIL import Image

from schemas.urls import HostAllowList, UnsafeURL
from smi.errors import PermanentError, TransientError
from smi.fetch import FetchRejected, fetch_to_file
from smi.upscalers import LocalUpscaler, Submission, UpsamplerClient, UpscalerUnavailable
from smi.upscalers import local as local_upscaler
from smi.upscalers.upsampler import parse_retry_after
from tests.support.fake_upsampler import DEFAULT_API_KEY, RETRY_AFTER_SECONDS, FakeUpsampler
from tests.support.image_server import ImageServer

LOOPBACK = HostAllowList.parse("127.0.0.1/32")
MiB = 1024 * 1024


class Receiver:
    """A loopback HTTP endpoint that records what is POSTed to it (callbacks), or
    answers every request with a canned reply (a misbehaving API)."""

    def __init__(self) -> None:
        self.received: list[tuple[str, dict]] = []
        self.reply: tuple[int, str, dict[str, str]] | None = None  # status, body, headers
        self.delay = 0.0
        self.hang_up = False  # drop the connection once the request has arrived
        self._arrived = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> "Receiver":
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def wait_for(self, count: int, timeout: float = 10) -> list[tuple[str, dict]]:
        async with self._arrived:
            await asyncio.wait_for(self._arrived.wait_for(lambda: len(self.received) >= count), timeout)
        return self.received

    async def _handle(self, request: web.Request) -> web.Response:
        await asyncio.sleep(self.delay)
        if self.hang_up:
            request.transport.close()
            return web.Response()
        if self.reply is not None:
            status, body, headers = self.reply
            return web.Response(status=status, text=body, headers=headers, content_type="application/json")
        async with self._arrived:
            self.received.append((request.path, await request.json()))
            self._arrived.notify_all()
        return web.json_response({"ok": True})


@pytest.fixture
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture
async def fake():
    async with FakeUpsampler() as server:
        yield server


@pytest.fixture
async def receiver():
    server = await Receiver().start()
    yield server
    await server.stop()


@pytest.fixture
async def client(fake):
    upsampler = UpsamplerClient(fake.base_url, DEFAULT_API_KEY, timeout=5)
    yield upsampler
    await upsampler.close()


@pytest.fixture(scope="module")
async def local(tmp_path_factory):
    # One worker pool for the module: starting spawned workers is the slow part.
    upscaler = LocalUpscaler(tmp_path_factory.mktemp("storage"), allow=LOOPBACK)
    yield upscaler
    await upscaler.close()


def new_job_id() -> str:
    return str(uuid.uuid4())


# --- LocalUpscaler ---------------------------------------------------------------

# The source in memory (the default for small images) and in a file (any image over the limit).
@pytest.mark.parametrize("in_memory_up_to", [local_upscaler.IN_MEMORY_SOURCE_BYTES, 0])
async def test_local_upscale_makes_a_png_four_times_the_size(local, images, monkeypatch, in_memory_up_to):
    monkeypatch.setattr(local_upscaler, "IN_MEMORY_SOURCE_BYTES", in_memory_up_to)
    job_id = new_job_id()
    path = await local.upscale(job_id, f"{images.url}/img/64x48.png", 4, attempt=2)
    assert path == local.storage_dir / job_id / "attempt-2" / "upscaled-4x.png"
    with Image.open(path) as image:
        assert (image.format, image.size, image.mode) == ("PNG", (256, 192), "RGB")
    assert sorted(p.name for p in path.parent.iterdir()) == ["upscaled-4x.png"]  # work files gone


async def test_upscales_at_once_each_get_their_own_outcome(local, images):
    # As a stage's batch runs them: every result is its own call's (sources held in
    # memory are never mixed up), and a refused image fails alone.
    sizes = [(8 + i, 5 + i % 7) for i in range(40)]
    bombs = {3, 17, 31}
    jobs = [(new_job_id(), f"{images.url}/lying/20000x20000.png" if i in bombs else
             f"{images.url}/img/{w}x{h}.png") for i, (w, h) in enumerate(sizes)]
    outcomes = await asyncio.gather(*(local.upscale(job_id, url, 2) for job_id, url in jobs), return_exceptions=True)
    for i, ((job_id, _), outcome) in enumerate(zip(jobs, outcomes)):
        if i in bombs:
            assert isinstance(outcome, PermanentError) and "decompression bomb" in str(outcome)
            continue
        assert outcome == local.storage_dir / job_id / "upscaled-2x.png"
        with Image.open(outcome) as image:
            assert image.size == (sizes[i][0] * 2, sizes[i][1] * 2)


async def test_a_cancelled_call_leaves_the_others_of_its_submission_alone(tmp_path):
    upscaler = LocalUpscaler(tmp_path, allow=LOOPBACK, workers=1)
    try:
        calls = [asyncio.ensure_future(upscaler._in_worker(time.sleep, 0.2)) for _ in range(3)]
        await asyncio.sleep(0.05)
        calls[1].cancel()
        done = await asyncio.gather(*calls, return_exceptions=True)
        assert done[0] is None and done[2] is None and isinstance(done[1], asyncio.CancelledError)
        assert await upscaler._in_worker(divmod, 7, 2) == (3, 1)
    finally:
        await upscaler.close()


async def test_a_worker_that_dies_fails_its_calls_as_transient_and_the_next_call_works(images, tmp_path):
    upscaler = LocalUpscaler(tmp_path, allow=LOOPBACK, workers=1)
    try:
        outcomes = await asyncio.gather(upscaler._in_worker(os._exit, 1), upscaler._in_worker(os._exit, 1),
                                        return_exceptions=True)
        assert [type(o) for o in outcomes] == [TransientError, TransientError]
        assert "worker process died" in str(outcomes[0])
        path = await upscaler.upscale(new_job_id(), f"{images.url}/img/8x8.png", 2)
        with Image.open(path) as image:
            assert image.size == (16, 16)
    finally:
        await upscaler.close()


@pytest.mark.parametrize("extension", ["jpg", "webp"])
async def test_local_upscale_takes_jpeg_and_webp(local, images, extension):
    path = await local.upscale(new_job_id(), f"{images.url}/img/30x20.{extension}", 2)
    with Image.open(path) as image:
        assert (image.format, image.size) == ("PNG", (60, 40))


async def test_a_second_call_returns_the_result_without_fetching_again(local, images):
    job_id, url = new_job_id(), f"{images.url}/img/64x48.png"
    first = await local.upscale(job_id, url, 4)
    written = first.stat().st_mtime_ns
    second = await local.upscale(job_id, url, 4)
    assert second == first and second.stat().st_mtime_ns == written
    assert images.count("/img/64x48.png") == 1


async def test_a_damaged_result_is_done_again(local, images):
    job_id, url = new_job_id(), f"{images.url}/img/64x48.png"
    path = await local.upscale(job_id, url, 4)
    path.write_bytes(path.read_bytes()[:200])  # truncated
    assert await local.upscale(job_id, url, 4) == path
    with Image.open(path) as image:
        assert image.size == (256, 192)
        image.verify()
    assert images.count("/img/64x48.png") == 2


async def test_a_too_large_result_is_refused_from_the_header_before_decoding(local, images):
    # The header says 8000×6000 over 1×1 of pixel data: decoding would fail with a
    # different error, so this message proves the refusal came first.
    job_id = new_job_id()
    with pytest.raises(PermanentError, match="result would be 32000x24000 pixels, over the limit of 200000000"):
        await local.upscale(job_id, f"{images.url}/lying/8000x6000.png", 4)
    assert not local.result_path(job_id, 4).exists()


async def test_a_decompression_bomb_is_refused(local, images):
    with pytest.raises(PermanentError, match="decompression bomb"):
        await local.upscale(new_job_id(), f"{images.url}/lying/20000x20000.png", 2)


async def test_the_local_upscaler_applies_the_url_rule(local):
    with pytest.raises(UnsafeURL, match="10.0.0.1 is not public"):
        await local.upscale(new_job_id(), "http://10.0.0.1/a.png", 2)


async def test_a_job_id_must_be_a_plain_directory_name(local, images):
    with pytest.raises(PermanentError, match="directory name"):
        await local.upscale("../escape", f"{images.url}/img/8x8.png", 2)


# --- UpsamplerClient against FakeUpsampler ---------------------------------------

async def test_submit_then_a_success_callback_with_a_fetchable_result(client, fake, images, receiver, tmp_path):
    callback_url = f"{receiver.url}/webhooks/upsampler/secret-token"
    submission = await client.submit(f"{images.url}/img/64x48.png", 4, callback_url)
    assert submission == Submission(id=submission.id, status="IN_QUEUE", credit_cost=1)
    assert fake.submissions[0]["body"] == {
        "input": {"imageUrl": f"{images.url}/img/64x48.png", "inputImageType": "universal", "upscaleFactor": 4},
        "webhook": callback_url}

    [(path, body)] = await receiver.wait_for(1)
    assert path == "/webhooks/upsampler/secret-token"
    assert body == {"id": submission.id, "status": "SUCCESS", "creditCost": 1,
                    "imageUrl": f"{fake.url}/results/{submission.id}.png",
                    "compressedImageUrl": f"{fake.url}/results/{submission.id}.jpg"}
    result = await fetch_to_file(body["imageUrl"], tmp_path / "result", max_bytes=10 * MiB, allow=LOOPBACK)
    with Image.open(result.path) as image:
        assert (result.kind, image.size) == ("png", (256, 192))


@pytest.mark.parametrize("result, reason", [("bad_url", "HTTP 404"), ("not_image", "not an image"),
                                            ("oversized", "too large")])
async def test_scripted_bad_results_are_refused_when_fetched(client, fake, images, receiver, tmp_path,
                                                              result, reason):
    fake.script(result=result)
    await client.submit(f"{images.url}/img/8x8.png", 2, f"{receiver.url}/cb")
    [(_, body)] = await receiver.wait_for(1)
    assert body["status"] == "SUCCESS"
    with pytest.raises(FetchRejected, match=reason):
        await fetch_to_file(body["imageUrl"], tmp_path / "result", max_bytes=MiB, allow=LOOPBACK)
    assert list(tmp_path.iterdir()) == []


async def test_credit_cost_is_one_per_four_output_megapixels(client, images, receiver):
    submission = await client.submit(f"{images.url}/img/500x500.png", 8, f"{receiver.url}/cb")
    assert submission.credit_cost == 4  # 4000×4000 = 16 MP


async def test_status_goes_from_queued_through_in_progress_to_success(client, fake, images, receiver):
    fake.script(latency=0.6, callback=False)
    submission = await client.submit(f"{images.url}/img/64x48.png", 2, f"{receiver.url}/cb")
    seen, deadline = [], time.monotonic() + 5
    while time.monotonic() < deadline:
        body = await client.status(submission.id)
        if not seen or seen[-1] != body["status"]:
            seen.append(body["status"])
        if body["status"] in ("SUCCESS", "FAILED"):
            break
        await asyncio.sleep(0.05)
    assert seen == ["IN_QUEUE", "IN_PROGRESS", "SUCCESS"]
    assert body["imageUrl"] == f"{fake.url}/results/{submission.id}.png" and body["creditCost"] == 1
    assert fake.status_calls[-1] == submission.id
    await fake.settled()
    assert fake.callbacks_sent == [] and receiver.received == []


async def test_server_errors_and_rate_limits_are_transient(client, fake, images, receiver):
    fake.script(fail_submits_with=[500, 429])
    url, callback_url = f"{images.url}/img/8x8.png", f"{receiver.url}/cb"
    with pytest.raises(UpscalerUnavailable, match="HTTP 500") as first:
        await client.submit(url, 2, callback_url)
    with pytest.raises(TransientError, match="HTTP 429") as second:
        await client.submit(url, 2, callback_url)
    assert first.value.retry_after is None
    assert second.value.retry_after == RETRY_AFTER_SECONDS
    assert (await client.submit(url, 2, callback_url)).status == "IN_QUEUE"
    assert [record["answered"] for record in fake.submissions] == [500, 429, 200]


async def test_a_wrong_api_key_is_permanent_and_never_quoted(fake, images, receiver):
    wrong = UpsamplerClient(fake.base_url, "sk-wrong-key-123")
    try:
        with pytest.raises(PermanentError, match="rejected the API key") as raised:
            await wrong.submit(f"{images.url}/img/8x8.png", 2, f"{receiver.url}/cb")
        assert "sk-wrong-key-123" not in str(raised.value)
        with pytest.raises(PermanentError, match="rejected the API key"):
            await wrong.status("anything")
    finally:
        await wrong.close()
    assert fake.submissions[0]["authorized"] is False and fake.jobs == {}


async def test_insufficient_credits_is_permanent(client, fake, images, receiver):
    fake.script(fail_submits_with=[402])
    with pytest.raises(PermanentError, match="HTTP 402: Insufficient credits") as raised:
        await client.submit(f"{images.url}/img/8x8.png", 2, f"{receiver.url}/cb")
    assert not isinstance(raised.value, TransientError)


async def test_an_input_the_service_cannot_fetch_is_permanent(client, images, receiver):
    with pytest.raises(PermanentError, match="HTTP 400: Could not download the image"):
        await client.submit(f"{images.url}/status/404", 2, f"{receiver.url}/cb")
    with pytest.raises(PermanentError, match="HTTP 400: Unsupported image format"):
        await client.submit(f"{images.url}/text", 2, f"{receiver.url}/cb")


async def test_a_failed_job_shows_in_status_and_callback(client, fake, images, receiver):
    fake.script(outcome="FAILED", error="Upscaling failed: image too blurry")
    submission = await client.submit(f"{images.url}/img/8x8.png", 2, f"{receiver.url}/cb")
    [(_, body)] = await receiver.wait_for(1)
    assert (body["id"], body["status"], body["error"]) == (submission.id, "FAILED",
                                                           "Upscaling failed: image too blurry")
    status = await client.status(submission.id)
    assert (status["status"], status["error"], status["imageUrl"]) == (
        "FAILED", "Upscaling failed: image too blurry", None)


async def test_an_unknown_job_id_is_permanent(client):
    with pytest.raises(PermanentError, match="HTTP 404"):
        await client.status("no-such-job")


@pytest.mark.parametrize("factor", [0, 17])
async def test_a_factor_outside_the_api_range_is_refused_locally(client, fake, factor):
    with pytest.raises(PermanentError, match="outside 1..16"):
        await client.submit("https://images.example.com/a.png", factor, "https://hooks.example.com/cb")
    assert fake.submissions == []


@pytest.mark.parametrize("status, body, error, reason", [
    (200, '{"unexpected": true}', PermanentError, "unexpected Upsampler response"),
    (200, "not json", PermanentError, "unexpected Upsampler response"),
    (200, '{"id": "j1", "status": "DONE"}', PermanentError, "unexpected Upsampler response"),
    (200, '{"id": "j1", "status": "SUCCESS", "creditCost": 1}', PermanentError, "unexpected Upsampler response"),
    (200, '{"id": "j1", "status": "FAILED", "error": "Unsupported image"}', PermanentError,
     "refused the job: Unsupported image"),
    (500, '{"error": "Image too large for this plan"}', PermanentError, "HTTP 500: Image too large"),
    (503, "<html><body>Service Unavailable</body></html>", UpscalerUnavailable, r"HTTP 503$"),
    (504, "<html><body>Gateway Timeout</body></html>", UpscalerUnavailable, r"HTTP 504$"),
    (418, '{"message": "short and stout"}', PermanentError, "HTTP 418: short and stout"),
])
async def test_responses_are_classified(receiver, status, body, error, reason):
    receiver.reply = (status, body, {})
    canned = UpsamplerClient(receiver.url, DEFAULT_API_KEY)
    try:
        with pytest.raises(error, match=reason) as raised:
            await canned.submit("https://images.example.com/a.png", 4, "https://hooks.example.com/cb")
    finally:
        await canned.close()
    assert isinstance(raised.value, TransientError) == (error is UpscalerUnavailable)
    # Only a gateway's timeout leaves open whether Upsampler behind it took the job.
    assert getattr(raised.value, "in_doubt", False) == (status == 504)


async def test_an_echoed_api_key_is_scrubbed_from_reasons(receiver):
    receiver.reply = (400, '{"error": "bad request from key sk-live-abc"}', {})
    canned = UpsamplerClient(receiver.url, "sk-live-abc")
    try:
        with pytest.raises(PermanentError) as raised:
            await canned.status("j1")
    finally:
        await canned.close()
    assert "sk-live-abc" not in str(raised.value) and "***" in str(raised.value)


async def test_a_timeout_and_a_refused_connection_are_transient(receiver):
    receiver.delay = 5
    slow = UpsamplerClient(receiver.url, DEFAULT_API_KEY, timeout=0.3)
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    refused = UpsamplerClient(f"http://127.0.0.1:{closed_port}/api/v1", DEFAULT_API_KEY)
    try:
        with pytest.raises(UpscalerUnavailable, match="timed out") as timed_out:
            await slow.status("j1")
        with pytest.raises(UpscalerUnavailable, match="unreachable") as unreachable:
            await refused.status("j1")
    finally:
        await slow.close()
        await refused.close()
    # A request that left may have been taken; one that never connected was not.
    assert timed_out.value.in_doubt and not unreachable.value.in_doubt


async def test_a_connection_lost_after_the_request_left_leaves_it_in_doubt(receiver):
    receiver.hang_up = True
    dropped = UpsamplerClient(receiver.url, DEFAULT_API_KEY)
    try:
        with pytest.raises(UpscalerUnavailable, match="connection lost") as raised:
            await dropped.submit("https://images.example.com/a.png", 4, "https://hooks.example.com/cb")
    finally:
        await dropped.close()
    assert raised.value.in_doubt


async def test_a_request_that_never_got_a_connection_is_not_in_doubt(receiver):
    """With every connection taken, a submit that times out waiting for one never
    left: it is retried at once, not waited for as one Upsampler may have taken."""
    receiver.delay = 5
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=1))
    one_connection = UpsamplerClient(receiver.url, DEFAULT_API_KEY, session=session, timeout=0.5)
    try:
        first = asyncio.ensure_future(one_connection.submit("https://images.example.com/a.png", 4, "https://h/cb"))
        await asyncio.sleep(0.1)  # the first holds the only connection
        with pytest.raises(UpscalerUnavailable, match="no connection in time") as waited:
            await one_connection.submit("https://images.example.com/b.png", 4, "https://h/cb")
        with pytest.raises(UpscalerUnavailable, match="timed out") as sent:
            await first
    finally:
        await session.close()
    assert not waited.value.in_doubt and sent.value.in_doubt


def test_retry_after_takes_seconds_or_an_http_date():
    now = datetime(2025, 1, 1, 12, 0, tzinfo=UTC)
    assert parse_retry_after("30") == 30
    assert parse_retry_after(format_datetime(now + timedelta(seconds=90), usegmt=True), now=now) == 90
    assert parse_retry_after(format_datetime(now - timedelta(seconds=90), usegmt=True), now=now) == 0
    assert parse_retry_after("soon") is None and parse_retry_after(None) is None
