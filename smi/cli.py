"""The `smi` command line (design.md, "Command line"). Each subcommand is one small
function, cmd_<command>_<action>, that calls into the package doing the work and
returns the exit code; build_parser() wires it to its arguments."""

from __future__ import annotations

import argparse
import asyncio
import functools
import dataclasses
import getpass
import json
import logging
import os
import sys
from typing import Any, Awaitable, Callable, TypeVar

from rich.live import Live

from schemas.status import JobStatus
from smi.jobtable import JobNotFound, JobTable
from smi.kafka.producer import EventProducer
from smi.ops.commands import send_command
from smi.ops.jobs import (FIND_BY, MAX_LIMIT, ORDER_BY, find_job, job_view, list_jobs, opened_table, require_job,
                          show_job)
from smi.ops.lag import measure, watch
from smi.ops.render import console, job_detail, jobs_table, lag_tables, revenue_table
from smi.ops import revenue as revenue_ops
from smi.ops.revenue import revenue
from smi.settings import Settings
from smi.stack.layout import Layout
from smi.stack.manager import COMPONENT_NAMES, Stack
from smi.stack.report import render_down, render_status, render_up, status_json
from smi.stack.topics import ensure_topics


def _quiet_kafka_client() -> None:
    """The stack polls brokers that are still starting; aiokafka would log every
    refused connection, while the command itself reports the outcome."""
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)


def cmd_stack_up(args: argparse.Namespace) -> int:
    _quiet_kafka_client()
    stack = Stack.build(args.only)
    report = asyncio.run(stack.up())
    print(render_up(report, stack.layout))
    return 0 if report.ok else 1


def cmd_stack_down(args: argparse.Namespace) -> int:
    print(render_down(Stack.build(args.only).down()))
    return 0


def cmd_stack_status(args: argparse.Namespace) -> int:
    _quiet_kafka_client()
    stack = Stack.build(args.only)
    states = asyncio.run(stack.status())
    print(status_json(states, stack.layout) if args.json else render_status(states))
    return 0 if all(s.answers for s in states) else 1


def cmd_topics_create(args: argparse.Namespace) -> int:
    created = asyncio.run(ensure_topics(Settings()))
    print(f"created {len(created)} topics: {', '.join(created)}" if created else "all topics exist")
    return 0


def cmd_run(args: argparse.Namespace) -> int:
    from smi.stages import STAGES, run_stage
    from smi.supervisor import Supervisor, parse_workers

    if args.stage != "all":
        for flag, given in (("--demo", args.demo), ("--workers", args.workers)):
            if given:
                print(f"smi run: error: {flag} goes with `smi run all`", file=sys.stderr)
                return 2
        run_stage(args.stage, Settings())
        return 0
    try:
        workers = parse_workers(args.workers, STAGES)
    except ValueError as exc:
        print(f"smi run: error: {exc}", file=sys.stderr)
        return 2
    more = "".join(f", {n} of {stage}" for stage, n in workers.items() if n > 1)
    print(f"starting {', '.join(STAGES)}{more}; Ctrl-C stops them all", flush=True)
    companion = functools.partial(_demo, Settings(), once=args.once, timeout=args.timeout) if args.demo else None
    return asyncio.run(Supervisor(list(STAGES), companion=companion, stop_after_companion=args.once,
                                  workers=workers).run())


def cmd_demo(args: argparse.Namespace) -> int:
    return asyncio.run(_demo(Settings(), once=args.once, timeout=args.timeout))


async def _demo(settings: Settings, *, once: bool, timeout: float) -> int:
    from smi.demo.flow import DemoFailed, run_demo

    try:
        await run_demo(settings, timeout=timeout)
    except DemoFailed as exc:
        print(f"demo failed: {exc}", file=sys.stderr, flush=True)
        return 1
    if not once:
        base = settings.public_base_url.rstrip("/")
        print(f"\nThe system keeps running (Ctrl-C stops it):\n  gateway  {base}/healthz\n"
              f"  pay page {base}/pay/<job_id>  (PAYMENTS=local)\n  admin    {base}/admin\n"
              f"  mail     {Layout.from_env().data_dir('mail')}", flush=True)
        await asyncio.Event().wait()
    return 0


def cmd_stripe_trigger(args: argparse.Namespace) -> int:
    from smi.jobtable import JobNotFound
    from smi.trigger import trigger

    try:
        status, body = asyncio.run(trigger(Settings(), args.event_type, args.job, args.url))
    except JobNotFound:
        print(f"no job {args.job}", file=sys.stderr)
        return 1
    print(f"{args.event_type} for job {args.job}: gateway answered {status} {body}")
    return 0 if 200 <= status < 300 else 1


