"""The job table on its own, in scratch namespaces of the same Redis:

- bytes per job: a table of N completed jobs written through JobTable exactly as
  the stages write them (create, four transitions with the stages' fields, a
  download token, the email marker); MEMORY USAGE (exact, SAMPLES 0) of every key
  of the namespace, split into the jobs' own keys (hash, history, done set) and
  the shared indexes, and, as a cross-check, the INFO used_memory delta (noisy:
  other clients share this Redis);
- the rate of JobTable.transition (awaiting_payment -> pending, 100 at a time) on
  probe jobs inside that table, so the rate at 10,000 and at 1,000,000 jobs compare;
- one janitor pass with 100 due among 100,000 jobs, built and counted as
  tests/integration/test_janitor_scale.py does (its helpers are reused).
Every scratch key is deleted afterwards."""

from __future__ import annotations

import asyncio
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from datetime import timedelta
from pathlib import Path
from typing import Any

from schemas.events import make_event_id, utcnow
from schemas.status import Deadline, JobStatus, Stage
from smi.jobtable import JobTable

SHARDS = 16  # the production default (REDIS_SHARDS)
CONCURRENCY = 200


async def in_batches(items: Sequence[Any], work: Callable[[Any], Awaitable[Any]], size: int = CONCURRENCY) -> list:
    results: list = []
    for start in range(0, len(items), size):
        results += await asyncio.gather(*(work(item) for item in items[start:start + size]))
    return results


async def completed_job(table: JobTable, i: int) -> str:
    """A job as a real one ends up: the stages' writes with fields of real sizes."""
    now = utcnow()
    job, _ = await table.create({
        "image_url": f"https://shop.example.com/wp-content/uploads/2026/05/photo-{i}.jpg", "resolution": "4x",
        "email": f"customer{i}@example.com", "post_id": i + 1, "attachment_id": i + 1, "image_width": 2000,
        "image_height": 2000, "success_url": "https://shop.example.com/checkout/thank-you",
        "cancel_url": "https://shop.example.com/checkout/cancelled", "price_cents": 384, "cost_cents": 64,
        "credits": 16, "markup_percent": 500}, request_id=f"req-{uuid.uuid4().hex}", actor=Stage.CHECKOUT)
    job_id = job.job_id
    session = "cs_test_" + uuid.uuid4().hex + uuid.uuid4().hex[:26]
    await table.transition(job_id, JobStatus.AWAITING_PAYMENT, actor=Stage.CHECKOUT,
                           event_id=make_event_id(job_id, "awaiting_payment"),
                           fields={"stripe_checkout_session_id": session, "payment_status": "unpaid",
                                   "checkout_url": f"https://checkout.stripe.com/c/pay/{session}#fidkdWxOYHwnPyd1"},
                           deadlines={Deadline.ABANDON: now + timedelta(hours=1)})
    await table.transition(job_id, JobStatus.PENDING, actor=Stage.CHECKOUT, event_id=make_event_id(job_id, "pending"),
                           fields={"payment_status": "paid", "paid_at": now,
                                   "stripe_payment_intent_id": "pi_" + uuid.uuid4().hex[:24]})
    await table.transition(job_id, JobStatus.PROCESSING, actor=Stage.PROCESSOR,
                           event_id=make_event_id(job_id, "processing", 1),
                           fields={"upsampler_job_id": f"local-{job_id}-1", "attempts": 1,
                                   "processing_started_at": now},
                           deadlines={Deadline.POLL: now + timedelta(minutes=2)})
    await table.transition(job_id, JobStatus.COMPLETED, actor=Stage.PROCESSOR,
                           event_id=make_event_id(job_id, "completed", 1),
                           fields={"upscaled_file_path": f"/srv/smi/storage/{job_id}/upscaled-4x.png",
                                   "credits": 16, "completed_at": now, "cost_cents": 64})
    await table.issue_download_token(job_id, ttl_hours=24, warn_hours=4, now=now)
    await table.mark_done(job_id, "email:ready")
    return job_id


async def awaiting_job(table: JobTable, i: int) -> str:
    job, _ = await table.create({"image_url": f"https://shop.example.com/p/{i}.jpg", "resolution": "2x",
                                 "email": f"probe{i}@example.com", "image_width": 8, "image_height": 8,
                                 "price_cents": 50}, request_id=f"probe-{uuid.uuid4().hex}")
    await table.transition(job.job_id, JobStatus.AWAITING_PAYMENT, actor=Stage.CHECKOUT,
                           event_id=make_event_id(job.job_id, "awaiting_payment"),
                           fields={"stripe_checkout_session_id": f"cs_probe_{job.job_id}", "payment_status": "unpaid"})
    return job.job_id


async def namespace_keys(redis, namespace: str) -> list[bytes]:
    """Every key of a scratch namespace: they all carry ``<namespace>{s<N>}``."""
    return [key async for key in redis.scan_iter(match=f"*{namespace}{{s*", count=5000)]


async def memory_usage(redis, keys: Sequence[bytes]) -> list[int]:
    sizes: list[int] = []
    for start in range(0, len(keys), 5000):
        pipe = redis.pipeline(transaction=False)
        for key in keys[start:start + 5000]:
            pipe.memory_usage(key, samples=0)
        sizes += [size or 0 for size in await pipe.execute()]
    return sizes


