"""GET /downloads/{token} and POST /webhooks/upsampler/{callback_token} on a real
gateway process with its own STORAGE_DIR, real Redis and Kafka. Jobs are built in
the job table through the real transition path; their images are real files."""

from __future__ import annotations

import io
import json
import os
import secrets
import uuid
from contextlib import asynccontextmanager
from datetime import timedelta

import aiohttp
import pytest
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from schemas.events import utcnow
from schemas.status import JobStatus as S
from services.gateway.upsampler_webhook import record_callback
from smi.jobtable import hash_token
from smi.jobtable.table import new_download_token
from tests.e2e.conftest import free_port, start_gateway
from tests.support.jobs import make_job
from tests.support.kafka_watch import eventually, for_job

PRIVATE_HEADERS = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}


@pytest.fixture(scope="module")
def gateway_storage(tmp_path_factory):
    """STORAGE_DIR of this module's own gateway (set explicitly: it must not depend
    on what the session's stage_env holds)."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="module")
async def downloads_gateway(stage_env, gateway_storage, tmp_path_factory, http, topics_ready):
    stage = await start_gateway(http, {**stage_env, "STORAGE_DIR": str(gateway_storage)},
                                tmp_path_factory.mktemp("downloads-gateway-logs"))
    yield stage
    stage.stop()


@asynccontextmanager
async def client_from(address: str):
    """A client whose requests come from ``address`` (any of 127.0.0.0/8): its own
    rate-limit bucket, untouched by the other tests' failed lookups."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(address, 0))) as session:
        yield session


def image_bytes(image_format: str) -> bytes:
    # Noise, so the file is big enough for a meaningful Range and compresses badly.
    image = Image.frombytes("RGB", (96, 64), os.urandom(96 * 64 * 3))
    out = io.BytesIO()
    image.save(out, format=image_format)
    return out.getvalue()


async def completed_job_with_file(table, storage, *, image_format="PNG", resolution="4x"):
    """A completed job, its image under STORAGE_DIR (always named .png: the gateway
    must go by the bytes) and a live download token."""
    job = await make_job(table, S.COMPLETED, resolution=resolution)
    path = storage / job.job_id / f"upscaled-{resolution}.png"
    path.parent.mkdir()
    data = image_bytes(image_format)
    path.write_bytes(data)
    await table.update(job.job_id, {"upscaled_file_path": str(path)})
    token, _ = await table.issue_download_token(job.job_id, ttl_hours=24)
    return job, token, data


async def status_of(http, url: str) -> int:
    async with http.get(url) as resp:
        return resp.status


# -- downloads -------------------------------------------------------------------

@pytest.mark.parametrize(("image_format", "content_type", "extension"), [
    ("PNG", "image/png", "png"), ("JPEG", "image/jpeg", "jpg"), ("WEBP", "image/webp", "webp")])
async def test_a_completed_job_streams_its_file_byte_identical_with_private_headers(
        downloads_gateway, table, gateway_storage, http, image_format, content_type, extension):
    job, token, data = await completed_job_with_file(table, gateway_storage, image_format=image_format)
    url = f"{downloads_gateway.url}/downloads/{token}"
    async with http.get(url) as resp:
        assert resp.status == 200
        assert await resp.read() == data
        headers = resp.headers
    assert headers["Content-Type"] == content_type
    assert headers["Content-Disposition"] == f'attachment; filename="upscaled-4x-{job.job_id[:8]}.{extension}"'
    assert headers["Content-Length"] == str(len(data))
    assert headers["X-Content-Type-Options"] == "nosniff"
    assert {k: headers[k] for k in PRIVATE_HEADERS} == PRIVATE_HEADERS

    async with http.head(url) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Length"] == str(len(data))
        assert resp.headers["Content-Type"] == content_type
        assert await resp.read() == b""


