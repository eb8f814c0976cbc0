"""The bench's CPU accounting and profile summary (bench/cpu.py)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys

import pytest
from rich.console import Console

from bench.cpu import CpuWindow, bottleneck, children, cpu_per_item, cpu_seconds, summarize, system_processes
from bench.report import render

RAW = """\
<module> (services/checkout/__main__.py:8);run (smi/kafka/handling.py:120);on_payment_event (services/checkout/handlers.py:135);get (smi/jobtable/table.py:240);select (selectors.py:468) 30
<module> (services/checkout/__main__.py:8);run (smi/kafka/handling.py:120);on_payment_event (services/checkout/handlers.py:135);model_validate (pydantic/main.py:732) 20
<module> (services/checkout/__main__.py:8);select (selectors.py:468) 50
"""


def test_a_profile_is_summarized_as_shares_of_all_samples():
    summary = summarize(RAW, top=3)
    assert summary["self"][0] == ("select (selectors.py:468)", 80.0)
    ours = dict(summary["ours_inclusive"])
    assert ours["<module> (services/checkout/__main__.py:8)"] == 100.0
    assert ours["on_payment_event (services/checkout/handlers.py:135)"] == 50.0
    assert "model_validate (pydantic/main.py:732)" not in ours  # not our code
    assert len(summary["ours_inclusive"]) == 3
    assert summarize("") == {"self": [], "ours_inclusive": []}


def test_the_bottleneck_is_a_saturated_process_else_the_phase_waits():
    assert bottleneck("pending_to_completed", {"processor": 0.97, "redis": 0.2}).startswith(
        "processor is CPU-bound")
    waiting = bottleneck("pending_to_completed", {"processor": 0.3, "redis": 0.1})
    assert "no process is CPU-bound" in waiting and "processor waits" in waiting
    assert bottleneck("x", {}) == "no CPU figures"
    cores = os.cpu_count() or 1
    busy = {f"p{i}": 0.8 for i in range(cores + 1)}
    assert bottleneck("request_to_awaiting_payment", busy).startswith("the machine is CPU-bound")
    # The machine's own figure counts what the system's processes leave out (the
    # bench itself, its profiler): under it the phase waits, over it the machine is full.
    system = {"processor": 0.5, "notifier": 0.3}
    assert "waits" in bottleneck("pending_to_completed", system, machine=0.9)
    full = bottleneck("pending_to_completed", system, machine=0.95 * cores)
    assert full.startswith("the machine is CPU-bound") and "the system's processes 0.80" in full


BURN = """
import sys, time
sys.stdin.readline()
while time.process_time() < float(sys.argv[1]):
    pass
print("done", flush=True)
time.sleep(30)
"""


def burner(cpu_seconds_to_burn: float) -> subprocess.Popen:
    """A process that, once told to (a line on stdin), uses a fixed amount of CPU
    (however long that takes on a busy machine), says so, and idles."""
    return subprocess.Popen([sys.executable, "-c", BURN, str(cpu_seconds_to_burn)], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)


def go(*procs: subprocess.Popen) -> None:
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    for proc in procs:
        assert proc.stdout.readline().strip() == "done"


def test_cpu_is_read_from_proc_for_a_process_and_its_children():
    busy, idle = burner(0.8), burner(0.0)
    try:
        assert {busy.pid, idle.pid} <= set(children(os.getpid()))
        go(busy, idle)
        assert cpu_seconds(busy.pid) >= 0.75  # /proc counts in clock ticks (10 ms)
        assert cpu_seconds(busy.pid) - cpu_seconds(idle.pid) >= 0.5  # the burn, beyond both startups
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert cpu_seconds(busy.pid) is None  # gone


async def test_a_window_reports_cores_used_per_process():
    busy, idle = burner(0.6), burner(0.0)
    try:
        await asyncio.sleep(0.5)  # past their startup
        window = CpuWindow({"busy": busy.pid, "idle": idle.pid}).start()
        before = {"busy": cpu_seconds(busy.pid), "idle": cpu_seconds(idle.pid)}
        go(busy, idle)
        cores = window.stop()
        burnt = cpu_seconds(busy.pid) - before["busy"]
    finally:
        for proc in (busy, idle):
            proc.kill()
            proc.wait()
    assert burnt > 0.1  # the busy one burnt (up to 0.6 s, less what its startup took)
    assert cores["busy"] * window.seconds == pytest.approx(burnt, abs=0.05)
    assert cores["idle"] * window.seconds < 0.05
    # The whole machine was at least as busy as the one process that burnt.
    assert window.machine * window.seconds >= burnt - 0.05


SUPERVISOR = """
import subprocess, sys, time
code = "import time; time.sleep(60)"
kids = [subprocess.Popen([sys.executable, "-c", code, f"services.{stage}"]) for stage in sys.argv[1:]]
print("up", flush=True)
sys.stdin.readline()
for kid in kids:
    kid.kill()
    kid.wait()
