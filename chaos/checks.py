"""What a chaos run must prove, as pure functions of what it observed (no I/O, so
the unit tests feed them hand-made histories, Stripe calls and emails).

Inputs:
- ``requests``: request id -> True when the job was meant to fail (an image URL
  that 404s), False when it was meant to complete;
- ``jobs``: every job in the job table (a run has a table of its own), with its
  history of transitions;
- ``stripe_calls``: every request the stages made to "Stripe" (the recording proxy);
- ``message_ids``: the Message-ID of every email the SMTP sink accepted, in order;
- ``events``: (topic, job id, event id) of every message on the status topics;
- ``dead_letters``: every message on ``jobs.dead_letter``;
- ``lag``: consumer group -> messages not yet committed, after the run settled;
- ``upscaler_jobs``: with UPSCALER=upsampler, the id of every job the (fake)
  Upsampler accepted, each a paid upscale.

Each check returns a Check: a name, whether it holds, counts, and a few examples
of what broke it."""

from __future__ import annotations

import re
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

COMPLETED, FAILED = "completed", "failed"
TERMINAL = frozenset({COMPLETED, FAILED})
GOOD_PATH = ("awaiting_payment", "pending", "processing", "completed")
BAD_PATH = ("awaiting_payment", "pending", "processing", "failed")
# With UPSCALER=upsampler a bad image fails at the submission: Upsampler fetches the
# input before it accepts the job, and refuses one it cannot fetch.
REFUSED_PATH = ("awaiting_payment", "pending", "failed")
SESSIONS_PATH = "/v1/checkout/sessions"
REFUNDS_PATH = "/v1/refunds"
EXAMPLES = 10
# <kind.job_id.occurrence@domain> (services/notifier/emails.py message_id)
MESSAGE_ID = re.compile(r"^<([a-z_]+)\.([0-9a-f-]{36})\.([^@>]+)@[^>]+>$")


@dataclass(frozen=True)
class Transition:
    source: str | None
    target: str
    event_id: str | None
    actor: str = ""


@dataclass(frozen=True)
class JobRecord:
    job_id: str
    request_id: str | None
    status: str
    payment_status: str | None = None
    refund_id: str | None = None
    history: tuple[Transition, ...] = ()
    upscaler_job_id: str | None = None


@dataclass(frozen=True)
class StripeCall:
    method: str
    path: str
    idempotency_key: str | None
    form: Mapping[str, str]
    status: int = 200

    @property
    def job_id(self) -> str | None:
        return self.form.get("metadata[job_id]") or self.form.get("client_reference_id")


@dataclass(frozen=True)
class Event:
    topic: str
    job_id: str | None
    event_id: str | None


@dataclass
class Check:
    name: str
    ok: bool
    summary: str
    counts: dict[str, Any] = field(default_factory=dict)
    examples: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _examples(items: Iterable[str]) -> list[str]:
    out = []
    for item in items:
        if len(out) == EXAMPLES:
            break
        out.append(item)
    return out


def _jobs_by_request(jobs: Iterable[JobRecord]) -> dict[str, list[JobRecord]]:
    by_request: dict[str, list[JobRecord]] = defaultdict(list)
    for job in jobs:
        if job.request_id is not None:
            by_request[job.request_id].append(job)
    return by_request


def expected_status(bad: bool) -> str:
    return FAILED if bad else COMPLETED


# -- jobs -------------------------------------------------------------------------

def check_none_lost(requests: Mapping[str, bool], jobs: Sequence[JobRecord]) -> Check:
    """Every request made exactly one job, and the table holds no job we did not ask for."""
    by_request = _jobs_by_request(jobs)
    lost = [r for r in requests if not by_request.get(r)]
    doubled = {r: [j.job_id for j in js] for r, js in by_request.items() if len(js) > 1}
    foreign = [j.job_id for j in jobs if j.request_id not in requests]
    ok = not lost and not doubled and not foreign
    return Check("none lost, one job per request", ok,
                 f"{len(requests) - len(lost)}/{len(requests)} requests made a job; {len(doubled)} made more than "
                 f"one; {len(foreign)} jobs of no request",
                 {"requests": len(requests), "lost": len(lost), "doubled": len(doubled), "foreign": len(foreign)},
                 _examples([f"lost request {r}" for r in lost] + [f"request {r}: jobs {js}" for r, js in doubled.items()]
                           + [f"job {j} of no request" for j in foreign]))


