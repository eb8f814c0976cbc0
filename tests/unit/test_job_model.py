"""The job record and its flat Redis encoding (design.md, "The job table")."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import pytest
from hypothesis import given
from hypothesis import strategies as st

from schemas.job import (
    INT_FIELDS,
    SECRET_FIELDS,
    TIME_FIELDS,
    Job,
    decode_fields,
    encode_fields,
    encode_value,
    from_ms,
    to_ms,
)
from schemas.status import JobStatus

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
EMAIL = "jane.customer@example.com"
TOKEN_HASH = "9b74c9897bac770ffc029102a200c5de5a3a1d7b0d6c5e1c4f1e2d3c4b5a6978"
T0 = datetime(2025, 1, 2, 3, 4, 5, 678000, tzinfo=UTC)  # 1735787045678 ms


def full_job_fields() -> dict:
    return {
        "job_id": JOB_ID,
        "status": JobStatus.COMPLETED,
        "request_id": "wp-42-7-4x",
        "image_url": "https://images.example.com/photo.jpg",
        "resolution": "4x",
        "email": EMAIL,
        "post_id": 42,
        "attachment_id": 7,
        "image_width": 2000,
        "image_height": 2000,
        "success_url": "https://shop.example.com/thanks",
        "cancel_url": "https://shop.example.com/cancel",
        "upsampler_job_id": "up-123",
        "callback_token_hash": "c" * 64,
        "upscaled_url": "https://results.example.com/up-123.png",
        "upscaled_file_path": "var/storage/3f/3f1c2a9e.png",
        "stripe_checkout_session_id": "cs_test_abc",
        "checkout_url": "https://checkout.stripe.com/c/pay/cs_test_abc",
        "stripe_payment_intent_id": "pi_abc",
        "payment_status": "paid",
        "price_cents": 384,
        "cost_cents": 64,
        "credits": 16,
        "markup_percent": 500,
        "download_token_hash": TOKEN_HASH,
        "download_expires_at": T0 + timedelta(hours=24),
        "paid_at": T0 + timedelta(minutes=2),
        "processing_started_at": T0 + timedelta(minutes=3),
        "completed_at": T0 + timedelta(minutes=4),
        "attempts": 1,
        "created_at": T0,
        "updated_at": T0 + timedelta(minutes=4),
    }


def as_redis(fields: dict[str, str]) -> dict[bytes, bytes]:
    """What HGETALL returns without decode_responses."""
    return {k.encode(): v.encode() for k, v in fields.items()}


def test_round_trip_through_redis_encoding():
    job = Job(**full_job_fields())
    encoded = encode_fields(job.model_dump())
    assert all(isinstance(k, str) and isinstance(v, str) for k, v in encoded.items())
    again = Job.from_redis(as_redis(encoded))
    assert again == job


def test_round_trip_with_str_keys_too():
    job = Job(**full_job_fields())
    assert Job.from_redis(encode_fields(job.model_dump())) == job


def test_none_fields_are_not_stored():
    job = Job(**full_job_fields())
    encoded = encode_fields(job.model_dump())
    assert "failure_reason" not in encoded
    assert "refund_id" not in encoded
    assert "failed_at" not in encoded


def test_time_fields_are_epoch_milliseconds():
    encoded = encode_fields({"created_at": T0, "paid_at": T0 + timedelta(seconds=1)})
    assert encoded == {"created_at": "1735787045678", "paid_at": "1735787046678"}
    assert from_ms("1735787045678") == T0
    assert from_ms(1735787045678) == T0
    assert from_ms("0") == datetime(1970, 1, 1, tzinfo=UTC)
    assert to_ms(T0) == 1735787045678


def test_time_fields_decode_to_aware_utc():
    job = Job.from_redis(as_redis(encode_fields(full_job_fields())))
    for name in TIME_FIELDS:
        value = getattr(job, name, None)
        if value is not None:
            assert value.utcoffset() == timedelta(0), name
    assert job.created_at == T0


def test_naive_time_refused():
    with pytest.raises(ValueError):
        to_ms(datetime(2025, 1, 1))
    with pytest.raises(ValueError):
        encode_fields({"created_at": datetime(2025, 1, 1)})


def test_status_is_stored_as_its_value():
    assert encode_value("status", JobStatus.AWAITING_PAYMENT) == "awaiting_payment"
    job = Job.from_redis(as_redis(encode_fields({**full_job_fields(), "status": JobStatus.AWAITING_PAYMENT})))
    assert job.status is JobStatus.AWAITING_PAYMENT


@pytest.mark.parametrize("name", sorted(INT_FIELDS))
@pytest.mark.parametrize("bad", ["384", 3.84, 384.0, True, False])
def test_int_fields_are_strict_on_the_way_in(name, bad):
    with pytest.raises(TypeError):
        encode_value(name, bad)


@pytest.mark.parametrize("name", sorted(INT_FIELDS))
def test_int_fields_decode_to_int(name):
    decoded = decode_fields({name.encode(): b"12"})
    assert decoded[name] == 12
    assert type(decoded[name]) is int


@pytest.mark.parametrize("bad", [b"3.84", b"abc", b""])
def test_int_fields_refuse_garbage_on_the_way_out(bad):
    with pytest.raises(ValueError):
        decode_fields({b"price_cents": bad})


def test_booleans_are_never_stored():
    with pytest.raises(TypeError):
        encode_value("payment_status", True)


def test_unknown_stored_fields_are_ignored_by_the_model():
    raw = as_redis(encode_fields(full_job_fields())) | {b"download_token_hashes": b"a,b", b"some_future_field": b"x"}
    assert Job.from_redis(raw).job_id == JOB_ID


@given(st.integers(min_value=0, max_value=4_102_444_800_000))  # up to 2100
def test_ms_round_trip(ms):
    assert to_ms(from_ms(ms)) == ms


def test_public_view_has_exactly_four_fields():
    view = Job(**full_job_fields()).public_view()
    assert set(view) == {"job_id", "status", "resolution", "created_at"}
    assert view["job_id"] == JOB_ID
    assert view["status"] == "completed"
    assert view["resolution"] == "4x"
    assert datetime.fromisoformat(view["created_at"]) == T0
    json.dumps(view)  # serialisable as it is


def test_redacted_has_no_secrets():
    job = Job(**full_job_fields())
    data = job.redacted()
    assert "email" not in data
    assert "download_token_hash" not in data
    assert "callback_token_hash" not in data
    assert not SECRET_FIELDS & set(data)
    text = json.dumps(data)
    assert EMAIL not in text
    assert TOKEN_HASH not in text
    assert "c" * 64 not in text
    assert data["has_email"] is True
    assert data["job_id"] == JOB_ID
    assert data["price_cents"] == 384
    assert data["status"] == "completed"


def test_redacted_without_email():
    fields = full_job_fields()
    fields["email"] = None
    assert Job(**fields).redacted()["has_email"] is False


def test_secret_fields():
    assert {"email", "download_token_hash"} <= SECRET_FIELDS
