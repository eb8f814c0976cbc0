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


# What an operator may find a job by besides its id: the ids other systems show
# (Stripe's dashboard and receipts, the Upsampler's), each the job table keeps an
# index of. The token lookups stay inside the gateway: a token never reaches an operator.
FIND_BY = ("checkout_session", "payment_intent", "upsampler_job")
MAX_LOOKUP_LENGTH = 255


async def find_job(table: JobTable, kind: str, value: str) -> Job:
    """The job a Stripe checkout session, payment intent or upscaler job belongs to
    (one lookup per shard); JobNotFound when none does."""
    if kind not in FIND_BY:
        raise ValueError(f"find by one of {', '.join(FIND_BY)}, not {kind!r}")
    if not value or len(value) > MAX_LOOKUP_LENGTH or not value.isprintable() or any(c.isspace() for c in value):
        raise JobNotFound(value)  # no id of those systems looks like this
    job = await table.find_by(kind, value)  # checks the job holds the value
    if job is None:
        raise JobNotFound(value)
    return job


async def job_named(table: JobTable, text: str) -> Job:
    """The job an operator names by any id they may hold: a Stripe checkout session
    (cs_...) or payment intent (pi_...), the job's own id, or else the upscaler's job
    id (a UUID too, so tried after the job id). JobNotFound when none matches."""
    if text.startswith("cs_"):
        return await find_job(table, "checkout_session", text)
    if text.startswith("pi_"):
        return await find_job(table, "payment_intent", text)
    try:
        return await require_job(table, text)
    except JobNotFound:
        return await find_job(table, "upsampler_job", text)


async def show_job(table: JobTable, job_id: str) -> dict[str, Any]:
    """The redacted job, the side effects done for it, and its transition history,
    oldest first."""
    return await job_view(table, await require_job(table, job_id))


async def job_view(table: JobTable, job: Job) -> dict[str, Any]:
    view = job.redacted()
    # The side effects done once per job (JobTable.mark_done: "email:ready", ...): the
    # record of each email sent, which the notifier logs only at DEBUG.
    view["done"] = sorted(job.done)
    view["history"] = [
        {"at": rfc3339(entry.at), "from": entry.source.value if entry.source else None,
         "to": entry.target.value, "by": entry.actor, "event_id": entry.event_id}
        for entry in await table.history(job.job_id)
    ]
    return view