def check_final_states(requests: Mapping[str, bool], jobs: Sequence[JobRecord]) -> Check:
    """Good jobs completed; bad ones failed, refunded (payment_status refunded and a
    refund id) and nothing else."""
    by_request = _jobs_by_request(jobs)
    wrong, counts = [], Counter()
    for request_id, bad in requests.items():
        for job in by_request.get(request_id, []):
            want = expected_status(bad)
            counts[job.status] += 1
            if job.status != want:
                wrong.append(f"job {job.job_id} ({'bad' if bad else 'good'} image) is {job.status}, expected {want}")
            elif bad and (not job.refund_id or job.payment_status != "refunded"):
                wrong.append(f"job {job.job_id} failed but is not refunded "
                             f"(refund_id={job.refund_id}, payment_status={job.payment_status})")
            elif not bad and job.refund_id:
                wrong.append(f"job {job.job_id} completed and was refunded ({job.refund_id})")
    return Check("every job in its expected final state", not wrong,
                 f"{len(wrong)} jobs not where they should be; statuses: {dict(sorted(counts.items()))}",
                 {"wrong": len(wrong), **{f"status_{k}": v for k, v in sorted(counts.items())}}, _examples(wrong))


def check_none_stuck(jobs: Sequence[JobRecord]) -> Check:
    stuck = [j for j in jobs if j.status not in TERMINAL]
    by_status = Counter(j.status for j in stuck)
    return Check("no job stuck", not stuck, f"{len(stuck)} jobs not in a final status {dict(by_status)}",
                 {"stuck": len(stuck), **{f"stuck_{k}": v for k, v in by_status.items()}},
                 _examples(f"job {j.job_id} is {j.status}" for j in stuck))


def check_histories(requests: Mapping[str, bool], jobs: Sequence[JobRecord],
                    bad_path: tuple[str, ...] = BAD_PATH) -> Check:
    """No transition twice in a history (same target or same event id), and each
    history is the expected path for its kind of job."""
    duplicates, off_path = [], []
    for job in jobs:
        targets = Counter(t.target for t in job.history)
        event_ids = Counter(t.event_id for t in job.history if t.event_id)
        twice = [f"{k}×{n}" for k, n in targets.items() if n > 1] + [f"event {k}×{n}" for k, n in event_ids.items()
                                                                     if n > 1]
        if twice:
            duplicates.append(f"job {job.job_id}: {', '.join(twice)}")
        if job.request_id in requests and job.status in TERMINAL:
            path = tuple(t.target for t in job.history if t.target != "new")
            want = bad_path if requests[job.request_id] else GOOD_PATH
            if path != want:
                off_path.append(f"job {job.job_id}: {' → '.join(path)} (expected {' → '.join(want)})")
    return Check("no duplicate transition in any history", not duplicates and not off_path,
                 f"{len(duplicates)} histories with a repeated transition, {len(off_path)} off the expected path",
                 {"histories": len(jobs), "duplicates": len(duplicates), "off_path": len(off_path)},
                 _examples(duplicates + off_path))


# -- Stripe ------------------------------------------------------------------------

def _calls(calls: Iterable[StripeCall], path: str) -> dict[str | None, list[StripeCall]]:
    grouped: dict[str | None, list[StripeCall]] = defaultdict(list)
    for call in calls:
        if call.method == "POST" and call.path == path:
            grouped[call.job_id].append(call)
    return grouped


