"""The topic registry: name, key, value model and the single writer of every topic
(design.md, "Topics"). Stages and tools look topics up here, never by string."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pydantic import BaseModel

from schemas.events import Command, DeadLetter, JobEvent, UpscalerEvent
from schemas.requests import JobRequest
from schemas.stripe_events import StripeEvent


@dataclass(frozen=True)
class TopicSpec:
    name: str
    key: Literal["job_id", "request_id"]
    value: type[BaseModel]
    writers: tuple[str, ...]
    # Broker-side record limit (max.message.bytes) when the broker default (1 MiB)
    # is not right: an upstream's oversized request should reach checkout and be
    # dead-lettered with a reason, not bounce off the broker with a bare error.
    max_message_bytes: int | None = None

    @property
    def event_type(self) -> str:
        """JobEvent.type for status topics: the name without its prefix."""
        return self.name.split(".", 1)[1]


JOBS_REQUESTED = TopicSpec("jobs.requested", "request_id", JobRequest, ("upstream",),
                           max_message_bytes=8 * 1024 * 1024)
PAYMENTS_EVENTS = TopicSpec("payments.events", "job_id", StripeEvent, ("gateway",))
UPSCALER_EVENTS = TopicSpec("upscaler.events", "job_id", UpscalerEvent, ("gateway", "processor"))
JOBS_AWAITING_PAYMENT = TopicSpec("jobs.awaiting_payment", "job_id", JobEvent, ("checkout",))
JOBS_PENDING = TopicSpec("jobs.pending", "job_id", JobEvent, ("checkout",))
JOBS_PROCESSING = TopicSpec("jobs.processing", "job_id", JobEvent, ("processor",))
JOBS_COMPLETED = TopicSpec("jobs.completed", "job_id", JobEvent, ("processor",))
JOBS_FAILED = TopicSpec("jobs.failed", "job_id", JobEvent, ("processor",))
JOBS_ABANDONED = TopicSpec("jobs.abandoned", "job_id", JobEvent, ("janitor",))
JOBS_EXPIRING = TopicSpec("jobs.expiring", "job_id", JobEvent, ("janitor",))
PAYMENTS_REFUNDS = TopicSpec("payments.refunds", "job_id", JobEvent, ("checkout",))
JOBS_COMMANDS = TopicSpec("jobs.commands", "job_id", Command, ("operators",))
JOBS_DEAD_LETTER = TopicSpec("jobs.dead_letter", "job_id", DeadLetter,
                             ("checkout", "processor", "notifier", "janitor", "gateway"))

ALL_TOPICS: tuple[TopicSpec, ...] = (
    JOBS_REQUESTED, PAYMENTS_EVENTS, UPSCALER_EVENTS, JOBS_AWAITING_PAYMENT, JOBS_PENDING,
    JOBS_PROCESSING, JOBS_COMPLETED, JOBS_FAILED, JOBS_ABANDONED, JOBS_EXPIRING, PAYMENTS_REFUNDS,
    JOBS_COMMANDS, JOBS_DEAD_LETTER,
)
BY_NAME: dict[str, TopicSpec] = {t.name: t for t in ALL_TOPICS}


def topic(name: str) -> TopicSpec:
    try:
        return BY_NAME[name]
    except KeyError:
        raise KeyError(f"unknown topic {name!r}; known: {', '.join(BY_NAME)}") from None
