"""The job table against real Redis, each test on one server and on a 3-node Redis
Cluster (the `redis` fixture is parametrized)."""

from __future__ import annotations

import asyncio
import string
from datetime import timedelta

import pytest

from schemas.events import rfc3339
from schemas.status import TRANSITIONS, Deadline, JobStatus as S, Stage, TransitionNotAllowed, find_transition, owner_of
from services.janitor.handlers import Janitor, JanitorConfig
from smi.jobtable import DownloadExpired, JobNotFound, JobTable
from smi.jobtable.codec import field_code, lookup_field
from smi.jobtable.keys import shard_of
from smi.jobtable.table import hash_token
from tests.support.jobs import job_fields, make_job

ALLOWED = [(t.source, t.target) for t in TRANSITIONS]
NOT_ALLOWED = [(a, b) for a in S for b in S if a != b and (a, b) not in ALLOWED and b != S.NEW]


async def snapshot(table: JobTable, job_id: str) -> dict:
    """Everything Redis holds about one job and its shard's indexes, byte for byte."""
    r, keys = table.redis, table.keys
    shard = int(keys.tag_of(job_id).split("{s")[1].rstrip("}"))
    state = {"job": await r.hgetall(keys.job(job_id))}  # the history is a field of the hash
    for st in S:
        for order in "cu":
            state[f"{st}:{order}"] = await r.zrange(keys.status_index(shard, st, order), 0, -1)
    for kind in Deadline:
        state[f"dl:{kind}"] = await r.zrange(keys.deadline(shard, kind), 0, -1, withscores=True)
    state["rev"] = await r.hgetall(keys.revenue(shard))  # the shard's running revenue figures
    return state


async def test_create_returns_a_new_job_in_status_new(table):
    job, created = await table.create(job_fields())
    assert created and job.status is S.NEW
    assert job.email == "buyer@example.com" and job.price_cents == 384 and job.attempts == 0
    assert len(job.job_id) == 36 and job.job_id[14] == "4"  # UUIDv4
    [entry] = await table.history(job.job_id)
    assert entry.source is None and entry.target is S.NEW and entry.actor == "checkout"


async def test_same_request_id_gives_the_same_job_even_concurrently(table):
    results = await asyncio.gather(*[table.create(job_fields(), request_id="req-42") for _ in range(10)])
    assert len({job.job_id for job, _ in results}) == 1
    assert sum(created for _, created in results) == 1
    other, created = await table.create(job_fields(), request_id="req-43")
    assert created and other.job_id != results[0][0].job_id
    page = await table.get_jobs([S.NEW], limit=100)
    assert len(page.jobs) == 2


@pytest.mark.parametrize("source,target", ALLOWED, ids=lambda s: str(s))
async def test_every_allowed_transition_applies(table, source, target):
    job = await make_job(table, source)
    owner = find_transition(source, target).owner
    result = await table.transition(job.job_id, target, actor=owner, event_id="ev-1")
    assert result.applied and result.previous is source
    after = await table.get(job.job_id)
    assert after.status is target and after.updated_at >= job.updated_at
    last = (await table.history(job.job_id))[-1]
    assert (last.source, last.target, last.actor, last.event_id) == (source, target, owner.value, "ev-1")
    assert [j.job_id for j in (await table.get_jobs([target])).jobs] == [job.job_id]
    assert (await table.get_jobs([source])).jobs == []


@pytest.mark.parametrize("source,target", NOT_ALLOWED, ids=lambda s: str(s))
async def test_every_other_transition_is_rejected_and_changes_nothing(table, source, target):
    job = await make_job(table, source)
    before = await snapshot(table, job.job_id)
    result = await table.transition(job.job_id, target, actor=owner_of(target), event_id="ev-x",
                                    fields={"failure_reason": "should not be written"},
                                    deadlines={Deadline.ABANDON: job.created_at + timedelta(hours=1)})
    assert result.outcome == "rejected" and result.previous is source
    assert await snapshot(table, job.job_id) == before


async def test_same_status_is_a_noop(table):
    job = await make_job(table, S.PENDING)
    before = await snapshot(table, job.job_id)
    result = await table.transition(job.job_id, S.PENDING, actor=Stage.CHECKOUT, event_id="another-event")
    assert result.outcome == "noop"
    assert await snapshot(table, job.job_id) == before


