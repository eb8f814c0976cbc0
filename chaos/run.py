"""Exactly-once outcomes under crashes (issue 7): `make chaos` or
`python -m chaos.run --jobs N [--seed S] ...`.

Starts a stack of its own (Kafka, Redis, stripe-mock on free ports in
--port-range, under the run directory; never the shared one on 9092/6379/12111),
every stage as its own process with PAYMENTS=stripe behind a recording proxy,
publishes and pays N jobs (about 10 % with an image URL that 404s, to be failed
and refunded) while SIGKILLing stage processes, Redis and restarting Kafka, then
checks the outcome (chaos/checks.py). Prints a table, writes a JSON report
(default var/chaos/<UTC time>.json, stage and stack logs beside it) and exits 0
only when every check holds; 1 when one fails, 2 on bad arguments."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import signal
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from chaos.driver import ChaosConfig, ChaosRun
from chaos.stages import STAGES

console = Console() if sys.stdout.isatty() else Console(width=160)


def say(text: str) -> None:
    console.print(text, highlight=False, markup=False)


def _pair(text: str) -> tuple[float, float]:
    low, sep, high = text.partition(":")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected MIN:MAX seconds") from None
    if pair[0] < 0 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"{text!r}: expected 0 ≤ MIN ≤ MAX")
    return pair


def _port_range(text: str) -> tuple[int, int]:
    low, sep, high = text.partition("-")
    try:
        pair = (int(low), int(high))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LOW-HIGH") from None
    if not (1024 <= pair[0] and pair[0] + 16 <= pair[1] <= 65535):
        raise argparse.ArgumentTypeError(f"{text!r}: expected 1024 ≤ LOW, LOW + 16 ≤ HIGH ≤ 65535")
    return pair


def build_parser(prog: str = "python -m chaos.run") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=2000, help="job requests (2,000)")
    parser.add_argument("--seed", type=int, help="picks the failing jobs and the faults (default: random, reported)")
    parser.add_argument("--bad-fraction", type=float, default=0.1,
                        help="share of jobs whose image URL 404s: failed and refunded (0.1)")
    parser.add_argument("--publish-seconds", type=float,
                        help="requests are published evenly over this window, the faults happen in it "
                             "(default max(40, jobs/15))")
    parser.add_argument("--kill-every", type=_pair, default=(3.0, 6.0), metavar="MIN:MAX",
                        help="seconds between SIGKILLs of a random stage process (3:6; 0:0 for none)")
    parser.add_argument("--second-worker", default="processor", choices=[*STAGES, "none"],
                        help="the stage that runs a second worker for a while (processor; a second gateway "
                             "shares the first's port)")
    parser.add_argument("--upscaler", default="local", choices=["local", "upsampler"],
                        help="the processor's backend: local (Pillow) or upsampler (the paid API's path, against "
                             "the fake Upsampler server of tests/support; checks one paid upscale per job)")
    parser.add_argument("--upsampler-late", type=float, default=0.0, metavar="FRACTION",
                        help="with --upscaler upsampler: the share of submissions the fake answers only after the "
                             "processor's request timeout (taken and paid for, yet unanswered; 0)")
    parser.add_argument("--no-redis-kill", action="store_true", help="do not SIGKILL Redis")
    parser.add_argument("--no-kafka-restart", action="store_true", help="do not restart the broker")
    parser.add_argument("--session-timeout", type=float, default=6.0,
                        help="KAFKA_SESSION_TIMEOUT_SECONDS of the stages (6, the least they accept)")
    parser.add_argument("--settle-timeout", type=float,
                        help="how long every job may take to end after the faults (default 180 + jobs/10 s)")
    parser.add_argument("--port-range", type=_port_range, default=(29000, 29999), metavar="LOW-HIGH",
                        help="free ports for the run's own Kafka, Redis, stripe-mock and gateway (29000-29999)")
    parser.add_argument("--stage-env", action="append", default=[], metavar="NAME=VALUE",
                        help="an extra environment variable for every stage process (repeatable; to try a fix)")
    parser.add_argument("--out", type=Path, help="the JSON report (default var/chaos/<UTC time>.json)")
    parser.add_argument("--keep-data", action="store_true", help="keep the run's Kafka and Redis data")
    return parser


def validate(args: argparse.Namespace) -> str | None:
    if args.jobs < 1:
        return "--jobs must be ≥ 1"
    if not 0 <= args.bad_fraction <= 1:
        return "--bad-fraction must be between 0 and 1"
    if args.publish_seconds is not None and args.publish_seconds <= 0:
        return "--publish-seconds must be > 0"
    if not 6 <= args.session_timeout <= 300:
        return "--session-timeout must be between 6 and 300 (what the stages accept)"
    if args.settle_timeout is not None and args.settle_timeout <= 0:
        return "--settle-timeout must be > 0"
    if not 0 <= args.upsampler_late <= 1:
        return "--upsampler-late must be between 0 and 1"
    if args.upsampler_late and args.upscaler != "upsampler":
        return "--upsampler-late needs --upscaler upsampler"
    if args.kill_every[1] and args.kill_every[0] < 0.5:
        return "--kill-every: at least 0.5 s between kills"
    for item in args.stage_env:
        name, sep, _ = item.partition("=")
        if not sep or not name.isidentifier():
            return f"--stage-env {item!r}: expected NAME=VALUE"
    return None


def config_from(args: argparse.Namespace) -> ChaosConfig:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = args.out or Path("var/chaos") / f"{stamp}.json"
    return ChaosConfig(
        jobs=args.jobs, seed=args.seed if args.seed is not None else random.randrange(2 ** 31),
        bad_fraction=args.bad_fraction, publish_seconds=args.publish_seconds, kill_every=args.kill_every,
        second_worker="" if args.second_worker == "none" else args.second_worker,
        redis_kill=not args.no_redis_kill, kafka_restart=not args.no_kafka_restart,
        session_timeout=args.session_timeout, settle_timeout=args.settle_timeout, port_range=args.port_range,
        run_dir=out.with_suffix(""), keep_data=args.keep_data, upscaler=args.upscaler,
        upsampler_late=args.upsampler_late,
        extra_env=dict(item.split("=", 1) for item in args.stage_env), say=say)


def main(argv: list[str] | None = None, prog: str = "python -m chaos.run") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    problem = validate(args)
    if problem:
        parser.print_usage(sys.stderr)
        print(f"{prog}: error: {problem}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("aiokafka").setLevel(logging.CRITICAL)  # the broker restart is expected
    config = config_from(args)
    out = config.run_dir.with_suffix(".json")
    say(f"chaos run: {config.jobs} jobs, seed {config.seed}; logs in {config.run_dir}")
    try:
        results = asyncio.run(_run_until_signalled(config))
    except KeyboardInterrupt:
        say("interrupted; everything the run started is stopped")
        return 130
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    for part in render(results):
        console.print(part)
    say(f"JSON: {out}")
    if "error" in results:
        say(f"the run failed: {results['error']}")
        return 1
    return 0 if results.get("ok") else 1


async def _run_until_signalled(config: ChaosConfig) -> dict[str, Any]:
    """The run, stopped (and torn down) by SIGTERM as by Ctrl-C."""
    task = asyncio.current_task()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, task.cancel)
    run = ChaosRun(config)
    try:
        return await run.run()
    except asyncio.CancelledError:
        raise KeyboardInterrupt from None
    except Exception as exc:  # reported with what was measured; the stack is already down
        return {"error": f"{type(exc).__name__}: {exc}", "config": config.__dict__ | {"say": None}}


def render(results: dict[str, Any]) -> list[Any]:
    parts: list[Any] = []
    if "checks" not in results:
        return parts
    checks = Table(title=f"chaos run {results['run_id']}: {results['counts']['requests']} jobs, "
                         f"seed {results['config']['seed']}, {results['seconds']}s")
    checks.add_column("check")
    checks.add_column("result")
    checks.add_column("measured", overflow="fold")
    for check in results["checks"]:
        detail = check["summary"] + ("".join(f"\n  {e}" for e in check["examples"]) if not check["ok"] else "")
        checks.add_row(check["name"], "ok" if check["ok"] else "FAILED", detail)
    if not results.get("settled"):
        checks.add_row("settled in time", "FAILED", "the run timed out waiting for the jobs to end")
    parts.append(checks)
    faults = Table(title="faults")
    faults.add_column("at (s)", justify="right")
    faults.add_column("fault")
    faults.add_column("details", overflow="fold")
    kills = results["faults"]["sigkills"]
    faults.add_row("", f"{results['faults']['sigkills_total']} SIGKILLs of stage processes",
                   ", ".join(f"{k} {v}" for k, v in sorted(kills.items())))
    for entry in sorted(results["timeline"], key=lambda e: e.get("started", e["t"])):
        details = {k: v for k, v in entry.items() if k not in ("t", "what")}
        faults.add_row(str(entry["t"]), entry["what"], ", ".join(f"{k} {v}" for k, v in details.items()))
    for exit_ in results["faults"]["unexpected_exits"]:
        faults.add_row(str(exit_["t"]), f"{exit_['worker']} exited by itself ({exit_['exit_code']})",
                       exit_["last_line"])
    parts.append(faults)
    counts = results["counts"]
    phases = results.get("phases", {})
    parts.append(
        f"jobs {counts['jobs']} ({counts['statuses']}); webhooks {counts['webhooks_acknowledged']} acknowledged of "
        f"{counts['webhook_posts']} POSTs (refused: {counts['webhook_refusals']}); Stripe requests "
        f"{counts['stripe_requests']}; emails {counts['emails_delivered']}; publish retries {counts['publish_errors']}"
        f"\nphases (s): {phases}")
    return parts


if __name__ == "__main__":
    sys.exit(main())
