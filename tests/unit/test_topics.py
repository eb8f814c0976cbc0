"""The topic registry against design.md's "Topics" table (a contract)."""

from __future__ import annotations

import pytest

from schemas.events import Command, DeadLetter, JobEvent, UpscalerEvent
from schemas.requests import JobRequest
from schemas.status import JobStatus, owner_of
from schemas.stripe_events import StripeEvent
from schemas.topics import ALL_TOPICS, BY_NAME, topic

EXPECTED = {
    # name: (key, value model, writers)
    "jobs.requested": ("request_id", JobRequest, {"upstream"}),
    "payments.events": ("job_id", StripeEvent, {"gateway"}),
    "upscaler.events": ("job_id", UpscalerEvent, {"gateway", "processor"}),  # processor hosts the local upscaler
    "jobs.awaiting_payment": ("job_id", JobEvent, {"checkout"}),
    "jobs.pending": ("job_id", JobEvent, {"checkout"}),
    "jobs.processing": ("job_id", JobEvent, {"processor"}),
    "jobs.completed": ("job_id", JobEvent, {"processor"}),
    "jobs.failed": ("job_id", JobEvent, {"processor"}),
    "jobs.abandoned": ("job_id", JobEvent, {"janitor"}),
    "jobs.expiring": ("job_id", JobEvent, {"janitor"}),
    "payments.refunds": ("job_id", JobEvent, {"checkout"}),
    "jobs.commands": ("job_id", Command, {"operators"}),
    "jobs.dead_letter": ("job_id", DeadLetter, {"checkout", "processor", "notifier", "janitor", "gateway"}),
}


def test_registry_has_exactly_the_designed_topics():
    assert [t.name for t in ALL_TOPICS] == list(EXPECTED)
    assert set(BY_NAME) == set(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_topic_spec(name):
    key, model, writers = EXPECTED[name]
    spec = topic(name)
    assert spec.key == key
    assert spec.value is model
    assert set(spec.writers) == writers


def test_status_topics_have_one_writer_which_owns_the_status():
    for status in (JobStatus.AWAITING_PAYMENT, JobStatus.PENDING, JobStatus.PROCESSING,
                   JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.ABANDONED):
        spec = topic(f"jobs.{status.value}")
        assert spec.writers == (owner_of(status).value,)
        assert spec.event_type == status.value


def test_event_type_strips_the_prefix():
    assert topic("jobs.expiring").event_type == "expiring"
    assert topic("payments.refunds").event_type == "refunds"


def test_unknown_topic_names_the_known_ones():
    with pytest.raises(KeyError, match="jobs.requested"):
        topic("jobs.nope")