async def test_a_stage_that_does_not_own_the_target_cannot_even_try(table):
    job = await make_job(table, S.AWAITING_PAYMENT)
    with pytest.raises(TransitionNotAllowed):
        await table.transition(job.job_id, S.PENDING, actor=Stage.PROCESSOR, event_id="e")


async def test_missing_job(table):
    with pytest.raises(JobNotFound):
        await table.get("00000000-0000-4000-8000-000000000000")
    with pytest.raises(JobNotFound):
        await table.transition("00000000-0000-4000-8000-000000000000", S.PENDING, actor=Stage.CHECKOUT, event_id="e")


async def test_redelivered_event_is_applied_once_even_when_the_move_is_allowed_again(table):
    # failed -> processing (an operator retry) is allowed every time the job is failed,
    # so only the event id stops a redelivered retry from being applied twice.
    job = await make_job(table, S.FAILED)
    first = await table.transition(job.job_id, S.PROCESSING, actor=Stage.PROCESSOR, event_id="retry-1")
    assert first.applied
    assert (await table.transition(job.job_id, S.FAILED, actor=Stage.PROCESSOR, event_id="fail-2")).applied
    again = await table.transition(job.job_id, S.PROCESSING, actor=Stage.PROCESSOR, event_id="retry-1")
    assert again.outcome == "duplicate"
    assert (await table.get(job.job_id)).status is S.FAILED
    history = await table.history(job.job_id)
    assert [h.event_id for h in history].count("retry-1") == 1


async def test_fields_move_with_the_transition_and_lookups_follow(table):
    job = await make_job(table, S.NEW)
    await table.transition(job.job_id, S.AWAITING_PAYMENT, actor=Stage.CHECKOUT, event_id="e1",
                           fields={"stripe_checkout_session_id": "cs_test_1", "checkout_url": "https://pay/1"})
    found = await table.find_by("checkout_session", "cs_test_1")
    assert found is not None and found.job_id == job.job_id and found.checkout_url == "https://pay/1"
    # Replacing a looked-up value drops the old lookup.
    assert await table.update(job.job_id, {"stripe_checkout_session_id": "cs_test_2"})
    assert await table.find_by("checkout_session", "cs_test_1") is None
    assert (await table.find_by("checkout_session", "cs_test_2")).job_id == job.job_id
    await table.update(job.job_id, {"stripe_payment_intent_id": "pi_1", "upsampler_job_id": "up_1"})
    assert (await table.find_by("payment_intent", "pi_1")).job_id == job.job_id
    assert (await table.find_by("upsampler_job", "up_1")).job_id == job.job_id
    await table.update(job.job_id, {}, clear=["upsampler_job_id"])
    assert await table.find_by("upsampler_job", "up_1") is None
    assert (await table.get(job.job_id)).upsampler_job_id is None


async def test_lookups_are_filed_under_a_digest_and_a_colliding_entry_finds_nothing(table):
    job, other = await make_job(table, S.NEW), await make_job(table, S.NEW)
    session = "cs_test_" + "a1B2" * 14 + "c3"  # as long as Stripe's: 66 characters
    await table.update(job.job_id, {"stripe_checkout_session_id": session})
    shard = int(table.keys.tag_of(job.job_id).split("{s")[1].rstrip("}"))
    [(field, stored)] = (await table.redis.hgetall(table.keys.lookup(shard, "checkout_session"))).items()
    assert field.decode() == lookup_field(session) and len(field) == 28  # Lua and Python agree
    assert table.keys.job_id_of(stored) == job.job_id
    assert (await table.find_by("checkout_session", session)).job_id == job.job_id
    # Two values with one digest (forced here; 112 bits make it unlikely): the entry
    # points at a job that does not hold the value asked for, so nothing is found.
    await table.redis.hset(table.keys.lookup(shard, "checkout_session"), lookup_field("cs_test_other"),
                           table.keys.stored_id(other.job_id))
    assert await table.find_by("checkout_session", "cs_test_other") is None


@pytest.mark.parametrize("value", ["9f1c2d3e-0000-4000-8000-00000000000a", "ünïcødé-上传-id", "u" * 255, "a b"])
async def test_any_upscaler_id_is_found_through_its_digest(table, value):
    """Lua hashes the bytes redis-py sends (UTF-8), Python the str it encodes: the
    same digest for any text, so whatever id the upscaler hands out is found."""
    job = await make_job(table, S.NEW)
    await table.update(job.job_id, {"upsampler_job_id": value})
    assert (await table.find_by("upsampler_job", value)).job_id == job.job_id
    assert await table.find_by("upsampler_job", value + "-") is None


