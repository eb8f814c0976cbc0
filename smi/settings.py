"""Configuration from the environment (design.md, "Configuration"). Every variable
has a local default so `make run` works on a fresh machine; secrets come only from
the environment (the local defaults are test-mode values, useless in production)."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict
from ipaddress import IPv4Network, IPv6Network, ip_network
from typing import Annotated

from schemas.money import MARKUP_RANGE
from schemas.requests import DEFAULT_RESOLUTIONS, RequestPolicy
from schemas.urls import HostAllowList
from smi.kafka.names import KafkaNames, check_namespace

# The gateway serves /metrics on its own port; 9105 is its workers' own ports, used
# only while they share the gateway port (GATEWAY_REUSE_PORT).
STAGE_METRICS_PORTS = {"checkout": 9101, "processor": 9102, "notifier": 9103, "janitor": 9104, "gateway": 9105}
METRICS_WORKER_PORT_STEP = 100  # checkout's second worker on 9201, its third on 9301


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    kafka_bootstrap_servers: str = "127.0.0.1:9092"
    # In front of every topic and consumer group (smi/kafka/names.py).
    kafka_namespace: str = ""
    redis_url: str = "redis://127.0.0.1:6379/0"
    # A comma-separated list of host:port seeds turns on Redis Cluster mode.
    redis_cluster_nodes: str = ""
    redis_shards: int = Field(16, ge=1, le=1024)
    redis_namespace: str = ""

    payments: Literal["stripe", "local"] = "stripe"
    stripe_api_key: str = "sk_test_123"  # stripe-mock accepts any test key
    stripe_api_base: str = "http://127.0.0.1:12111"
    stripe_webhook_secret: str = "whsec_local_development_only"

    upscaler: Literal["local", "upsampler"] = "local"
    upsampler_api_key: str = ""
    upsampler_base_url: str = "https://upsampler.com/api/v1"

    # Processor: a job without a callback is polled after this long, and failed with
    # reason upsampler_timeout once it has been processing for the timeout.
    upsampler_poll_after_seconds: float = Field(120, gt=0)
    upsampler_timeout_minutes: float = Field(30, gt=0)
    # A submission cut off by a crash before its answer was recorded: how long the
    # job waits for a callback from it (Upsampler may have taken it) before it is
    # submitted again, a second paid upscale if the first did reach Upsampler.
    upsampler_in_doubt_wait_seconds: float = Field(120, gt=0)
    # One request to Upsampler; a submit not answered in time is in doubt, as above.
    upsampler_request_timeout_seconds: float = Field(30, gt=0, le=600)
    # Submissions to Upsampler in flight at once (each marked in doubt before it
    # leaves; see services/processor/handlers.py, ProcessorConfig.submits_in_flight).
    upsampler_submits_in_flight: int = Field(100, ge=1, le=10_000)
    upscaler_submit_retries: int = Field(6, ge=0)
    processor_tick_seconds: float = Field(5, gt=0)
    # Processes of the local upscaler's Pillow pool; 0 = one per CPU core.
    local_upscaler_workers: int = Field(0, ge=0, le=64)
    max_image_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    max_result_bytes: int = Field(200 * 1024 * 1024, ge=1024)

    smtp_url: str = "smtp://127.0.0.1:2525"
    mail_from: str = "Sell My Images <shop@localhost>"
    shop_name: str = "Sell My Images"
    reply_to: str = ""
    admin_email: str = ""

    gateway_host: str = "127.0.0.1"
    gateway_port: int = Field(8080, ge=0, le=65535)
    # Several gateway processes listen on the one port (SO_REUSEPORT; the kernel
    # spreads connections): `smi run all --workers gateway=N` sets it.
    gateway_reuse_port: bool = False
    public_base_url: str = "http://127.0.0.1:8080"
    storage_dir: Path = Path("var/storage")
    admin_token: str = ""
    url_allow_hosts: Annotated[list[str], NoDecode] = Field(default_factory=list)
    # Load balancers and proxies in front of the gateway (CIDRs): a request from one
    # is counted against the client X-Forwarded-For names, not against the proxy.
    trusted_proxies: Annotated[list[IPv4Network | IPv6Network], NoDecode] = Field(default_factory=list)

    allowed_resolutions: Annotated[list[str], NoDecode] = Field(default_factory=lambda: list(DEFAULT_RESOLUTIONS))
    download_ttl_hours: int = Field(24, ge=1, le=168)
    expiry_warning_hours: int = Field(4, ge=0, le=168)
    payment_timeout_minutes: int = Field(60, ge=1)
    janitor_interval_seconds: float = Field(30, gt=0)
    failed_retention_days: int = Field(7, ge=0)
    pii_retention_days: int = Field(0, ge=0)  # 0 = keep customer emails
    markup_percent: int = Field(500, ge=MARKUP_RANGE[0], le=MARKUP_RANGE[1])
    credit_price_cents: int = Field(4, ge=0)

    metrics_port: int | None = Field(None, ge=0, le=65535)
    # Which of a stage's processes this is (`smi run all --workers` sets it): worker N
    # serves its metrics METRICS_WORKER_PORT_STEP * (N - 1) above the stage's port.
    worker_number: int = Field(1, ge=1, le=1000)
    metrics_host: str = "127.0.0.1"  # 0.0.0.0 inside a container
    # How long the group waits for a silent (e.g. SIGKILLed) worker before handing its
    # partitions to the others; heartbeats go every third of it.
    kafka_session_timeout_seconds: float = Field(30, ge=6, le=300)
    # Messages a stage agent handles at once (concurrently, one job's in order) and
    # acks together; and how many SMTP connections the notifier opens at once.
    stage_batch_size: int = Field(256, ge=1, le=10_000)
    # Batches an agent has in hand at once: a second fills the first's round trips.
    stage_batches_in_flight: int = Field(2, ge=1, le=16)
    # ... and how old the batch in hand is when it stops holding back the next
    # though no whole batch waits (0: it holds it back until a whole batch waits).
    stage_second_batch_after_ms: int = Field(10, ge=0, le=60_000)
    smtp_connections: int = Field(8, ge=1, le=256)
    topic_partitions: int = Field(6, ge=1)
    topic_replication: int = Field(1, ge=1)
    max_message_bytes: int = Field(1024 * 1024, ge=1024)
    log_format: Literal["text", "json"] = "text"
    # The stages' asyncio event loop: uvloop (libuv) costs less CPU per message than
    # the standard library's; "asyncio" is there to compare, or where uvloop is absent.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"

    @field_validator("url_allow_hosts", "allowed_resolutions", mode="before")
    @classmethod
    def _comma_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [item.strip() for item in value.split(",") if item.strip()]
        return value

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        if isinstance(value, str):
            value = [item.strip() for item in value.split(",") if item.strip()]
        if not isinstance(value, list):
            return value
        try:
            return [item if isinstance(item, (IPv4Network, IPv6Network)) else ip_network(item) for item in value]
        except ValueError as exc:  # "10.0.0.1/8 has host bits set", "'proxy' does not appear to be ..."
            raise ValueError(f"TRUSTED_PROXIES takes addresses and networks (CIDR), comma-separated: {exc}") from None

    @field_validator("allowed_resolutions")
    @classmethod
    def _resolutions(cls, value: list[str]) -> list[str]:
        for item in value:
            if not (item.endswith("x") and item[:-1].isdigit() and int(item[:-1]) >= 1):
                raise ValueError(f"resolution {item!r} must look like '4x'")
        if not value:
            raise ValueError("at least one resolution must be offered")
        return value

    @field_validator("kafka_namespace")
    @classmethod
    def _kafka_namespace(cls, value: str) -> str:
        return check_namespace(value)

    @field_validator("smtp_url")
    @classmethod
    def _smtp(cls, value: str) -> str:
        if not value.startswith(("smtp://", "smtps://")):
            raise ValueError("SMTP_URL must start with smtp:// or smtps://")
        return value

    @property
    def checkout_session_ttl_minutes(self) -> int:
        """With PAYMENTS=stripe, expires_at is held within Stripe's 30 min to 24 h
        window; the local provider takes any value of at least one minute."""
        if self.payments == "stripe":
            return min(max(self.payment_timeout_minutes, 30), 24 * 60)
        return self.payment_timeout_minutes

    @property
    def kafka_names(self) -> KafkaNames:
        return KafkaNames(self.kafka_namespace)

    @property
    def request_policy(self) -> RequestPolicy:
        return RequestPolicy(tuple(self.allowed_resolutions), HostAllowList.parse(self.url_allow_hosts))

    def stage_batching(self) -> dict[str, Any]:
        """How a stage agent takes its batches (smi.kafka.handling.add_stage_agents)."""
        return {"batch_size": self.stage_batch_size, "batches_in_flight": self.stage_batches_in_flight,
                "second_batch_after": self.stage_second_batch_after_ms / 1000 or None}

    def metrics_port_for(self, stage: str) -> int:
        """The stage's metrics port (0: a free one), its later workers' stepped up
        from it, so each worker has a port a scrape configuration can name."""
        base = self.metrics_port if self.metrics_port is not None else STAGE_METRICS_PORTS.get(stage, 0)
        if base == 0:
            return 0
        port = base + METRICS_WORKER_PORT_STEP * (self.worker_number - 1)
        return port if port <= 65535 else 0


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    return Settings()
