"""The stored layout of a job hash (smi/jobtable/codec.py): codes that round-trip
and never clash, and event ids that come back exactly as given."""

import re
import uuid

import pytest

from schemas.events import make_event_id
from schemas.job import Job, encode_fields
from schemas.status import JobStatus, Stage
from smi.jobtable import codec
from smi.jobtable.scripts import source

STORED = set(Job.model_fields) - {"job_id"} | {"history", "download_token_hashes"}


def test_every_stored_field_has_its_own_short_code():
    assert set(codec.FIELD_CODES) == STORED
    codes = list(codec.FIELD_CODES.values())
    assert len(set(codes)) == len(codes)
    assert all(1 <= len(code) <= 3 and re.fullmatch(r"[a-z_]+", code) for code in codes)


def test_a_hash_read_back_gives_the_job_it_was_written_from():
    fields = {"image_url": "https://shop.example.com/a.jpg", "resolution": "4x", "image_width": 10,
              "image_height": 20, "price_cents": 384, "stripe_checkout_session_id": "cs_test_1"}
    stored = codec.encode_names({**encode_fields(fields), "status": "pending", "created_at": "1000",
                                 "updated_at": "2000", "history": "x"})
    stored[codec.done_field("email:ready")] = "1"
    raw = {k.encode(): str(v).encode() for k, v in stored.items()}
    job = Job.from_redis(codec.decode_hash(raw, "job-1"))
    assert job.job_id == "job-1" and job.status is JobStatus.PENDING
    assert job.image_width == 10 and job.stripe_checkout_session_id == "cs_test_1" and job.price_cents == 384
    assert job.done == frozenset({"email:ready"})


def test_a_field_of_a_newer_version_is_skipped_not_misread():
    raw = {b"s": b"new", b"c": b"1", b"u": b"1", b"iu": b"u", b"rs": b"2x", b"w": b"1", b"h": b"1", b"zz": b"?"}
    assert "zz" not in codec.decode_hash(raw, "j") and codec.decode_hash(raw, "j")["status"] == b"new"


@pytest.mark.parametrize("event_id", [make_event_id(str(uuid.uuid4()), "pending"), str(uuid.uuid4()),
                                      "retry-1", "=starts-with-equals", "ABCDEFGHIJKLMNOPQRSTUV",
                                      str(uuid.uuid4()).upper()])
def test_event_ids_come_back_exactly(event_id):
    stored = codec.compact_id(event_id)
    assert codec.expand_id(stored) == event_id
    assert not any(c.isspace() for c in stored)


def test_a_uuid_event_id_is_stored_in_22_characters():
    assert len(codec.compact_id(make_event_id("job", "completed", 1))) == 22


def test_a_damaged_stored_event_id_is_an_error():
    with pytest.raises(ValueError):
        codec.expand_id("not*base64")


def test_history_codes_cover_every_status_and_actor_once():
    assert sorted(codec.STATUS_BY_CODE.values()) == sorted(JobStatus)
    assert sorted(codec.ACTOR_BY_CODE.values()) == sorted(s.value for s in Stage)


def test_the_scripts_get_the_codes_the_python_side_uses():
    lua = source("transition")
    for name, code in codec.FIELD_CODES.items():
        assert f"{name} = '{code}'" in lua
    for status, code in codec.STATUS_CODES.items():
        assert f"{status.value} = '{code}'" in lua


def test_stored_ids_sort_as_the_uuids_do():
    """Status index members break ties of a millisecond by the stored id: the order
    must be the job ids' own."""
    ids = sorted(str(uuid.uuid4()) for _ in range(2000))
    ids += ["00000000-0000-4000-8000-000000000000", "ffffffff-ffff-4fff-bfff-ffffffffffff"]
    assert sorted(ids, key=codec.compact_id) == sorted(ids)


@pytest.mark.parametrize("stored", ["", "short", "A" * 23, "é" * 22, "*" * 22])
def test_anything_but_a_stored_id_is_refused(stored):
    with pytest.raises(ValueError):
        codec.expand_id(stored)


@pytest.mark.parametrize("value", [str(uuid.uuid4()).upper(), "{" + str(uuid.uuid4()) + "}", uuid.uuid4().hex,
                                   str(uuid.uuid4())[:-1] + "g", str(uuid.uuid4())[:-1] + " ",
                                   str(uuid.uuid4()).replace("-", " "), "a" * 8 + "-" * 28,
                                   "urn:uuid:" + str(uuid.uuid4())])
def test_only_the_canonical_spelling_of_a_uuid_is_compacted(value):
    stored = codec.compact_id(value)
    assert stored == "=" + value and codec.expand_id(stored) == value