def cmd_bench(args: argparse.Namespace) -> int:
    # bench/ sits beside smi/ in the checkout and is not part of the installed package.
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    from bench.run import main as bench_main

    return bench_main(args.bench_args, prog="smi bench")


T = TypeVar("T")


def _on_table(work: Callable[[JobTable], Awaitable[T]]) -> T:
    async def run() -> T:
        async with opened_table(Settings()) as table:
            return await work(table)
    return asyncio.run(run())


def _print_json(value: Any) -> None:
    print(json.dumps(value, indent=2, ensure_ascii=False))


def _not_found(job_id: str) -> int:
    print(f"no job {job_id}", file=sys.stderr)
    return 1


def _requested_by() -> str:
    """Who sent an operator command, as the stages log it: cli:<unix user>."""
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # no login name and no passwd entry (some containers)
        user = str(os.getuid())
    return f"cli:{user}"


def cmd_jobs_list(args: argparse.Namespace) -> int:
    page = _on_table(lambda table: list_jobs(table, statuses=args.status, limit=args.limit,
                                             order_by=args.order_by, cursor=args.cursor))
    if args.json:
        _print_json({"jobs": [job.redacted() for job in page.jobs], "next_cursor": page.next_cursor})
    else:
        console().print(jobs_table(page.jobs, page.next_cursor))
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    try:
        view = _on_table(lambda table: show_job(table, args.job_id))
    except JobNotFound:
        return _not_found(args.job_id)
    return _print_job(view, as_json=args.json)


def cmd_jobs_find(args: argparse.Namespace) -> int:
    kind = next(kind for kind in FIND_BY if getattr(args, kind))
    value = getattr(args, kind)

    async def found(table: JobTable) -> dict[str, Any]:
        return await job_view(table, await find_job(table, kind, value))

    try:
        view = _on_table(found)
    except JobNotFound:
        print(f"no job with {kind.replace('_', ' ')} {value}", file=sys.stderr)
        return 1
    return _print_job(view, as_json=args.json)


def _print_job(view: dict[str, Any], *, as_json: bool) -> int:
    if as_json:
        _print_json(view)
    else:
        console().print(job_detail(view))
    return 0


def _send_job_command(command: str, job_id: str, *, force: bool = False) -> int:
    settings = Settings()

    async def run() -> None:
        async with opened_table(settings) as table:
            await require_job(table, job_id)
        async with EventProducer.from_settings(settings, client_id="smi-cli") as producer:
            await send_command(producer, command, job_id, requested_by=_requested_by(), force=force)

    _quiet_kafka_client()
    try:
        asyncio.run(run())
    except JobNotFound:
        return _not_found(job_id)
    print(f"{command}{' (forced)' if force else ''} requested for job {job_id}; "
          f"follow it with `smi jobs show {job_id}`")
    return 0


def cmd_jobs_retry(args: argparse.Namespace) -> int:
    return _send_job_command("retry", args.job_id, force=args.force)


def cmd_jobs_resend(args: argparse.Namespace) -> int:
    return _send_job_command("resend_download", args.job_id)


EXIT_TOTALS_DIFFER = 3  # `revenue --recount/--rebuild`: the running totals are not the recount's


def cmd_revenue(args: argparse.Namespace) -> int:
    if not (args.recount or args.rebuild):
        totals = _on_table(revenue)
        if args.json:
            _print_json(dataclasses.asdict(totals))
        else:
            console().print(revenue_table(totals))
        return 0

    async def compare(table: JobTable) -> tuple[int | None, revenue_ops.Check]:
        rebuilt = await revenue_ops.rebuild(table) if args.rebuild else None
        return rebuilt, await revenue_ops.check(table)

    rebuilt, result = _on_table(compare)
    if args.json:
        _print_json({"recount": dataclasses.asdict(result.recount), "totals": dataclasses.asdict(result.totals.revenue),
                     "match": result.matches, "incomplete_shards": list(result.totals.incomplete_shards),
                     "quiet": result.quiet, **({"rebuilt_jobs": rebuilt} if rebuilt is not None else {})})
    else:
        console().print(revenue_table(result.recount))
        if rebuilt is not None:
            print(f"rebuilt the running totals from {rebuilt} jobs")
        if result.matches:
            print("the running totals match this recount")
    if result.matches:
        return 0
    if not result.totals.complete:
        print(f"no complete running totals: shard(s) {','.join(map(str, result.totals.incomplete_shards))} hold jobs "
              "from before the totals existed; `smi revenue --rebuild` builds them", file=sys.stderr)
    else:
        differ = "; ".join(f"{name} {walked} (recount) vs {kept} (running totals)"
                           for name, (walked, kept) in result.differences().items())
        busy = "" if result.quiet else (" (jobs were being written during each recount: run it again when "
                                        "quieter before rebuilding)")
        print(f"the running totals DIFFER from the recount: {differ}{busy}; `smi revenue --rebuild` recounts "
              "them", file=sys.stderr)
    return EXIT_TOTALS_DIFFER


