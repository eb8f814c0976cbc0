"""The janitor stage: a thin Faust app with a timer for the due deadlines and two
topics, all fed to services/janitor/handlers.py (consumer group ``janitor``)."""

from __future__ import annotations

import logging
from datetime import timedelta

import faust

from schemas.topics import JOBS_FAILED, PAYMENTS_EVENTS
from services.janitor.handlers import Janitor, JanitorConfig
from smi.clock import Clock
from smi.jobtable import open_table
from smi.kafka.app import attach_producer, create_app
from smi.kafka.handling import add_stage_agents, value_of
from smi.kafka.producer import EventProducer
from smi.payments import payments_for
from smi.settings import Settings

STAGE = "janitor"
log = logging.getLogger(__name__)


def build(settings: Settings, **app_overrides) -> tuple[faust.App, Janitor]:
    app = create_app(STAGE, settings, **app_overrides)
    producer = attach_producer(app, EventProducer.from_settings(settings, client_id=STAGE))
    # One clock for the process, the table's writes included, so a test that moves
    # it sees a consistent history.
    clock = Clock.from_env()
    table = open_table(settings, clock=clock.now)
    config = JanitorConfig(
        storage_dir=settings.storage_dir.resolve(),
        expiry_warning=timedelta(hours=settings.expiry_warning_hours),
        failed_retention=timedelta(days=settings.failed_retention_days),
        email_retention=timedelta(days=settings.pii_retention_days) if settings.pii_retention_days else None)
    janitor = Janitor(table, payments_for(settings), producer.send, config, clock.now)

    add_stage_agents(app, producer, {
        PAYMENTS_EVENTS: value_of(janitor.on_payment_event),
        JOBS_FAILED: value_of(janitor.on_job_failed),
    }, **settings.stage_batching())

    first_tick = True

    @app.timer(interval=settings.janitor_interval_seconds)
    async def due_deadlines() -> None:
        # Every worker ticks; claim_due hands each due item to one of them.
        nonlocal first_tick
        if first_tick:
            log.info("janitor timers running every %ss", settings.janitor_interval_seconds)
            first_tick = False
        try:
            handled = await janitor.tick()
        except Exception:
            log.exception("janitor tick failed")
            return
        if handled.total():
            log.info("janitor pass: %s", handled)

    return app, janitor
