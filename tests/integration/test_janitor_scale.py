"""One janitor pass over 100,000 jobs of which 100 are due: it handles exactly those
100 and its Redis traffic is O(100), naming no other job (issue 5).

Real Redis. The janitor's own ports, the publisher and the payment provider, are
in-memory fakes: this test is about what the pass reads, not about Kafka or Stripe.
Every command the janitor sends is counted on the wire (a counting connection
class), so pipelines and Lua scripts are counted one command each."""

from __future__ import annotations

import asyncio
import re
import time
import uuid
from datetime import UTC, datetime, timedelta

import pytest
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.connection import Connection

from schemas.job import encode_fields, to_ms
from schemas.status import Deadline, JobStatus as S
from services.janitor.handlers import Handled, Janitor, JanitorConfig
from smi.jobtable import JobTable
from smi.jobtable.codec import encode_names
from smi.jobtable.keys import KeySpace, shard_of
from tests.integration.conftest import REDIS_URL
from tests.support.jobs import job_fields, make_job

TOTAL_JOBS = 100_000
DUE_PER_KIND = 25  # abandon, warn, expire, purge: 100 due in all
SHARDS = 16  # the production default
JANITOR_SETS = (Deadline.ABANDON, Deadline.WARN, Deadline.EXPIRE, Deadline.PURGE)
NOW = datetime.now(UTC).replace(microsecond=0)
UUID = re.compile(rb"[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}")
STORED_ID = re.compile(rb"(?<![A-Za-z0-9_-])[A-Za-z0-9_-]{22}(?![A-Za-z0-9_-])")
# Filler jobs, by status, and the (future) deadlines a job in that status carries.
FILLER_DEADLINES = {
    S.AWAITING_PAYMENT: (Deadline.ABANDON,),
    S.COMPLETED: (Deadline.WARN, Deadline.EXPIRE),
    S.FAILED: (Deadline.PURGE,),
    S.ABANDONED: (),
    S.PENDING: (),
}


def counting_client(url: str) -> tuple[Redis, list[tuple]]:
    """A Redis client that records every command it puts on the wire."""
    sent: list[tuple] = []

    class CountingConnection(Connection):
        def pack_command(self, *args):
            sent.append(args)
            return super().pack_command(*args)

    pool = BlockingConnectionPool.from_url(url, connection_class=CountingConnection, max_connections=10)
    return Redis(connection_pool=pool), sent


def index_member(ms: int, job_id: str) -> str:
    # Mirrors member() of smi/jobtable/lua/prelude.lua: 13-digit epoch ms, then the id.
    return f"{ms:013d}:{job_id}"


async def write_filler_jobs(table: JobTable, count: int) -> list[str]:
    """``count`` jobs that are not due, written straight into the table's layout.

    A test fixture shortcut: 100,000 jobs through the table's scripts take minutes,
    one pipeline of plain writes takes seconds. Each job gets what the scripts would
    give it (hash, status index members, deadline members); the test then reads a
    sample back through JobTable to prove the layout matches."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    statuses = list(FILLER_DEADLINES)
    for start in range(0, count, 2_000):
        pipe = table.redis.pipeline(transaction=False)
        for i in range(start, min(start + 2_000, count)):
            job_id, status = ids[i], statuses[i % len(statuses)]
            shard = shard_of(job_id, SHARDS)
            created = to_ms(NOW - timedelta(days=3, seconds=i))
            pipe.hset(table.keys.job(job_id), mapping=encode_names({
                **encode_fields(job_fields(post_id=i)), "status": status.value,
                "created_at": str(created), "updated_at": str(created), "attempts": "0"}))
            member = index_member(created, table.keys.stored_id(job_id))
            pipe.zadd(table.keys.status_index(shard, status, "c"), {member: 0})
            pipe.zadd(table.keys.status_index(shard, status, "u"), {member: 0})
            for kind in FILLER_DEADLINES[status]:
                due = NOW + timedelta(hours=1) + timedelta(seconds=i)  # all of them later than NOW
                pipe.zadd(table.keys.deadline(shard, kind), {table.keys.stored_id(job_id): to_ms(due)})
        await pipe.execute()
    return ids


async def make_due_jobs(table: JobTable, storage) -> dict[Deadline, list[str]]:
    """DUE_PER_KIND jobs due in each set, made through the table's own scripts."""

    async def abandon_due():
        job = await make_job(table, S.AWAITING_PAYMENT)
        await table.update(job.job_id, {}, deadlines={Deadline.ABANDON: NOW - timedelta(minutes=1)})
        return job.job_id

    async def warn_due():
        job = await make_job(table, S.COMPLETED)
        # Expires in 3 h, warned from 4 h before: due an hour ago.
        await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, now=NOW - timedelta(hours=21))
        return job.job_id

    async def expire_due():
        job = await make_job(table, S.COMPLETED)
        path = storage / job.job_id / "upscaled-4x.png"
        path.parent.mkdir()
        path.write_bytes(b"\x89PNG\r\n\x1a\n")
        await table.update(job.job_id, {"upscaled_file_path": str(path)})
        await table.issue_download_token(job.job_id, ttl_hours=24, now=NOW - timedelta(hours=25))
        return job.job_id

    async def purge_due():
        job = await make_job(table, S.FAILED)
        (storage / job.job_id).mkdir()
        (storage / job.job_id / "upscaled-4x.download").write_bytes(b"partial")
        await table.update(job.job_id, {}, deadlines={Deadline.PURGE: NOW - timedelta(minutes=1)})
        return job.job_id

    makers = {Deadline.ABANDON: abandon_due, Deadline.WARN: warn_due, Deadline.EXPIRE: expire_due,
              Deadline.PURGE: purge_due}
    return {kind: list(await asyncio.gather(*[make() for _ in range(DUE_PER_KIND)])) for kind, make in makers.items()}