def cmd_lag(args: argparse.Namespace) -> int:
    _quiet_kafka_client()
    settings = Settings()
    bootstrap, names = settings.kafka_bootstrap_servers, settings.kafka_names
    if not args.watch:
        groups = asyncio.run(measure(bootstrap, names=names))
        if args.json:
            _print_json([dataclasses.asdict(group) for group in groups])
        else:
            console().print(lag_tables(groups))
        return 0

    async def follow() -> None:
        if args.json:  # one JSON document per line and refresh (JSON Lines)
            async for groups in watch(bootstrap, names=names):
                print(json.dumps([dataclasses.asdict(group) for group in groups]), flush=True)
            return
        with Live(auto_refresh=False) as live:
            async for groups in watch(bootstrap, names=names):
                live.update(lag_tables(groups), refresh=True)

    try:
        asyncio.run(follow())
    except KeyboardInterrupt:
        pass
    return 0


def _status_list(text: str) -> list[JobStatus]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    known = [status.value for status in JobStatus]
    unknown = [name for name in names if name not in known]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown status {', '.join(unknown) or '(none)'}; choose from {','.join(known)}")
    return [JobStatus(name) for name in names]


def _limit(text: str) -> int:
    try:
        limit = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"{limit} is out of range 1..{MAX_LIMIT}")
    return limit