"""


def test_a_stages_second_and_third_workers_are_named_by_their_number():
    stages = ["checkout", "notifier", "checkout", "checkout"]
    parent = subprocess.Popen([sys.executable, "-c", SUPERVISOR, *stages], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert parent.stdout.readline().strip() == "up"
        found = system_processes(parent.pid)
        kids = sorted(children(parent.pid))
    finally:
        parent.communicate("stop\n", timeout=30)  # it kills its children, then ends
    named = {name: pid for name, pid in found.items() if name not in ("kafka", "redis")}
    assert sorted(named) == ["checkout", "checkout.2", "checkout.3", "notifier"]
    assert sorted(named.values()) == kids
    # Numbered in start order (pids rise with it here): the first checkout is "checkout".
    assert named["checkout"] < named["checkout.2"] < named["checkout.3"]


def test_the_report_shows_each_phase_bottleneck_and_profile():
    results = {"bottlenecks": {"pending_to_completed": {
        "cores": {"processor": 0.95, "redis": 0.1}, "bottleneck": "processor is CPU-bound (0.95 of one core)",
        "profile": {"stage": "processor", "ours_inclusive": [("on_pending (services/processor/handlers.py:79)", 40.0)]}}}}
    console = Console(width=250, record=True)
    for part in render(results):
        console.print(part)
    text = console.export_text()
    assert "pending → completed" in text and "processor 0.95" in text and "processor is CPU-bound" in text
    assert "40% on_pending" in text


def test_the_report_shows_the_frames_under_how_a_stage_was_started():
    # `smi run processor` (the stages-alone part) puts smi/cli.py's frames on top.
    entry = ["main (smi/cli.py:439)", "cmd_run (smi/cli.py:79)", "<module> (smi/cli.py:443)",
             "run_stage (smi/stages.py:55)", "settle (smi/kafka/handling.py:273)"]
    results = {"bottlenecks": {"alone_pending_to_completed": {
        "cores": {"processor": 1.2}, "bottleneck": "processor is CPU-bound (1.20 of one core)",
        "profile": {"stage": "processor", "ours_inclusive": [(frame, 54.0) for frame in entry]
                    + [("Processor.on_pending (services/processor/handlers.py:123)", 31.0)]}}}}
    console = Console(width=250, record=True)
    for part in render(results):
        console.print(part)
    text = console.export_text()
    assert "processor alone: pending → completed" in text and "31% Processor.on_pending" in text
    assert not any(name in text for name in ("cmd_run", "run_stage", "settle", "54%"))


def test_cpu_per_item_is_cores_times_seconds_over_items():
    entry = {"cores": {"checkout": 0.5, "redis": 0.1}, "seconds": 4.0}
    assert cpu_per_item(entry, 1000) == {"checkout": 2.0, "redis": 0.4}
    assert cpu_per_item(entry, 0) == {} and cpu_per_item(entry, None) == {}
