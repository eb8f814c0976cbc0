"""Message envelopes (design.md, "Topics"): JobEvent, Command, DeadLetter, the
Upsampler callback body and the Stripe event object."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta, timezone

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from schemas.events import EVENT_NAMESPACE, Command, DeadLetter, JobEvent, UpscalerEvent, make_event_id, rfc3339
from schemas.stripe_events import HANDLED_TYPES, SOURCE, StripeEvent

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"  # a UUIDv4


# --- event ids -------------------------------------------------------------------

def test_event_id_is_deterministic():
    assert make_event_id(JOB_ID, "completed", 0) == make_event_id(JOB_ID, "completed", 0)
    assert make_event_id(JOB_ID, "completed") == make_event_id(JOB_ID, "completed", 0)


def test_event_id_is_stable_across_releases():
    # Pinned: a change of namespace or name format would make a redelivered event
    # produced by a new release look new to consumers running the old one.
    assert make_event_id(JOB_ID, "completed", 0) == "566067d8-9f03-5f05-b3b6-a9485580a74a"
    assert make_event_id(JOB_ID, "completed", 1) == "a0ed42b0-2471-54df-81be-72451b2d440f"


def test_event_id_differs_by_attempt_type_and_job():
    ids = {
        make_event_id(JOB_ID, "completed", 0),
        make_event_id(JOB_ID, "completed", 1),
        make_event_id(JOB_ID, "failed", 0),
        make_event_id(str(uuid.uuid4()), "completed", 0),
    }
    assert len(ids) == 4


def test_event_id_is_a_uuid5():
    parsed = uuid.UUID(make_event_id(JOB_ID, "pending", 3))
    assert parsed.version == 5
    assert str(parsed) == make_event_id(JOB_ID, "pending", 3)


@given(st.uuids(version=4).map(str), st.sampled_from(["pending", "processing", "completed", "failed"]),
       st.integers(min_value=0, max_value=10_000))
def test_event_id_properties(job_id, event_type, attempt):
    a = make_event_id(job_id, event_type, attempt)
    assert a == make_event_id(job_id, event_type, attempt)
    assert a != make_event_id(job_id, event_type, attempt + 1)
    assert uuid.UUID(a).version == 5


# --- JobEvent ----------------------------------------------------------------------

def test_new_event_fields():
    moment = datetime(2025, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    e = JobEvent.new("completed", JOB_ID, attempt=2, data={"price_cents": 384}, occurred_at=moment)
    assert e.type == "completed"
    assert e.job_id == JOB_ID
    assert e.event_id == make_event_id(JOB_ID, "completed", 2)
    assert e.version == 1
    assert e.data == {"price_cents": 384}
    assert e.occurred_at == moment


def test_new_event_defaults_to_now_in_utc():
    before = datetime.now(UTC) - timedelta(seconds=1)
    e = JobEvent.new("pending", JOB_ID)
    assert e.data == {}
    assert e.occurred_at.tzinfo is not None
    assert e.occurred_at.utcoffset() == timedelta(0)
    assert before <= e.occurred_at <= datetime.now(UTC)


def test_json_round_trip_equals_original():
    e = JobEvent.new("awaiting_payment", JOB_ID, data={
        "request_id": "r-1", "checkout_url": "https://checkout.stripe.com/c/pay/cs_test_a1",
        "checkout_session_id": "cs_test_a1", "price_cents": 384})
    wire = e.model_dump_json()
    again = JobEvent.model_validate_json(wire)
    assert again == e
    assert again.model_dump_json() == wire


@given(st.datetimes(min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)),
       st.dictionaries(st.text(max_size=10), st.one_of(st.integers(), st.text(max_size=20), st.booleans(), st.none())))
def test_json_round_trip_property(moment, data):
    e = JobEvent.new("failed", JOB_ID, data=data, occurred_at=moment)
    assert JobEvent.model_validate_json(e.model_dump_json()) == e
    assert abs(e.occurred_at - moment) < timedelta(milliseconds=1)


def test_occurred_at_is_rfc3339_utc_with_z():
    moment = datetime(2025, 3, 4, 7, 6, 7, 891000, tzinfo=timezone(timedelta(hours=2)))
    wire = json.loads(JobEvent.new("pending", JOB_ID, occurred_at=moment).model_dump_json())
    assert wire["occurred_at"] == "2025-03-04T05:06:07.891Z"
    assert set(wire) == {"event_id", "type", "job_id", "occurred_at", "version", "data"}
    assert wire["version"] == 1


def test_rfc3339_helper():
    assert rfc3339(datetime(2025, 1, 1, tzinfo=UTC)) == "2025-01-01T00:00:00.000Z"
    assert rfc3339(datetime(2025, 1, 1, 1, tzinfo=timezone(timedelta(hours=1)))) == "2025-01-01T00:00:00.000Z"


def _wire(**changes) -> dict:
    data = {"event_id": make_event_id(JOB_ID, "pending", 0), "type": "pending", "job_id": JOB_ID,
            "occurred_at": "2025-03-04T05:06:07.891Z", "version": 1, "data": {}}
    data.update(changes)
    return data


def test_parses_z_and_offsets():
    assert JobEvent.model_validate(_wire()).occurred_at == datetime(2025, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    e = JobEvent.model_validate(_wire(occurred_at="2025-03-04T07:06:07.891+02:00"))
    assert e.occurred_at == datetime(2025, 3, 4, 5, 6, 7, 891000, tzinfo=UTC)
    assert e.occurred_at.utcoffset() == timedelta(0)


def test_naive_datetimes_rejected():
    with pytest.raises(ValidationError, match="timezone"):
        JobEvent.new("pending", JOB_ID, occurred_at=datetime(2025, 1, 1, 12, 0))
    with pytest.raises(ValidationError):
        JobEvent.model_validate(_wire(occurred_at="2025-03-04T05:06:07.891"))


@pytest.mark.parametrize("version", [0, 2, "1", None])
def test_version_must_be_1(version):
    with pytest.raises(ValidationError):
        JobEvent.model_validate(_wire(version=version))


def test_version_defaults_to_1():
    wire = _wire()
    del wire["version"]
    assert JobEvent.model_validate(wire).version == 1


@pytest.mark.parametrize("job_id", [
    "not-a-uuid", "", "3F1C2A9E-8D4B-4C6A-9F2E-1B7D5E0A4C3D",  # upper case
    "3f1c2a9e-8d4b-1c6a-9f2e-1b7d5e0a4c3d",  # version 1
    "3f1c2a9e-8d4b-4c6a-cf2e-1b7d5e0a4c3d",  # wrong variant
    "3f1c2a9e8d4b4c6a9f2e1b7d5e0a4c3d",  # no dashes
    " 3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d", "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d\n", 42,
])
def test_invalid_job_ids_rejected(job_id):
    with pytest.raises(ValidationError):
        JobEvent.model_validate(_wire(job_id=job_id))


def test_unknown_envelope_fields_rejected():
    with pytest.raises(ValidationError):
        JobEvent.model_validate(_wire(email="customer@example.com"))


def test_events_are_frozen():
    e = JobEvent.new("pending", JOB_ID)
    with pytest.raises(ValidationError):
        e.type = "completed"


# --- Command -----------------------------------------------------------------------

@pytest.mark.parametrize("command", ["retry", "resend_download"])
def test_commands_accepted(command):
    c = Command.model_validate_json(json.dumps({"command": command, "job_id": JOB_ID, "requested_by": "cli:alice"}))
    assert c.command == command
    assert c.force is False


@pytest.mark.parametrize("command", ["refund", "delete", "RETRY", "resend", "", None])
def test_other_commands_rejected(command):
    with pytest.raises(ValidationError):
        Command(command=command, job_id=JOB_ID, requested_by="cli:alice")


def test_force_is_a_strict_bool():
    assert Command(command="retry", job_id=JOB_ID, requested_by="admin", force=True).force is True
    for bad in ("true", 1, 0, "yes", None):
        with pytest.raises(ValidationError):
            Command(command="retry", job_id=JOB_ID, requested_by="admin", force=bad)


def test_command_needs_requester_and_valid_job():
    with pytest.raises(ValidationError):
        Command(command="retry", job_id=JOB_ID, requested_by="")
    with pytest.raises(ValidationError):
        Command.model_validate({"command": "retry", "job_id": JOB_ID})
    with pytest.raises(ValidationError):
        Command(command="retry", job_id="nope", requested_by="admin")
    with pytest.raises(ValidationError):
        Command(command="retry", job_id=JOB_ID, requested_by="admin", extra="x")


# --- DeadLetter --------------------------------------------------------------------

def test_dead_letter_shape():
    d = DeadLetter(source_topic="jobs.requested", partition=3, offset=17, key="r-1", value="not json",
                   error="not JSON: Expecting value at line 1 column 1", stage="checkout",
                   occurred_at=datetime(2025, 1, 1, tzinfo=UTC))
    wire = json.loads(d.model_dump_json())
    assert set(wire) == {"source_topic", "partition", "offset", "key", "value", "error", "stage", "occurred_at"}
    assert wire["occurred_at"] == "2025-01-01T00:00:00.000Z"
    assert DeadLetter.model_validate_json(d.model_dump_json()) == d


def test_dead_letter_defaults_occurred_at_to_now():
    d = DeadLetter(source_topic="t", partition=None, offset=None, key=None, value=None, error="e", stage="gateway")
    assert json.loads(d.model_dump_json())["occurred_at"].endswith("Z")


# --- Upsampler callback ------------------------------------------------------------

UPSAMPLER_SUCCESS = {
    "id": "5f0c7a3e-2b1d-4e8f-9a6b-7c1d2e3f4a5b",
    "status": "SUCCESS",
    "input": {"imageUrl": "https://images.example.com/photo.jpg", "inputImageType": "realism", "upscaleFactor": 4},
    "creditCost": 16,
    "imageUrl": "https://upsampler-results.example.com/5f0c7a3e/full.png",
    "compressedImageUrl": "https://upsampler-results.example.com/5f0c7a3e/compressed.jpg",
    "job_id": JOB_ID,
}


def test_upscaler_event_parses_callback_body():
    e = UpscalerEvent.model_validate_json(json.dumps(UPSAMPLER_SUCCESS))
    assert e.job_id == JOB_ID
    assert e.id == UPSAMPLER_SUCCESS["id"]
    assert e.status == "SUCCESS"
    assert e.credit_cost == 16
    assert e.image_url == UPSAMPLER_SUCCESS["imageUrl"]
    assert e.compressed_image_url == UPSAMPLER_SUCCESS["compressedImageUrl"]
    assert e.error is None


def test_upscaler_event_failure():
    e = UpscalerEvent.model_validate({"id": "u-1", "status": "FAILED", "error": "Image too large", "job_id": JOB_ID})
    assert e.status == "FAILED"
    assert e.error == "Image too large"
    assert e.image_url is None


def test_upscaler_event_by_field_name_too():
    e = UpscalerEvent(job_id=JOB_ID, id="u-1", status="IN_PROGRESS", credit_cost=2.5, image_url=None)
    assert e.credit_cost == 2.5


@pytest.mark.parametrize("changes", [{"status": "DONE"}, {"job_id": "nope"}, {"job_id": None}, {"id": None}])
def test_upscaler_event_rejects(changes):
    with pytest.raises(ValidationError):
        UpscalerEvent.model_validate({**UPSAMPLER_SUCCESS, **changes})


# --- Stripe ------------------------------------------------------------------------

CHECKOUT_COMPLETED = {
    "id": "evt_1QxYzAbCdEfGhIjK",
    "object": "event",
    "api_version": "2024-06-20",
    "created": 1735787045,
    "livemode": False,
    "pending_webhooks": 1,
    "request": {"id": None, "idempotency_key": None},
    "type": "checkout.session.completed",
    "data": {
        "object": {
            "id": "cs_test_a1B2c3D4e5F6g7H8i9J0",
            "object": "checkout.session",
            "amount_subtotal": 384,
            "amount_total": 384,
            "client_reference_id": JOB_ID,
            "currency": "usd",
            "customer_details": {"email": "customer@example.com", "name": "Jane Customer", "address": None},
            "customer_email": None,
            "expires_at": 1735790645,
            "livemode": False,
            "metadata": {"job_id": JOB_ID, "source": "smi-pipeline"},
            "mode": "payment",
            "payment_intent": "pi_3QxYzAbCdEfGhIjK0",
            "payment_status": "paid",
            "status": "complete",
            "success_url": "https://shop.example.com/thanks",
            "url": None,
        }
    },
}


def test_stripe_checkout_completed():
    e = StripeEvent.model_validate_json(json.dumps(CHECKOUT_COMPLETED))
    assert e.id == "evt_1QxYzAbCdEfGhIjK"
    assert e.type == "checkout.session.completed"
    assert e.type in HANDLED_TYPES
    assert e.created == 1735787045
    assert e.livemode is False
    assert e.job_id == JOB_ID
    assert e.is_ours is True
    obj = e.data.object
    assert obj.id == "cs_test_a1B2c3D4e5F6g7H8i9J0"
    assert obj.object == "checkout.session"
    assert obj.payment_status == "paid"
    assert obj.amount_total == 384
    assert obj.payment_intent_id == "pi_3QxYzAbCdEfGhIjK0"
    assert obj.email == "customer@example.com"


def _with_object(**changes) -> dict:
    event = json.loads(json.dumps(CHECKOUT_COMPLETED))
    event["data"]["object"].update(changes)
    return event


def test_stripe_job_id_falls_back_to_client_reference_id():
    e = StripeEvent.model_validate(_with_object(metadata={"source": SOURCE}))
    assert e.job_id == JOB_ID


def test_stripe_event_from_another_integration_is_not_ours():
    e = StripeEvent.model_validate(_with_object(metadata={"order": "1234"}, client_reference_id=None))
    assert e.is_ours is False
    assert e.job_id is None


def test_stripe_expanded_payment_intent():
    e = StripeEvent.model_validate(_with_object(payment_intent={"id": "pi_expanded", "object": "payment_intent"}))
    assert e.data.object.payment_intent_id == "pi_expanded"


def test_stripe_payment_intent_object_is_its_own_intent():
    event = {"id": "evt_2", "object": "event", "type": "payment_intent.payment_failed", "created": 1, "livemode": False,
             "data": {"object": {"id": "pi_9", "object": "payment_intent", "metadata": {"job_id": JOB_ID, "source": SOURCE}}}}
    e = StripeEvent.model_validate(event)
    assert e.data.object.payment_intent_id == "pi_9"
    assert e.job_id == JOB_ID


def test_stripe_email_falls_back_to_customer_email():
    e = StripeEvent.model_validate(_with_object(customer_details=None, customer_email="other@example.com"))
    assert e.data.object.email == "other@example.com"


def test_stripe_event_without_data_object_rejected():
    with pytest.raises(ValidationError):
        StripeEvent.model_validate({"id": "evt_3", "type": "x", "created": 1, "data": {}})



@settings(max_examples=500, deadline=None)
@given(st.uuids(version=4).map(str), st.text(max_size=40), st.one_of(st.integers(min_value=0), st.text(max_size=20)))
def test_event_ids_are_uuid5_of_the_job_type_and_attempt(job_id, event_type, attempt):
    # The fast computation must give exactly what uuid5 gives: ids of events
    # published before it must still be recognised as repeats.
    expected = str(uuid.uuid5(EVENT_NAMESPACE, f"{job_id}/{event_type}/{attempt}"))
    assert make_event_id(job_id, event_type, attempt) == expected
