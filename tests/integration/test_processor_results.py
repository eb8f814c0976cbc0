"""An Upsampler result stored by the processor on the real job table, fetched over
real HTTP: on disk (fsync) before the processor moves the job to completed, the
files of many jobs downloaded through one session, and that session released by
``close()``."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.status import JobStatus as S
from schemas.urls import HostAllowList
from services.processor.handlers import Processor, ProcessorConfig
from tests.support.image_server import ImageServer, make_image
from tests.support.jobs import make_job

pytestmark = pytest.mark.usefixtures("redis")


class Remote:
    """The Upsampler backend's place: only close() is called here."""

    closed = False

    async def close(self) -> None:
        self.closed = True


async def test_results_are_synced_before_completion_through_one_session(table, tmp_path, monkeypatch):
    published: list[tuple[str, str]] = []

    async def publish(spec, key, value) -> None:
        published.append((spec.name, key))

    config = ProcessorConfig(storage_dir=tmp_path, allow=HostAllowList.parse("127.0.0.1/32"),
                             public_base_url="http://127.0.0.1:8080", credit_price_cents=4,
                             poll_after=timedelta(seconds=30), timeout=timedelta(minutes=10), submit_retries=3,
                             max_result_bytes=10 ** 6)
    remote = Remote()
    processor = Processor(table, publish, config, remote=remote, clock=lambda: datetime.now(UTC))
    jobs = [await make_job(table, S.PROCESSING, upsampler_job_id=f"up-{n}", attempts=1) for n in range(3)]

    # One log, in the order things happen: each fsync (of which file), and each move
    # of a job to completed, as the processor asks the table for it. The file must be
    # on disk before the job says completed.
    happened: list[tuple[str, str]] = []
    real_fsync, real_transition = os.fsync, table.transition

    def recording_fsync(fd: int) -> None:
        happened.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    async def recording_transition(job_id, target, **options):
        if target is S.COMPLETED:
            happened.append(("completed", job_id))
        return await real_transition(job_id, target, **options)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(table, "transition", recording_transition)
    async with ImageServer() as images:
        for job in jobs:
            event = {"job_id": job.job_id, "id": job.upsampler_job_id, "status": "SUCCESS", "creditCost": 2,
                     "imageUrl": f"{images.url}/img/64x48.png"}
            assert (await processor.on_upscaler_event(json.dumps(event).encode())).startswith("completed")
            session = processor._results_session.current
            assert session is not None and not session.closed
            if job is jobs[0]:
                first_session = session
            assert session is first_session  # one session, its connections pooled, for every result

            done = await table.get(job.job_id)
            assert done.status is S.COMPLETED
            assert Path(done.upscaled_file_path).read_bytes() == make_image(64, 48, "png")
            [(synced_at, path)] = [(at, what) for at, (kind, what) in enumerate(happened)
                                   if kind == "fsync" and job.job_id in what]
            assert path.endswith(".part") and synced_at < happened.index(("completed", job.job_id))
    assert [name for name, _ in published] == ["jobs.completed"] * 3

    await processor.close()
    assert first_session.closed and remote.closed