async def test_a_range_request_gets_206_and_exactly_those_bytes(downloads_gateway, table, gateway_storage, http):
    _, token, data = await completed_job_with_file(table, gateway_storage)
    url = f"{downloads_gateway.url}/downloads/{token}"
    async with http.get(url, headers={"Range": "bytes=100-1099"}) as resp:
        assert resp.status == 206
        assert await resp.read() == data[100:1100]
        assert resp.headers["Content-Range"] == f"bytes 100-1099/{len(data)}"
        assert resp.headers["Content-Length"] == "1000"
        assert resp.headers["Content-Type"] == "image/png"
    async with http.get(url, headers={"Range": "bytes=-10"}) as resp:  # resume the tail
        assert resp.status == 206 and await resp.read() == data[-10:]


async def test_an_expired_link_is_410(downloads_gateway, table, gateway_storage, http):
    job, _, _ = await completed_job_with_file(table, gateway_storage)
    # Issued two hours ago with a one-hour lifetime: expired an hour ago.
    old, expiry = await table.issue_download_token(job.job_id, ttl_hours=1, now=utcnow() - timedelta(hours=2))
    assert expiry < utcnow()
    async with http.get(f"{downloads_gateway.url}/downloads/{old}") as resp:
        assert resp.status == 410
        assert {k: resp.headers[k] for k in PRIVATE_HEADERS} == PRIVATE_HEADERS

    # A deadline still ahead, but the janitor has marked the download expired.
    other, _, _ = await completed_job_with_file(table, gateway_storage)
    live, _ = await table.issue_download_token(other.job_id, ttl_hours=24)
    await table.update(other.job_id, {"download_expired_at": utcnow()})
    assert await status_of(http, f"{downloads_gateway.url}/downloads/{live}") == 410


async def test_unknown_and_revoked_tokens_are_404_and_malformed_ones_400(downloads_gateway, table, gateway_storage,
                                                                       http):
    base = f"{downloads_gateway.url}/downloads"
    assert await status_of(http, f"{base}/{new_download_token()}") == 404
    for malformed in ("short", "a" * 63, "a" * 65, "a" * 63 + "-", "a" * 63 + "é"):
        assert await status_of(http, f"{base}/{malformed}") == 400, malformed

    job, first, _ = await completed_job_with_file(table, gateway_storage)
    second, _ = await table.issue_download_token(job.job_id, ttl_hours=24, revoke_others=True)
    assert await status_of(http, f"{base}/{first}") == 404
    assert await status_of(http, f"{base}/{second}") == 200


async def test_a_job_not_completed_yet_is_425(downloads_gateway, table, http):
    job = await make_job(table, S.PROCESSING)
    token, _ = await table.issue_download_token(job.job_id, ttl_hours=24)
    assert await status_of(http, f"{downloads_gateway.url}/downloads/{token}") == 425


async def test_a_file_outside_storage_is_refused_as_404_and_the_token_is_never_logged(
        downloads_gateway, table, gateway_storage, tmp_path, http):
    outside = tmp_path / "secret.png"
    outside.write_bytes(image_bytes("PNG"))
    job, token, _ = await completed_job_with_file(table, gateway_storage)
    link = gateway_storage / job.job_id / "link.png"
    link.symlink_to(outside)
    url = f"{downloads_gateway.url}/downloads/{token}"
    for path in (outside, gateway_storage / job.job_id / ".." / ".." / outside.parent.name / outside.name, link):
        await table.update(job.job_id, {"upscaled_file_path": str(path)})
        async with http.get(url) as resp:
            assert resp.status == 404, path
            assert await resp.read() != outside.read_bytes()

    async def warned():
        log = downloads_gateway.log_tail(100_000)
        return log.count(f"job {job.job_id}: upscaled file path resolves outside STORAGE_DIR") == 3 and log
    log = await eventually(warned, timeout=10)
    assert token not in log and hash_token(token) not in log


async def test_a_cleaned_up_file_is_410(downloads_gateway, table, gateway_storage, http):
    job, token, _ = await completed_job_with_file(table, gateway_storage)
    (gateway_storage / job.job_id / "upscaled-4x.png").unlink()
    assert await status_of(http, f"{downloads_gateway.url}/downloads/{token}") == 410