async def test_a_request_id_sharing_a_digest_with_another_job_s_still_makes_its_own_job(table):
    first, _ = await table.create(job_fields(), request_id="req-first")
    # A second request id of the same shard, and a forced digest collision: its
    # index entry names the job of req-first.
    shards = table.keys.shards
    second = next(f"req-second-{i}" for i in range(1000)
                  if shard_of(f"req-second-{i}", shards) == shard_of("req-first", shards))
    requests = f"req:{table.keys.tag_of(first.job_id)}"
    await table.redis.hset(requests, lookup_field(second), table.keys.stored_id(first.job_id))
    made, created = await table.create(job_fields(), request_id=second)
    assert created and made.job_id != first.job_id and made.request_id == second
    again, created = await table.create(job_fields(), request_id=second)
    assert not created and again.job_id == made.job_id
    assert (await table.create(job_fields(), request_id="req-first"))[0].job_id == first.job_id


@pytest.mark.parametrize("target", [S.PENDING, S.ABANDONED])
async def test_leaving_awaiting_payment_drops_the_checkout_url(table, target):
    job = await make_job(table, S.NEW)
    await table.transition(job.job_id, S.AWAITING_PAYMENT, actor=Stage.CHECKOUT, event_id="e1",
                           fields={"stripe_checkout_session_id": "cs_test_url", "checkout_url": "https://pay/url"})
    assert (await table.get(job.job_id)).checkout_url == "https://pay/url"
    actor = owner_of(target)
    assert (await table.transition(job.job_id, target, actor=actor, event_id="e2")).applied
    assert field_code("checkout_url").encode() not in await table.redis.hgetall(table.keys.job(job.job_id))
    after = await table.get(job.job_id)
    assert after.checkout_url is None and after.stripe_checkout_session_id == "cs_test_url"


async def test_update_refuses_managed_and_unknown_fields_and_honours_expected_status(table):
    job = await make_job(table, S.PENDING)
    for bad in ({"status": "completed"}, {"created_at": job.created_at}, {"download_token_hash": "x"}, {"nonsense": 1}):
        with pytest.raises(ValueError):
            await table.update(job.job_id, bad)
    assert not await table.update(job.job_id, {"failure_reason": "x"}, expect_status=[S.PROCESSING])
    assert (await table.get(job.job_id)).failure_reason is None
    assert await table.update(job.job_id, {"failure_reason": "x"}, expect_status=[S.PENDING])
    assert await table.update_cost_data(job.job_id, credits=16, cost_cents=64)
    after = await table.get(job.job_id)
    assert (after.failure_reason, after.credits, after.cost_cents) == ("x", 16, 64)
    with pytest.raises(JobNotFound):
        await table.update("00000000-0000-4000-8000-000000000000", {"credits": 1})


async def test_deadlines_are_set_by_transitions_and_cleared_when_the_status_is_left(table):
    job = await make_job(table, S.NEW)
    due_at = job.created_at + timedelta(minutes=60)
    await table.transition(job.job_id, S.AWAITING_PAYMENT, actor=Stage.CHECKOUT, event_id="e1",
                           deadlines={Deadline.ABANDON: due_at})
    assert await table.due(Deadline.ABANDON, limit=10, now=due_at - timedelta(seconds=1)) == []
    [item] = await table.due(Deadline.ABANDON, limit=10, now=due_at)
    assert item.job_id == job.job_id and item.due_at == due_at
    await table.transition(job.job_id, S.PENDING, actor=Stage.CHECKOUT, event_id="e2")
    assert await table.due(Deadline.ABANDON, limit=10, now=due_at + timedelta(days=1)) == []


async def test_claim_due_hands_each_item_to_one_claimer_until_its_lease_runs_out(table):
    base = None
    ids = []
    for _ in range(30):
        job = await make_job(table, S.NEW)
        base = base or job.created_at
        await table.transition(job.job_id, S.AWAITING_PAYMENT, actor=Stage.CHECKOUT, event_id="e",
                               deadlines={Deadline.ABANDON: base})
        ids.append(job.job_id)
    now = base + timedelta(minutes=1)
    claims = await asyncio.gather(*[table.claim_due(Deadline.ABANDON, limit=7, lease=timedelta(minutes=5), now=now)
                                    for _ in range(6)])
    claimed = [item.job_id for claim in claims for item in claim]
    assert sorted(claimed) == sorted(ids)  # 6 x 7 >= 30: all claimed, none twice
    assert await table.claim_due(Deadline.ABANDON, limit=50, lease=timedelta(minutes=5), now=now) == []
    await table.clear_deadline(ids[0], Deadline.ABANDON)
    later = await table.claim_due(Deadline.ABANDON, limit=50, lease=timedelta(minutes=5), now=now + timedelta(minutes=6))
    assert sorted(i.job_id for i in later) == sorted(ids[1:])


