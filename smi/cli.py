"""The `smi` command line (design.md, "Command line"). Each subcommand is one small
function, cmd_<command>_<action>, that calls into the package doing the work and
returns the exit code; build_parser() wires it to its arguments."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from smi.settings import Settings
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
    from smi.supervisor import Supervisor

    if args.stage == "all":
        print(f"starting {', '.join(STAGES)}; Ctrl-C stops them all")
        return asyncio.run(Supervisor(list(STAGES)).run())
    run_stage(args.stage, Settings())
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

    run = commands.add_parser("run", help="run one stage, or all of them under a supervisor")
    run.add_argument("stage", choices=[*STAGES, "all"])
    run.set_defaults(handler=cmd_run)

    stripe = commands.add_parser("stripe", help="Stripe test helpers")
    stripe_commands = stripe.add_subparsers(dest="action", required=True, metavar="ACTION")
    trigger = stripe_commands.add_parser("trigger", help="send a signed test webhook for a job to the gateway")
    trigger.add_argument("event_type", choices=EVENT_TYPES, metavar="EVENT_TYPE",
                         help=f"one of {', '.join(EVENT_TYPES)}")
    trigger.add_argument("--job", required=True, help="the job id")
    trigger.add_argument("--url", help="the gateway's base URL (default PUBLIC_BASE_URL)")
    trigger.set_defaults(handler=cmd_stripe_trigger)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    return args.handler(args)


if __name__ == "__main__":
    sys.exit(main())
