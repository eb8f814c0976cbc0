"""The processor stage: a thin Faust app feeding jobs.pending, upscaler.events and
jobs.commands to services/processor/handlers.py, plus a timer for submit retries
and polls (consumer group ``processor``)."""

from __future__ import annotations

import logging
import os
from datetime import timedelta

import faust

from schemas.topics import JOBS_COMMANDS, JOBS_PENDING, UPSCALER_EVENTS
from services.processor.handlers import Processor, ProcessorConfig
from smi.clock import Clock
from smi.jobtable import open_table
from smi.kafka.app import attach_producer, close_on_stop, create_app
from smi.kafka.handling import add_stage_agents, value_of
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.upscalers import LocalUpscaler, UpsamplerClient

STAGE = "processor"
log = logging.getLogger(__name__)


def build(settings: Settings, **app_overrides) -> tuple[faust.App, Processor]:
    app = create_app(STAGE, settings, **app_overrides)
    producer = attach_producer(app, EventProducer.from_settings(settings, client_id=STAGE))
    clock = Clock.from_env()  # one clock per process; tests can move it
    table = open_table(settings, clock=clock.now)
    allow = settings.request_policy.allow_hosts
    storage = settings.storage_dir.resolve()
    config = ProcessorConfig(
        storage_dir=storage, allow=allow, public_base_url=settings.public_base_url,
        credit_price_cents=settings.credit_price_cents,
        poll_after=timedelta(seconds=settings.upsampler_poll_after_seconds),
        timeout=timedelta(minutes=settings.upsampler_timeout_minutes),
        in_doubt_wait=timedelta(seconds=settings.upsampler_in_doubt_wait_seconds),
        submits_in_flight=settings.upsampler_submits_in_flight,
        submit_retries=settings.upscaler_submit_retries, max_result_bytes=settings.max_result_bytes)
    if settings.upscaler == "local":
        local = LocalUpscaler(storage, allow=allow, max_input_bytes=settings.max_image_bytes,
                              workers=settings.local_upscaler_workers or os.cpu_count() or 1)
        backend = {"local": local}
    else:
        backend = {"remote": UpsamplerClient(settings.upsampler_base_url, settings.upsampler_api_key,
                                             timeout=settings.upsampler_request_timeout_seconds)}
    processor = Processor(table, producer.send, config, clock=clock.now, **backend)
    close_on_stop(app, processor.close)  # its HTTP sessions, and the local backend's worker processes

    add_stage_agents(app, producer, {
        JOBS_PENDING: value_of(processor.on_pending),
        UPSCALER_EVENTS: value_of(processor.on_upscaler_event),
        JOBS_COMMANDS: value_of(processor.on_command),
    }, **settings.stage_batching())

    @app.timer(interval=settings.processor_tick_seconds)
    async def due_retries_and_polls() -> None:
        # Every worker ticks; claim_due hands each due item to one of them.
        try:
            await processor.tick()
        except Exception:
            log.exception("processor tick failed")

    return app, processor