async def test_download_tokens_only_hashes_at_rest(table):
    job = await make_job(table, S.COMPLETED)
    token, expiry = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, now=job.updated_at)
    assert len(token) == 64 and set(token) <= set(string.ascii_letters + string.digits)
    assert expiry == job.updated_at + timedelta(hours=24)
    assert (await table.find_by_token(token)).job_id == job.job_id
    assert await table.find_by_token("A" * 64) is None
    after = await table.get(job.job_id)
    assert after.download_expires_at == expiry and after.download_token_hash != token
    [warn] = await table.due(Deadline.WARN, limit=5, now=expiry)
    assert warn.due_at == expiry - timedelta(hours=4)
    # The raw token is nowhere in Redis: not in a key, field, value, member or list entry.
    needle = token.encode()
    async for key in table.redis.scan_iter(match=f"*{table.keys.namespace}*", count=1000):
        kind = (await table.redis.type(key)).decode()
        if kind == "hash":
            blob = b"".join(k + v for k, v in (await table.redis.hgetall(key)).items())
        elif kind == "list":
            blob = b"".join(await table.redis.lrange(key, 0, -1))
        elif kind == "zset":
            blob = b"".join(await table.redis.zrange(key, 0, -1))
        else:
            blob = await table.redis.get(key) or b""
        assert needle not in key + blob, key


async def test_second_token_keeps_the_first_and_revoking_replaces_all(table):
    job = await make_job(table, S.COMPLETED)
    first, expiry = await table.issue_download_token(job.job_id, ttl_hours=24)
    second, same = await table.issue_download_token(job.job_id, ttl_hours=24, expires_at=expiry)
    assert same == expiry
    assert (await table.find_by_token(first)) is not None and (await table.find_by_token(second)) is not None
    # The newest hash is stored once; only older live ones go in the second field.
    newest, older = await table.redis.hmget(table.keys.job(job.job_id), field_code("download_token_hash"),
                                            field_code("download_token_hashes"))
    assert newest.decode() == hash_token(second) and older.decode().split() == [hash_token(first)]
    third, later = await table.issue_download_token(job.job_id, ttl_hours=48, revoke_others=True)
    assert await table.redis.hexists(table.keys.job(job.job_id), field_code("download_token_hashes")) == 0
    assert later > expiry
    assert await table.find_by_token(first) is None and await table.find_by_token(second) is None
    assert (await table.find_by_token(third)).download_expires_at == later
    with pytest.raises(ValueError):
        await table.issue_download_token(job.job_id, ttl_hours=169)
    with pytest.raises(JobNotFound):
        await table.issue_download_token("00000000-0000-4000-8000-000000000000", ttl_hours=1)


async def test_an_expired_download_gets_no_new_token(table):
    """A resend that read the job before the janitor recorded the expiry must not
    issue a link to the files the janitor is deleting."""
    job = await make_job(table, S.COMPLETED)
    token, expiry = await table.issue_download_token(job.job_id, ttl_hours=24)
    await table.update(job.job_id, {"download_expired_at": expiry}, clear=["upscaled_file_path"])
    before = await table.redis.hgetall(table.keys.job(job.job_id))
    with pytest.raises(DownloadExpired):
        await table.issue_download_token(job.job_id, ttl_hours=24, revoke_others=True)
    assert await table.redis.hgetall(table.keys.job(job.job_id)) == before
    assert (await table.get(job.job_id)).download_expired_at == expiry


async def test_count_by_status(table):
    for status in (S.NEW, S.PENDING, S.PENDING, S.FAILED):
        await make_job(table, status)
    counts = await table.count_by_status()
    assert counts[S.NEW] == 1 and counts[S.PENDING] == 2 and counts[S.FAILED] == 1 and counts[S.COMPLETED] == 0


