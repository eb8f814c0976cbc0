"""The notifier stage: a thin Faust app that feeds four topics to the plain async
handlers of services/notifier/handlers.py (consumer group ``notifier``)."""

from __future__ import annotations

import faust

from schemas.topics import JOBS_COMMANDS, JOBS_COMPLETED, JOBS_EXPIRING, PAYMENTS_REFUNDS
from services.notifier.handlers import Notifier, NotifierConfig
from smi.clock import Clock
from smi.jobtable import open_table
from smi.kafka.app import attach_producer, create_app
from smi.kafka.handling import RetryPolicy, add_stage_agents, value_of
from smi.kafka.producer import EventProducer
from smi.mailer import Mailer
from smi.settings import Settings

STAGE = "notifier"
# SMTP outages (a server restarting, a relay answering 4xx while it is throttled)
# last minutes rather than seconds: ride them out for roughly 2.5 to 5 minutes
# before the message is dead-lettered.
SMTP_RETRY_POLICY = RetryPolicy(retries=10, backoff=1.0, max_backoff=60.0)


def build(settings: Settings, **app_overrides) -> tuple[faust.App, Notifier]:
    app = create_app(STAGE, settings, **app_overrides)
    producer = attach_producer(app, EventProducer.from_settings(settings, client_id=STAGE))
    clock = Clock.from_env()  # one clock per process; tests can move it
    table = open_table(settings, clock=clock.now)
    notifier = Notifier(table, Mailer.from_url(settings.smtp_url, connections=settings.smtp_connections), NotifierConfig.from_settings(settings),
                        clock=clock.now)

    add_stage_agents(app, producer, {
        JOBS_COMPLETED: value_of(notifier.on_completed),
        PAYMENTS_REFUNDS: value_of(notifier.on_refund),
        JOBS_EXPIRING: value_of(notifier.on_expiring),
        JOBS_COMMANDS: notifier.on_command,
    }, **settings.stage_batching(),
        policy=SMTP_RETRY_POLICY)
    return app, notifier