class RecordingPayments:
    def __init__(self):
        self.expired: list[str] = []

    async def expire_session(self, job) -> None:
        self.expired.append(job.job_id)


async def drop_namespace(table: JobTable, job_ids: list[str]) -> None:
    """Remove every key the test made (they are all derivable: no SCAN of the server)."""
    keys = [table.keys.job(job_id) for job_id in job_ids]
    for shard in range(SHARDS):
        keys += [table.keys.status_index(shard, st, order) for st in S for order in ("c", "u")]
        keys += [table.keys.deadline(shard, kind) for kind in Deadline]
        keys += [table.keys.lookup(shard, kind) for kind in ("download_token", "checkout_session")]
        keys.append(f"req:{table.keys.tag(shard)}")
    for start in range(0, len(keys), 10_000):
        await table.redis.unlink(*keys[start:start + 10_000])


@pytest.fixture
async def big_table(redis_single, namespace, tmp_path):
    table = JobTable(redis_single, shards=SHARDS, namespace=namespace)
    started = time.monotonic()
    due = await make_due_jobs(table, tmp_path)
    due_count = sum(len(ids) for ids in due.values())
    filler = await write_filler_jobs(table, TOTAL_JOBS - due_count)
    build_seconds = time.monotonic() - started
    print(f"\nbuilt {TOTAL_JOBS} jobs ({due_count} due) in {build_seconds:.1f}s")
    yield table, due, build_seconds
    await drop_namespace(table, filler + [j for ids in due.values() for j in ids])


async def test_one_pass_over_100000_jobs_handles_the_100_due_and_reads_only_them(big_table, namespace, tmp_path):
    table, due, build_seconds = big_table
    assert build_seconds < 60
    counts = await table.count_by_status()
    assert sum(counts.values()) == TOTAL_JOBS
    sample = (await table.get_jobs([S.AWAITING_PAYMENT], limit=3, descending=False)).jobs
    assert [j.status for j in sample] == [S.AWAITING_PAYMENT] * 3  # the shortcut's layout reads back

    client, sent = counting_client(REDIS_URL)
    await client.ping()
    published: list[tuple[str, str, object]] = []

    async def publish(spec, key, value):
        published.append((spec.name, key, value))

    payments = RecordingPayments()

    def make_janitor(email_retention: timedelta | None = None) -> Janitor:
        config = JanitorConfig(storage_dir=tmp_path, expiry_warning=timedelta(hours=4),
                               failed_retention=timedelta(days=7), email_retention=email_retention)
        return Janitor(JobTable(client, shards=SHARDS, namespace=namespace), payments, publish, config, lambda: NOW)

    async def one_pass(janitor: Janitor, now: datetime) -> tuple[Handled, list[tuple]]:
        sent.clear()
        handled = await janitor.tick(now)
        return handled, list(sent)

    handled, first_pass = await one_pass(make_janitor(), NOW)
    again, second_pass = await one_pass(make_janitor(), NOW + timedelta(seconds=1))
    # With email retention on and no job old enough: one page of the oldest jobs.
    with_emails, emails_pass = await one_pass(make_janitor(timedelta(days=30)), NOW + timedelta(seconds=2))
    await client.aclose()

    due_ids = {j for ids in due.values() for j in ids}
    assert handled == Handled(abandoned=25, warned=25, expired=25, purged=25)
    assert sorted(payments.expired) == sorted(due[Deadline.ABANDON])
    assert sorted(key for topic, key, _ in published if topic == "jobs.abandoned") == sorted(due[Deadline.ABANDON])
    assert sorted(key for topic, key, _ in published if topic == "jobs.expiring") == sorted(due[Deadline.WARN])
    for job_id in due[Deadline.EXPIRE]:
        job = await table.get(job_id)
        assert job.download_expired_at == NOW and job.upscaled_file_path is None
    assert list(tmp_path.iterdir()) == []  # expired and purged jobs' files are gone
    assert (await table.count_by_status())[S.ABANDONED] == counts[S.ABANDONED] + DUE_PER_KIND

    # What the pass read: only the due jobs' keys, and a number of commands that
    # grows with the 100 due jobs and the shard count, not with the 100,000.
    assert jobs_named(first_pass) == due_ids
    print(f"first pass: {len(first_pass)} commands ({len(first_pass) / len(due_ids):.1f} per due job); "
          f"nothing due: {len(second_pass)}; nothing due, email retention on: {len(emails_pass)}")
    assert len(first_pass) <= 12 * len(due_ids) + 8 * SHARDS
    # Nothing due: one claim per set and shard, and nothing else.
    assert again.total() == 0
    assert len(second_pass) <= len(JANITOR_SETS) * SHARDS
    # The email step reads one page: its cursor, a ranged read per shard and status, the page's jobs.
    batch = JanitorConfig.batch
    assert with_emails.total() == 0
    assert len(jobs_named(emails_pass)) <= batch
    assert len(emails_pass) <= len(JANITOR_SETS) * SHARDS + 1 + SHARDS * len(S) + batch


def jobs_named(commands: list[tuple]) -> set[str]:
    """The job ids that appear in any argument of ``commands`` (keys and values), as
    UUIDs or in their stored form (22 characters of URL-safe base64; an event id has
    that form too, but is a version 5 UUID where job ids are version 4)."""
    named = set()
    for command in commands:
        for arg in command:
            raw = arg if isinstance(arg, bytes) else str(arg).encode()
            named |= {m.decode() for m in UUID.findall(raw)}
            for m in STORED_ID.findall(raw):
                job_id = KeySpace.job_id_of(m)
                if uuid.UUID(job_id).version == 4:
                    named.add(job_id)
    return named
