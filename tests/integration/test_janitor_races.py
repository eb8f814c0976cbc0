"""The janitor's two races with an operator, on the real job table (single Redis),
with the real notifier (resend; its emails over SMTP to an in-process sink) and the
real processor (retry; the local upscaler fetching over loopback HTTP):

- EXPIRE vs resend: a resend that lands between the janitor's read and its write
  wins (the files stay, the new expiry stands); one that lands after the write is
  refused. Never a live link to a deleted file.
- PURGE vs retry: a retry that lands between the janitor's read and its deletion
  keeps the files of its own attempt; a retry after the purge still works.

Each race is reproduced deterministically by a seam between the janitor's read and
its write (a wrapped ``table.get``, or the file deletion), never by sleeps. Only
the janitor's publisher and payments are in-memory: neither is part of these steps."""

from __future__ import annotations

import asyncio
import re
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.events import Command
from schemas.status import Deadline, JobStatus as S
from schemas.topics import JOBS_COMMANDS
from schemas.urls import HostAllowList
from services.gateway.downloads import is_expired, locate_stored_image
from services.janitor import handlers as janitor_handlers
from services.janitor.handlers import Janitor, JanitorConfig
from services.notifier.emails import Letterhead
from services.notifier.handlers import Notifier, NotifierConfig
from services.processor.handlers import Processor, ProcessorConfig
from smi.errors import PermanentError
from smi.jobtable import JobTable
from smi.kafka.handling import SourceMessage
from smi.mailer import Mailer
from smi.upscalers import LocalUpscaler
from tests.support.image_server import ImageServer
from tests.support.jobs import make_job
from tests.support.smtp_sink import SmtpSink, about_job

LOOPBACK = HostAllowList.parse("127.0.0.1/32")
LINK = re.compile(r"/downloads/([A-Za-z0-9]{64})")
PNG = b"\x89PNG\r\n\x1a\n" + bytes(100)
LEASE = JanitorConfig.lease


class Published(list):
    async def __call__(self, spec, key, value) -> None:
        self.append((spec.name, key, value))


class NoPayments:
    async def expire_session(self, job) -> None:
        raise AssertionError("no session to expire in these tests")


@pytest.fixture
def now() -> datetime:
    return datetime.now(UTC).replace(microsecond=0)


@pytest.fixture
def table(redis_single, namespace) -> JobTable:
    return JobTable(redis_single, shards=4, namespace=namespace)


@pytest.fixture
def storage(tmp_path) -> Path:
    path = tmp_path / "storage"
    path.mkdir()
    return path.resolve()


@pytest.fixture
def janitor(table, storage, now) -> Janitor:
    config = JanitorConfig(storage_dir=storage, expiry_warning=timedelta(hours=4),
                           failed_retention=timedelta(days=7), email_retention=None)
    # A table object of its own: the tests wrap its reads without touching theirs.
    return Janitor(JobTable(table.redis, shards=4, namespace=table.keys.namespace), NoPayments(), Published(),
                   config, lambda: now)


@pytest.fixture
def sink():
    server = SmtpSink().start()
    yield server
    server.stop()


@pytest.fixture
async def notifier(table, sink, now):
    mailer = Mailer.from_url(sink.url)
    config = NotifierConfig(Letterhead("Race Shop", "shop@example.com"), "http://127.0.0.1:8080",
                            download_ttl_hours=24, expiry_warning_hours=4)
    yield Notifier(table, mailer, config, clock=lambda: now)
    await mailer.close()


async def resend(notifier: Notifier, job_id: str) -> str:
    """The notifier's handling of an operator's ``resend_download``: "sent", or the
    refusal it would dead-letter."""
    command = Command(command="resend_download", job_id=job_id, requested_by="race-test")
    message = SourceMessage(JOBS_COMMANDS.name, 0, int(uuid.uuid4().int % 10**9), job_id.encode(),
                            command.model_dump_json().encode())
    try:
        return await notifier.on_command(message)
    except PermanentError as exc:
        return f"refused: {exc}"


async def expired_download(table: JobTable, storage: Path, now: datetime, *, warn_hours: int = 4):
    """A completed job whose download expired an hour ago, its file on disk."""
    job = await make_job(table, S.COMPLETED)
    path = storage / job.job_id / "attempt-1" / "upscaled-4x.png"
    path.parent.mkdir(parents=True)
    path.write_bytes(PNG)
    await table.update(job.job_id, {"upscaled_file_path": str(path), "attempts": 1})
    _, expires = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=warn_hours,
                                                  now=now - timedelta(hours=25))
    assert expires < now
    return await table.get(job.job_id), path