async def test_a_client_with_too_many_failed_lookups_gets_429_with_retry_after(downloads_gateway, table,
                                                                               gateway_storage):
    base = f"{downloads_gateway.url}/downloads"
    _, token, _ = await completed_job_with_file(table, gateway_storage)
    async with client_from("127.0.0.2") as guesser:
        # Successful downloads are never charged.
        for _ in range(25):
            assert await status_of(guesser, f"{base}/{token}") == 200
        for n in range(20):
            url = f"{base}/{new_download_token()}" if n % 2 else f"{base}/not-a-token"
            assert await status_of(guesser, url) in (400, 404)
        for url in (f"{base}/{new_download_token()}", f"{base}/{token}"):  # hits are refused too
            async with guesser.get(url) as resp:
                assert resp.status == 429
                assert 1 <= int(resp.headers["Retry-After"]) <= 3  # one lookup back every 60/20 s
    async with client_from("127.0.0.3") as bystander:
        assert await status_of(bystander, f"{base}/{new_download_token()}") == 404


async def guess_statuses(session: aiohttp.ClientSession, base: str, count: int, forwarded_for=lambda n: None):
    statuses = []
    for n in range(count):
        header = forwarded_for(n)
        async with session.get(f"{base}/downloads/{new_download_token()}",
                               headers={"X-Forwarded-For": header} if header else {}) as resp:
            statuses.append(resp.status)
    return statuses


async def test_a_forged_x_forwarded_for_does_not_buy_more_guesses(downloads_gateway):
    """No TRUSTED_PROXIES: the header is the client's own word, and ignored."""
    async with client_from("127.0.0.61") as guesser:
        statuses = await guess_statuses(guesser, downloads_gateway.url, 25, lambda n: f"198.51.100.{n + 1}")
    assert statuses == [404] * 20 + [429] * 5, statuses


async def test_behind_a_trusted_proxy_each_forwarded_client_has_its_own_limit(stage_env, http, tmp_path_factory):
    # Every loopback address plays one of our load balancers.
    stage = await start_gateway(http, {**stage_env, "TRUSTED_PROXIES": "127.0.0.0/8"},
                                tmp_path_factory.mktemp("proxied-gateway-logs"))
    try:
        async with client_from("127.0.0.62") as proxy, client_from("127.0.0.63") as other_proxy:
            # What the client claims (left) is never read; what our proxy saw (right) is.
            statuses = await guess_statuses(proxy, stage.url, 21, lambda n: f"6.6.6.{n}, 198.51.100.7")
            assert statuses == [404] * 20 + [429], statuses
            # The same client through another of our proxies: the same limit.
            assert await guess_statuses(other_proxy, stage.url, 1, lambda n: "198.51.100.7") == [429]
            # Another client behind the same proxy, and the proxy's own requests: not limited.
            assert await guess_statuses(proxy, stage.url, 1, lambda n: "198.51.100.8") == [404]
            assert await guess_statuses(proxy, stage.url, 1) == [404]
    finally:
        stage.stop()


# -- Upsampler callbacks -----------------------------------------------------------

async def job_with_callback_token(table, status=S.PROCESSING):
    job = await make_job(table, status)
    raw = secrets.token_urlsafe(32)
    await table.update(job.job_id, {"callback_token_hash": hash_token(raw)})
    return job, raw


def callback_body(**overrides) -> dict:
    body = {"id": f"up-{uuid.uuid4().hex[:12]}", "status": "SUCCESS", "creditCost": 16,
            "imageUrl": "https://cdn.upsampler.example/result.png", "compressedImageUrl": None}
    body.update(overrides)
    return body


