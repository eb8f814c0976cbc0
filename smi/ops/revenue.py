"""Revenue over all jobs (design.md, "Money": integer cents, never floats)."""

from __future__ import annotations

from dataclasses import dataclass

from schemas.status import JobStatus
from smi.jobtable import JobTable

PAGE_SIZE = 1000


@dataclass(frozen=True)
class Revenue:
    charged_cents: int  # what customers paid: price of every job with paid_at
    cost_cents: int  # what the upscaler cost: every completed job
    refunded_cents: int  # what went back to customers
    profit_cents: int  # charged - refunded - cost
    margin_percent: float | None  # profit / (charged - refunded); None when nothing was kept
    paid_jobs: int
    refunded_jobs: int


async def revenue(table: JobTable) -> Revenue:
    """Totals over every job in the table.

    O(jobs): it reads every job record, a page at a time. Fine for an operator's
    command over thousands of jobs; a shop with millions would keep running totals
    updated by the transitions instead. Paging by created_at keeps the walk exact
    while stages write: a job that changes status between pages keeps its place in
    that order, so it is neither skipped nor counted twice."""
    charged = cost = refunded = paid_jobs = refunded_jobs = 0
    cursor: str | None = None
    while True:
        page = await table.get_jobs(None, limit=PAGE_SIZE, order_by="created_at", descending=False, cursor=cursor)
        for job in page.jobs:
            if job.paid_at is not None:
                charged += job.price_cents or 0
                paid_jobs += 1
            if job.status is JobStatus.COMPLETED:
                cost += job.cost_cents or 0
            if job.refund_amount_cents is not None:
                refunded += job.refund_amount_cents
                refunded_jobs += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    kept = charged - refunded
    profit = kept - cost
    # A ratio, not money: rounded to hundredths of a percent for display and JSON.
    margin = round(profit * 100 / kept, 2) if kept else None
    return Revenue(charged, cost, refunded, profit, margin, paid_jobs, refunded_jobs)
