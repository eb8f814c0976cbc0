"""The pipeline under load: throughput, latency, baselines, Redis per job (issue 7).

`make bench`, `smi bench` or `python -m bench.run [--jobs N] [--out FILE]`. Needs
the stack (`smi stack up`: Kafka, Redis, stripe-mock). Its systems run in the Kafka
namespace "bench." (KAFKA_NAMESPACE, unless set), so other stages on the broker do
not disturb them, though they share its CPU.
Starts `smi run all` itself (PAYMENTS=local, UPSCALER=local, or
with `--upscaler upsampler` the Upsampler backend against the fake Upsampler
server answering at once, its callbacks through the gateway; its own
REDIS_NAMESPACE, an 8×8 input image, its own SMTP sink), measures, stops
it; then runs each stage alone (bench/alone.py), and `smi run checkout` with
PAYMENTS=stripe against stripe-mock. Writes
every figure to a JSON file (default var/bench/<UTC time>.json) and prints tables;
a figure that misses a target of issue 7 is marked MISSED. Nothing is tuned."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import sys
import time
import uuid
from functools import partial
from datetime import UTC, datetime
from importlib.metadata import version
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console

from bench import alone, baselines, table
from bench.cpu import cpu_per_item, phase_watch, py_spy, system_processes
from bench.pipeline import PAY_CONCURRENCY, Flow, phase_timeout
from bench.report import check_targets, ratio, render, stage_figures
from bench.system import (EventWatch, StageGroupsBusy, Surroundings, SystemProcess, require_idle_stage_groups,
                          stage_group_members, surroundings)
from schemas.topics import JOBS_AWAITING_PAYMENT, JOBS_COMPLETED, JOBS_PENDING
from smi.jobtable import JobTable, connect
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.kafka_broker import kafka_version
from smi.stack.topics import ensure_topics
from smi.stages import FAUST_STAGES, STAGES
from smi.supervisor import parse_workers

BENCH_NAMESPACE = "bench."
PARTS = ("baselines", "pipeline", "stages", "stripe", "table", "janitor")
NOISE = ("one 2-core machine runs Kafka, Redis, five stage processes and the bench itself, and possibly a CI run "
         "on the same broker and Redis: the figures are noisy; compare runs, not single numbers")
console = Console() if sys.stdout.isatty() else Console(width=160)  # piped: no 80-column wrapping


def say(text: str) -> None:
    console.print(text, highlight=False)


def build_parser(prog: str = "python -m bench.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20_000, help="job requests published and paid (20,000)")
    parser.add_argument("--out", type=Path, help="the JSON file (default var/bench/<UTC time>.json)")
    parser.add_argument("--baseline-messages", type=int,
                        help="messages and keys of the baselines (max(jobs, 20,000): a shorter one ends in a blink)")
    parser.add_argument("--upscaler", choices=("local", "upsampler"), default="local",
                        help="the processor's backend: local (Pillow in worker processes) or upsampler (the "
                             "production path, against the fake Upsampler server of tests/support, answering at once)")
    parser.add_argument("--paced-jobs", type=int, help="requests of the 1,000/s latency run (min(jobs, 5,000))")
    parser.add_argument("--pay-concurrency", type=int, default=PAY_CONCURRENCY,
                        help=f"payment webhooks in flight at once ({PAY_CONCURRENCY})")
    parser.add_argument("--stripe-jobs", type=int, default=1000,
                        help="requests of the stripe-mock checkout run (1,000)")
    parser.add_argument("--stripe-mock", default="http://127.0.0.1:12111", help="stripe-mock's address")
    parser.add_argument("--million", action="store_true",
                        help="also measure a table of 1,000,000 jobs (~5 GB of Redis and its AOF, ~30 min)")
    parser.add_argument("--parts", default=",".join(PARTS), help=f"what to measure (default {','.join(PARTS)})")
    parser.add_argument("--workers", action="append", default=[], metavar="STAGE=N",
                        help="more processes of a stage in the pipeline part, as `smi run all --workers` "
                             "(e.g. checkout=2 or gateway=2); each stage alone runs one")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the py-spy profile of each phase's stage (CPU per process is still measured)")
    return parser


def main(argv: list[str] | None = None, prog: str = "python -m bench.run") -> int:
    args = build_parser(prog).parse_args(argv)
    logging.getLogger("aiokafka").setLevel(logging.ERROR)  # retries on fresh scratch topics are expected
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    unknown = set(args.parts) - set(PARTS)
    if unknown or args.jobs < 1 or args.pay_concurrency < 1:
        say(f"[red]bad arguments: {', '.join(unknown) or '--jobs and --pay-concurrency must be ≥ 1'}[/]")
        return 2
    try:
        args.worker_counts = parse_workers(args.workers, STAGES)
    except ValueError as exc:
        say(f"[red]bad arguments: {exc}[/]")
        return 2
    if args.profile and py_spy() is None:
        say("[yellow]py-spy not found (pip install py-spy): no profiles, CPU per process only[/]")
        args.profile = False
    args.paced_jobs = args.paced_jobs or min(args.jobs, 5000)
    args.baseline_messages = args.baseline_messages or max(args.jobs, 20_000)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    args.out = args.out or Path("var/bench") / f"{stamp}.json"
    args.log = args.out.with_suffix(".system.log")
    try:
        return asyncio.run(run(args))
    except StageGroupsBusy as exc:
        say(f"[red]not starting:[/] {exc}")
        return 2


async def run(args: argparse.Namespace) -> int:
    run_id = uuid.uuid4().hex[:8]
    settings = Settings()
    # The systems it starts run in the Kafka namespace "bench." (unless one is set):
    # other stages on the broker (a test session, someone's `smi run all`) neither
    # take its messages nor share its groups. Its topics stay for the next run: with a
    # fresh set per run, deleted after it (the broker removes the files a minute
    # later, while the next run measures), the paced p99 of five runs was 91-244 ms;
    # with one set kept, 51-97 ms in four.
    if not settings.kafka_namespace:
        settings = settings.model_copy(update={"kafka_namespace": BENCH_NAMESPACE})
    redis = connect(settings.redis_url, settings.redis_cluster_nodes)
    results: dict[str, Any] = {
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"), "run_id": run_id,
        "machine": await machine_facts(redis),
        "config": {"jobs": args.jobs, "paced_jobs": args.paced_jobs, "paced_rate": 1000, "upscaler": args.upscaler,
                   "baseline_messages": args.baseline_messages, "pay_concurrency": args.pay_concurrency,
                   "stripe_jobs": args.stripe_jobs, "parts": args.parts, "workers": args.worker_counts,
                   "kafka": settings.kafka_bootstrap_servers,
                   "kafka_namespace": settings.kafka_namespace, "redis": settings.redis_url,
                   "system_log": str(args.log)},
        "stages": {}, "bottlenecks": {}, "baselines": {}, "redis": {"tables": {}}, "janitor": {}, "notes": [NOISE], "errors": []}
    started = time.monotonic()
    try:
        await ensure_topics(settings)
        if {"pipeline", "stages", "stripe"} & set(args.parts):
            await require_idle_stage_groups(settings.kafka_bootstrap_servers, settings.kafka_names)
        steps = {"baselines": lambda: measure_baselines(args, settings, redis, results),
                 "pipeline": lambda: measure_pipeline(args, settings, redis, run_id, results),
                 "stages": lambda: alone.measure(args, settings, redis, run_id, results, say),
                 "stripe": lambda: measure_stripe_checkout(args, settings, redis, run_id, results),
                 "table": lambda: measure_table(args, redis, results),
                 "janitor": lambda: measure_janitor(settings, redis, results)}
        for part in args.parts:
            say(f"[bold]{part}[/]")
            try:
                await steps[part]()
            except StageGroupsBusy:
                raise
            except Exception as exc:  # one part failing must not lose the others' figures
                results["errors"].append(f"{part}: {type(exc).__name__}: {exc}")
                say(f"  [red]{part} failed: {type(exc).__name__}: {exc}[/]")
    finally:
        await redis.aclose()
    passthrough = results["baselines"].get("kafka_passthrough", {}).get("rate")
    stage_floor = results["baselines"].get("stage_agent_forward", {}).get("rate")
    for figures in results["stages"].values():
        figures["ratio_to_passthrough"] = ratio(figures.get("rate"), passthrough)
        figures["ratio_to_stage_floor"] = ratio(figures.get("rate"), stage_floor)
    for phase, entry in results["bottlenecks"].items():
        entry["cpu_ms_per_item"] = cpu_per_item(entry, results["stages"].get(phase, {}).get("count"))
    results["machine"]["loadavg_end"] = [round(x, 2) for x in os.getloadavg()]
    results["seconds"] = round(time.monotonic() - started, 1)
    results["targets"] = check_targets(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2, ensure_ascii=False) + "\n")
    for part in render(results):
        console.print(part)
    say(f"JSON: {args.out}   system log: {args.log}")
    return 1 if results["errors"] else 0


async def machine_facts(redis) -> dict[str, Any]:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return {"cores": os.cpu_count(), "cpu": cpu, "python": platform.python_version(), "platform": platform.platform(),
            "kafka": f"{kafka_version()} (the stack's pinned version)",
            "redis": (await redis.info("server"))["redis_version"],
            "aiokafka": version("aiokafka"), "faust": version("faust-streaming"), "redis-py": version("redis"),
            "loadavg_start": [round(x, 2) for x in os.getloadavg()]}


async def measure_baselines(args, settings: Settings, redis, results: dict) -> None:
    kafka = await baselines.kafka_passthrough(settings.kafka_bootstrap_servers, args.baseline_messages)
    results["baselines"]["kafka_passthrough"] = kafka
    say(f"  aiokafka consume→produce: {kafka['rate']:,.0f} msgs/s")
    for name, stage_agent, what in (("faust_agent_ack_only", False, "a Faust agent that only acks"),
                                     ("stage_agent_forward", True, "smi's stage agent forwarding each message")):
        floor = await baselines.faust_floor(settings.kafka_bootstrap_servers, args.baseline_messages,
                                            stage_agent=stage_agent)
        results["baselines"][name] = floor
        say(f"  {what}: {floor['rate']:,.0f} msgs/s")
    cas = await baselines.redis_cas(redis, args.baseline_messages)
    results["baselines"]["redis_cas"] = cas
    say(f"  redis-py Lua CAS, pipelines of 100: {cas['rate']:,.0f} ops/s")


async def measure_pipeline(args, settings: Settings, redis, run_id: str, results: dict) -> None:
    namespace = f"bench{run_id}:"
    async with surroundings(settings, namespace=namespace, upscaler=args.upscaler,
                            on_exit=lambda: table.unlink_namespace(redis, namespace)) as around:
        await _run_pipeline(args, settings, redis, run_id, results, around)


async def _run_pipeline(args, settings: Settings, redis, run_id: str, results: dict, around: Surroundings) -> None:
    workers = [f"--workers={stage}={n}" for stage, n in args.worker_counts.items()]
    system = await SystemProcess("all", around.env, args.log, workers).start()
    say(f"  `smi run all` started (pid {system.proc.pid}, namespace {around.namespace}, log {args.log})")
    stages, most_members = results["stages"], {}
    expected = {stage: args.worker_counts.get(stage, 1) for stage in FAUST_STAGES}
    members = asyncio.create_task(watch_group_members(settings, most_members))
    try:
        async with EventProducer.from_settings(settings, client_id="smi-bench") as producer:
            flow = Flow(run_id, around.images.image_url, around.gateway, around.secret, producer, around.watch,
                        around.sink, pay_concurrency=args.pay_concurrency)
            await warm_up(flow, system)
            # Every worker in its group before anything is timed: a late one would
            # rebalance the stage in the middle of a phase.
            await until_groups(settings, expected, system)

            sent = await flow.publish_paced(flow.requests(args.paced_jobs, "paced"), per_second=1000)
            stages["paced_request_to_awaiting_payment"] = figures = await flow.until_awaiting_payment(
                sent, phase_timeout(len(sent), 50))
            say(f"  paced 1,000/s: p99 {figures['latency_ms']['p99']} ms")

            processes = system_processes(system.proc.pid)
            watch_phase = partial(phase_watch, processes, results["bottlenecks"], args.profile)
            async with watch_phase("request_to_awaiting_payment"):
                sent = await flow.publish(flow.requests(args.jobs, "burst"))
                stages["request_to_awaiting_payment"] = figures = await flow.until_awaiting_payment(
                    sent, phase_timeout(len(sent), 50))
            say(f"  burst: {figures['count']:,} awaiting_payment at {figures['rate']} /s")
            job_ids = [flow.watch.by_request[r][1]["job_id"] for r in sent if r in flow.watch.by_request]

            async with watch_phase("webhook_to_pending"):
                sent_at, acked_at, refused = await flow.pay(job_ids)
                stages["webhook_acknowledged"] = stage_figures(sent_at, acked_at, args.jobs)
                if refused:
                    results["errors"].append(f"webhooks not acknowledged: {dict(refused)}")
                paid = list(acked_at)
                pending = await flow.until(JOBS_PENDING.name, paid, phase_timeout(len(paid), 50))
            stages["webhook_to_pending"] = figures = stage_figures(sent_at, pending, args.jobs)
            say(f"  webhooks: {figures['count']:,} pending at {figures['rate']} /s")
            async with watch_phase("pending_to_completed"):
                completed = await flow.until(JOBS_COMPLETED.name, list(pending), phase_timeout(len(pending), 10))
            stages["pending_to_completed"] = figures = stage_figures(pending, completed, args.jobs)
            say(f"  processor: {figures['count']:,} completed at {figures['rate']} /s")
            async with watch_phase("request_to_email"):
                emails = await flow.until_emailed(list(completed), phase_timeout(len(completed), 10))
            stages["request_to_email"] = figures = stage_figures(
                flow.job_requested, emails, args.jobs, since=min(completed.values(), default=None))
            say(f"  notifier: {figures['count']:,} emails at {figures['rate']} /s")

            results["errors"] += flow.problems(job_ids)
            if args.upscaler == "upsampler" and args.worker_counts.get("gateway", 1) == 1:
                results["upsampler_callbacks"] = counts = await callback_counts(around.gateway)
                say(f"  gateway: Upsampler callbacks {counts}")
            job_table = JobTable(redis, shards=settings.redis_shards, namespace=around.namespace)
            results["redis"]["live_job_keys_bytes"] = await table.live_job_bytes(redis, job_table, list(emails)[:200])
    finally:
        members.cancel()
        foreign_members_note(most_members, expected, results)
        await system.stop()


async def callback_counts(gateway_url: str) -> dict[str, Any]:
    """The gateway's Upsampler callbacks: how many it published, and of those that
    found their job still pending, what became of the upscaler id they name (one
    gateway process: its /metrics counts only its own)."""
    async with aiohttp.ClientSession() as http, http.get(f"{gateway_url}/metrics") as resp:
        text = await resp.text()
    counts: dict[str, Any] = {"published": 0.0, "found_pending": {}}
    for sample in (s for family in text_string_to_metric_families(text) for s in family.samples):
        if sample.name == "smi_gateway_callbacks_recorded_total":
            counts["found_pending"][sample.labels["result"]] = sample.value
        elif sample.name == "smi_gateway_webhooks_total" and sample.labels == {"source": "upsampler",
                                                                               "outcome": "published"}:
            counts["published"] = sample.value
    return counts


async def warm_up(flow: Flow, system: SystemProcess, timeout: float = 300) -> None:
    """One job all the way to its email: every stage is up and has its partitions."""
    sent = await flow.publish(flow.requests(1, "warmup"))
    figures = await flow.until_awaiting_payment(sent, timeout)
    if not figures["count"]:
        raise RuntimeError(f"the system did not come up (alive: {system.alive}); see {system.log_path}")
    job_id = next(iter(flow.jobs))
    _, acked, refused = await flow.pay([job_id])
    if not acked:
        raise RuntimeError(f"the gateway refused the warm-up payment: {dict(refused)}")
    if not await flow.until_emailed([job_id], timeout):
        raise RuntimeError(f"the warm-up job got no email; see {system.log_path}")
    say("  warm-up job went through: request, payment, upscale, email")


async def until_groups(settings: Settings, expected: dict[str, int], system: SystemProcess,
                       timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        members = await stage_group_members(settings.kafka_bootstrap_servers, settings.kafka_names)
        if all(members.get(stage, 0) >= n for stage, n in expected.items()):
            return
        if time.monotonic() > deadline or not system.alive:
            raise RuntimeError(f"the stages' workers did not all join their groups: {members}, "
                               f"expected {expected}; see {system.log_path}")
        await asyncio.sleep(0.5)


async def watch_group_members(settings: Settings, most: dict[str, int], every: float = 5.0) -> None:
    """Keeps the most members seen per stage group. Our system runs the workers it
    was asked for: more means someone else's stages joined during the run and
    shared our partitions."""
    while True:
        try:
            for group, members in (await stage_group_members(settings.kafka_bootstrap_servers,
                                                             settings.kafka_names)).items():
                most[group] = max(most.get(group, 0), members)
        except Exception:  # a missed sample is no reason to stop measuring
            pass
        await asyncio.sleep(every)


def foreign_members_note(most: dict[str, int], expected: dict[str, int], results: dict) -> None:
    crowded = {g: n for g, n in most.items() if n > expected.get(g, 1)}
    if crowded:
        results["notes"].append(f"other consumers joined the stage groups during the run (most members seen: "
                                f"{crowded}): the pipeline figures are unreliable")


async def measure_stripe_checkout(args, settings: Settings, redis, run_id: str, results: dict) -> None:
    namespace = f"bench{run_id}s:"
    watch = await EventWatch(settings.kafka_bootstrap_servers, [JOBS_AWAITING_PAYMENT.name],
                             settings.kafka_names).start()
    env = {"PAYMENTS": "stripe", "STRIPE_API_BASE": args.stripe_mock, "STRIPE_API_KEY": "sk_test_123",
           "KAFKA_NAMESPACE": settings.kafka_namespace,
           "REDIS_NAMESPACE": namespace, "URL_ALLOW_HOSTS": "127.0.0.1/32", "METRICS_PORT": "0"}
    system = await SystemProcess("checkout", env, args.log).start()
    say(f"  `smi run checkout` with PAYMENTS=stripe against {args.stripe_mock} (pid {system.proc.pid})")
    try:
        async with EventProducer.from_settings(settings, client_id="smi-bench") as producer:
            flow = Flow(run_id, "http://127.0.0.1:9/tiny.png", "", "", producer, watch)
            warmup = await flow.publish(flow.requests(1, "stripe-warmup"))
            if not (await flow.until_awaiting_payment(warmup, 300))["count"]:
                raise RuntimeError(f"checkout did not come up (alive: {system.alive}); see {args.log}")
            sent = await flow.publish(flow.requests(args.stripe_jobs, "stripe"))
            results["stages"]["stripe_request_to_awaiting_payment"] = figures = await flow.until_awaiting_payment(
                sent, phase_timeout(len(sent), 20))
            say(f"  stripe-mock: {figures['count']:,} checkout sessions at {figures['rate']} /s")
    finally:
        await system.stop()
        await watch.stop()
        await table.unlink_namespace(redis, namespace)


async def measure_table(args, redis, results: dict) -> None:
    for size in (10_000, 1_000_000) if args.million else (10_000,):
        say(f"  building a table of {size:,} completed jobs")
        figures = await table.table_at_size(redis, size, progress=say)
        results["redis"]["tables"][str(size)] = figures
        say(f"  {size:,} jobs: {figures['bytes_per_job']:,} bytes/job, {figures['transition_rate']:,} transitions/s "
            f"(built in {figures['build_seconds']}s)")


async def measure_janitor(settings: Settings, redis, results: dict) -> None:
    results["janitor"] = figures = await table.janitor_pass(redis, settings.redis_url)
    say(f"  {figures['handled']} handled among {figures['jobs']:,} in {figures['seconds']}s, "
        f"{figures['commands']} Redis commands")


if __name__ == "__main__":
    sys.exit(main())