async def post_callback(http, url: str, body: dict | bytes, content_type: str = "application/json"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with http.post(url, data=data, headers={"Content-Type": content_type}) as resp:
        return resp.status


async def gateway_counts(http, gateway_url: str, name: str) -> dict[frozenset, float]:
    """The samples of one counter of the gateway's /metrics, by their labels."""
    async with http.get(f"{gateway_url}/metrics") as resp:
        text = await resp.text()
    return {frozenset(s.labels.items()): s.value
            for family in text_string_to_metric_families(text) for s in family.samples if s.name == name}


async def callbacks_recorded(http, gateway_url: str) -> dict[str, float]:
    """The gateway's smi_gateway_callbacks_recorded_total, by result."""
    counts = await gateway_counts(http, gateway_url, "smi_gateway_callbacks_recorded_total")
    return {dict(labels)["result"]: n for labels, n in counts.items()}


def grown(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after.get(k, 0) - before.get(k, 0) for k in after.keys() | before.keys()
            if after.get(k, 0) != before.get(k, 0)}


async def test_an_upsampler_callback_is_published_with_the_job_id_its_token_names(downloads_gateway, table,
                                                                                   http, watcher):
    job, raw = await job_with_callback_token(table)
    counted = await callbacks_recorded(http, downloads_gateway.url)
    body = callback_body(job_id=str(uuid.uuid4()))  # a job_id in the body does not choose the job
    assert await post_callback(http, f"{downloads_gateway.url}/webhooks/upsampler/{raw}", body) == 200
    [message] = await watcher.wait_for("upscaler.events", for_job(job.job_id))
    assert message.json() == {**body, "job_id": job.job_id}
    # Past pending, the submission's answer came first: nothing is written to the job.
    assert (await table.get(job.job_id)).callback_upscaler_id is None
    assert grown(counted, await callbacks_recorded(http, downloads_gateway.url)) == {}

    webhooks = await gateway_counts(http, downloads_gateway.url, "smi_gateway_webhooks_total")
    assert webhooks.get(frozenset({"source": "upsampler", "outcome": "published"}.items()), 0) >= 1


async def test_a_callback_for_a_pending_job_records_the_upscaler_id_it_names(downloads_gateway, table, http,
                                                                            watcher):
    """The submission is in doubt (or its answer not in yet): the gateway records the
    upscaler id in the job, so that the processor adopts it even while the event is
    still queued. The job stays pending: the processor owns its transition."""
    job, raw = await job_with_callback_token(table, S.PENDING)
    counted = await callbacks_recorded(http, downloads_gateway.url)
    body = callback_body(status="IN_PROGRESS")
    assert await post_callback(http, f"{downloads_gateway.url}/webhooks/upsampler/{raw}", body) == 200
    await watcher.wait_for("upscaler.events", for_job(job.job_id))
    recorded = await table.get(job.job_id)
    assert recorded.callback_upscaler_id == body["id"] and recorded.status is S.PENDING
    assert grown(counted, await callbacks_recorded(http, downloads_gateway.url)) == {"recorded": 1}


async def test_a_callback_whose_job_moved_on_since_it_was_read_records_nothing(table):
    """Between the gateway's read and its write the job was submitted again (a new
    token): the callback of the old submission must not name the new one's upscale."""
    job, raw = await job_with_callback_token(table, S.PENDING)
    as_read = await table.get(job.job_id)
    await table.update(job.job_id, {"callback_token_hash": hash_token(secrets.token_urlsafe(32))})
    # As the gateway passes it: the body plus the job id its token names.
    event = {**callback_body(status="IN_PROGRESS"), "job_id": job.job_id}
    assert await record_callback(table, as_read, event) == "moved_on"
    assert (await table.get(job.job_id)).callback_upscaler_id is None
    event = {**callback_body(id="up-new", status="IN_PROGRESS"), "job_id": job.job_id}
    assert await record_callback(table, await table.get(job.job_id), event) == "recorded"
    assert (await table.get(job.job_id)).callback_upscaler_id == "up-new"


async def test_a_callback_the_processor_cannot_read_is_published_but_not_recorded(downloads_gateway, table, http,
                                                                                watcher):
    """A body with no status is published (the processor dead-letters it with the
    reason) but names no upscale the processor could adopt."""
    job, raw = await job_with_callback_token(table, S.PENDING)
    counted = await callbacks_recorded(http, downloads_gateway.url)
    body = {"id": f"up-{uuid.uuid4().hex[:12]}"}
    assert await post_callback(http, f"{downloads_gateway.url}/webhooks/upsampler/{raw}", body) == 200
    await watcher.wait_for("upscaler.events", for_job(job.job_id))
    assert (await table.get(job.job_id)).callback_upscaler_id is None
    assert grown(counted, await callbacks_recorded(http, downloads_gateway.url)) == {"unreadable": 1}


async def test_bad_upsampler_callbacks_get_4xx_and_publish_nothing(downloads_gateway, table, http, watcher):
    job, raw = await job_with_callback_token(table)
    url = f"{downloads_gateway.url}/webhooks/upsampler/{raw}"
    marker = f"up-unknown-{uuid.uuid4().hex}"
    base = f"{downloads_gateway.url}/webhooks/upsampler"
    cases = [
        await post_callback(http, f"{base}/{secrets.token_urlsafe(32)}", callback_body(id=marker)),  # unknown
        await post_callback(http, f"{base}/{raw}.x", callback_body(id=marker)),  # not URL-safe
        await post_callback(http, f"{base}/{'a' * 129}", callback_body(id=marker)),  # too long
        await post_callback(http, url, b'{"id": "up-1", "status": '),  # not JSON
        await post_callback(http, url, b'["id", "status"]'),  # not an object
        await post_callback(http, url, callback_body(), content_type="text/plain"),
        await post_callback(http, url, json.dumps(callback_body(pad="x" * (2 * 1024 * 1024))).encode()),
    ]
    assert cases == [404, 404, 404, 400, 400, 415, 413]
    # One good callback after them, on the same key and so the same partition: once it
    # is there, any bad one published before it would be there too.
    good = callback_body()
    assert await post_callback(http, url, good) == 200
    await watcher.wait_for("upscaler.events", for_job(job.job_id))
    assert [m.json() for m in watcher.matching("upscaler.events", for_job(job.job_id))] == \
        [{**good, "job_id": job.job_id}]
    assert not [m for m in watcher.matching("upscaler.events") if m.value and marker.encode() in m.value]


async def test_an_upsampler_callback_gets_503_while_kafka_is_unreachable(stage_env, table, http, tmp_path_factory):
    job, raw = await job_with_callback_token(table)
    no_kafka = {**stage_env, "KAFKA_BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    stage = await start_gateway(http, no_kafka, tmp_path_factory.mktemp("no-kafka-gateway-logs"),
                                ready=lambda status: status == 503)
    try:
        assert await post_callback(http, f"{stage.url}/webhooks/upsampler/{raw}", callback_body()) == 503
    finally:
        stage.stop()


async def test_the_gateway_answers_503_while_redis_is_unreachable(stage_env, http, tmp_path_factory):
    """A job table that does not answer is "retry later" for every route that needs
    it (the rate limits included), never a 500; and the log names the route, not
    the token."""
    no_redis = {**stage_env, "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0", "REDIS_CLUSTER_NODES": "",
                "ADMIN_TOKEN": "admin-" + uuid.uuid4().hex}
    stage = await start_gateway(http, no_redis, tmp_path_factory.mktemp("no-redis-gateway-logs"),
                                ready=lambda status: status == 503)
    token = new_download_token()
    try:
        for path, headers in [(f"/downloads/{token}", {}), (f"/jobs/{uuid.uuid4()}", {}),
                              ("/admin/jobs", {"Authorization": f"Bearer {no_redis['ADMIN_TOKEN']}"}),
                              ("/admin/jobs", {"Authorization": "Bearer wrong"})]:
            async with http.get(f"{stage.url}{path}", headers=headers) as resp:
                assert resp.status == 503, (path, resp.status, await resp.text())
                assert (await resp.json())["error"] == "the job table is unavailable, retry later"
                assert resp.headers["Retry-After"] == "5"
    finally:
        stage.stop()
    log = stage.log_path.read_text()
    assert "GET downloads: the job table is unavailable" in log, log
    assert token not in log