def _component_list(text: str) -> list[str]:
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in COMPONENT_NAMES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown component {', '.join(unknown) or '(none)'}; choose from {','.join(COMPONENT_NAMES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smi", description="smi-pipeline: local stack and operations")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    stack = commands.add_parser("stack", help="the local Kafka, Redis, stripe-mock and mail sink")
    stack_commands = stack.add_subparsers(dest="action", required=True, metavar="ACTION")
    only = argparse.ArgumentParser(add_help=False)
    only.add_argument("--only", type=_component_list, metavar="A,B",
                      help=f"act on these components only ({','.join(COMPONENT_NAMES)})")
    stack_commands.add_parser("up", parents=[only], help="start what is not running (idempotent)"
                              ).set_defaults(handler=cmd_stack_up)
    stack_commands.add_parser("down", parents=[only], help="stop what `up` started"
                              ).set_defaults(handler=cmd_stack_down)
    status = stack_commands.add_parser("status", parents=[only], help="is every component answering?")
    status.add_argument("--json", action="store_true", help="print a JSON object")
    status.set_defaults(handler=cmd_stack_status)

    topics = commands.add_parser("topics", help="Kafka topics of the pipeline")
    topics_commands = topics.add_subparsers(dest="action", required=True, metavar="ACTION")
    topics_commands.add_parser("create", help="create the missing topics").set_defaults(handler=cmd_topics_create)

    from smi.stages import STAGES
    from smi.trigger import EVENT_TYPES

    demo_options = argparse.ArgumentParser(add_help=False)
    demo_options.add_argument("--once", action="store_true", help="exit when the demo job completed (0) or not (1)")
    demo_options.add_argument("--timeout", type=float, default=180.0, help="seconds the demo job may take")

    run = commands.add_parser("run", parents=[demo_options],
                              help="run one stage, or all of them under a supervisor")
    run.add_argument("stage", choices=[*STAGES, "all"])
    run.add_argument("--demo", action="store_true", help="with `all`: run `smi demo` once the stages are up")
    run.add_argument("--workers", action="append", default=[], metavar="STAGE=N",
                     help="with `all`: N processes of a stage, e.g. checkout=2 (a Faust stage's join its "
                          "consumer group, the gateway's share its port); repeat, or separate with commas")
    run.set_defaults(handler=cmd_run)

    demo = commands.add_parser("demo", parents=[demo_options],
                               help="a real job through the running system: order, pay, upscale, email")
    demo.set_defaults(handler=cmd_demo)

    stripe = commands.add_parser("stripe", help="Stripe test helpers")
    stripe_commands = stripe.add_subparsers(dest="action", required=True, metavar="ACTION")
    trigger = stripe_commands.add_parser("trigger", help="send a signed test webhook for a job to the gateway")
    trigger.add_argument("event_type", choices=EVENT_TYPES, metavar="EVENT_TYPE",
                         help=f"one of {', '.join(EVENT_TYPES)}")
    trigger.add_argument("--job", required=True, help="the job id")
    trigger.add_argument("--url", help="the gateway's base URL (default PUBLIC_BASE_URL)")
    trigger.set_defaults(handler=cmd_stripe_trigger)

    as_json = argparse.ArgumentParser(add_help=False)
    as_json.add_argument("--json", action="store_true", help="print JSON instead of a table")

    jobs = commands.add_parser("jobs", help="list, inspect and act on jobs")
    jobs_commands = jobs.add_subparsers(dest="action", required=True, metavar="ACTION")
    listing = jobs_commands.add_parser("list", parents=[as_json], help="jobs, newest first")
    listing.add_argument("--status", type=_status_list, metavar="A,B",
                         help=f"only jobs in these statuses ({','.join(s.value for s in JobStatus)})")
    listing.add_argument("--limit", type=_limit, default=50, metavar="N", help=f"at most N jobs, 1..{MAX_LIMIT} (50)")
    listing.add_argument("--order-by", choices=ORDER_BY, default="created_at", help="newest first by this moment")
    listing.add_argument("--cursor", help="the next_cursor of the previous page")
    listing.set_defaults(handler=cmd_jobs_list)
    show = jobs_commands.add_parser("show", parents=[as_json], help="one job and its history")
    show.add_argument("job_id", metavar="ID")
    show.set_defaults(handler=cmd_jobs_show)
    find = jobs_commands.add_parser("find", parents=[as_json],
                                    help="the job of a Stripe checkout session, payment intent or upscaler job")
    by = find.add_mutually_exclusive_group(required=True)
    by.add_argument("--checkout-session", dest="checkout_session", metavar="ID", help="a Stripe cs_... id")
    by.add_argument("--payment-intent", dest="payment_intent", metavar="ID", help="a Stripe pi_... id")
    by.add_argument("--upsampler-job", dest="upsampler_job", metavar="ID", help="the upscaler's job id")
    find.set_defaults(handler=cmd_jobs_find)
    retry = jobs_commands.add_parser("retry", help="ask the processor to process a failed job again")
    retry.add_argument("job_id", metavar="ID")
    retry.add_argument("--force", action="store_true", help="retry even if the job was refunded")
    retry.set_defaults(handler=cmd_jobs_retry)
    resend = jobs_commands.add_parser("resend", help="email a completed job's download link again (a new link)")
    resend.add_argument("job_id", metavar="ID")
    resend.set_defaults(handler=cmd_jobs_resend)

    lag = commands.add_parser("lag", parents=[as_json], help="consumer lag and status of each stage's group")
    lag.add_argument("--watch", action="store_true", help="refresh every 2 s until Ctrl-C")
    lag.set_defaults(handler=cmd_lag)

    revenue_cmd = commands.add_parser(
        "revenue", parents=[as_json], help="charged, cost, refunds, profit, margin",
        description="Charged, cost, refunds, profit and margin, from the running totals the job table keeps per "
                    "shard (O(shards)). A table older than those totals is recounted job by job instead (with a "
                    "warning) until `--rebuild` has run once.")
    checks = revenue_cmd.add_mutually_exclusive_group()
    checks.add_argument("--recount", action="store_true",
                        help="walk every job (O(jobs)), print its figures and compare them with the running "
                             f"totals: exit {EXIT_TOTALS_DIFFER} when they differ, or when the table predates them")
    checks.add_argument("--rebuild", action="store_true",
                        help="recount every job into the running totals, online (a chunk of jobs per Lua script; "
                             "writes meanwhile are counted once), then compare as --recount does")
    revenue_cmd.set_defaults(handler=cmd_revenue)

    # Every argument goes to bench/run.py's own parser (`smi bench --help` shows them).
    bench = commands.add_parser("bench", add_help=False, prefix_chars="+",
                                help="measure the pipeline under load (`smi bench --help`)")
    bench.add_argument("bench_args", nargs=argparse.REMAINDER)
    bench.set_defaults(handler=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