async def test_a_resend_between_the_janitors_read_and_its_write_wins(janitor, table, storage, notifier, sink, now):
    # No warning due: the EXPIRE step's is then the only read of the job in the pass.
    job, path = await expired_download(table, storage, now, warn_hours=0)
    assert await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2)) == []
    outcomes: list[str] = []
    read = janitor.table.get

    async def read_then_resend(job_id: str):
        found = await read(job_id)
        if job_id == job.job_id:
            outcomes.append(await resend(notifier, job_id))  # the operator, right after the read
        return found
    janitor.table.get = read_then_resend

    handled = await janitor.tick(now)

    assert outcomes == ["sent"]
    [delivery] = sink.deliveries(about_job(job.job_id, "resend"))
    token = LINK.search(delivery.message.get_body(("plain",)).get_content()).group(1)
    assert handled.expired == 0
    after = await table.get(job.job_id)
    # The resend won: the file stays, the new expiry stands, the new link serves it.
    assert path.exists()
    assert after.download_expired_at is None and after.upscaled_file_path == str(path)
    assert after.download_expires_at == now + timedelta(hours=24)
    found = await table.find_by_token(token)
    assert found is not None and not is_expired(found)
    assert locate_stored_image(storage, found.upscaled_file_path) is not None
    # The new link waits for its warning; its expiry is armed once that is given.
    due = await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2))
    assert [(d.job_id, d.due_at) for d in due] == [(job.job_id, now + timedelta(hours=20))]
    assert await table.due(Deadline.EXPIRE, limit=10, now=now + timedelta(days=2)) == []

    # At the new expiry the janitor expires it after all (the warning, late, arms
    # the expiry, which the same pass then handles).
    janitor.table.get = read
    later = now + timedelta(hours=24, minutes=1)
    assert (await janitor.tick(later)).expired == 1
    assert not path.exists() and (await table.get(job.job_id)).download_expired_at == later


async def test_a_resend_while_the_janitor_deletes_the_files_is_refused(janitor, table, storage, notifier, sink, now,
                                                                       monkeypatch):
    job, path = await expired_download(table, storage, now)
    loop = asyncio.get_running_loop()
    outcomes: list[str] = []
    delete = janitor_handlers.delete_job_files

    def resend_then_delete(storage_dir, read_job):
        # In the janitor's deletion thread: the operator's resend runs on the loop
        # and ends before a single file goes.
        outcomes.append(asyncio.run_coroutine_threadsafe(resend(notifier, job.job_id), loop).result(30))
        delete(storage_dir, read_job)
    monkeypatch.setattr(janitor_handlers, "delete_job_files", resend_then_delete)

    assert (await janitor.tick(now)).expired == 1

    [outcome] = outcomes
    assert outcome.startswith("refused: resend refused") and "download expired" in outcome
    assert sink.deliveries(about_job(job.job_id)) == []  # no email carries a link to a deleted file
    after = await table.get(job.job_id)
    assert after.download_expired_at == now and after.upscaled_file_path is None
    assert not path.exists() and not path.parent.parent.exists()
    assert await table.due(Deadline.EXPIRE, limit=10, now=now + timedelta(days=2)) == []
    assert await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2)) == []


async def test_the_expiry_is_recorded_before_the_files_go_and_a_janitor_that_dies_between_leaves_it_to_the_next(
        janitor, table, storage, notifier, now, monkeypatch):
    job, path = await expired_download(table, storage, now)
    delete = janitor_handlers.delete_job_files

    def dies(storage_dir, read_job):
        raise OSError("the janitor died here")
    monkeypatch.setattr(janitor_handlers, "delete_job_files", dies)
    assert (await janitor.tick(now)).expired == 0

    # Recorded first: the links answer 410 and a resend is refused from here on,
    # while the file is still on disk.
    recorded = await table.get(job.job_id)
    assert recorded.download_expired_at == now and recorded.upscaled_file_path is None
    assert is_expired(recorded) and path.exists()
    assert (await resend(notifier, job.job_id)).startswith("refused:")
    # The item is still in the set (at the dead claim's lease end), so it comes back.
    [item] = await table.due(Deadline.EXPIRE, limit=10, now=now + timedelta(days=2))
    assert (item.job_id, item.due_at) == (job.job_id, now + LEASE)

    monkeypatch.setattr(janitor_handlers, "delete_job_files", delete)
    assert (await janitor.tick(now + LEASE - timedelta(seconds=1))).total() == 0  # still leased
    await janitor.tick(now + LEASE + timedelta(seconds=1))
    assert not path.exists() and not (storage / job.job_id).exists()
    assert await table.due(Deadline.EXPIRE, limit=10, now=now + timedelta(days=2)) == []
    after = await table.get(job.job_id)
    assert after.download_expired_at == now  # the first record stands


