"""Helpers to build jobs in a given status through the real transition path."""

from __future__ import annotations

import itertools

from schemas.status import JobStatus as S
from schemas.status import find_transition

from smi.jobtable import JobTable

_counter = itertools.count()

# A route from "new" to every status, each hop a row of the transition table.
ROUTES: dict[S, list[S]] = {
    S.NEW: [],
    S.AWAITING_PAYMENT: [S.AWAITING_PAYMENT],
    S.PENDING: [S.AWAITING_PAYMENT, S.PENDING],
    S.ABANDONED: [S.AWAITING_PAYMENT, S.ABANDONED],
    S.PROCESSING: [S.AWAITING_PAYMENT, S.PENDING, S.PROCESSING],
    S.COMPLETED: [S.AWAITING_PAYMENT, S.PENDING, S.PROCESSING, S.COMPLETED],
    S.FAILED: [S.AWAITING_PAYMENT, S.PENDING, S.PROCESSING, S.FAILED],
}


def job_fields(**overrides) -> dict:
    fields = dict(image_url="https://images.example.com/a.png", resolution="4x", email="buyer@example.com",
                  post_id=7, image_width=2000, image_height=2000, price_cents=384)
    fields.update(overrides)
    return fields


async def make_job(table: JobTable, status: S = S.NEW, **overrides):
    job, _ = await table.create(job_fields(**overrides))
    current = S.NEW
    for target in ROUTES[status]:
        owner = find_transition(current, target).owner
        result = await table.transition(job.job_id, target, actor=owner, event_id=f"setup-{next(_counter)}")
        assert result.applied, (current, target, result)
        current = target
    return await table.get(job.job_id)