def _one_operation(job_id: str, calls: list[StripeCall], prefix: str) -> list[str]:
    """Problems with the calls of one job: every call must carry the job's single
    idempotency key and the same parameters (Stripe then makes one object; other
    parameters under a reused key are refused)."""
    problems = []
    keys = {c.idempotency_key for c in calls}
    if keys != {f"{prefix}-{job_id}"}:
        problems.append(f"job {job_id}: idempotency keys {sorted(map(str, keys))}, expected {{{prefix}-{job_id}}}")
    forms = {tuple(sorted(c.form.items())) for c in calls}
    if len(forms) > 1:
        first, *others = [dict(f) for f in forms]
        differing = sorted({k for other in others for k in set(first) | set(other) if first.get(k) != other.get(k)})
        problems.append(f"job {job_id}: {len(forms)} different parameter sets under one key (differ in {differing})")
    return problems


def check_checkout_sessions(jobs: Sequence[JobRecord], calls: Sequence[StripeCall]) -> Check:
    grouped = _calls(calls, SESSIONS_PATH)
    known = {j.job_id for j in jobs}
    problems = [f"a checkout session for job {j}, which is not in the table" for j in grouped if j not in known]
    missing = [j for j in known if j not in grouped]
    problems += [f"job {j}: no checkout session request recorded" for j in missing]
    for job_id, job_calls in grouped.items():
        if job_id in known:
            problems += _one_operation(job_id, job_calls, "checkout")
    raw = sum(len(c) for c in grouped.values())
    repeats = sum(len(c) - 1 for j, c in grouped.items() if j in known)
    return Check("exactly one checkout session per job", not problems,
                 f"{raw} create requests for {len(grouped)} jobs ({repeats} repeats, each under the job's one key "
                 f"with the same parameters)", {"requests": raw, "jobs": len(grouped), "repeats": repeats,
                                                "problems": len(problems)}, _examples(problems))


def check_refunds(requests: Mapping[str, bool], jobs: Sequence[JobRecord], calls: Sequence[StripeCall]) -> Check:
    """At most one refund per job (one key, same parameters), only failed jobs
    refunded, and every failed paid job refunded."""
    grouped = _calls(calls, REFUNDS_PATH)
    by_id = {j.job_id: j for j in jobs}
    problems = []
    for job_id, job_calls in grouped.items():
        job = by_id.get(job_id)
        if job is None:
            problems.append(f"a refund for job {job_id}, which is not in the table")
            continue
        if job.status != FAILED or not requests.get(job.request_id, False):
            problems.append(f"job {job_id} ({job.status}) was refunded")
        problems += _one_operation(job_id, job_calls, "refund")
    unrefunded = [j.job_id for j in jobs if j.status == FAILED and j.job_id not in grouped]
    problems += [f"failed job {j}: no refund request recorded" for j in unrefunded]
    raw = sum(len(c) for c in grouped.values())
    return Check("at most one refund per job, only failed jobs", not problems,
                 f"{raw} refund requests for {len(grouped)} jobs; {sum(1 for j in jobs if j.status == FAILED)} "
                 f"failed jobs", {"requests": raw, "jobs": len(grouped), "repeats": raw - len(grouped),
                                  "problems": len(problems)}, _examples(problems))


# -- emails ------------------------------------------------------------------------

def parse_message_id(message_id: str | None) -> tuple[str, str, str] | None:
    """(kind, job id, occurrence) of a notifier Message-ID, or None."""
    found = MESSAGE_ID.match((message_id or "").strip())
    return (found.group(1), found.group(2), found.group(3)) if found else None


def _emails(message_ids: Iterable[str | None], kind: str) -> tuple[dict[str, Counter], list[str]]:
    """job id -> Counter of its Message-IDs of that kind; and unparseable ids."""
    per_job: dict[str, Counter] = defaultdict(Counter)
    strange = []
    for message_id in message_ids:
        parsed = parse_message_id(message_id)
        if parsed is None:
            strange.append(str(message_id))
        elif parsed[0] == kind:
            per_job[parsed[1]][message_id] += 1
    return per_job, strange


