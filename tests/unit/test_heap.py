"""smi.heap: the startup heap is frozen, and collector pauses are observed."""

from __future__ import annotations

import gc

import pytest

from smi import heap, metrics


@pytest.fixture
def restore_gc():
    callbacks = list(gc.callbacks)
    yield
    gc.unfreeze()
    gc.callbacks[:] = callbacks


def pause_count(generation: str) -> float:
    return next((s.value for m in metrics.GC_PAUSE.collect() for s in m.samples
                 if s.name.endswith("_count") and s.labels == {"generation": generation}), 0.0)


def test_freezing_takes_live_objects_out_of_the_collector(restore_gc):
    gc.unfreeze()
    survivor = [[n] for n in range(1000)]  # alive at the freeze (and tracked: lists)
    frozen = heap.freeze_startup_heap()
    # A frozen object that dies right after the freeze (a temporary of another
    # thread) leaves the count: a CI run read one fewer than the freeze returned.
    assert len(survivor) <= gc.get_freeze_count() <= frozen
    assert gc.is_tracked(survivor[0])
    assert not any(survivor[0] is obj for obj in gc.get_objects())  # frozen: in no generation's list
    # The gauge reads the count when scraped: the same holds for it.
    assert len(survivor) <= metrics.GC_FROZEN.collect()[0].samples[0].value <= frozen


def test_every_pass_is_observed_by_generation_once_recorded(restore_gc):
    heap.record_gc_pauses()
    heap.record_gc_pauses()  # idempotent: one callback, one observation per pass
    assert gc.callbacks.count(heap._on_gc) == 1
    full, young = pause_count("2"), pause_count("0")
    gc.collect()
    gc.collect(0)
    assert pause_count("2") == full + 1
    assert pause_count("0") == young + 1
