"""Run one stage in this process: `smi run <stage>` and `python -m services.<stage>`.
Faust stages run under faust's Worker (signal handling, graceful rebalance on
SIGTERM); the gateway runs under asyncio directly."""

from __future__ import annotations

import asyncio
import importlib
import logging

from smi.heap import freeze_startup_heap, record_gc_pauses
from smi.jobtable import open_table
from smi.logs import logging_config, setup_logging
from smi.metrics import GaugeRefresher, start_metrics_server
from smi.settings import Settings

FAUST_STAGES = ("checkout", "processor", "notifier", "janitor")  # grows as the other stages land
STAGES = FAUST_STAGES + ("gateway",)

log = logging.getLogger(__name__)


def run_stage(stage: str, settings: Settings, *, loglevel: str = "info") -> None:
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; one of {', '.join(STAGES)}")
    setup_logging(stage, loglevel, settings.log_format)
    use_event_loop(settings.event_loop)
    if stage == "gateway":
        from services.gateway.app import serve

        freeze_startup_heap()
        asyncio.run(serve(settings))
        return
    from faust import Worker

    from smi.kafka.startup import wait_for_kafka

    # A loop of its own, never made current: asyncio.run would leave no current loop
    # behind, and the Worker below asks for one.
    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(wait_for_kafka(settings.kafka_bootstrap_servers))
    finally:
        loop.close()
    module = importlib.import_module(f"services.{stage}.app")
    app, _ = module.build(settings)
    start_metrics_server(settings.metrics_port_for(stage), host=settings.metrics_host)
    # The stage's table lives inside its handlers; the gauges read through a small client of their own.
    table = open_table(settings, max_connections=2)
    app.add_dependency(GaugeRefresher(stage, table, settings.kafka_bootstrap_servers, settings.kafka_names))
    record_gc_pauses()
    freeze_startup_heap()
    # The Worker sets logging up again when it starts: hand it the same configuration.
    stage_worker(Worker)(app, loglevel=loglevel,
                         logging_config=logging_config(stage, loglevel, settings.log_format)).execute_from_commandline()


def use_event_loop(kind: str) -> None:
    """Every event loop this process makes from now on is of ``kind``: the stage's,
    and the one Faust's consumer runs in its own thread. Faust's own switch
    (mode.loop.use) sets the same policy."""
    import mode.loop

    mode.loop.use("uvloop" if kind == "uvloop" else "aio")
    # What the policy makes, not what was asked for.
    log.info("event loop: %s", type(asyncio.get_event_loop_policy()).__module__.split(".")[0])


def stage_worker(worker_class: type) -> type:
    """Faust's Worker, freezing the heap once more when the app has started: its
    consumer, producer and topic metadata are made during the start (smi.heap)."""
    class StageWorker(worker_class):
        # Log lines keep Faust's label ("[^Worker]: Ready" is what operators and
        # tests wait for), not this class's name.
        shortlabel = label = "Worker"

        async def on_startup_finished(self) -> None:
            await super().on_startup_finished()
            freeze_startup_heap()

    return StageWorker
