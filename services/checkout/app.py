"""The checkout stage: a thin Faust app that feeds three topics to the plain async
handlers of services/checkout/handlers.py (consumer group ``checkout``)."""

from __future__ import annotations

import faust

from schemas.topics import JOBS_FAILED, JOBS_REQUESTED, PAYMENTS_EVENTS
from services.checkout.handlers import Checkout, Source
from smi.clock import Clock
from smi.jobtable import open_table
from smi.kafka.app import attach_producer, create_app
from smi.kafka.handling import SourceMessage, add_stage_agents, value_of
from smi.kafka.producer import EventProducer
from smi.payments import payments_for
from smi.settings import Settings

STAGE = "checkout"


def build(settings: Settings, **app_overrides) -> tuple[faust.App, Checkout]:
    app = create_app(STAGE, settings, **app_overrides)
    producer = attach_producer(app, EventProducer.from_settings(settings, client_id=STAGE))
    clock = Clock.from_env()  # one clock per process; tests can move it
    table = open_table(settings, clock=clock.now)
    checkout = Checkout(table, payments_for(settings), producer.send, policy=settings.request_policy,
                        markup_percent=settings.markup_percent, credit_price_cents=settings.credit_price_cents,
                        clock=clock.now)

    async def job_requested(message: SourceMessage) -> None:
        await checkout.on_job_request(message.value, Source(message.topic, message.partition, message.offset))

    add_stage_agents(app, producer, {
        JOBS_REQUESTED: job_requested,
        PAYMENTS_EVENTS: value_of(checkout.on_payment_event),
        JOBS_FAILED: value_of(checkout.on_job_failed),
    }, **settings.stage_batching())
    return app, checkout
