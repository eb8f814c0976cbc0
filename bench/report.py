"""Pure functions of the bench: percentiles, per-stage figures, the issue's targets,
and the rich tables. No I/O here (tests/unit/test_bench_report.py)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from rich.table import Table
from rich.text import Text


def percentile(values: Sequence[float], p: float) -> float | None:
    """The p-th percentile (0..100), interpolated between the closest ranks (as
    numpy's default); None for no values."""
    if not 0 <= p <= 100:
        raise ValueError("p must be within 0..100")
    if not values:
        return None
    ordered = sorted(values)
    rank = (len(ordered) - 1) * p / 100
    low, high = math.floor(rank), math.ceil(rank)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def latency_summary(seconds: Sequence[float]) -> dict[str, float | None]:
    """p50/p95/p99/max of latencies given in seconds, in milliseconds."""
    def ms(value: float | None) -> float | None:
        return None if value is None else round(value * 1000, 2)
    return {"p50": ms(percentile(seconds, 50)), "p95": ms(percentile(seconds, 95)),
            "p99": ms(percentile(seconds, 99)), "max": ms(max(seconds) if seconds else None)}


def stage_figures(starts: Mapping[str, float], ends: Mapping[str, float], expected: int, *,
                  since: float | None = None) -> dict[str, Any]:
    """One stage of the flow: ``starts`` and ``ends`` map an item (job or request id)
    to the moment (epoch seconds) it entered and left the stage. The rate is items
    done over the window from the first start (or ``since``) to the last end, the
    latency per item its end minus its start (queueing included: that is what
    latency under load is)."""
    pairs = [(starts[key], end) for key, end in ends.items() if key in starts]
    figures: dict[str, Any] = {"expected": expected, "count": len(pairs), "complete": len(pairs) >= expected,
                               "seconds": None, "rate": None, "latency_ms": latency_summary([])}
    if pairs:
        first = since if since is not None else min(start for start, _ in pairs)
        seconds = max(end for _, end in pairs) - first
        figures["seconds"] = round(seconds, 3)
        figures["rate"] = round(len(pairs) / seconds, 1) if seconds > 0 else None
        figures["latency_ms"] = latency_summary([end - start for start, end in pairs])
    return figures


def rate_figures(count: int, seconds: float) -> dict[str, Any]:
    return {"count": count, "seconds": round(seconds, 3), "rate": round(count / seconds, 1) if seconds > 0 else None}


def ratio(value: float | None, base: float | None) -> float | None:
    return round(value / base, 3) if value and base else None


@dataclass(frozen=True)
class Target:
    figure: str  # a dotted path into the results
    op: str  # ">=", "<=" or "<"
    bound: float
    label: str

    def met(self, value: float) -> bool:
        return {">=": value >= self.bound, "<=": value <= self.bound, "<": value < self.bound}[self.op]


# The targets of issue 7, "Fast stages".
TARGETS = (
    Target("stages.request_to_awaiting_payment.rate", ">=", 5000, "requests → awaiting_payment ≥ 5,000/s"),
    Target("stages.request_to_awaiting_payment.ratio_to_passthrough", ">=", 0.5,
           "requests → awaiting_payment ≥ 50% of the raw pass-through"),
    Target("stages.webhook_to_pending.rate", ">=", 2000, "signed webhooks → pending ≥ 2,000/s"),
    Target("stages.pending_to_completed.rate", ">=", 2000, "pending → completed ≥ 2,000/s"),
    Target("stages.request_to_email.rate", ">=", 1000, "download-ready emails ≥ 1,000/s"),
    # The same, each stage draining its backlog with the stages after it not running
    # (bench/alone.py): its own capacity, where the pipeline's stages share the cores.
    Target("stages.alone_request_to_awaiting_payment.rate", ">=", 5000,
           "requests → awaiting_payment ≥ 5,000/s, checkout alone"),
    Target("stages.alone_webhook_to_pending.rate", ">=", 2000,
           "signed webhooks → pending ≥ 2,000/s, gateway and checkout alone"),
    Target("stages.alone_pending_to_completed.rate", ">=", 2000, "pending → completed ≥ 2,000/s, processor alone"),
    Target("stages.alone_completed_to_email.rate", ">=", 1000, "download-ready emails ≥ 1,000/s, notifier alone"),
    Target("stages.paced_request_to_awaiting_payment.latency_ms.p99", "<", 100,
           "p99 request → awaiting_payment < 100 ms at 1,000 req/s"),
    Target("redis.tables.10000.bytes_per_job", "<=", 2048, "Redis ≤ 2 KiB per job (10,000 jobs)"),
    Target("redis.tables.1000000.bytes_per_job", "<=", 2048, "Redis ≤ 2 KiB per job (1,000,000 jobs)"),
)


def lookup(results: Mapping[str, Any], path: str) -> Any:
    value: Any = results
    for part in path.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return None
        value = value[part]
    return value


def check_targets(results: Mapping[str, Any], targets: Sequence[Target] = TARGETS) -> list[dict[str, Any]]:
    """Each target with its measured value and a status: met, MISSED, or not
    measured. A stage that did not finish all its items misses its targets."""
    rows = []
    for target in targets:
        value = lookup(results, target.figure)
        parts = target.figure.split(".")
        stage = lookup(results, ".".join(parts[:2])) if parts[0] == "stages" else None
        if value is None:
            status = "MISSED (no result)" if stage else "not measured"
        elif stage and not stage.get("complete", True):
            status = f"MISSED (only {stage['count']} of {stage['expected']} done)"
        else:
            status = "met" if target.met(value) else "MISSED"
        rows.append({"target": target.label, "figure": target.figure, "value": value, "status": status})
    return rows


# -- rendering -------------------------------------------------------------------

STAGE_LABELS = {
    "request_to_awaiting_payment": "request → awaiting_payment, burst",
    "paced_request_to_awaiting_payment": "request → awaiting_payment, 1,000/s offered",
    "webhook_acknowledged": "webhook → gateway's 200",
    "webhook_to_pending": "webhook → pending",
    "pending_to_completed": "pending → completed",
    "request_to_email": "request → email (rate from 1st completed)",
    "stripe_request_to_awaiting_payment": "request → awaiting_payment, stripe-mock",
    "alone_request_to_awaiting_payment": "checkout alone: requests → awaiting_payment",
    "alone_webhook_to_pending": "gateway and checkout alone: webhook → pending",
    "alone_pending_to_completed": "processor alone: pending → completed",
    "alone_completed_to_email": "notifier alone: completed → email",
}


def number(value: Any, digits: int = 0, suffix: str = "") -> str:
    if value is None:
        return "–"
    return f"{value:,.{digits}f}{suffix}"


def stages_table(stages: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(title="Pipeline stages (rate = items done / first in → last out)")
    table.caption = ("÷ stage floor: the rate over that of smi's stage agent forwarding each message (Baselines), "
                     "the most any stage can do here")
    for column in ("stage", "done", "seconds", "rate /s", "÷ pass-through", "÷ stage floor", "p50 ms", "p95 ms",
                   "p99 ms", "max ms"):
        table.add_column(column, justify="left" if column == "stage" else "right")
    for name, s in stages.items():
        lat = s.get("latency_ms", {})
        done = f"{s['count']:,}/{s['expected']:,}"
        table.add_row(STAGE_LABELS.get(name, name), done if s["complete"] else Text(done, style="red"),
                      number(s.get("seconds"), 1), number(s.get("rate")), number(s.get("ratio_to_passthrough"), 3),
                      number(s.get("ratio_to_stage_floor"), 3),
                      *(number(lat.get(k), 1) for k in ("p50", "p95", "p99", "max")))
    return table


def slowest_alone(stages: Mapping[str, Mapping[str, Any]]) -> str | None:
    """Which stage, measured alone (bench/alone.py), drains the fewest jobs a
    second: the most the whole pipeline can do here, whatever the other stages do."""
    rates = {name: s["rate"] for name, s in stages.items() if name.startswith("alone_") and s.get("rate")}
    if not rates:
        return None
    name = min(rates, key=rates.__getitem__)
    return (f"{STAGE_LABELS.get(name, name)} at {number(rates[name])}/s: the slowest stage alone, "
            f"the most the pipeline can move through it on this machine")


def baselines_table(baselines: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(title="Baselines (same broker and Redis)")
    for column in ("baseline", "count", "seconds", "rate /s"):
        table.add_column(column, justify="left" if column == "baseline" else "right")
    for name, b in baselines.items():
        table.add_row(name, number(b.get("count")), number(b.get("seconds"), 2), number(b.get("rate")))
    return table


def redis_table(redis: Mapping[str, Any]) -> Table:
    live = redis.get("live_job_keys_bytes")
    caption = (f"a completed job of the pipeline run: {live['total']:,} bytes in its own hash (history and done "
               f"markers included), indexes not counted" if live else None)
    table = Table(title="Job table in Redis (scratch tables of completed jobs)", caption=caption)
    for column in ("jobs in table", "bytes/job", "job keys", "index", "INFO Δ/job", "transitions /s", "build s"):
        table.add_column(column, justify="right")
    for size, t in redis.get("tables", {}).items():
        table.add_row(number(int(size)), number(t.get("bytes_per_job")), number(t.get("job_keys_bytes_per_job")),
                      number(t.get("index_bytes_per_job")), number(t.get("info_delta_bytes_per_job")),
                      number(t.get("transition_rate")), number(t.get("build_seconds"), 1))
    return table


def janitor_table(janitor: Mapping[str, Any]) -> Table:
    table = Table(title="One janitor pass")
    for column in ("jobs", "due", "handled", "seconds", "Redis commands"):
        table.add_column(column, justify="right")
    table.add_row(number(janitor.get("jobs")), number(janitor.get("due")), number(janitor.get("handled")),
                  number(janitor.get("seconds"), 3), number(janitor.get("commands")))
    return table


# Frames under every message of a stage (how it was started, its agent): the
# profile column shows what is under them.
ENTRY_FRAMES = ("__main__", "smi/cli.py", "smi/stages.py", "smi/kafka/handling.py")


def bottlenecks_table(bottlenecks: Mapping[str, Mapping[str, Any]]) -> Table:
    table = Table(title="Where each phase spends its time (CPU in cores, 1.00 = one core all the time; "
                        "and CPU milliseconds per item)")
    for column in ("phase", "busiest processes", "bottleneck", "top of the owning stage's profile (ours, inclusive)"):
        table.add_column(column)
    for phase, entry in bottlenecks.items():
        cores = sorted(entry.get("cores", {}).items(), key=lambda item: -item[1])[:4]
        profile = entry.get("profile") or {}
        frames = [f"{pct:.0f}% {frame.split(' (')[0]}" for frame, pct in profile.get("ours_inclusive", [])
                  if not any(entry in frame for entry in ENTRY_FRAMES)][:4]
        per_item = entry.get("cpu_ms_per_item", {})
        table.add_row(STAGE_LABELS.get(phase, phase),
                      ", ".join(f"{n} {c:.2f}" + (f" ({per_item[n]:.2f} ms/item)" if n in per_item else "")
                                for n, c in cores),
                      entry.get("bottleneck", ""), (f"{profile.get('stage')}: " if frames else "") + "; ".join(frames))
    return table


def targets_table(rows: Sequence[Mapping[str, Any]]) -> Table:
    table = Table(title="Targets of issue 7")
    table.add_column("target")
    table.add_column("measured", justify="right")
    table.add_column("status")
    for row in rows:
        value = row["value"]
        shown = number(value, 3 if isinstance(value, float) and value < 10 else 0)
        style = "green" if row["status"] == "met" else ("dim" if row["status"] == "not measured" else "bold red")
        table.add_row(row["target"], shown, Text(row["status"], style=style))
    return table


def render(results: Mapping[str, Any]) -> list[Any]:
    """The renderables of the terminal report, in order."""
    parts: list[Any] = []
    if results.get("stages"):
        parts.append(stages_table(results["stages"]))
        if slowest := slowest_alone(results["stages"]):
            parts.append(Text(slowest, style="bold"))
    if results.get("bottlenecks"):
        parts.append(bottlenecks_table(results["bottlenecks"]))
    if results.get("baselines"):
        parts.append(baselines_table(results["baselines"]))
    if results.get("redis", {}).get("tables") or results.get("redis", {}).get("live_job_keys_bytes"):
        parts.append(redis_table(results["redis"]))
    if results.get("janitor"):
        parts.append(janitor_table(results["janitor"]))
    parts.append(targets_table(results.get("targets") or check_targets(results)))
    machine = results.get("machine", {})
    if machine:
        parts.append(Text("machine: " + ", ".join(f"{k} {v}" for k, v in machine.items()), style="dim"))
    for note in results.get("notes", []):
        parts.append(Text(f"note: {note}", style="yellow"))
    for error in results.get("errors", []):
        parts.append(Text(f"error: {error}", style="bold red"))
    return parts