async def used_memory(redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def unlink(redis, keys: Iterable[bytes | str]) -> None:
    keys = list(keys)
    for start in range(0, len(keys), 10_000):
        await redis.unlink(*keys[start:start + 10_000])


async def unlink_namespace(redis, namespace: str) -> None:
    """Deletes every key of a scratch namespace."""
    await unlink(redis, await namespace_keys(redis, namespace))


async def table_at_size(redis, size: int, *, probes: int = 2000, progress: Callable[[str], None] = print) -> dict:
    """Bytes per job and transition rate in a table of ``size`` completed jobs."""
    namespace = f"benchmem{uuid.uuid4().hex[:8]}:"
    table = JobTable(redis, shards=SHARDS, namespace=namespace)
    try:
        before = await used_memory(redis)
        started = time.perf_counter()
        done = 0
        for start in range(0, size, 10_000):
            await in_batches(range(start, min(start + 10_000, size)), lambda i: completed_job(table, i))
            done = min(start + 10_000, size)
            if size > 10_000 and done % 100_000 == 0:
                progress(f"    {done:,} of {size:,} jobs written ({time.perf_counter() - started:.0f}s)")
        build_seconds = time.perf_counter() - started
        info_delta = await used_memory(redis) - before
        keys = await namespace_keys(redis, namespace)
        sizes = await memory_usage(redis, keys)
        job_bytes = sum(s for k, s in zip(keys, sizes) if k.startswith(b"job:"))
        index_bytes = sum(s for k, s in zip(keys, sizes) if not k.startswith(b"job:"))

        probe_ids = await in_batches(range(probes), lambda i: awaiting_job(table, i))
        started = time.perf_counter()
        outcomes = await in_batches(probe_ids, lambda job_id: table.transition(
            job_id, JobStatus.PENDING, actor=Stage.CHECKOUT, event_id=make_event_id(job_id, "pending")), size=100)
        transition_seconds = time.perf_counter() - started
        applied = sum(1 for r in outcomes if r.applied)
        if applied != probes:
            raise RuntimeError(f"only {applied} of {probes} probe transitions applied")
        return {"jobs": size, "bytes_per_job": round((job_bytes + index_bytes) / size),
                "job_keys_bytes_per_job": round(job_bytes / size), "index_bytes_per_job": round(index_bytes / size),
                "info_delta_bytes_per_job": round(info_delta / size), "keys": len(keys),
                "build_seconds": round(build_seconds, 1), "build_rate": round(size / build_seconds),
                "transition_rate": round(probes / transition_seconds), "transition_probes": probes}
    finally:
        await unlink_namespace(redis, namespace)


async def live_job_bytes(redis, table: JobTable, job_ids: Sequence[str]) -> dict[str, int] | None:
    """Mean MEMORY USAGE of the own key of real jobs: the hash (with the history and
    the done markers in it)."""
    if not job_ids:
        return None
    mean = round(sum(await memory_usage(redis, [table.keys.job(j) for j in job_ids])) / len(job_ids))
    return {"hash": mean, "total": mean, "jobs": len(job_ids)}


async def janitor_pass(redis, redis_url: str) -> dict:
    """One janitor tick with 100 due among 100,000 jobs: seconds and Redis commands."""
    from services.janitor.handlers import Janitor, JanitorConfig
    from tests.integration import test_janitor_scale as scale

    namespace = f"benchjan{uuid.uuid4().hex[:8]}:"
    table = JobTable(redis, shards=scale.SHARDS, namespace=namespace)
    job_ids: list[str] = []
    with tempfile.TemporaryDirectory(prefix="smi-bench-janitor-") as storage:
        try:
            started = time.perf_counter()
            due = await scale.make_due_jobs(table, Path(storage))
            due_count = sum(len(ids) for ids in due.values())
            job_ids = [j for ids in due.values() for j in ids]
            job_ids += await scale.write_filler_jobs(table, scale.TOTAL_JOBS - due_count)
            build_seconds = time.perf_counter() - started

            client, sent = scale.counting_client(redis_url)
            await client.ping()

            async def publish(spec, key, value) -> None:
                pass

            config = JanitorConfig(storage_dir=Path(storage), expiry_warning=timedelta(hours=4),
                                   failed_retention=timedelta(days=7), email_retention=None)
            janitor = Janitor(JobTable(client, shards=scale.SHARDS, namespace=namespace), scale.RecordingPayments(),
                              publish, config, lambda: scale.NOW)
            sent.clear()
            started = time.perf_counter()
            handled = await janitor.tick(scale.NOW)
            seconds = time.perf_counter() - started
            commands = len(sent)
            await client.aclose()
        finally:
            await scale.drop_namespace(table, job_ids)
            await unlink_namespace(redis, namespace)
    return {"jobs": scale.TOTAL_JOBS, "due": due_count, "handled": handled.total(), "seconds": round(seconds, 4),
            "commands": commands, "build_seconds": round(build_seconds, 1)}
