"""Each stage alone (``--parts stages``): the stages are started one after another,
each once the work for it is waiting, so each drains its backlog with the stages
after it not yet running. In the pipeline part every stage shares the two cores
with the others (the processor upscales while the notifier emails); here a
stage's rate is its own capacity on the machine, Kafka and Redis included:

1. requests published, then checkout started: requests → ``awaiting_payment``;
2. the gateway started, every job paid by signed webhook (checkout and the gateway
   run): webhooks → ``pending``;
3. the processor started: ``pending`` → ``completed``;
4. the notifier started: completed → download-ready email.

A backlog's rate and CPU count from its stage's first output, so a stage's start
(joining its group, its worker pool) is not in them; a backlog has no latency
worth reporting (each item waited for the stage to start)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from typing import Any

from bench import table
from bench.cpu import phase_watch, stack_processes
from bench.pipeline import Flow, phase_timeout
from bench.report import latency_summary, stage_figures
from bench.system import Surroundings, SystemProcess, surroundings
from schemas.topics import JOBS_COMPLETED, JOBS_PENDING
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.probes import http_ok

START_TIMEOUT = 180.0  # a stage's start: joining its group, on a busy broker


async def measure(args, settings: Settings, redis, run_id: str, results: dict, say: Callable[[str], None]) -> None:
    namespace = f"bench{run_id}a:"
    async with surroundings(settings, namespace=namespace, upscaler=args.upscaler,
                            on_exit=lambda: table.unlink_namespace(redis, namespace)) as around, AsyncExitStack() as stack:
        running: dict[str, SystemProcess] = {}

        async def start(stage: str) -> None:
            process = await SystemProcess(stage, around.env, args.log).start()
            stack.push_async_callback(process.stop)
            running[stage] = process
            say(f"  `smi run {stage}` started (pid {process.proc.pid})")

        def watch_phase(phase: str):
            processes = {stage: p.proc.pid for stage, p in running.items()} | stack_processes()
            return phase_watch(processes, results["bottlenecks"], args.profile, phase)

        producer = await stack.enter_async_context(EventProducer.from_settings(settings, client_id="smi-bench-alone"))
        flow = Flow(run_id, around.images.image_url, around.gateway, around.secret, producer, around.watch,
                    around.sink, pay_concurrency=args.pay_concurrency)
        stages = results["stages"]

        sent = await flow.publish(flow.requests(args.jobs, "alone"))
        await start("checkout")
        await _first(flow, lambda: bool(flow.watch.by_request.keys() & sent.keys()), "checkout's first event",
                     running)
        async with watch_phase("alone_request_to_awaiting_payment"):
            await flow.until_awaiting_payment(sent, phase_timeout(len(sent), 50))
        ends = {r: flow.watch.by_request[r][0] for r in sent if r in flow.watch.by_request}
        stages["alone_request_to_awaiting_payment"] = figures = _drained(sent, ends, len(sent))
        say(f"  checkout alone: {figures['count']:,} awaiting_payment at {figures['rate']} /s")
        job_ids = [flow.watch.by_request[r][1]["job_id"] for r in sent if r in flow.watch.by_request]

        await start("gateway")
        await _until_healthy(around, running)
        async with watch_phase("alone_webhook_to_pending"):
            sent_at, acked_at, refused = await flow.pay(job_ids)
            if refused:
                results["errors"].append(f"stages alone: webhooks not acknowledged: {dict(refused)}")
            pending = await flow.until(JOBS_PENDING.name, list(acked_at), phase_timeout(len(acked_at), 50))
        stages["alone_webhook_to_pending"] = figures = stage_figures(sent_at, pending, len(job_ids))
        say(f"  gateway and checkout alone: {figures['count']:,} pending at {figures['rate']} /s")

        completed_seen = flow.watch.first[JOBS_COMPLETED.name]
        await start("processor")
        await _first(flow, lambda: any(j in completed_seen for j in pending), "the processor's first completion",
                     running)
        async with watch_phase("alone_pending_to_completed"):
            completed = await flow.until(JOBS_COMPLETED.name, list(pending), phase_timeout(len(pending), 10))
        stages["alone_pending_to_completed"] = figures = _drained(pending, completed, len(job_ids))
        say(f"  processor alone: {figures['count']:,} completed at {figures['rate']} /s")

        await start("notifier")
        await _first(flow, lambda: any(j in flow.sink.ready for j in completed), "the notifier's first email", running)
        async with watch_phase("alone_completed_to_email"):
            emails = await flow.until_emailed(list(completed), phase_timeout(len(completed), 10))
        stages["alone_completed_to_email"] = figures = _drained(completed, emails, len(job_ids))
        say(f"  notifier alone: {figures['count']:,} emails at {figures['rate']} /s")

        results["errors"] += [f"stages alone: {problem}" for problem in flow.problems(job_ids)]


def _drained(starts: Mapping[str, float], ends: Mapping[str, float], expected: int) -> dict[str, Any]:
    """A backlog's figures: the rate from the stage's first output to its last."""
    figures = stage_figures(starts, ends, expected, since=min(ends.values(), default=None))
    figures["latency_ms"] = latency_summary([])
    return figures


async def _first(flow: Flow, seen: Callable[[], bool], what: str, running: Mapping[str, SystemProcess]) -> None:
    if not await flow.watch.wait(seen, timeout=START_TIMEOUT, what=what):
        raise RuntimeError(f"no sign of {what} (alive: {_alive(running)}); see the system log")


async def _until_healthy(around: Surroundings, running: Mapping[str, SystemProcess]) -> None:
    """The gateway answers /healthz: before it does, a webhook is refused, not timed."""
    deadline = time.monotonic() + START_TIMEOUT
    while not await http_ok(f"{around.gateway}/healthz", {}):
        if time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not come up (alive: {_alive(running)}); see the system log")
        await asyncio.sleep(0.2)


def _alive(running: Mapping[str, SystemProcess]) -> Sequence[str]:
    return [stage for stage, process in running.items() if process.alive]
