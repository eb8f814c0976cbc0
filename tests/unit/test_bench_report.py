"""The bench's pure figures and report (bench/report.py)."""

from __future__ import annotations

import pytest
from rich.console import Console

from bench.report import (Target, check_targets, latency_summary, lookup, percentile, rate_figures, ratio, render,
                          slowest_alone, stage_figures)


def test_percentile_interpolates_between_closest_ranks():
    values = [15, 20, 35, 40, 50]
    assert percentile(values, 0) == 15
    assert percentile(values, 100) == 50
    assert percentile(values, 50) == 35
    assert percentile(values, 40) == pytest.approx(29.0)  # rank 1.6: 20 + 0.6 * 15
    assert percentile(list(reversed(values)), 40) == pytest.approx(29.0)  # order of input does not matter
    assert percentile([7], 99) == 7


def test_percentile_of_nothing_is_none_and_p_is_checked():
    assert percentile([], 50) is None
    with pytest.raises(ValueError):
        percentile([1], 101)


def test_p99_of_a_hundred_values_sits_just_under_the_largest():
    values = [i / 1000 for i in range(1, 101)]  # 1..100 ms
    summary = latency_summary(values)
    assert summary["p50"] == pytest.approx(50.5)
    assert summary["p99"] == pytest.approx(99.01)
    assert summary["max"] == 100.0
    assert latency_summary([]) == {"p50": None, "p95": None, "p99": None, "max": None}


def test_stage_figures_rate_over_first_start_to_last_end_and_latency_per_item():
    starts = {"a": 100.0, "b": 100.5, "c": 101.0, "lost": 101.0}
    ends = {"a": 100.1, "b": 101.0, "c": 102.0, "stranger": 100.2}  # "stranger" never started here
    figures = stage_figures(starts, ends, expected=4)
    assert figures["count"] == 3
    assert figures["complete"] is False
    assert figures["seconds"] == 2.0
    assert figures["rate"] == 1.5
    assert figures["latency_ms"]["max"] == 1000.0
    assert figures["latency_ms"]["p50"] == 500.0


def test_stage_figures_window_can_start_later_and_nothing_done_is_no_rate():
    figures = stage_figures({"a": 0.0, "b": 0.0}, {"a": 10.0, "b": 11.0}, expected=2, since=9.0)
    assert figures["complete"] is True
    assert figures["rate"] == 1.0  # 2 items in 2 s, from `since`
    assert figures["latency_ms"]["p50"] == 10500.0  # latencies still from each item's start
    empty = stage_figures({"a": 0.0}, {}, expected=1)
    assert empty["count"] == 0 and empty["rate"] is None and empty["seconds"] is None


def test_rate_and_ratio():
    assert rate_figures(1000, 0.5) == {"count": 1000, "seconds": 0.5, "rate": 2000.0}
    assert rate_figures(10, 0)["rate"] is None
    assert ratio(2500, 10000) == 0.25
    assert ratio(None, 10000) is None and ratio(2500, None) is None


def results_with(rate: float, count: int = 10, p99: float = 80.0, bytes_per_job: int = 3000) -> dict:
    stage = {"expected": 10, "count": count, "complete": count >= 10, "seconds": 1.0, "rate": rate,
             "latency_ms": {"p50": 1.0, "p95": 2.0, "p99": p99, "max": 3.0}, "ratio_to_passthrough": 0.6}
    return {"stages": {"request_to_awaiting_payment": stage,
                       "paced_request_to_awaiting_payment": {**stage, "rate": 1000.0}},
            "redis": {"tables": {"10000": {"bytes_per_job": bytes_per_job}}}}


def statuses(rows: list[dict]) -> dict[str, str]:
    return {row["figure"]: row["status"] for row in rows}


def test_targets_are_met_missed_or_not_measured():
    rows = statuses(check_targets(results_with(rate=6000.0)))
    assert rows["stages.request_to_awaiting_payment.rate"] == "met"
    assert rows["stages.request_to_awaiting_payment.ratio_to_passthrough"] == "met"
    assert rows["stages.paced_request_to_awaiting_payment.latency_ms.p99"] == "met"
    assert rows["redis.tables.10000.bytes_per_job"] == "MISSED"  # 3000 > 2048
    assert rows["stages.webhook_to_pending.rate"] == "not measured"
    assert rows["redis.tables.1000000.bytes_per_job"] == "not measured"
    assert statuses(check_targets(results_with(rate=4999.0)))["stages.request_to_awaiting_payment.rate"] == "MISSED"


def test_a_stage_that_did_not_finish_misses_its_targets_whatever_its_rate():
    rows = statuses(check_targets(results_with(rate=9000.0, count=7)))
    assert rows["stages.request_to_awaiting_payment.rate"] == "MISSED (only 7 of 10 done)"


def test_bounds_are_strict_where_the_issue_says_less_than():
    assert Target("x", "<", 100, "").met(99.9) and not Target("x", "<", 100, "").met(100)
    assert Target("x", "<=", 2048, "").met(2048)
    assert Target("x", ">=", 2000, "").met(2000)
    rows = statuses(check_targets(results_with(rate=6000.0, p99=100.0)))
    assert rows["stages.paced_request_to_awaiting_payment.latency_ms.p99"] == "MISSED"


def test_lookup_follows_dotted_paths():
    assert lookup({"a": {"b": {"c": 3}}}, "a.b.c") == 3
    assert lookup({"a": {"b": 1}}, "a.x") is None
    assert lookup({"a": 1}, "a.b") is None


def test_render_shows_figures_and_marks_missed_targets():
    results = results_with(rate=4000.0)
    results["baselines"] = {"kafka_passthrough": {"count": 10, "seconds": 0.001, "rate": 10000.0}}
    results["janitor"] = {"jobs": 100000, "due": 100, "handled": 100, "seconds": 0.2, "commands": 624}
    results["machine"] = {"cores": 2}
    results["notes"] = ["noisy"]
    console = Console(record=True, width=200)
    for part in render(results):
        console.print(part)
    text = console.export_text()
    assert "request → awaiting_payment, burst" in text
    assert "4,000" in text and "10,000" in text and "624" in text
    assert "MISSED" in text and "met" in text
    assert "cores 2" in text and "note: noisy" in text


def test_the_slowest_stage_alone_is_named_and_the_pipeline_phases_do_not_count():
    stages = {"pending_to_completed": {"rate": 400.0},  # the pipeline's: shares the cores, not a capacity
              "alone_request_to_awaiting_payment": {"rate": 2600.0},
              "alone_pending_to_completed": {"rate": 875.4},
              "alone_completed_to_email": {"rate": 1300.0},
              "alone_webhook_to_pending": {"rate": None}}  # not measured: no rate
    assert slowest_alone(stages) == ("processor alone: pending → completed at 875/s: the slowest stage alone, "
                                     "the most the pipeline can move through it on this machine")
    assert slowest_alone({"pending_to_completed": {"rate": 400.0}}) is None
