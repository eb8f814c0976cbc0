"""Operator commands on ``jobs.commands`` (design.md, "Topics"): the processor acts
on ``retry``, the notifier on ``resend_download``. Sending only asks; the stage that
owns the job's next step decides (a retry of a job that is not failed is refused
there and dead-lettered with the reason)."""

from __future__ import annotations

from typing import get_args

from schemas.events import Command
from schemas.topics import JOBS_COMMANDS
from smi.kafka.producer import EventProducer

COMMANDS: tuple[str, ...] = get_args(Command.model_fields["command"].annotation)


async def send_command(producer: EventProducer, command: str, job_id: str, *, requested_by: str,
                       force: bool = False) -> Command:
    """Publish the command keyed by job id (so it lands on the job's partition, in
    order with the job's other commands) and return it once the broker acknowledged.
    Raises ValueError for an unknown command or a malformed job id."""
    if command not in COMMANDS:
        raise ValueError(f"unknown command {command!r}; one of {', '.join(COMMANDS)}")
    message = Command(command=command, job_id=job_id, requested_by=requested_by, force=force)
    await producer.send(JOBS_COMMANDS, job_id, message)
    return message
