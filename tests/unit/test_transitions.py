"""The transition table (design.md, "Statuses and transitions", a contract): written
out literally here so that a change to schemas/status.py that is not also a change
to the design fails this test."""

from __future__ import annotations

import itertools

import pytest

from schemas.status import (
    DEADLINE_STATUS,
    TRANSITIONS,
    Deadline,
    JobStatus,
    Stage,
    TransitionNotAllowed,
    fields_left_by,
    find_transition,
    owner_of,
    sources_of,
)

# | from | to | owner |  -- the "(new)" row is new -> awaiting_payment in code, and
# "pending, processing -> failed" is two pairs.
EXPECTED: dict[tuple[str, str], str] = {
    ("new", "awaiting_payment"): "checkout",
    ("awaiting_payment", "pending"): "checkout",
    ("abandoned", "pending"): "checkout",
    ("awaiting_payment", "abandoned"): "janitor",
    ("pending", "processing"): "processor",
    ("failed", "processing"): "processor",
    ("processing", "completed"): "processor",
    ("pending", "failed"): "processor",
    ("processing", "failed"): "processor",
}

ALL_STATUSES = {"new", "awaiting_payment", "pending", "processing", "completed", "failed", "abandoned"}


def test_statuses_are_exactly_the_designed_ones():
    assert {s.value for s in JobStatus} == ALL_STATUSES


def test_stages():
    assert {s.value for s in Stage} == {"checkout", "processor", "notifier", "janitor", "gateway"}


def test_table_matches_design_exactly():
    actual = {(t.source.value, t.target.value): t.owner.value for t in TRANSITIONS}
    assert actual == EXPECTED
    assert len(TRANSITIONS) == len(EXPECTED), "a pair appears twice in TRANSITIONS"


@pytest.mark.parametrize("pair,owner", sorted(EXPECTED.items()))
def test_every_designed_row_is_found(pair, owner):
    t = find_transition(JobStatus(pair[0]), JobStatus(pair[1]))
    assert t is not None
    assert (t.source, t.target, t.owner) == (JobStatus(pair[0]), JobStatus(pair[1]), Stage(owner))
    assert t.trigger  # every row says why it happens


NON_PAIRS = sorted(
    (a, b) for a, b in itertools.product(ALL_STATUSES, repeat=2) if (a, b) not in EXPECTED
)


@pytest.mark.parametrize("pair", NON_PAIRS)
def test_every_other_pair_is_absent(pair):
    assert find_transition(JobStatus(pair[0]), JobStatus(pair[1])) is None


def test_some_forbidden_moves_explicitly():
    S = JobStatus
    assert find_transition(S.COMPLETED, S.PENDING) is None  # no going back after delivery
    assert find_transition(S.AWAITING_PAYMENT, S.PROCESSING) is None  # never process unpaid
    assert find_transition(S.ABANDONED, S.AWAITING_PAYMENT) is None
    assert find_transition(S.FAILED, S.PENDING) is None  # retries go straight to processing
    assert find_transition(S.PENDING, S.PENDING) is None  # same-status writes are not transitions
    assert find_transition(S.NEW, S.PENDING) is None


def test_completed_is_terminal_and_new_is_initial():
    assert not [t for t in TRANSITIONS if t.source == JobStatus.COMPLETED]
    assert not [t for t in TRANSITIONS if t.target == JobStatus.NEW]


@pytest.mark.parametrize(
    "target,owner",
    [
        (JobStatus.AWAITING_PAYMENT, Stage.CHECKOUT),
        (JobStatus.PENDING, Stage.CHECKOUT),
        (JobStatus.ABANDONED, Stage.JANITOR),
        (JobStatus.PROCESSING, Stage.PROCESSOR),
        (JobStatus.COMPLETED, Stage.PROCESSOR),
        (JobStatus.FAILED, Stage.PROCESSOR),
    ],
)
def test_owner_of(target, owner):
    assert owner_of(target) == owner


def test_each_target_has_exactly_one_owner():
    for target in {t.target for t in TRANSITIONS}:
        owners = {t.owner for t in TRANSITIONS if t.target == target}
        assert len(owners) == 1, f"{target} has owners {owners}"
        assert owner_of(target) in owners


def test_no_transition_leads_to_new():
    with pytest.raises(TransitionNotAllowed):
        owner_of(JobStatus.NEW)


def test_notifier_and_gateway_own_no_transition():
    owners = {t.owner for t in TRANSITIONS}
    assert Stage.NOTIFIER not in owners
    assert Stage.GATEWAY not in owners


@pytest.mark.parametrize(
    "target,owner,sources",
    [
        (JobStatus.AWAITING_PAYMENT, Stage.CHECKOUT, {JobStatus.NEW}),
        (JobStatus.PENDING, Stage.CHECKOUT, {JobStatus.AWAITING_PAYMENT, JobStatus.ABANDONED}),
        (JobStatus.ABANDONED, Stage.JANITOR, {JobStatus.AWAITING_PAYMENT}),
        (JobStatus.PROCESSING, Stage.PROCESSOR, {JobStatus.PENDING, JobStatus.FAILED}),
        (JobStatus.COMPLETED, Stage.PROCESSOR, {JobStatus.PROCESSING}),
        (JobStatus.FAILED, Stage.PROCESSOR, {JobStatus.PENDING, JobStatus.PROCESSING}),
        # a stage that does not own the target gets nothing
        (JobStatus.PENDING, Stage.PROCESSOR, set()),
        (JobStatus.ABANDONED, Stage.CHECKOUT, set()),
        (JobStatus.COMPLETED, Stage.NOTIFIER, set()),
        (JobStatus.FAILED, Stage.JANITOR, set()),
        (JobStatus.NEW, Stage.CHECKOUT, set()),
    ],
)
def test_sources_of(target, owner, sources):
    result = sources_of(target, owner)
    assert isinstance(result, frozenset)
    assert result == sources


def test_deadlines_belong_to_statuses():
    assert DEADLINE_STATUS == {
        Deadline.ABANDON: JobStatus.AWAITING_PAYMENT,
        Deadline.RETRY: JobStatus.PENDING,
        Deadline.POLL: JobStatus.PROCESSING,
        Deadline.WARN: JobStatus.COMPLETED,
        Deadline.EXPIRE: JobStatus.COMPLETED,
        Deadline.PURGE: JobStatus.FAILED,
    }
    assert set(DEADLINE_STATUS) == set(Deadline)


def test_the_checkout_url_is_kept_only_while_the_job_awaits_payment_and_a_submission_in_doubt_while_pending():
    in_doubt = ("submit_started_at", "callback_upscaler_id")
    assert fields_left_by(JobStatus.AWAITING_PAYMENT) == in_doubt
    assert fields_left_by(JobStatus.PENDING) == ("checkout_url",)
    for status in set(JobStatus) - {JobStatus.AWAITING_PAYMENT, JobStatus.PENDING}:
        assert fields_left_by(status) == ("checkout_url", *in_doubt)


def test_abandon_deadline_status_can_be_left_by_the_janitor():
    # The janitor's abandon timer only makes sense if it owns awaiting_payment -> abandoned.
    assert find_transition(DEADLINE_STATUS[Deadline.ABANDON], JobStatus.ABANDONED).owner == Stage.JANITOR