async def test_done_markers_record_each_step_once_per_job(table):
    job = await make_job(table, S.COMPLETED)
    other = await make_job(table, S.COMPLETED)
    assert not await table.is_done(job.job_id, "email:ready")
    assert await table.mark_done(job.job_id, "email:ready") is True
    assert await table.mark_done(job.job_id, "email:ready") is False
    assert await table.is_done(job.job_id, "email:ready")
    assert not await table.is_done(job.job_id, "email:refund")
    assert not await table.is_done(other.job_id, "email:ready")
    # A read of the job carries its markers (no second round trip), never shown to operators.
    read = await table.get(job.job_id)
    assert read.done == {"email:ready"} and (await table.get(other.job_id)).done == frozenset()
    assert "done" not in read.redacted()


async def test_a_repeated_request_whose_job_was_deleted_by_hand_is_not_found(table):
    job, _ = await table.create(job_fields(), request_id="req-deleted")
    await table.redis.delete(table.keys.job(job.job_id))
    with pytest.raises(JobNotFound):
        await table.create(job_fields(), request_id="req-deleted")


async def test_a_done_marker_for_an_unknown_job_records_nothing(table):
    missing = "00000000-0000-4000-8000-000000000000"
    assert await table.mark_done(missing, "email:ready") is False
    # No lone field that would make a half record the next get() trips over.
    assert await table.redis.exists(table.keys.job(missing)) == 0
    with pytest.raises(ValueError):
        await table.mark_done(missing, "email ready")


async def test_history_and_done_markers_live_in_the_job_hash_only(table):
    """One key per job: the history and the markers are fields of its hash."""
    job = await make_job(table, S.COMPLETED)
    await table.mark_done(job.job_id, "email:ready")
    await table.issue_download_token(job.job_id, ttl_hours=24)
    job_keys = [k async for k in table.redis.scan_iter(match=f"*{table.keys.stored_id(job.job_id)}*")]
    assert job_keys == [table.keys.job(job.job_id).encode()]
    assert [h.target for h in await table.history(job.job_id)][-1] is S.COMPLETED


async def test_an_event_id_the_history_could_not_hold_is_refused(table):
    job = await make_job(table, S.AWAITING_PAYMENT)
    for bad in ("", "a b", "id\n"):
        with pytest.raises(ValueError):
            await table.transition(job.job_id, S.PENDING, actor=Stage.CHECKOUT, event_id=bad)
    assert (await table.get(job.job_id)).status is S.AWAITING_PAYMENT


async def test_a_second_link_never_shortens_a_pushed_out_expiry(table):
    job = await make_job(table, S.COMPLETED)
    _, first_expiry = await table.issue_download_token(job.job_id, ttl_hours=24)
    _, pushed = await table.issue_download_token(job.job_id, ttl_hours=48, revoke_others=True)  # a resend
    # A warning handled late asks for a second link "with the same expiry" as it saw.
    token, kept = await table.issue_download_token(job.job_id, ttl_hours=24, expires_at=first_expiry)
    assert kept == pushed > first_expiry
    assert (await table.get(job.job_id)).download_expires_at == pushed
    assert (await table.find_by_token(token)) is not None


# -- clearing a claimed deadline only while it is still the claim's ------------------


async def test_claim_due_leases_to_lease_end_and_a_conditional_clear_takes_only_that(table):
    renewed, untouched = await make_job(table, S.COMPLETED), await make_job(table, S.COMPLETED)
    t0 = renewed.updated_at
    for job in (renewed, untouched):
        await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, now=t0)
    now, lease = t0 + timedelta(hours=20, seconds=1), timedelta(minutes=2, microseconds=1500)
    claimed = await table.claim_due(Deadline.WARN, limit=10, lease=lease, now=now)
    assert sorted(i.job_id for i in claimed) == sorted([renewed.job_id, untouched.job_id])
    leased_until = table.lease_end(now, lease)
    assert {i.due_at for i in await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2))} == {leased_until}

    # While the claimer works, a resend issues a new token: the warning is armed for
    # the new expiry. Clearing "if still the lease" keeps it; the other job's goes.
    _, new_expiry = await table.issue_download_token(renewed.job_id, ttl_hours=24, warn_hours=4,
                                                     revoke_others=True, now=now + timedelta(seconds=5))
    assert await table.clear_deadline(renewed.job_id, Deadline.WARN, if_due_at=leased_until) is False
    assert await table.clear_deadline(untouched.job_id, Deadline.WARN, if_due_at=leased_until) is True
    [left] = await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2))
    assert (left.job_id, left.due_at) == (renewed.job_id, new_expiry - timedelta(hours=4))
    # Not in the set, or a plain clear: as before.
    assert await table.clear_deadline(untouched.job_id, Deadline.WARN, if_due_at=leased_until) is False
    assert await table.clear_deadline(renewed.job_id, Deadline.WARN) is True
    assert await table.due(Deadline.WARN, limit=10, now=now + timedelta(days=2)) == []


