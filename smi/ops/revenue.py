"""Revenue over all jobs (design.md, "Money": integer cents, never floats).

``revenue`` reads the running figures the job table keeps per shard (one small hash
per shard, updated by the same Lua script that changes a field they count; see
smi/jobtable/lua/prelude.lua), so it costs O(shards), not O(jobs). ``recount`` walks
every job and is the reference: ``check`` compares the two, ``rebuild`` recounts the
jobs into the running figures (a table older than them, or figures found wrong)."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from schemas.status import JobStatus
from smi.jobtable import JobTable, ShardRevenue
from smi.jobtable.table import REVENUE_FIGURES

log = logging.getLogger(__name__)

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


def figures(charged: int, cost: int, refunded: int, paid_jobs: int, refunded_jobs: int) -> Revenue:
    kept = charged - refunded
    profit = kept - cost
    # A ratio, not money: rounded to hundredths of a percent for display and JSON.
    margin = round(profit * 100 / kept, 2) if kept else None
    return Revenue(charged, cost, refunded, profit, margin, paid_jobs, refunded_jobs)


@dataclass(frozen=True)
class Totals:
    """The shards' running figures, summed. ``incomplete_shards``: shards whose
    figures do not count every job (the table predates them; ``rebuild`` fixes it)."""
    revenue: Revenue
    incomplete_shards: tuple[int, ...]

    @property
    def complete(self) -> bool:
        return not self.incomplete_shards


def _sum(shards: list[ShardRevenue]) -> Totals:
    total = {name: sum(s.figures[name] for s in shards) for name in REVENUE_FIGURES}
    return Totals(figures(**total), tuple(s.shard for s in shards if not s.complete))


async def running_totals(table: JobTable) -> Totals:
    """O(shards): the running figures of every shard, in one pipelined round trip."""
    return _sum(await table.revenue_figures())


async def revenue(table: JobTable) -> Revenue:
    """Totals over every job in the table, from the running figures. A table older
    than them (some shard's figures incomplete) gets the recount instead, slow but
    right, and a warning that names the fix."""
    totals = await running_totals(table)
    if totals.complete:
        return totals.revenue
    log.warning("the running revenue figures of shard(s) %s do not count every job (the table predates them): "
                "recounting every job instead; `smi revenue --rebuild` builds them",
                ",".join(map(str, totals.incomplete_shards)))
    return await recount(table)


async def recount(table: JobTable) -> Revenue:
    """Totals over every job in the table, by reading every job record.

    O(jobs): a page at a time. The reference for the running figures. Paging by
    created_at keeps the walk exact while stages write: a job that changes status
    between pages keeps its place in that order, so it is neither skipped nor
    counted twice."""
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
    return figures(charged, cost, refunded, paid_jobs, refunded_jobs)


@dataclass(frozen=True)
class Check:
    recount: Revenue  # the walk over every job
    totals: Totals  # the running figures, read right after the walk
    quiet: bool  # the running figures did not move during the walk

    @property
    def matches(self) -> bool:
        return self.totals.complete and self.totals.revenue == self.recount

    def differences(self) -> dict[str, tuple[object, object]]:
        """figure -> (recount, running totals), for the figures that differ."""
        walked, kept = vars(self.recount), vars(self.totals.revenue)
        return {name: (walked[name], kept[name]) for name in walked if walked[name] != kept[name]}


async def check(table: JobTable, *, attempts: int = 3) -> Check:
    """Recount and compare with the running figures. Stages writing during the walk
    can make the two differ for a moment: a walk during which the figures moved and
    that disagrees is tried again, up to ``attempts`` times."""
    for _ in range(attempts):
        before = await running_totals(table)
        walked = await recount(table)
        after = await running_totals(table)
        result = Check(walked, after, quiet=before == after)
        if result.matches or result.quiet:
            break
    return result


async def rebuild(table: JobTable, *, chunk: int = 200) -> int:
    """Recount every shard's jobs into its running figures, online (a chunk of jobs
    per Lua script; writes during the rebuild are counted exactly once). Returns the
    jobs counted."""
    counted = 0
    for shard in range(table.keys.shards):
        counted += await table.rebuild_revenue(shard, chunk=chunk)
    return counted