def _check_emails(name: str, kind: str, should: set[str], message_ids: Sequence[str | None]) -> Check:
    per_job, strange = _emails(message_ids, kind)
    problems = [f"job {j}: no {kind} email" for j in sorted(should) if j not in per_job]
    problems += [f"job {j}: {len(ids)} different {kind} emails ({', '.join(ids)})"
                 for j, ids in per_job.items() if len(ids) > 1]
    problems += [f"job {j}: a {kind} email it should not have" for j in per_job if j not in should]
    problems += [f"an email with Message-ID {s!r}" for s in strange if kind == "ready"]
    raw = sum(sum(ids.values()) for ids in per_job.values())
    resent = sum(n - 1 for ids in per_job.values() for n in ids.values())
    return Check(name, not problems,
                 f"{raw} deliveries for {len(per_job)}/{len(should)} jobs; {resent} repeats of the same "
                 f"Message-ID (a crash between send and record; allowed)",
                 {"deliveries": raw, "jobs": len(per_job), "expected_jobs": len(should), "same_id_repeats": resent,
                  "problems": len(problems)}, _examples(problems))


def check_ready_emails(jobs: Sequence[JobRecord], message_ids: Sequence[str | None]) -> Check:
    return _check_emails("one download-ready email per completed job", "ready",
                         {j.job_id for j in jobs if j.status == COMPLETED}, message_ids)


def check_refund_emails(jobs: Sequence[JobRecord], message_ids: Sequence[str | None]) -> Check:
    return _check_emails("one refund email per refunded job", "refund",
                         {j.job_id for j in jobs if j.refund_id}, message_ids)


# -- Kafka -------------------------------------------------------------------------

def check_events(jobs: Sequence[JobRecord], events: Sequence[Event]) -> Check:
    """One event id per job and status topic: a redelivered step publishes the
    same event again (same id, consumers drop it); a second id would be a second
    transition."""
    ids: dict[tuple[str, str], set[str | None]] = defaultdict(set)
    raw = Counter()
    for event in events:
        if event.job_id:
            ids[(event.topic, event.job_id)].add(event.event_id)
            raw[event.topic] += 1
    problems = [f"job {j} on {t}: {len(e)} event ids" for (t, j), e in ids.items() if len(e) > 1]
    known = {j.job_id for j in jobs}
    problems += [f"job {j} on {t}: not in the table" for (t, j) in ids if j not in known]
    repeats = sum(raw.values()) - len(ids)
    return Check("one event id per job and status topic", not problems,
                 f"{sum(raw.values())} events on the status topics, {repeats} of them repeats of an event id",
                 {"events": sum(raw.values()), "repeats": repeats, "problems": len(problems),
                  **{f"events_{t}": n for t, n in sorted(raw.items())}}, _examples(problems))


# The statuses announced on a topic of their own (design.md, "Topics"): jobs.<status>.
ANNOUNCED_STATUSES = frozenset({"awaiting_payment", "pending", "processing", COMPLETED, FAILED})
REFUNDS_TOPIC = "payments.refunds"


def check_announced(jobs: Sequence[JobRecord], events: Sequence[Event]) -> Check:
    """Every transition in a history is on its status topic, and every refund on
    payments.refunds: each stage writes the job before it publishes, so a crash in
    between must leave the redelivery to publish (found missing for ``processing``)."""
    seen = {(event.topic, event.job_id) for event in events}
    missing = Counter()
    examples = []
    for job in jobs:
        topics = [f"jobs.{t.target}" for t in job.history if t.target in ANNOUNCED_STATUSES]
        topics += [REFUNDS_TOPIC] if job.refund_id else []
        for topic in topics:
            if (topic, job.job_id) not in seen:
                missing[topic] += 1
                examples.append(f"job {job.job_id}: no event on {topic}")
    return Check("every transition and refund announced", not missing,
                 f"{sum(missing.values())} transitions or refunds with no event"
                 + (f" ({', '.join(f'{t} {n}' for t, n in sorted(missing.items()))})" if missing else ""),
                 {"missing": sum(missing.values()), **{f"missing_{t}": n for t, n in sorted(missing.items())}},
                 _examples(examples))


