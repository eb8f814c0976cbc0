"""JobRequest: what upstream systems publish on ``jobs.requested`` (design.md).

Validation needs two settings (the allowed resolutions and the URL allow-list);
they arrive through pydantic's validation context so the model stays I/O-free:
``parse_job_request(raw, RequestPolicy(...))``."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Annotated, Any, TypeVar

import email_validator
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, ValidationError, ValidationInfo, field_validator
from pydantic.networks import validate_email

from schemas.money import resolution_factor
from schemas.urls import NO_EXEMPTIONS, HostAllowList, UnsafeURL, check_browser_url, check_url

MAX_URL_LENGTH = 2048
MAX_DIMENSION = 65_535  # the largest side JPEG/PNG/WebP encoders accept in practice
DEFAULT_RESOLUTIONS = ("2x", "4x", "8x")


# email-validator costs tens of microseconds an address, a tenth of a request's CPU
# in checkout. The plain ASCII dot-atom form nearly every address has is checked
# here by a pattern, normalized as email-validator does (domain lower-cased);
# anything else (Unicode, quoted local parts, "Name <addr>", "--" in a label, a
# top-level domain that does not start and end with a letter, a special-use
# domain) goes to pydantic's EmailStr check as before.
# tests/unit/test_job_request.py checks that what the pattern takes, email-validator
# takes too, with the same result.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_LABEL = r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_PLAIN_EMAIL = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@(?:{_LABEL}\.)+[A-Za-z](?:[A-Za-z0-9-]{{0,61}}[A-Za-z])?")
_SPECIAL_USE_DOMAINS = tuple(email_validator.SPECIAL_USE_DOMAIN_NAMES)


def plain_email(value: str) -> str | None:
    """The normalized address if ``value`` is a plain ASCII address, else None."""
    if len(value) > 254 or not _PLAIN_EMAIL.fullmatch(value):
        return None
    local, _, domain = value.rpartition("@")
    domain = domain.lower()
    if len(local) > 64 or len(domain) > 253 or "--" in domain:
        return None
    if any(domain == name or domain.endswith("." + name) for name in _SPECIAL_USE_DOMAINS):
        return None
    return f"{local}@{domain}"


def check_email(value: str) -> str:
    return plain_email(value) or validate_email(value)[1]


@dataclass(frozen=True)
class RequestPolicy:
    resolutions: tuple[str, ...] = DEFAULT_RESOLUTIONS
    allow_hosts: HostAllowList = field(default=NO_EXEMPTIONS)


def _policy(info: ValidationInfo) -> RequestPolicy:
    ctx = info.context or {}
    return ctx.get("policy", RequestPolicy())


class JobRequest(BaseModel):
    # Unknown fields are ignored so an upstream may add fields without every request
    # being dead-lettered; every known field is strictly typed ("100" is not 100).
    model_config = ConfigDict(extra="ignore", frozen=True, str_strip_whitespace=True)

    request_id: Annotated[str, Field(min_length=1, max_length=128, pattern=r"^[\x21-\x7e]+$")] | None = None
    image_url: Annotated[str, Field(min_length=1, max_length=MAX_URL_LENGTH)]
    resolution: str
    email: Annotated[str, AfterValidator(check_email)]
    post_id: Annotated[StrictInt, Field(ge=1)]
    attachment_id: Annotated[StrictInt, Field(ge=1)] | None = None
    image_width: Annotated[StrictInt, Field(ge=1, le=MAX_DIMENSION)]
    image_height: Annotated[StrictInt, Field(ge=1, le=MAX_DIMENSION)]
    success_url: Annotated[str, Field(max_length=MAX_URL_LENGTH)] | None = None
    cancel_url: Annotated[str, Field(max_length=MAX_URL_LENGTH)] | None = None

    @field_validator("image_url")
    @classmethod
    def _public_image_url(cls, value: str, info: ValidationInfo) -> str:
        try:
            check_url(value, _policy(info).allow_hosts)
        except UnsafeURL as exc:
            raise ValueError(str(exc)) from None
        return value

    @field_validator("success_url", "cancel_url")
    @classmethod
    def _browser_url(cls, value: str | None) -> str | None:
        # The customer's browser follows these, not our servers: scheme and host only
        # (a shop on localhost is a valid development setup).
        if value is not None:
            try:
                check_browser_url(value)
            except UnsafeURL as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("resolution")
    @classmethod
    def _offered_resolution(cls, value: str, info: ValidationInfo) -> str:
        allowed = _policy(info).resolutions
        if value not in allowed:
            raise ValueError(f"resolution must be one of {', '.join(allowed)}")
        resolution_factor(value)
        return value

    @property
    def factor(self) -> int:
        return resolution_factor(self.resolution)


class InvalidMessage(ValueError):
    """A message that cannot be parsed or validated; ``reason`` goes to the dead letter."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def describe_validation_error(exc: ValidationError) -> str:
    """A compact, human-readable reason that never echoes input values (they may
    hold an email address, which must not reach topics or logs)."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        where = ".".join(str(p) for p in err["loc"]) or "message"
        parts.append(f"{where}: {err['msg']}")
    return "; ".join(parts)


def decode_json_object(raw: bytes | str, *, max_bytes: int) -> dict[str, Any]:
    """Bytes -> dict, with the reasons a dead letter needs (size, UTF-8, JSON, shape)."""
    if isinstance(raw, str):
        raw = raw.encode("utf-8", "surrogatepass")
    if raw is None:
        raise InvalidMessage("empty message (tombstone)")
    if len(raw) > max_bytes:
        raise InvalidMessage(f"message of {len(raw)} bytes exceeds the limit of {max_bytes}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidMessage(f"not UTF-8: {exc.reason} at byte {exc.start}") from None
    try:
        value = json.loads(text)
    except RecursionError:
        raise InvalidMessage("JSON nested too deeply") from None
    except json.JSONDecodeError as exc:
        raise InvalidMessage(f"not JSON: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    if not isinstance(value, dict):
        raise InvalidMessage(f"expected a JSON object, got {type(value).__name__}")
    return value


M = TypeVar("M", bound=BaseModel)

# The largest event a stage takes from a topic (Stripe's bodies included).
MAX_EVENT_BYTES = 1024 * 1024


def parse_message(model: type[M], raw: bytes | str | None, *, what: str | None = None,
                  max_bytes: int = MAX_EVENT_BYTES) -> M:
    """A stage's input message as ``model``, or InvalidMessage with the reason (a
    dead letter's): decode_json_object's, or which fields are wrong, never their values."""
    try:
        return model.model_validate(decode_json_object(raw, max_bytes=max_bytes))
    except ValidationError as exc:
        raise InvalidMessage(f"not a {what or model.__name__}: {describe_validation_error(exc)}") from None


MAX_REQUEST_BYTES = 64 * 1024


def parse_job_request(raw: bytes | str | dict, policy: RequestPolicy = RequestPolicy()) -> JobRequest:
    data = raw if isinstance(raw, dict) else decode_json_object(raw, max_bytes=MAX_REQUEST_BYTES)
    try:
        return JobRequest.model_validate(data, context={"policy": policy})
    except ValidationError as exc:
        raise InvalidMessage(describe_validation_error(exc)) from None
