"""The admin API (design.md, "HTTP gateway") on real gateway processes with their own
ADMIN_TOKEN, real Redis and Kafka. Jobs are seeded through the job table; commands
are seen on jobs.commands by the session's watcher."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest

from schemas.status import JobStatus as S
from tests.e2e.conftest import KAFKA_NAMES, free_port
from tests.e2e.conftest import start_gateway
from tests.e2e.test_gateway_downloads import client_from
from tests.support.jobs import make_job
from tests.support.kafka_watch import for_job

TOKEN = "admin-e2e-" + uuid.uuid4().hex
AUTH = {"Authorization": f"Bearer {TOKEN}"}
# The lag page names groups as the broker has them: the session's namespaced ones.
STAGE_GROUPS = {KAFKA_NAMES.group(stage) for stage in ("checkout", "processor", "notifier", "janitor")}


@pytest.fixture(scope="module")
async def admin(stage_env, tmp_path_factory, http, topics_ready):
    stage = await start_gateway(http, {**stage_env, "ADMIN_TOKEN": TOKEN}, tmp_path_factory.mktemp("admin-api"))
    yield stage
    stage.stop()


async def call(http, method: str, url: str, **kwargs) -> tuple[int, dict, dict]:
    async with http.request(method, url, **kwargs) as resp:
        return resp.status, await resp.json(), dict(resp.headers)


async def test_every_route_wants_the_bearer_token(admin, table, http):
    job = await make_job(table, S.FAILED)
    routes = [("GET", "/admin/jobs"), ("GET", f"/admin/jobs/{job.job_id}"), ("POST", f"/admin/jobs/{job.job_id}/retry"),
              ("POST", f"/admin/jobs/{job.job_id}/resend"), ("GET", "/admin/revenue"), ("GET", "/admin/lag")]
    for method, path in routes:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {TOKEN}"},
                        {"Authorization": TOKEN}):
            status, body, reply = await call(http, method, admin.url + path, headers=headers)
            assert status == 401, (method, path, headers)
            assert reply["WWW-Authenticate"].startswith("Bearer")
            assert "error" in body


async def test_jobs_are_listed_redacted_filtered_and_ordered(admin, table, http):
    older = await make_job(table, S.FAILED, email="older@example.com")
    newer = await make_job(table, S.FAILED, email=None)
    completed = await make_job(table, S.COMPLETED)

    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs?status=failed&limit=1000", headers=AUTH)
    assert status == 200
    ids = [job["job_id"] for job in body["jobs"]]
    assert {job["status"] for job in body["jobs"]} == {"failed"}
    assert completed.job_id not in ids
    assert ids.index(newer.job_id) < ids.index(older.job_id)  # newest first
    # As moments, not strings: a whole second is written without its fraction
    # ("...:05Z"), which sorts after "...:05.040000Z" as text.
    created = [datetime.fromisoformat(job["created_at"]) for job in body["jobs"]]
    assert created == sorted(created, reverse=True)
    listed = {job["job_id"]: job for job in body["jobs"]}
    assert "email" not in listed[older.job_id] and "download_token_hash" not in listed[older.job_id]
    assert listed[older.job_id]["has_email"] is True and listed[newer.job_id]["has_email"] is False

    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs?status=failed,completed&limit=1000",
                                 headers=AUTH)
    assert status == 200 and {older.job_id, newer.job_id, completed.job_id} <= {j["job_id"] for j in body["jobs"]}

    # Touching the older job puts it before the newer one by updated_at. Other tests'
    # failed jobs share the namespace and may be touched meanwhile by the running
    # stages, so the pages are walked one job at a time through the cursor.
    await table.update(older.job_id, {"failure_reason": "touched"})
    seen: list[str] = []
    cursor = None
    while newer.job_id not in seen:
        params = {"status": "failed", "order_by": "updated_at", "limit": "1", **({"cursor": cursor} if cursor else {})}
        status, page, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH, params=params)
        assert status == 200 and len(page["jobs"]) == 1
        seen += [job["job_id"] for job in page["jobs"]]
        cursor = page["next_cursor"]
        assert cursor, "the newer job was never listed"
    assert older.job_id in seen and seen.index(older.job_id) < seen.index(newer.job_id)
    assert len(seen) == len(set(seen))  # no page repeats a job


async def test_a_job_is_found_by_its_stripe_and_upscaler_ids(admin, table, http):
    job = await make_job(table, S.COMPLETED)
    ids = {"checkout_session": f"cs_test_{uuid.uuid4().hex}", "payment_intent": f"pi_{uuid.uuid4().hex[:24]}",
           "upsampler_job": str(uuid.uuid4())}
    await table.update(job.job_id, {"stripe_checkout_session_id": ids["checkout_session"],
                                    "stripe_payment_intent_id": ids["payment_intent"],
                                    "upsampler_job_id": ids["upsampler_job"]})
    for kind, value in ids.items():
        status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH, params={kind: value})
        assert status == 200 and [j["job_id"] for j in body["jobs"]] == [job.job_id], kind
        assert "email" not in body["jobs"][0] and body["next_cursor"] is None
    for params in ({"payment_intent": ids["payment_intent"], "status": "completed,failed"},):
        status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH, params=params)
        assert status == 200 and len(body["jobs"]) == 1
    # Another status, an id no job has, one that no system would issue: nothing found.
    for params in ({"payment_intent": ids["payment_intent"], "status": "failed"},
                   {"payment_intent": "pi_" + uuid.uuid4().hex}, {"checkout_session": "cs test"},
                   {"upsampler_job": ids["payment_intent"]}):
        status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH, params=params)
        assert (status, body["jobs"]) == (200, []), params
    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH,
                                 params={"payment_intent": ids["payment_intent"], "upsampler_job": "x"})
    assert status == 400 and "one of" in body["error"]
    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs", headers=AUTH,
                                 params={"payment_intent": ids["payment_intent"], "status": "bogus"})
    assert status == 400 and "bogus" in body["error"]


async def test_guessing_the_token_is_slowed_down(admin):
    async with client_from("127.0.0.93") as guesser:
        for attempt in range(20):
            wrong = {"Authorization": f"Bearer guess{attempt}"}
            async with guesser.get(f"{admin.url}/admin/jobs", headers=wrong) as resp:
                assert resp.status == 401
        # Throttled before the comparison: the right token does not get through either.
        async with guesser.get(f"{admin.url}/admin/jobs", headers=AUTH) as resp:
            assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
        async with guesser.post(f"{admin.url}/admin/ui/login", data={"token": TOKEN}) as resp:
            assert resp.status == 429


@pytest.mark.parametrize("query", ["status=bogus", "limit=abc", "limit=0", "limit=1001", "order_by=price"])
async def test_bad_query_arguments_are_refused_with_a_message(admin, http, query):
    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs?{query}", headers=AUTH)
    assert status == 400 and body["error"]


async def test_a_job_shows_redacted_with_the_steps_done_and_its_history(admin, table, http):
    job = await make_job(table, S.FAILED)
    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs/{job.job_id}", headers=AUTH)
    assert status == 200
    assert body["job_id"] == job.job_id and body["status"] == "failed" and body["has_email"] is True
    assert "email" not in body
    assert [(entry["from"], entry["to"]) for entry in body["history"]] == [
        (None, "new"), ("new", "awaiting_payment"), ("awaiting_payment", "pending"), ("pending", "processing"),
        ("processing", "failed")]
    assert body["done"] == []
    await table.mark_done(job.job_id, "email:refund")  # what the notifier records once an email is sent
    status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs/{job.job_id}", headers=AUTH)
    assert status == 200 and body["done"] == ["email:refund"]
    for missing in (str(uuid.uuid4()), "not-a-job"):
        status, body, _ = await call(http, "GET", f"{admin.url}/admin/jobs/{missing}", headers=AUTH)
        assert status == 404 and body["error"]


async def test_retry_and_resend_publish_the_command(admin, table, http, watcher):
    failed = await make_job(table, S.FAILED)
    status, body, _ = await call(http, "POST", f"{admin.url}/admin/jobs/{failed.job_id}/retry", headers=AUTH,
                                 json={"force": True})
    expected = {"command": "retry", "job_id": failed.job_id, "requested_by": "admin-api", "force": True}
    assert status == 202 and body == expected
    [message] = await watcher.wait_for("jobs.commands", for_job(failed.job_id))
    assert message.json() == expected

    completed = await make_job(table, S.COMPLETED)
    status, body, _ = await call(http, "POST", f"{admin.url}/admin/jobs/{completed.job_id}/resend", headers=AUTH)
    expected = {"command": "resend_download", "job_id": completed.job_id, "requested_by": "admin-api", "force": False}
    assert status == 202 and body == expected
    [message] = await watcher.wait_for("jobs.commands", for_job(completed.job_id))
    assert message.json() == expected


async def test_commands_for_unknown_jobs_or_with_bad_bodies_publish_nothing(admin, table, http, watcher):
    unknown = str(uuid.uuid4())
    for action in ("retry", "resend"):
        status, body, _ = await call(http, "POST", f"{admin.url}/admin/jobs/{unknown}/{action}", headers=AUTH)
        assert status == 404 and body["error"]
    job = await make_job(table, S.FAILED)
    for raw in (b"not json", b'{"force": "yes"}', b'{"force": true, "extra": 1}', b"[]"):
        status, body, _ = await call(http, "POST", f"{admin.url}/admin/jobs/{job.job_id}/retry", headers=AUTH,
                                     data=raw)
        assert status == 400 and body["error"], raw
    # Give a stray publish time to show up before saying there was none.
    probe = await make_job(table, S.FAILED)
    assert (await call(http, "POST", f"{admin.url}/admin/jobs/{probe.job_id}/retry", headers=AUTH))[0] == 202
    await watcher.wait_for("jobs.commands", for_job(probe.job_id))
    assert watcher.matching("jobs.commands", for_job(unknown)) == []
    assert watcher.matching("jobs.commands", for_job(job.job_id)) == []


async def test_revenue_and_lag_answer_json(admin, table, http):
    await make_job(table, S.COMPLETED, cost_cents=64)
    status, totals, _ = await call(http, "GET", f"{admin.url}/admin/revenue", headers=AUTH)
    assert status == 200
    assert set(totals) == {"charged_cents", "cost_cents", "refunded_cents", "profit_cents", "margin_percent",
                           "paid_jobs", "refunded_jobs"}
    assert totals["cost_cents"] >= 64
    assert totals["profit_cents"] == totals["charged_cents"] - totals["refunded_cents"] - totals["cost_cents"]

    status, body, _ = await call(http, "GET", f"{admin.url}/admin/lag", headers=AUTH)
    assert status == 200
    assert {group["group"] for group in body["groups"]} == STAGE_GROUPS
    for group in body["groups"]:
        assert group["status"] in {"ok", "lagging", "stalled", "stopped"}
        assert group["total_lag"] == sum(p["lag"] for p in group["partitions"])


async def test_admin_is_disabled_without_a_token(stage_env, tmp_path_factory, http, table):
    stage = await start_gateway(http, {**stage_env, "ADMIN_TOKEN": ""}, tmp_path_factory.mktemp("admin-off"))
    try:
        job = await make_job(table, S.FAILED)
        for method, path in [("GET", "/admin/jobs"), ("POST", f"/admin/jobs/{job.job_id}/retry"),
                             ("GET", "/admin/revenue")]:
            for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer anything"}):
                status, body, _ = await call(http, method, stage.url + path, headers=headers)
                assert status == 503 and body == {"error": "admin disabled: set ADMIN_TOKEN"}
        async with http.get(f"{stage.url}/admin/ui/jobs", allow_redirects=False) as resp:
            assert resp.status == 503 and "admin disabled: set ADMIN_TOKEN" in await resp.text()
    finally:
        stage.stop()


async def test_a_command_answers_503_while_kafka_is_away(stage_env, tmp_path_factory, http, table):
    nowhere = f"127.0.0.1:{free_port()}"
    stage = await start_gateway(http, {**stage_env, "ADMIN_TOKEN": TOKEN, "KAFKA_BOOTSTRAP_SERVERS": nowhere},
                                tmp_path_factory.mktemp("admin-no-kafka"), ready=lambda status: status == 503)
    try:
        job = await make_job(table, S.FAILED)
        status, body, _ = await call(http, "POST", f"{stage.url}/admin/jobs/{job.job_id}/retry", headers=AUTH)
        assert status == 503 and body["error"]
        status, body, _ = await call(http, "GET", f"{stage.url}/admin/jobs/{job.job_id}", headers=AUTH)
        assert status == 200  # reading needs Redis only
    finally:
        stage.stop()
