"""The chaos run's checks (chaos/checks.py) on hand-made observations: a clean run
passes every check, and each kind of duplicate or loss is caught by its check."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from chaos.checks import (BAD_PATH, GOOD_PATH, REFUSED_PATH, Event, JobRecord, StripeCall, Transition,
                          check_announced, check_checkout_sessions, check_dead_letters, check_drained, check_events,
                          check_final_states, check_histories, check_none_lost, check_none_stuck, check_ready_emails,
                          check_refund_emails, check_refunds, check_upscaler_submissions, parse_message_id,
                          run_checks)


def _history(job_id: str, path: tuple[str, ...]) -> tuple[Transition, ...]:
    out, source = [], None
    for target in path:
        out.append(Transition(source, target, f"ev-{job_id}-{target}", "stage"))
        source = target
    return tuple(out)


def _session_call(job_id: str, **overrides) -> StripeCall:
    form = {"mode": "payment", "client_reference_id": job_id, "metadata[job_id]": job_id,
            "line_items[0][price_data][unit_amount]": "8", "expires_at": "1900000000"}
    form.update(overrides.pop("form", {}))
    fields = {"method": "POST", "path": "/v1/checkout/sessions", "idempotency_key": f"checkout-{job_id}",
              "form": form, "status": 200, **overrides}
    return StripeCall(**fields)


def _refund_call(job_id: str, **overrides) -> StripeCall:
    form = {"payment_intent": f"pi_{job_id[:8]}", "metadata[job_id]": job_id}
    form.update(overrides.pop("form", {}))
    fields = {"method": "POST", "path": "/v1/refunds", "idempotency_key": f"refund-{job_id}", "form": form,
              "status": 200, **overrides}
    return StripeCall(**fields)


def _mid(kind: str, job_id: str, occurrence: str = "1") -> str:
    return f"<{kind}.{job_id}.{occurrence}@smi-pipeline>"


@dataclasses.dataclass
class Run:
    """A clean run of three good jobs and one bad one."""
    requests: dict
    jobs: list
    calls: list
    mids: list
    events: list

    def checks(self, **changes):
        inputs = dict(requests=self.requests, jobs=self.jobs, stripe_calls=self.calls, message_ids=self.mids,
                      events=self.events, dead_letters=[], lag={"checkout": 0, "notifier": 0})
        inputs.update(changes)
        return {c.name: c for c in run_checks(**inputs)}


@pytest.fixture
def run() -> Run:
    requests, jobs, calls, mids, events = {}, [], [], [], []
    for n, bad in enumerate([False, False, False, True]):
        job_id, request_id = str(uuid.uuid4()), f"req-{n}"
        requests[request_id] = bad
        path = BAD_PATH if bad else GOOD_PATH
        jobs.append(JobRecord(job_id, request_id, path[-1], "refunded" if bad else "paid",
                              f"re_{n}" if bad else None, _history(job_id, path)))
        calls.append(_session_call(job_id))
        mids.append(_mid("refund" if bad else "ready", job_id))
        if bad:
            calls.append(_refund_call(job_id))
        for topic in ("jobs.awaiting_payment", "jobs.pending", "jobs.processing",
                      "jobs.failed" if bad else "jobs.completed", *(["payments.refunds"] if bad else [])):
            events.append(Event(topic, job_id, f"ev-{job_id}-{topic}"))
    return Run(requests, jobs, calls, mids, events)


def test_a_clean_run_passes_every_check(run):
    failed = {name: c.summary for name, c in run.checks().items() if not c.ok}
    assert failed == {}


def test_retries_under_one_key_with_the_same_parameters_are_one_session_and_one_refund(run):
    good, bad = run.jobs[0], run.jobs[3]
    calls = run.calls + [_session_call(good.job_id), _session_call(good.job_id), _refund_call(bad.job_id)]
    checks = run.checks(stripe_calls=calls)
    assert checks["exactly one checkout session per job"].ok
    assert checks["exactly one checkout session per job"].counts["repeats"] == 2
    assert checks["at most one refund per job, only failed jobs"].ok


def test_a_second_checkout_session_under_another_key_is_caught(run):
    job = run.jobs[1]
    check = check_checkout_sessions(run.jobs, run.calls + [_session_call(job.job_id,
                                                                         idempotency_key=f"checkout-{job.job_id}-2")])
    assert not check.ok
    assert job.job_id in check.examples[0] and "idempotency keys" in check.examples[0]


def test_a_session_request_without_a_key_is_caught(run):
    job = run.jobs[1]
    assert not check_checkout_sessions(run.jobs, run.calls + [_session_call(job.job_id, idempotency_key=None)]).ok


def test_different_parameters_under_the_one_key_are_caught(run):
    job = run.jobs[2]
    repeat = _session_call(job.job_id, form={"line_items[0][price_data][unit_amount]": "9"})
    check = check_checkout_sessions(run.jobs, run.calls + [repeat])
    assert not check.ok
    assert "unit_amount" in check.examples[0]


def test_a_job_without_a_session_request_is_caught(run):
    calls = [c for c in run.calls if c.job_id != run.jobs[0].job_id or c.path != "/v1/checkout/sessions"]
    assert not check_checkout_sessions(run.jobs, calls).ok


def test_a_second_refund_under_another_key_is_caught(run):
    bad = run.jobs[3]
    check = check_refunds(run.requests, run.jobs, run.calls + [_refund_call(bad.job_id, idempotency_key="other")])
    assert not check.ok


def test_a_refund_of_a_completed_job_is_caught(run):
    good = run.jobs[0]
    check = check_refunds(run.requests, run.jobs, run.calls + [_refund_call(good.job_id)])
    assert not check.ok
    assert f"job {good.job_id} (completed) was refunded" in check.examples


def test_a_failed_job_never_refunded_is_caught(run):
    calls = [c for c in run.calls if c.path != "/v1/refunds"]
    assert not check_refunds(run.requests, run.jobs, calls).ok


def test_a_duplicate_transition_in_a_history_is_caught(run):
    job = run.jobs[0]
    doubled = job.history[:3] + (Transition("processing", "processing", "ev-other", "processor"),) + job.history[3:]
    jobs = [dataclasses.replace(job, history=doubled), *run.jobs[1:]]
    check = check_histories(run.requests, jobs)
    assert not check.ok and check.counts["duplicates"] == 1
    assert "processing×2" in check.examples[0]


def test_a_repeated_event_id_in_a_history_is_caught(run):
    job = run.jobs[1]
    history = list(job.history)
    history[2] = dataclasses.replace(history[2], event_id=history[1].event_id)
    jobs = [run.jobs[0], dataclasses.replace(job, history=tuple(history)), *run.jobs[2:]]
    assert not check_histories(run.requests, jobs).ok


def test_a_history_off_the_expected_path_is_caught(run):
    job = run.jobs[0]
    skipped = tuple(t for t in job.history if t.target != "processing")
    jobs = [dataclasses.replace(job, history=skipped), *run.jobs[1:]]
    check = check_histories(run.requests, jobs)
    assert not check.ok and check.counts["off_path"] == 1


def test_a_bad_job_refused_at_the_submission_is_on_the_expected_path_only_when_told(run):
    bad = run.jobs[3]
    refused = [*run.jobs[:3], dataclasses.replace(bad, history=_history(bad.job_id, REFUSED_PATH))]
    assert not check_histories(run.requests, refused).ok  # the local backend fails it in processing
    assert check_histories(run.requests, refused, REFUSED_PATH).ok
    assert not check_histories(run.requests, run.jobs, REFUSED_PATH).ok


def test_a_lost_request_and_a_doubled_job_are_caught(run):
    assert not check_none_lost({**run.requests, "req-lost": False}, run.jobs).ok
    twin = dataclasses.replace(run.jobs[0], job_id=str(uuid.uuid4()))
    check = check_none_lost(run.requests, run.jobs + [twin])
    assert not check.ok and check.counts["doubled"] == 1


def test_wrong_final_states_are_caught(run):
    good, bad = run.jobs[0], run.jobs[3]
    assert not check_final_states(run.requests, [dataclasses.replace(good, status="failed"), *run.jobs[1:]]).ok
    unrefunded = dataclasses.replace(bad, refund_id=None, payment_status="paid")
    check = check_final_states(run.requests, [*run.jobs[:3], unrefunded])
    assert not check.ok and "not refunded" in check.examples[0]


def test_a_job_stuck_in_processing_is_caught(run):
    stuck = dataclasses.replace(run.jobs[0], status="processing")
    check = check_none_stuck([stuck, *run.jobs[1:]])
    assert not check.ok and check.counts["stuck_processing"] == 1


def test_a_resend_with_the_same_message_id_is_counted_but_allowed(run):
    job = run.jobs[0]
    check = check_ready_emails(run.jobs, run.mids + [_mid("ready", job.job_id)])
    assert check.ok
    assert check.counts["deliveries"] == 4 and check.counts["same_id_repeats"] == 1


def test_a_second_ready_email_with_another_message_id_is_caught(run):
    job = run.jobs[0]
    check = check_ready_emails(run.jobs, run.mids + [_mid("ready", job.job_id, "2")])
    assert not check.ok
    assert "2 different ready emails" in check.examples[0]


def test_a_missing_or_misdirected_email_is_caught(run):
    good, bad = run.jobs[0], run.jobs[3]
    assert not check_ready_emails(run.jobs, [m for m in run.mids if good.job_id not in m]).ok
    assert not check_ready_emails(run.jobs, run.mids + [_mid("ready", bad.job_id)]).ok
    assert not check_refund_emails(run.jobs, run.mids + [_mid("refund", good.job_id)]).ok
    assert not check_refund_emails(run.jobs, [m for m in run.mids if bad.job_id not in m]).ok


def test_two_event_ids_for_one_job_on_one_topic_are_caught(run):
    job = run.jobs[0]
    repeat = Event("jobs.completed", job.job_id, f"ev-{job.job_id}-jobs.completed")
    assert check_events(run.jobs, run.events + [repeat]).ok  # the same event again: a redelivery
    second = Event("jobs.completed", job.job_id, "another-id")
    check = check_events(run.jobs, run.events + [second])
    assert not check.ok and "2 event ids" in check.examples[0]


@pytest.mark.parametrize("topic", ["jobs.awaiting_payment", "jobs.pending", "jobs.processing", "jobs.failed",
                                   "payments.refunds"])
def test_a_transition_or_refund_never_announced_is_caught(run, topic):
    bad = run.jobs[3]  # the failed, refunded job
    kept = [e for e in run.events if (e.topic, e.job_id) != (topic, bad.job_id)]
    assert len(kept) == len(run.events) - 1
    check = check_announced(run.jobs, kept)
    assert not check.ok and check.counts["missing"] == 1 and check.counts[f"missing_{topic}"] == 1
    assert check.examples == [f"job {bad.job_id}: no event on {topic}"]
    # Another job's event on that topic does not stand in for it.
    assert not check_announced(run.jobs, kept + [Event(topic, run.jobs[0].job_id, "x")]).ok


def with_upscales(run) -> tuple[list, list[str]]:
    """The run's jobs, each holding an upscale the upscaler accepted (the bad one
    failed at the submission: it holds none)."""
    jobs = [dataclasses.replace(j, upscaler_job_id=None if j.status == "failed" else f"ups-{n}")
            for n, j in enumerate(run.jobs)]
    return jobs, [j.upscaler_job_id for j in jobs if j.upscaler_job_id]


def test_one_accepted_upscale_per_job_passes_and_an_unused_one_is_counted(run):
    jobs, accepted = with_upscales(run)
    check = check_upscaler_submissions(jobs, accepted)
    assert check.ok and check.counts == {"accepted": 3, "jobs": 3, "unused": 0, "problems": 0}
    resubmitted = check_upscaler_submissions(jobs, accepted + ["ups-orphan"])  # a kill before the record
    assert resubmitted.ok and resubmitted.counts["unused"] == 1
    assert run.checks(upscaler_jobs=accepted, jobs=jobs)["one paid upscale per job"].ok


def test_a_completed_job_without_an_accepted_upscale_or_one_upscale_for_two_jobs_is_caught(run):
    jobs, accepted = with_upscales(run)
    never = check_upscaler_submissions(jobs, accepted[1:])
    assert not never.ok and "never accepted" in never.examples[0]
    shared = [dataclasses.replace(jobs[1], upscaler_job_id=jobs[0].upscaler_job_id), jobs[0], *jobs[2:]]
    check = check_upscaler_submissions(shared, accepted)
    assert not check.ok and check.examples == [f"upscaler job {jobs[0].upscaler_job_id} held by 2 jobs"]


def test_dead_letters_and_lag_are_caught():
    assert not check_dead_letters([{"stage": "checkout", "error": "boom"}]).ok
    assert check_dead_letters([]).ok
    assert not check_drained({"checkout": 0, "notifier": 18}).ok
    assert not check_drained({"(unreadable)": None}).ok


def test_message_ids_parse():
    job_id = str(uuid.uuid4())
    assert parse_message_id(_mid("ready", job_id)) == ("ready", job_id, "1")
    assert parse_message_id(" " + _mid("expiring", job_id, "ab-cd") + "\n") == ("expiring", job_id, "ab-cd")
    assert parse_message_id("<something@else>") is None
    assert parse_message_id(None) is None
