"""Key layout of the job table (smi/jobtable/keys.py): the job ids it makes."""

from __future__ import annotations

import uuid

import pytest

from smi.jobtable.keys import KeySpace, shard_of


@pytest.mark.parametrize("shards", [1, 2, 16, 1024])
def test_a_requests_job_id_is_a_uuid4_in_the_requests_shard(shards):
    keys = KeySpace(shards)
    ids = set()
    for i in range(500):
        request_id = f"req-{i}"
        job_id = keys.new_job_id(request_id)
        assert shard_of(job_id, shards) == shard_of(request_id, shards)
        parsed = uuid.UUID(job_id)
        assert parsed.version == 4 and str(parsed) == job_id  # canonical lower-case form
        ids.add(job_id)
    assert len(ids) == 500


def test_job_ids_of_one_request_id_still_differ():
    # The request index, not the id, makes a repeat land on the same job.
    keys = KeySpace(16)
    assert len({keys.new_job_id("req-1") for _ in range(200)}) == 200


def test_the_shard_bits_leave_the_rest_random():
    keys = KeySpace(16)
    ids = [keys.new_job_id("req-1") for _ in range(200)]
    # Everything but the last three hex digits comes from uuid4: all distinct.
    assert len({i[:-3] for i in ids}) == 200


def test_a_job_is_keyed_and_indexed_by_its_22_character_stored_id():
    keys = KeySpace(16)
    job_id = keys.new_job_id("req-9")
    stored = keys.stored_id(job_id)
    assert len(stored) == 22 and keys.job(job_id) == f"job:{keys.tag_of(job_id)}:{stored}"
    assert keys.job_id_of(stored) == job_id and keys.job_id_of(stored.encode()) == job_id
    # An id that is not a canonical UUID keeps its own spelling, told apart by "=".
    assert keys.job_id_of(keys.stored_id("not-a-uuid")) == "not-a-uuid"
    assert keys.stored_id(job_id.upper()) != stored