def check_upscaler_submissions(jobs: Sequence[JobRecord], accepted: Sequence[str]) -> Check:
    """Every completed job's upscale is one the upscaler accepted, and no accepted
    upscale serves two jobs. An accepted upscale that no job holds was paid for and
    not used: after a kill between the submission and its record, or a submission
    left unanswered (--upsampler-late), the job waits for that submission's callback
    and adopts it, and resubmits only if none came in time (allowed, as an email
    sent again is; an outage there no longer does, see record_effect)."""
    accepted_ids = Counter(accepted)
    holders = Counter(j.upscaler_job_id for j in jobs if j.upscaler_job_id)
    problems = [f"job {j.job_id}: completed with upscaler job {j.upscaler_job_id!r}, never accepted"
                for j in jobs if j.status == COMPLETED and accepted_ids[j.upscaler_job_id] == 0]
    problems += [f"upscaler job {u} held by {n} jobs" for u, n in holders.items() if n > 1]
    unused = sum(n for u, n in accepted_ids.items() if holders[u] == 0)
    submitted_jobs = sum(1 for j in jobs if j.upscaler_job_id and accepted_ids[j.upscaler_job_id])
    return Check("one paid upscale per job", not problems,
                 f"{len(accepted)} upscales accepted for {submitted_jobs} jobs; {unused} held by no job "
                 "(a submission cut off by a kill or left unanswered, and no callback in time; allowed)",
                 {"accepted": len(accepted), "jobs": submitted_jobs, "unused": unused, "problems": len(problems)},
                 _examples(problems))


def check_dead_letters(dead_letters: Sequence[Mapping[str, Any]]) -> Check:
    by_reason = Counter(f"{d.get('stage')}: {str(d.get('error'))[:120]}" for d in dead_letters)
    return Check("no message dead-lettered", not dead_letters, f"{len(dead_letters)} dead letters",
                 {"dead_letters": len(dead_letters)}, _examples(f"{n}× {r}" for r, n in by_reason.most_common()))


def check_drained(lag: Mapping[str, int | None]) -> Check:
    behind = {g: n for g, n in lag.items() if n != 0}
    return Check("every stage group caught up", not behind,
                 "lag " + ", ".join(f"{g} {n}" for g, n in sorted(lag.items())), dict(lag),
                 _examples(f"{g}: {n} messages not committed" for g, n in behind.items()))


def run_checks(*, requests: Mapping[str, bool], jobs: Sequence[JobRecord], stripe_calls: Sequence[StripeCall],
               message_ids: Sequence[str | None], events: Sequence[Event] = (),
               dead_letters: Sequence[Mapping[str, Any]] = (), lag: Mapping[str, int | None] | None = None,
               upscaler_jobs: Sequence[str] | None = None, bad_path: tuple[str, ...] = BAD_PATH) -> list[Check]:
    checks = [
        check_none_lost(requests, jobs),
        check_final_states(requests, jobs),
        check_none_stuck(jobs),
        check_histories(requests, jobs, bad_path),
        check_checkout_sessions(jobs, stripe_calls),
        check_refunds(requests, jobs, stripe_calls),
        check_ready_emails(jobs, message_ids),
        check_refund_emails(jobs, message_ids),
        check_events(jobs, events),
        check_announced(jobs, events),
        check_dead_letters(dead_letters),
    ]
    if upscaler_jobs is not None:
        checks.append(check_upscaler_submissions(jobs, upscaler_jobs))
    if lag is not None:
        checks.append(check_drained(lag))
    return checks
