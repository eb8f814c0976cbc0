"""Tables for people (rich). Machines get --json instead, so nothing here is meant to
be parsed, and every view is built from already-redacted data."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from rich.console import Console, Group
from rich.table import Table

from schemas.job import Job
from smi.ops.lag import LAGGING, OK, STALLED, STOPPED, GroupLag
from smi.ops.revenue import Revenue

STATUS_STYLE = {OK: "green", LAGGING: "yellow", STALLED: "bold red", STOPPED: "red"}
# The fields of a job an operator looks at first; the rest follow in table order.
FIRST_FIELDS = ("job_id", "status", "resolution", "price_cents", "cost_cents", "payment_status", "failure_reason")
# Rows of the jobs table need about 130 columns; rich cuts them to 80 when the output
# is not a terminal, which garbles `smi jobs list | less` or a file for a ticket.
PIPED_WIDTH = 160


def console() -> Console:
    """The terminal's width, or PIPED_WIDTH when the output goes to a pipe or file."""
    terminal = Console()
    return terminal if terminal.is_terminal else Console(width=PIPED_WIDTH)


def money(cents: int | None) -> str:
    if cents is None:
        return "-"
    sign = "-" if cents < 0 else ""
    return f"{sign}${abs(cents) // 100:,}.{abs(cents) % 100:02d}"


def count(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def moment(value: datetime | str | None) -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return value.strftime("%Y-%m-%d %H:%M:%S")


def jobs_table(jobs: list[Job], next_cursor: str | None = None) -> Table:
    table = Table(title=count(len(jobs), "job"), caption=f"more: --cursor '{next_cursor}'" if next_cursor else None)
    table.add_column("job id", no_wrap=True)
    for name in ("status", "res.", "price", "paid (UTC)", "created (UTC)", "updated (UTC)"):
        table.add_column(name)
    for job in jobs:
        table.add_row(job.job_id, job.status.value, job.resolution, money(job.price_cents), moment(job.paid_at),
                      moment(job.created_at), moment(job.updated_at))
    return table


def job_detail(view: dict[str, Any]) -> Group:
    """``view`` is smi.ops.jobs.show_job's result: redacted fields, the steps done,
    and the history."""
    fields = Table(show_header=False, title=f"job {view['job_id']}")
    fields.add_column(style="bold")
    fields.add_column()
    names = [*FIRST_FIELDS, *(n for n in view if n not in FIRST_FIELDS and n != "history")]
    for name in names:
        value = view.get(name)
        if value is not None:
            fields.add_row(name, _shown(name, value))
    history = Table(title="history")
    for name in ("at (UTC)", "from", "to", "by", "event id"):
        history.add_column(name)
    for entry in view["history"]:
        history.add_row(moment(entry["at"]), entry["from"] or "-", entry["to"], entry["by"], entry["event_id"] or "-")
    return Group(fields, history)


def _shown(name: str, value: Any) -> str:
    if name.endswith("_cents"):
        return money(value)
    if name.endswith("_at"):
        return moment(value)
    if isinstance(value, list):  # the steps done
        return ", ".join(value) or "-"
    return str(value)


def revenue_table(totals: Revenue) -> Table:
    table = Table(show_header=False, title="revenue")
    table.add_column(style="bold")
    table.add_column(justify="right")
    table.add_row("charged", f"{money(totals.charged_cents)} ({count(totals.paid_jobs, 'paid job')})")
    table.add_row("refunds", f"{money(totals.refunded_cents)} ({count(totals.refunded_jobs, 'refunded job')})")
    table.add_row("upscaler cost", money(totals.cost_cents))
    table.add_row("profit", money(totals.profit_cents))
    table.add_row("margin", "-" if totals.margin_percent is None else f"{totals.margin_percent:.2f}%")
    return table


def lag_tables(groups: list[GroupLag]) -> Group:
    summary = Table(title="consumer groups")
    for name in ("group", "status", "members", "lag"):
        summary.add_column(name)
    behind = Table(title="partitions with lag", caption="partitions without lag are left out; --json lists all")
    for name in ("group", "topic", "partition", "committed", "end", "lag"):
        behind.add_column(name)
    for group in groups:
        summary.add_row(group.group, f"[{STATUS_STYLE[group.status]}]{group.status}[/]", str(group.members),
                        str(group.total_lag))
        for p in group.partitions:
            if p.lag:
                behind.add_row(group.group, p.topic, str(p.partition), "-" if p.committed is None else str(p.committed),
                               str(p.end), str(p.lag))
    return Group(summary, behind) if behind.row_count else Group(summary)
