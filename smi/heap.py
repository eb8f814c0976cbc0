"""The garbage collector of a long-running stage process: the heap it starts with
frozen, and every pause measured (``smi_gc_pause_seconds``).

Why: CPython's full collection walks every tracked object, and a stage holds
hundreds of thousands from its start that never die (modules, classes, schemas,
the app's wiring). Each full pass paused a stage for 50-130 ms, a few times a
minute under load: the tail of its latency (bench, the paced run's p99). Frozen
objects are skipped by every pass, and after the freeze full passes took 1-11 ms.
Frozen objects are never freed, so only what exists at startup is frozen;
everything made later is collected as before."""

from __future__ import annotations

import gc
import logging
import time

from smi import metrics

log = logging.getLogger(__name__)
_pass_started = 0.0  # when the running pass began (one pass at a time: the GIL)


def freeze_startup_heap() -> int:
    """Collect what startup left behind, then freeze the rest. Returns the number of
    objects frozen so far (they accumulate over calls)."""
    gc.collect()
    gc.freeze()
    frozen = gc.get_freeze_count()
    log.info("startup heap frozen: %d objects out of the garbage collector's passes", frozen)
    return frozen


def _on_gc(phase: str, info: dict) -> None:
    global _pass_started
    if phase == "start":
        _pass_started = time.perf_counter()
    else:
        metrics.GC_PAUSE.labels(str(info["generation"])).observe(time.perf_counter() - _pass_started)


def record_gc_pauses() -> None:
    """Observe every collection's pause from now on (once per process)."""
    if _on_gc not in gc.callbacks:
        gc.callbacks.append(_on_gc)
