"""Reading jobs for operators: pages of jobs and one job with its history. What
leaves here is redacted (no customer email, no token hashes)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast, get_args

from pydantic import TypeAdapter, ValidationError

from schemas.events import JobId, rfc3339
from schemas.job import Job
from schemas.status import JobStatus
from smi.jobtable import JobNotFound, JobTable, Page, open_table
from smi.jobtable.table import OrderBy
from smi.settings import Settings

MAX_LIMIT = 1000
ORDER_BY: tuple[str, ...] = get_args(OrderBy)
# A string that is not shaped like a job id cannot name a job: "not found" without
# asking Redis (and without building keys from arbitrary input).
_JOB_ID = TypeAdapter(JobId)


@asynccontextmanager
async def opened_table(settings: Settings) -> AsyncIterator[JobTable]:
    """The job table the stages use (same Redis, shards and namespace), closed after use."""
    table = open_table(settings)
    try:
        yield table
    finally:
        await table.redis.aclose()


async def list_jobs(table: JobTable, *, statuses: list[JobStatus] | None, limit: int,
                    order_by: str = "created_at", descending: bool = True, cursor: str | None = None) -> Page:
    """One page of jobs in ``statuses`` (all when None), newest first by default.
    Pass the page's ``next_cursor`` back as ``cursor`` for the next page."""
    if not 1 <= limit <= MAX_LIMIT:
        raise ValueError(f"limit must be 1..{MAX_LIMIT}, got {limit}")
    if order_by not in ORDER_BY:
        raise ValueError(f"order_by must be one of {', '.join(ORDER_BY)}, got {order_by!r}")
    return await table.get_jobs(statuses, limit=limit, order_by=cast(OrderBy, order_by), descending=descending,
                                cursor=cursor)


async def require_job(table: JobTable, job_id: str) -> Job:
    """The job, or JobNotFound, also for a string that is not a job id at all."""
    try:
        _JOB_ID.validate_python(job_id)
    except ValidationError:
        raise JobNotFound(job_id) from None
    return await table.get(job_id)


async def show_job(table: JobTable, job_id: str) -> dict[str, Any]:
    """The redacted job plus its transition history, oldest first."""
    job = await require_job(table, job_id)
    view = job.redacted()
    view["history"] = [
        {"at": rfc3339(entry.at), "from": entry.source.value if entry.source else None,
         "to": entry.target.value, "by": entry.actor, "event_id": entry.event_id}
        for entry in await table.history(job_id)
    ]
    return view
