"""Message envelopes of the status topics (design.md, "Topics")."""

from __future__ import annotations

import hashlib
import uuid
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StringConstraints, field_serializer, field_validator

# Fixed namespace: event ids must be the same in every process and every release.
EVENT_NAMESPACE = uuid.UUID("7c1e3a52-4b1f-5d0e-9a57-3f0f6c2b8e11")

JobId = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")]


def utcnow() -> datetime:
    return datetime.now(UTC)


def rfc3339(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_NAMESPACE_BYTES = EVENT_NAMESPACE.bytes


def make_event_id(job_id: str, event_type: str, attempt: int | str = 0) -> str:
    """Deterministic: the same job, transition and attempt always give the same id,
    so an event produced again after a crash or redelivery is recognisably a repeat.

    It is ``str(uuid.uuid5(EVENT_NAMESPACE, "<job>/<type>/<attempt>"))`` computed
    without the UUID object (a third of the cost; several ids are made per job):
    SHA-1 of namespace and name, version 5 and RFC 4122 variant bits set."""
    digest = bytearray(hashlib.sha1(_NAMESPACE_BYTES + f"{job_id}/{event_type}/{attempt}".encode()).digest()[:16])
    digest[6] = (digest[6] & 0x0F) | 0x50
    digest[8] = (digest[8] & 0x3F) | 0x80
    h = digest.hex()
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


class JobEvent(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    event_id: str
    type: str
    job_id: JobId
    occurred_at: datetime
    version: Literal[1] = 1
    data: dict[str, Any] = Field(default_factory=dict)

    @field_validator("occurred_at")
    @classmethod
    def _aware(cls, value: datetime) -> datetime:
        if value.tzinfo is None:
            raise ValueError("occurred_at must carry a timezone (RFC 3339)")
        # Held at the wire's precision (milliseconds), so an event equals its own
        # JSON round trip and every consumer sees the moment the producer saw.
        value = value.astimezone(UTC)
        return value.replace(microsecond=value.microsecond - value.microsecond % 1000)

    @field_serializer("occurred_at")
    def _ser_time(self, value: datetime) -> str:
        return rfc3339(value)

    @classmethod
    def new(cls, event_type: str, job_id: str, *, attempt: int | str = 0, data: dict[str, Any] | None = None,
            occurred_at: datetime | None = None) -> "JobEvent":
        return cls(event_id=make_event_id(job_id, event_type, attempt), type=event_type, job_id=job_id,
                   occurred_at=occurred_at or utcnow(), data=data or {})


class Command(BaseModel):
    """An operator's request on ``jobs.commands``."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    command: Literal["retry", "resend_download"]
    job_id: JobId
    requested_by: Annotated[str, StringConstraints(min_length=1, max_length=200)]
    force: StrictBool = False


class DeadLetter(BaseModel):
    """What a stage could not handle, with enough to replay it by hand."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    source_topic: str
    partition: int | None
    offset: int | None
    key: str | None
    value: str | None  # the raw value, decoded with replacement characters if needed
    error: str
    stage: str
    occurred_at: datetime = Field(default_factory=utcnow)

    @field_serializer("occurred_at")
    def _ser_time(self, value: datetime) -> str:
        return rfc3339(value)


UpscalerStatus = Literal["IN_QUEUE", "IN_PROGRESS", "SUCCESS", "FAILED"]


class UpscalerEvent(BaseModel):
    """An Upsampler callback body (or the local upscaler's equivalent) plus job_id."""

    model_config = ConfigDict(extra="allow", frozen=True, populate_by_name=True)

    job_id: JobId
    id: str
    status: UpscalerStatus
    credit_cost: float | None = Field(default=None, alias="creditCost")
    image_url: str | None = Field(default=None, alias="imageUrl")
    compressed_image_url: str | None = Field(default=None, alias="compressedImageUrl")
    error: str | None = None
