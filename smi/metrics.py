"""Prometheus metrics of the stage processes (design.md, "Configuration": METRICS_PORT).

One module-level set on prometheus_client's default registry: a stage process is one
Faust worker, so one registry per process is exactly one set per scrape target. Call
sites use the one-line helpers below; ``start_metrics_server`` exports the registry
and ``GaugeRefresher`` keeps the gauges read from Redis and Kafka current.

The gateway keeps its own registry (services/gateway/context.py) and serves it on
its own port."""

from __future__ import annotations

import asyncio
import errno
import gc
import logging
import time
from contextlib import AsyncExitStack
from typing import TYPE_CHECKING

from mode import Service
from prometheus_client import Counter, Gauge, Histogram, start_http_server

from smi.kafka.names import DEFAULT, KafkaNames
from smi.ops.lag import OffsetReader

if TYPE_CHECKING:
    from smi.jobtable import JobTable

log = logging.getLogger(__name__)

# Redis and Kafka answer these queries from a few small requests (ZCARDs per shard and
# status; for the group, its offsets, members, topics and their start and end offsets),
# so every worker may refresh.
REFRESH_SECONDS = 15.0
# A handler's time includes its retries' backoff (up to minutes while a dependency is
# down): buckets reach past the default 10 s.
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)

MESSAGES = Counter(
    "smi_messages_total",
    "Messages a stage took from a topic, by outcome: handled or dead_lettered once per message, "
    "retried once per retry after a transient error",
    ["stage", "topic", "outcome"])
HANDLER_DURATION = Histogram(
    "smi_handler_duration_seconds",
    "Seconds from taking a message to being allowed to ack it (retries and dead-lettering included)",
    ["stage", "topic"], buckets=DURATION_BUCKETS)
TRANSITIONS = Counter(
    "smi_transitions_total",
    "Job table transitions asked for, by the job's status before, the target, and outcome "
    "(applied, duplicate, noop, rejected)",
    ["source", "target", "outcome"])
DEAD_LETTERS = Counter("smi_dead_letters_total", "Messages sent to jobs.dead_letter, by stage and source topic",
                       ["stage", "topic"])
REFUNDS = Counter("smi_refunds_total", "Refunds issued for failed paid jobs")
EMAILS = Counter("smi_emails_total", "Customer emails, by kind and outcome", ["kind", "outcome"])
UPSCALER_REQUESTS = Counter("smi_upscaler_requests_total", "Requests to the upscaler, by backend and outcome",
                            ["backend", "outcome"])
JOBS = Gauge("smi_jobs", "Jobs in the job table by status (every stage process reports the same table)",
             ["status"])
CONSUMER_LAG = Gauge("smi_consumer_lag",
                     "Messages this process's consumer group has still to handle, as `smi lag` counts them",
                     ["group", "topic", "partition"])
BATCH_SIZE = Histogram(
    "smi_batch_size_messages", "Messages per batch a stage agent took from its topic (1 when idle; "
    "mostly full batches mean the stage is the bottleneck)",
    ["stage", "topic"], buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024))
LAST_PROCESSED = Gauge("smi_last_processed_timestamp_seconds",
                       "Unix time this process last finished a message (handled or dead-lettered)", ["stage"])
GC_PAUSE = Histogram(
    "smi_gc_pause_seconds", "Pauses of this process's garbage collector, by generation (2: a full pass; "
    "smi.heap freezes the startup heap so that full passes stay short)",
    ["generation"], buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0))
GC_FROZEN = Gauge("smi_gc_frozen_objects",
                  "Objects of this process taken out of the garbage collector's passes at startup (smi.heap)")
GC_FROZEN.set_function(gc.get_freeze_count)


# -- one-line helpers for call sites ---------------------------------------------


def message(stage: str, topic: str, outcome: str) -> None:
    MESSAGES.labels(stage, topic, outcome).inc()


def batch(stage: str, topic: str, size: int) -> None:
    BATCH_SIZE.labels(stage, topic).observe(size)


