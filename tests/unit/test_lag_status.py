"""Burrow's evaluation rules without thresholds (smi.ops.lag.status_of), on windows
of hand-made samples, oldest first."""

from __future__ import annotations

import pytest

from schemas.topics import BY_NAME
from smi.ops.lag import STAGE_SOURCE_TOPICS, GroupSample, PartitionLag, status_of
from smi.stages import FAUST_STAGES


def reading(*partitions: tuple[int | None, int], members: int = 1, topic: str = "t") -> GroupSample:
    """One sample: a (committed, end) pair per partition 0, 1, ... of ``topic``."""
    rows = [PartitionLag(topic, n, committed, end, end - (committed or 0))
            for n, (committed, end) in enumerate(partitions)]
    return GroupSample("g", members, sum(r.lag for r in rows), rows)


def test_a_group_without_members_is_stopped_whatever_its_lag():
    assert status_of([reading((5, 5), members=0)]) == "stopped"
    assert status_of([reading((5, 9), members=1), reading((5, 9), members=0)]) == "stopped"


def test_commits_that_do_not_move_with_lag_left_are_stalled():
    assert status_of([reading((5, 9)), reading((5, 9)), reading((5, 12))]) == "stalled"


def test_a_partition_never_committed_with_messages_waiting_is_stalled():
    assert status_of([reading((None, 3)), reading((None, 3))]) == "stalled"


def test_idle_and_caught_up_is_ok():
    assert status_of([reading((5, 5)), reading((5, 5)), reading((5, 5))]) == "ok"


def test_lag_that_was_zero_anywhere_in_the_window_is_ok():
    # Burrow: a consumer that caught up within the window is keeping up.
    assert status_of([reading((5, 5)), reading((5, 8)), reading((5, 8))]) == "ok"


def test_lag_growing_while_commits_move_is_lagging():
    assert status_of([reading((5, 8)), reading((6, 11)), reading((7, 14))]) == "lagging"


def test_lag_that_holds_then_grows_while_commits_move_is_lagging():
    assert status_of([reading((5, 8)), reading((6, 9)), reading((7, 12))]) == "lagging"


@pytest.mark.parametrize("lags", [(3, 3, 3), (6, 4, 2), (3, 6, 4)], ids=["steady", "shrinking", "grew-then-shrank"])
def test_commits_moving_without_steady_growth_is_ok(lags):
    window = [reading((10 * i, 10 * i + lag)) for i, lag in enumerate(lags)]
    assert status_of(window) == "ok"


def test_one_sample_shows_no_movement_so_only_stopped_or_ok():
    assert status_of([reading((5, 9))]) == "ok"


def test_the_group_takes_its_worst_partition():
    stalled_and_ok = [reading((5, 9), (1, 1)), reading((5, 9), (2, 2))]
    assert status_of(stalled_and_ok) == "stalled"
    lagging_and_stalled = [reading((0, 2), (5, 9)), reading((1, 5), (5, 9))]
    assert status_of(lagging_and_stalled) == "stalled"
    lagging_and_ok = [reading((0, 2), (1, 1)), reading((1, 5), (2, 2))]
    assert status_of(lagging_and_ok) == "lagging"


def test_a_partition_seen_only_in_the_latest_sample_is_not_judged_yet():
    window = [reading((1, 1)), reading((1, 1), (0, 4))]
    assert status_of(window) == "ok"


def test_a_group_with_members_and_no_partitions_is_ok():
    assert status_of([reading(), reading()]) == "ok"


def test_an_empty_window_is_an_error():
    with pytest.raises(ValueError):
        status_of([])


def test_every_stage_group_and_only_registry_topics_have_source_topics():
    assert set(STAGE_SOURCE_TOPICS) == set(FAUST_STAGES)
    assert all(name in BY_NAME for topics in STAGE_SOURCE_TOPICS.values() for name in topics)
