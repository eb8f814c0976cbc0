"""The processor with the local (Pillow) backend, end to end: a paid job is really
upscaled, stored under STORAGE_DIR and downloadable; unsafe and bad inputs fail the
job with the reason (issue 4)."""

from __future__ import annotations

import asyncio
import json
import uuid

import pytest
from PIL import Image

from schemas.events import make_event_id
from schemas.status import JobStatus as S
from tests.e2e.conftest import KAFKA, KAFKA_NAMES, start_stage, wait_status
from tests.e2e.flows import paid_job
from tests.support.image_server import ImageServer
from tests.support.kafka_watch import drained, for_job


@pytest.fixture(scope="module")
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
async def processor(stage_env, tmp_path_factory, checkout, gateway):
    stage = await start_stage("processor", {**stage_env, "UPSCALER": "local", "PROCESSOR_TICK_SECONDS": "0.5"},
                              tmp_path_factory.mktemp("local-processor-logs"))
    yield stage
    stage.stop()


async def test_a_paid_job_is_upscaled_stored_and_downloadable(processor, images, producer, table, http, gateway,
                                                              storage_dir):
    url = f"{images.url}/img/64x48.png?u={uuid.uuid4().hex[:8]}"
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48,
                         resolution="4x")
    done = await wait_status(table, job.job_id, S.COMPLETED, timeout=60)
    assert done.upscaled_file_path.startswith(str(storage_dir))
    with Image.open(done.upscaled_file_path) as result:
        assert result.size == (256, 192) and result.format == "PNG"
    assert done.cost_cents == 0  # nothing paid to an upscaler
    token, _ = await table.issue_download_token(job.job_id, ttl_hours=1)
    async with http.get(f"{gateway.url}/downloads/{token}") as resp:
        assert resp.status == 200 and resp.content_type == "image/png"
        body = await resp.read()
    with open(done.upscaled_file_path, "rb") as stored:
        assert body == stored.read()


@pytest.mark.parametrize("path,reason", [
    ("/redirect?to=http://169.254.169.254/latest/meta-data", "not public"),
    ("/redirect?to=http://10.0.0.1/a.png", "not public"),
    ("/text", "not an image"),
    ("/status/404", "404"),
])
async def test_bad_images_fail_the_job_with_the_reason(processor, images, producer, table, http, gateway, path,
                                                      reason):
    job = await paid_job(producer, table, http, gateway, image_url=f"{images.url}{path}&u={uuid.uuid4().hex[:6]}"
                         if "?" in path else f"{images.url}{path}?u={uuid.uuid4().hex[:6]}",
                         image_width=64, image_height=48)
    failed = await wait_status(table, job.job_id, S.FAILED, timeout=60)
    assert reason in failed.failure_reason, failed.failure_reason


@pytest.mark.parametrize("crash_at, written", [("processor.after_processing_write", S.PROCESSING),
                                               ("processor.after_completed_write", S.COMPLETED)],
                         ids=["processing", "completed"])
async def test_killed_between_a_write_and_its_event_the_redelivery_announces_it_once(
        processor, images, producer, table, http, gateway, watcher, crash_at, written):
    """The local backend starts and completes the job while handling jobs.pending:
    a worker that dies after a write and before its event leaves the message to be
    redelivered, which finds the job past ``pending``. That delivery must still
    announce the status written (jobs.completed: the email hangs on it;
    jobs.processing: a contract topic upstream systems watch), once, with the first
    event id, and the job must complete."""
    processor.kill()
    processor.start(SMI_CRASH_AT=crash_at)
    url = f"{images.url}/img/64x48.png?u={uuid.uuid4().hex[:8]}"
    job = await paid_job(producer, table, http, gateway, image_url=url, image_width=64, image_height=48)
    assert await asyncio.to_thread(processor.wait_exit, 120) == 137
    assert (await table.get(job.job_id)).status is written
    topic = f"jobs.{written.value}"
    assert not watcher.matching(topic, for_job(job.job_id))  # written, not announced
    processor.start()
    await wait_status(table, job.job_id, S.COMPLETED, timeout=90)
    event_id = make_event_id(job.job_id, written.value, 1)
    await watcher.wait_for(topic, lambda m: for_job(job.job_id)(m) and json.loads(m.value)["event_id"] == event_id,
                           timeout=30)
    await drained(KAFKA, "processor", ["jobs.pending"], names=KAFKA_NAMES)
    assert {json.loads(m.value)["event_id"] for m in watcher.matching(topic, for_job(job.job_id))} == {event_id}
    assert [h.target for h in await table.history(job.job_id)].count(written) == 1
