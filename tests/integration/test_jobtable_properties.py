"""Random sequences of transition attempts against the real job table, checked
against a model built from the transition table (hypothesis)."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from schemas.status import JobStatus as S, Stage, TransitionNotAllowed, find_transition, sources_of
from smi.jobtable import JobTable, connect
from tests.integration.conftest import REDIS_URL
from tests.integration.test_jobtable import snapshot
from tests.support.jobs import job_fields

TARGETS = [s for s in S if s is not S.NEW]
steps = st.lists(st.tuples(st.sampled_from(TARGETS), st.sampled_from(list(Stage)), st.integers(0, 5)),
                 min_size=1, max_size=25)


def expected(current: S, target: S, actor: Stage, event: str, applied_events: set[str]) -> str:
    if not sources_of(target, actor):
        return "raises"
    if event in applied_events:
        return "duplicate"
    if target == current:
        return "noop"
    t = find_transition(current, target)
    return "applied" if t is not None and t.owner == actor else "rejected"


async def run_sequence(table: JobTable, sequence) -> None:
    job, _ = await table.create(job_fields())
    current, applied_events, applied = S.NEW, set(), 0
    for target, actor, event_no in sequence:
        event = f"ev-{event_no}"
        want = expected(current, target, actor, event, applied_events)
        before = await snapshot(table, job.job_id)
        if want == "raises":
            with pytest.raises(TransitionNotAllowed):
                await table.transition(job.job_id, target, actor=actor, event_id=event)
            assert await snapshot(table, job.job_id) == before
            continue
        result = await table.transition(job.job_id, target, actor=actor, event_id=event,
                                        fields={"failure_reason": f"{target}-{event}"})
        assert result.outcome == want, (current, target, actor, event)
        assert result.previous == current
        if want == "applied":
            current, applied = target, applied + 1
            applied_events.add(event)
            assert (await table.get(job.job_id)).failure_reason == f"{target}-{event}"
        else:
            assert await snapshot(table, job.job_id) == before
        assert (await table.get(job.job_id)).status == current
    assert len(await table.history(job.job_id)) == applied + 1


@pytest.mark.parametrize("mode", ["single", "cluster"])
def test_random_transition_sequences_follow_the_table(mode, request):
    nodes = request.getfixturevalue("redis_cluster_nodes") if mode == "cluster" else ""
    loop = asyncio.new_event_loop()
    client = connect(REDIS_URL, nodes)
    table = JobTable(client, shards=4, namespace=f"p{uuid.uuid4().hex[:10]}:")

    @settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(steps)
    def check(sequence):
        loop.run_until_complete(run_sequence(table, sequence))

    try:
        check()
    finally:
        loop.run_until_complete(client.aclose())
        loop.close()