def message_settled(stage: str, topic: str, outcome: str, seconds: float) -> None:
    """A message's final outcome (handled or dead_lettered): the stage made progress."""
    message(stage, topic, outcome)
    HANDLER_DURATION.labels(stage, topic).observe(seconds)
    LAST_PROCESSED.labels(stage).set(time.time())


def dead_letter(stage: str, topic: str) -> None:
    DEAD_LETTERS.labels(stage, topic).inc()


def transition(source: str, target: str, outcome: str) -> None:
    TRANSITIONS.labels(source, target, outcome).inc()


def refund() -> None:
    REFUNDS.inc()


def email(kind: str, outcome: str) -> None:
    EMAILS.labels(kind, outcome).inc()


def upscaler_request(backend: str, outcome: str) -> None:
    UPSCALER_REQUESTS.labels(backend, outcome).inc()


# -- export -----------------------------------------------------------------------


def start_metrics_server(port: int, host: str = "127.0.0.1") -> int:
    """Serve ``GET /metrics`` from a daemon thread; returns the port it listens on.
    Port 0 takes a free one, so several workers of one stage can share a host.

    A stage's fixed port already in use (a second worker started without
    METRICS_PORT=0) means a free port instead, said in the log: a stage that
    refused to run over its exporter would stop selling."""
    try:
        server, _ = start_http_server(port, addr=host)
    except OSError as exc:
        if port == 0 or exc.errno != errno.EADDRINUSE:
            raise
        log.warning("metrics port %d is in use; taking a free one", port)
        server, _ = start_http_server(0, addr=host)
    actual = server.server_port
    log.info("metrics on http://%s:%d/metrics", host, actual)
    return actual


class GaugeRefresher(Service):
    """Refreshes ``smi_jobs`` and ``smi_consumer_lag`` every REFRESH_SECONDS while
    the stage runs. A failed refresh keeps the last values and says why in the log;
    the stage goes on either way."""

    def __init__(self, stage: str, table: JobTable, bootstrap_servers: str, names: KafkaNames = DEFAULT, **kwargs):
        super().__init__(**kwargs)
        self.stage = stage
        self.names = names
        self.table = table
        self.bootstrap_servers = bootstrap_servers
        # Kafka clients stay open between refreshes; made on first use (aiokafka
        # binds to the running loop) and again after a failure.
        self._offsets: OffsetReader | None = None
        self._offsets_open = AsyncExitStack()
        self._lag_labels: set[tuple[str, str, str]] = set()

    async def on_stop(self) -> None:
        await self._close_offsets()
        await self.table.redis.aclose()

    @Service.timer(REFRESH_SECONDS, exec_first=True)
    async def _refresh(self) -> None:
        await self.refresh_jobs()
        await self.refresh_lag()

    async def refresh_jobs(self) -> None:
        try:
            counts = await asyncio.wait_for(self.table.count_by_status(), REFRESH_SECONDS)
        except Exception as exc:
            log.warning("could not count jobs for metrics: %s: %s", type(exc).__name__, exc)
            return
        for status, count in counts.items():
            JOBS.labels(status.value).set(count)

    async def refresh_lag(self) -> None:
        try:
            if self._offsets is None:
                self._offsets = await self._offsets_open.enter_async_context(
                    OffsetReader(self.bootstrap_servers, self.names))
            [sample] = await asyncio.wait_for(self._offsets.read([self.stage]), REFRESH_SECONDS)
        except Exception as exc:
            log.warning("could not read consumer lag for metrics: %s: %s", type(exc).__name__, exc)
            await self._close_offsets()
            return
        labels = {(sample.group, p.topic, str(p.partition)): p.lag for p in sample.partitions}
        for key, lag in labels.items():
            CONSUMER_LAG.labels(*key).set(lag)
        # Partitions that are gone (a deleted topic) stop being reported.
        for key in self._lag_labels - labels.keys():
            CONSUMER_LAG.remove(*key)
        self._lag_labels = set(labels)

    async def _close_offsets(self) -> None:
        self._offsets = None
        try:
            await self._offsets_open.aclose()
        except Exception:
            log.debug("closing the Kafka clients of the lag gauge failed", exc_info=True)
