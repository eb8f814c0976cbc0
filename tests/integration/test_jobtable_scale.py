"""Concurrency across processes, and paging through 10,000 jobs."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
from datetime import timedelta

from schemas.status import JobStatus as S, Stage
from tests.support.jobs import job_fields, make_job

ATTEMPTS_PER_PROCESS = 25
WORKER = textwrap.dedent("""
    import asyncio, json, sys, time
    from schemas.status import JobStatus, Stage
    from smi.jobtable import JobTable, connect

    url, nodes, namespace, job_id, name, start_at, n = sys.argv[1:8]

    async def main():
        client = connect(url, nodes)
        table = JobTable(client, shards=8, namespace=namespace)
        await table.redis.ping()
        await asyncio.sleep(max(0.0, float(start_at) - time.time()))
        results = await asyncio.gather(*[
            table.transition(job_id, JobStatus.PENDING, actor=Stage.CHECKOUT, event_id=f"{name}-{i}")
            for i in range(int(n))])
        print(json.dumps([r.outcome for r in results]))
        await client.aclose()

    asyncio.run(main())
""")


async def test_fifty_concurrent_attempts_from_two_processes_apply_once(table, request):
    job = await make_job(table, S.AWAITING_PAYMENT)
    nodes = request.getfixturevalue("redis_cluster_nodes") if "cluster" in request.node.callspec.id else ""
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    start_at = str(time.time() + 2.0)  # both processes fire together
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, url, nodes, table.keys.namespace, job.job_id,
                               name, start_at, str(ATTEMPTS_PER_PROCESS)], stdout=subprocess.PIPE, text=True)
             for name in ("a", "b")]
    outcomes = []
    for proc in procs:
        out, _ = await asyncio.to_thread(proc.communicate, timeout=60)
        assert proc.returncode == 0
        outcomes += json.loads(out)
    assert len(outcomes) == 2 * ATTEMPTS_PER_PROCESS
    assert outcomes.count("applied") == 1
    assert set(outcomes) <= {"applied", "noop"}
    history = await table.history(job.job_id)
    assert [h.target for h in history].count(S.PENDING) == 1


async def test_get_jobs_pages_10000_jobs_without_repeats_or_gaps(table):
    total, awaiting_every = 10_000, 5
    base = (await make_job(table, S.NEW)).created_at  # also the 10,001st job, status new
    created = []
    for chunk in range(0, total, 80):
        # Ten jobs per millisecond: ties in created_at must not break paging.
        results = await asyncio.gather(*[
            table.create(job_fields(post_id=i + 1), now=base + timedelta(milliseconds=(i // 10)))
            for i in range(chunk, chunk + 80)])
        created += [job.job_id for job, _ in results]
    moved = created[::awaiting_every]
    for chunk in range(0, len(moved), 80):
        await asyncio.gather(*[
            table.transition(job_id, S.AWAITING_PAYMENT, actor=Stage.CHECKOUT, event_id="e",
                             now=base + timedelta(seconds=10, milliseconds=i // 7))
            for i, job_id in enumerate(moved[chunk:chunk + 80], start=chunk)])

    async def page_all(statuses, order_by, descending, limit):
        seen, cursor, pages = [], None, 0
        while True:
            page = await table.get_jobs(statuses, limit=limit, order_by=order_by, descending=descending, cursor=cursor)
            assert len(page.jobs) <= limit
            seen += page.jobs
            pages += 1
            if page.next_cursor is None:
                return seen, pages
            cursor = page.next_cursor

    for order_by in ("created_at", "updated_at"):
        for descending in (True, False):
            jobs, pages = await page_all(None, order_by, descending, 333)
            ids = [j.job_id for j in jobs]
            assert len(ids) == len(set(ids)) == total + 1
            keys = [(getattr(j, order_by), j.job_id) for j in jobs]
            assert keys == sorted(keys, reverse=descending)
            assert pages == (total + 1) // 333 + 1

    awaiting, _ = await page_all([S.AWAITING_PAYMENT], "created_at", True, 1000)
    assert sorted(j.job_id for j in awaiting) == sorted(moved)
    assert all(j.status is S.AWAITING_PAYMENT for j in awaiting)
    new, _ = await page_all([S.NEW], "updated_at", False, 777)
    assert len(new) == total + 1 - len(moved)
    both = await table.get_jobs([S.NEW, S.AWAITING_PAYMENT], limit=25)
    assert len(both.jobs) == 25 and both.next_cursor is not None
    newest_first = [(j.created_at, j.job_id) for j in both.jobs]
    assert newest_first == sorted(newest_first, reverse=True)