async def test_a_download_waits_for_its_warning_and_then_for_its_expiry(table):
    job = await make_job(table, S.COMPLETED)
    t0, week = job.updated_at, timedelta(days=7)

    async def armed(kind: Deadline) -> list:
        return [(d.job_id, d.due_at) for d in await table.due(kind, limit=10, now=t0 + week)]

    _, expiry = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, now=t0)
    assert await armed(Deadline.WARN) == [(job.job_id, expiry - timedelta(hours=4))]
    assert await armed(Deadline.EXPIRE) == []  # one set at a time
    # A second link without a warning of its own, while the warning is pending: the
    # warning will arm the expiry.
    await table.issue_download_token(job.job_id, ttl_hours=24, expires_at=expiry, now=t0)
    assert await armed(Deadline.EXPIRE) == []

    now, lease = expiry - timedelta(hours=3), timedelta(minutes=2)
    [claimed] = await table.claim_due(Deadline.WARN, limit=10, lease=lease, now=now)
    assert await table.end_warning(job.job_id, if_due_at=now) is False  # not the claim's due time
    assert await armed(Deadline.EXPIRE) == []
    assert await table.end_warning(job.job_id, if_due_at=table.lease_end(now, lease)) is True
    assert await armed(Deadline.WARN) == []
    assert await armed(Deadline.EXPIRE) == [(job.job_id, expiry)]
    assert await table.end_warning(job.job_id, if_due_at=table.lease_end(now, lease)) is False

    # A resend with a warning takes the download back to waiting for it.
    _, resent = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, revoke_others=True,
                                                 now=now)
    assert await armed(Deadline.EXPIRE) == []
    assert await armed(Deadline.WARN) == [(job.job_id, resent - timedelta(hours=4))]
    # A download that expired meanwhile gets no expiry armed by its warning.
    await table.update(job.job_id, {"download_expired_at": resent})
    await table.claim_due(Deadline.WARN, limit=10, lease=lease, now=resent)
    assert await table.end_warning(job.job_id, if_due_at=table.lease_end(resent, lease)) is True
    assert await armed(Deadline.WARN) == [] and await armed(Deadline.EXPIRE) == []

    # Without a warning at all, the expiry is armed at once.
    plain = await make_job(table, S.COMPLETED)
    _, plain_expiry = await table.issue_download_token(plain.job_id, ttl_hours=24, now=t0)
    assert await armed(Deadline.EXPIRE) == [(plain.job_id, plain_expiry)]
    assert await armed(Deadline.WARN) == []


async def test_the_janitor_keeps_a_warning_a_resend_armed_while_it_published_the_last(table, tmp_path):
    """A resend between the janitor's publish of ``jobs.expiring`` and its clearing of
    the claimed warning used to lose the warning for the resent link's expiry."""
    job = await make_job(table, S.COMPLETED)
    t0 = job.updated_at
    _, first_expiry = await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4, now=t0)
    resent: list = []

    async def publish(spec, key, event):
        published.append(event)
        if not resent:  # the operator's resend lands right after the warning went out
            resent.append(await table.issue_download_token(job.job_id, ttl_hours=24, warn_hours=4,
                                                           revoke_others=True, now=warned_at))

    published: list = []
    janitor = Janitor(table, None, publish, JanitorConfig(storage_dir=tmp_path, expiry_warning=timedelta(hours=4),
                                                          failed_retention=timedelta(days=7), email_retention=None))
    warned_at = first_expiry - timedelta(hours=3)
    assert (await janitor.tick(warned_at)).warned == 1
    [(_, second_expiry)] = resent
    assert [e.data["expires_at"] for e in published] == [rfc3339(first_expiry)]
    # The resent link's warning is still armed, and comes due in its time.
    [armed] = await table.due(Deadline.WARN, limit=10, now=second_expiry)
    assert (armed.job_id, armed.due_at) == (job.job_id, second_expiry - timedelta(hours=4))
    assert (await janitor.tick(second_expiry - timedelta(hours=3))).warned == 1
    assert [e.data["expires_at"] for e in published] == [rfc3339(first_expiry), rfc3339(second_expiry)]
    assert await table.due(Deadline.WARN, limit=10, now=second_expiry + timedelta(days=1)) == []