# -- PURGE vs retry ------------------------------------------------------------------


@pytest.fixture
async def images():
    async with ImageServer() as server:
        yield server


@pytest.fixture(scope="module")
async def upscaler(tmp_path_factory):
    # Its storage is set per test below; the spawned worker pool is the slow part.
    local = LocalUpscaler(tmp_path_factory.mktemp("unused"), allow=LOOPBACK)
    yield local
    await local.close()


@pytest.fixture
def processor(table, storage, upscaler, now):
    upscaler.storage_dir = storage
    config = ProcessorConfig(storage_dir=storage, allow=LOOPBACK, public_base_url="http://127.0.0.1:8080",
                             credit_price_cents=4, poll_after=timedelta(seconds=30), timeout=timedelta(minutes=10),
                             submit_retries=3, max_result_bytes=10 ** 7)
    published = Published()
    return Processor(table, published, config, local=upscaler, clock=lambda: now), published


async def failed_with_leftovers(table: JobTable, storage: Path, images: ImageServer, now: datetime):
    """A job failed at its first attempt, long enough ago that its purge is due,
    with what that attempt left on disk."""
    job = await make_job(table, S.FAILED, image_url=f"{images.url}/img/16x12.png")
    await table.update(job.job_id, {"attempts": 1, "upsampler_job_id": f"local-{job.job_id}-1",
                                    "failed_at": now - timedelta(days=8)},
                       deadlines={Deadline.PURGE: now - timedelta(days=1)})
    leftovers = storage / job.job_id / "attempt-1"
    leftovers.mkdir(parents=True)
    (leftovers / ".source-0123").write_bytes(b"partial")
    return await table.get(job.job_id), leftovers


async def retry(processor: Processor, job_id: str) -> str:
    command = Command(command="retry", job_id=job_id, requested_by="race-test")
    return await processor.on_command(command.model_dump_json().encode())


async def test_a_retry_between_the_janitors_read_and_its_deletion_keeps_its_files(
        janitor, table, storage, images, processor, now):
    processor, published = processor
    job, leftovers = await failed_with_leftovers(table, storage, images, now)
    outcomes: list[str] = []
    read = janitor.table.get

    async def read_then_retry(job_id: str):
        found = await read(job_id)
        if job_id == job.job_id:
            # The operator's retry lands now: failed -> processing, and the new
            # attempt upscales (its result on disk) before the janitor goes on.
            outcomes.append(await retry(processor, job_id))
        return found
    janitor.table.get = read_then_retry

    await janitor.tick(now)

    assert outcomes == ["upscaled locally, completed (applied)"]
    assert not leftovers.exists()  # the failed attempt's files went
    done = await table.get(job.job_id)
    assert done.status is S.COMPLETED, done.failure_reason
    assert done.attempts == 2
    stored = locate_stored_image(storage, done.upscaled_file_path)
    assert stored is not None and stored.content_type == "image/png"
    assert await table.due(Deadline.PURGE, limit=10, now=now + timedelta(days=30)) == []


async def test_a_retry_after_the_purge_finished_fetches_and_stores_again(
        janitor, table, storage, images, processor, now):
    processor, published = processor
    job, leftovers = await failed_with_leftovers(table, storage, images, now)
    assert (await janitor.tick(now)).purged == 1
    assert not (storage / job.job_id).exists()

    assert await retry(processor, job.job_id) == "upscaled locally, completed (applied)"
    done = await table.get(job.job_id)
    assert done.status is S.COMPLETED, done.failure_reason
    assert locate_stored_image(storage, done.upscaled_file_path) is not None
