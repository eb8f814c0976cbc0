"""The job record (design.md, "The job table") and its flat string encoding.

Redis stores every field as a string: integers as decimal, moments as Unix epoch
milliseconds (compact, and directly usable as sorted-set scores inside Lua)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any, Mapping

from pydantic import BaseModel, ConfigDict, PrivateAttr

from schemas.status import JobStatus

INT_FIELDS = frozenset({
    "post_id", "attachment_id", "image_width", "image_height", "price_cents", "cost_cents",
    "credits", "markup_percent", "refund_amount_cents", "attempts", "submit_failures",
})
TIME_FIELDS = frozenset({
    "created_at", "updated_at", "paid_at", "processing_started_at", "completed_at", "failed_at",
    "refunded_at", "download_expires_at", "download_expired_at", "payment_failed_at",
    "abandoned_at", "submit_started_at",
})
# Fields the table manages itself; update() refuses them (status moves only through
# transition(), tokens only through issue_download_token()).
MANAGED_FIELDS = frozenset({
    "job_id", "request_id", "status", "created_at", "updated_at", "download_token_hash", "download_token_hashes",
})
# The job hash records each side effect done as a field "done:<step>" (JobTable.mark_done);
# a read of the job carries them as ``Job.done``, so checking one costs no second read.
DONE_PREFIX = "done:"
# Never shown outside the table's own process: not on topics, not in logs.
SECRET_FIELDS = frozenset({"email", "download_token_hash", "download_token_hashes", "callback_token_hash"})


class Job(BaseModel):
    model_config = ConfigDict(extra="ignore", frozen=True)

    job_id: str
    status: JobStatus
    request_id: str | None = None
    image_url: str
    resolution: str
    email: str | None = None
    post_id: int | None = None
    attachment_id: int | None = None
    image_width: int
    image_height: int
    success_url: str | None = None
    cancel_url: str | None = None
    upsampler_job_id: str | None = None
    callback_token_hash: str | None = None
    # When a submission to Upsampler began and its outcome is not recorded yet: a
    # redelivery finding it set cannot know whether Upsampler took the job.
    submit_started_at: datetime | None = None
    # The upscaler job a callback named, taken by the gateway while the job was still
    # pending (its submission in doubt, or not answered yet): Upsampler has that
    # upscale, so the processor adopts it rather than submit again, even if the
    # callback's event is still queued behind others on upscaler.events.
    callback_upscaler_id: str | None = None
    upscaled_url: str | None = None
    upscaled_file_path: str | None = None
    stripe_checkout_session_id: str | None = None
    checkout_url: str | None = None
    stripe_payment_intent_id: str | None = None
    payment_status: str | None = None
    price_cents: int | None = None
    cost_cents: int | None = None
    credits: int | None = None
    markup_percent: int | None = None
    download_token_hash: str | None = None
    download_expires_at: datetime | None = None
    download_expired_at: datetime | None = None
    paid_at: datetime | None = None
    payment_failed_at: datetime | None = None
    processing_started_at: datetime | None = None
    completed_at: datetime | None = None
    failed_at: datetime | None = None
    failure_reason: str | None = None
    refund_id: str | None = None
    refund_amount_cents: int | None = None
    refunded_at: datetime | None = None
    attempts: int = 0
    submit_failures: int = 0  # transient failures submitting the current attempt
    abandoned_at: datetime | None = None
    created_at: datetime
    updated_at: datetime
    # Not a field of the record: the steps whose side effect happened ("email:ready"),
    # read with it from the fields "done:<step>" (see DONE_PREFIX).
    _done: frozenset[str] = PrivateAttr(default=frozenset())

    @classmethod
    def from_redis(cls, raw: Mapping[Any, Any]) -> "Job":
        job = cls.model_validate(decode_fields(raw))
        names = (k.decode() if isinstance(k, bytes) else k for k in raw)
        done = frozenset(name[len(DONE_PREFIX):] for name in names if name.startswith(DONE_PREFIX))
        if done:
            job._done = done
        return job

    @property
    def done(self) -> frozenset[str]:
        """The steps whose side effect happened (JobTable.mark_done), as read with the job."""
        return self._done

    def public_view(self) -> dict[str, Any]:
        """What anyone holding the job id may see (GET /jobs/{id})."""
        return {"job_id": self.job_id, "status": self.status.value, "resolution": self.resolution,
                "created_at": self.created_at.isoformat()}

    def redacted(self) -> dict[str, Any]:
        """Everything but the secrets, for operators (admin API, CLI, logs)."""
        data = self.model_dump(mode="json", exclude=set(SECRET_FIELDS))
        data["has_email"] = self.email is not None
        return data


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_MS = timedelta(milliseconds=1)


def to_ms(moment: datetime) -> int:
    if moment.tzinfo is None:
        raise ValueError("naive datetime: pass an aware UTC moment")
    # Integer arithmetic: timestamp() * 1000 is a float and loses a millisecond now
    # and then (32.541 s -> 32540 ms), which would break from_ms/to_ms round trips.
    return (moment - _EPOCH) // _ONE_MS


def from_ms(ms: int | str) -> datetime:
    return _EPOCH + timedelta(milliseconds=int(ms))


def encode_value(name: str, value: Any) -> str:
    if name in TIME_FIELDS and isinstance(value, datetime):
        return str(to_ms(value))
    if isinstance(value, bool):
        raise TypeError(f"{name}: booleans are not stored")
    if name in INT_FIELDS:
        if type(value) is not int:
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        return str(value)
    if hasattr(value, "value"):  # enums
        return str(value.value)
    return str(value)


def encode_fields(fields: Mapping[str, Any]) -> dict[str, str]:
    """None means "no value"; callers that want to clear a field pass it to clear=."""
    return {k: encode_value(k, v) for k, v in fields.items() if v is not None}


def decode_fields(raw: Mapping[Any, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in raw.items():
        key = k.decode() if isinstance(k, bytes) else k
        if key.startswith(DONE_PREFIX):
            continue  # a marker, not a field (Job.done)
        val = v.decode() if isinstance(v, bytes) else v
        if key in TIME_FIELDS:
            out[key] = from_ms(val)
        elif key in INT_FIELDS:
            out[key] = int(val)
        else:
            out[key] = val
    return out
