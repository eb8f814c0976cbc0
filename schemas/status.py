"""Job statuses and the transition table: the one place that says who may move a
job from which status to which (design.md, "Statuses and transitions")."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cache
from enum import StrEnum


class JobStatus(StrEnum):
    # A job is created by checkout just before its Stripe session exists; it is
    # "new" only for that moment (the "(new)" row of the design's table).
    NEW = "new"
    AWAITING_PAYMENT = "awaiting_payment"
    PENDING = "pending"
    PROCESSING = "processing"
    COMPLETED = "completed"
    FAILED = "failed"
    ABANDONED = "abandoned"


class Stage(StrEnum):
    CHECKOUT = "checkout"
    PROCESSOR = "processor"
    NOTIFIER = "notifier"
    JANITOR = "janitor"
    GATEWAY = "gateway"


@dataclass(frozen=True)
class Transition:
    source: JobStatus
    target: JobStatus
    owner: Stage
    trigger: str


S = JobStatus
TRANSITIONS: tuple[Transition, ...] = (
    Transition(S.NEW, S.AWAITING_PAYMENT, Stage.CHECKOUT, "valid jobs.requested; Stripe session created"),
    Transition(S.AWAITING_PAYMENT, S.PENDING, Stage.CHECKOUT, "checkout.session.completed (paid) or async_payment_succeeded"),
    Transition(S.ABANDONED, S.PENDING, Stage.CHECKOUT, "late payment after abandonment: honour it"),
    Transition(S.AWAITING_PAYMENT, S.ABANDONED, Stage.JANITOR, "payment deadline passed or checkout.session.expired"),
    Transition(S.PENDING, S.PROCESSING, Stage.PROCESSOR, "submitted to the upscaler"),
    Transition(S.FAILED, S.PROCESSING, Stage.PROCESSOR, "operator retry (jobs.commands)"),
    Transition(S.PROCESSING, S.COMPLETED, Stage.PROCESSOR, "result stored under STORAGE_DIR"),
    Transition(S.PENDING, S.FAILED, Stage.PROCESSOR, "permanent error before submission"),
    Transition(S.PROCESSING, S.FAILED, Stage.PROCESSOR, "permanent error, retries exhausted, or upscaler timeout"),
)
del S

_BY_PAIR: dict[tuple[JobStatus, JobStatus], Transition] = {(t.source, t.target): t for t in TRANSITIONS}


class TransitionNotAllowed(ValueError):
    """A (from, to) pair that the table does not have, or a stage that does not own it."""


def find_transition(source: JobStatus, target: JobStatus) -> Transition | None:
    return _BY_PAIR.get((source, target))


@cache  # asked on every transition; the table never changes
def sources_of(target: JobStatus, owner: Stage) -> frozenset[JobStatus]:
    """The statuses from which ``owner`` may move a job to ``target``."""
    return frozenset(t.source for t in TRANSITIONS if t.target == target and t.owner == owner)


def owner_of(target: JobStatus) -> Stage:
    """Every target status has exactly one owning stage (single-writer rule)."""
    owners = {t.owner for t in TRANSITIONS if t.target == target}
    if len(owners) != 1:
        raise TransitionNotAllowed(f"no single owner for status {target!s}: {sorted(owners)}")
    return owners.pop()


class Deadline(StrEnum):
    """Timer sets of the job table; each is tied to the status it belongs to, and a
    job that leaves that status leaves the set (see ``DEADLINE_STATUS``)."""

    ABANDON = "abandon"  # awaiting_payment past the payment timeout
    RETRY = "retry"  # pending: submitting to the upscaler failed transiently, try again
    POLL = "poll"  # processing: no callback yet, ask the upscaler (and time out)
    WARN = "warn"  # download expires within EXPIRY_WARNING_HOURS
    EXPIRE = "expire"  # download expired: delete the file
    PURGE = "purge"  # failed: its files are kept FAILED_RETENTION_DAYS, then deleted


DEADLINE_STATUS: dict[Deadline, JobStatus] = {
    Deadline.ABANDON: JobStatus.AWAITING_PAYMENT,
    Deadline.RETRY: JobStatus.PENDING,
    Deadline.POLL: JobStatus.PROCESSING,
    Deadline.WARN: JobStatus.COMPLETED,
    Deadline.EXPIRE: JobStatus.COMPLETED,
    Deadline.PURGE: JobStatus.FAILED,
}


@cache  # asked on every transition
def deadlines_left_by(target: JobStatus) -> tuple[Deadline, ...]:
    """The deadline sets a job leaves when it moves to ``target``: those tied to
    any other status (moving to pending drops the abandon deadline)."""
    return tuple(d for d in Deadline if DEADLINE_STATUS[d] != target)


# Fields that mean something in one status only: a job moving to any other status
# loses them (the transition clears them, as it leaves the deadline sets above).
# The checkout URL is dead once the session is paid or expired, and it was the
# record's longest field (a real Stripe URL runs to 300-400 characters).
FIELD_STATUS: dict[str, JobStatus] = {
    "checkout_url": JobStatus.AWAITING_PAYMENT,
    # A submission in doubt is a pending job's question (services/processor).
    "submit_started_at": JobStatus.PENDING,
    "callback_upscaler_id": JobStatus.PENDING,
}


@cache  # asked on every transition
def fields_left_by(target: JobStatus) -> tuple[str, ...]:
    """The fields a job loses when it moves to ``target``."""
    return tuple(name for name, status in FIELD_STATUS.items() if status != target)
