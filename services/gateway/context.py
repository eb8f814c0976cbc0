"""What the gateway's handlers share: settings, the job table, the Kafka producer,
metrics and an HTTP client. One instance per gateway process."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from smi.jobtable import JobTable
from smi.kafka.producer import EventProducer
from smi.settings import Settings


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.webhooks = Counter("smi_gateway_webhooks_total", "Webhook requests by source and outcome",
                                ["source", "outcome"], registry=self.registry)
        # Callbacks that came while their job was pending, and whether the upscaler id
        # they name was written to the job for the processor to adopt.
        self.callbacks_recorded = Counter(
            "smi_gateway_callbacks_recorded_total", "Upsampler callbacks taken for a pending job, by what became "
            "of the upscaler id they name (recorded, moved_on, unreadable, error)", ["result"],
            registry=self.registry)
        # 404s and 429s climbing together: someone is guessing download links.
        self.downloads = Counter("smi_gateway_downloads_total", "Download requests by the status answered "
                                 "(200 also stands for a 206 to a Range request)", ["status"], registry=self.registry)


@dataclass
class GatewayContext:
    settings: Settings
    table: JobTable
    producer: EventProducer
    metrics: GatewayMetrics = field(default_factory=GatewayMetrics)
    http: aiohttp.ClientSession | None = None
    self_url: str = ""  # where this gateway listens, for the local pay page's own webhook
    background: list[asyncio.Task] = field(default_factory=list)


CONTEXT = web.AppKey("smi_gateway", GatewayContext)
