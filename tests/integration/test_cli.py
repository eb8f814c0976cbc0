"""The operator commands of `smi` (design.md, "Command line") as real subprocesses
against the real Redis and Kafka: a table seeded in a namespace of this run, read
with `jobs list/show` and `revenue`, acted on with `jobs retry/resend` (the commands
are read back from jobs.commands), and the exit codes of wrong input."""

from __future__ import annotations

import asyncio
import getpass
import json
import os
import re
import sys
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from schemas.status import JobStatus as S
from smi.jobtable import JobTable, connect
from tests.support.jobs import make_job
from tests.support.kafka_watch import TopicWatcher, for_job

BOOTSTRAP = os.environ.get("KAFKA_BOOTSTRAP_SERVERS", "127.0.0.1:9092")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
NAMESPACE = f"cli{uuid.uuid4().hex[:10]}:"
SHARDS = 8
ROOT = Path(__file__).resolve().parents[2]
EMAIL = "buyer@example.com"


@dataclass(frozen=True)
class Run:
    code: int
    out: str
    err: str

    def json(self):
        return json.loads(self.out)


async def smi(*args: str, namespace: str = NAMESPACE) -> Run:
    env = {**os.environ, "KAFKA_BOOTSTRAP_SERVERS": BOOTSTRAP, "REDIS_URL": REDIS_URL,
           "REDIS_NAMESPACE": namespace, "REDIS_SHARDS": str(SHARDS), "REDIS_CLUSTER_NODES": ""}
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "smi.cli", *args, cwd=ROOT, env=env,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout=60)
    return Run(proc.returncode, out.decode(), err.decode())


class SteppingClock:
    """Every write one second after the previous: creation and update order are
    unambiguous, so the expected order of every listing is known."""

    def __init__(self) -> None:
        self.moment = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)

    def __call__(self) -> datetime:
        self.moment += timedelta(seconds=1)
        return self.moment


@dataclass(frozen=True)
class Seeded:
    ids: dict[str, str]  # name -> job id, in creation order

    def newest_first(self, *names: str) -> list[str]:
        return [self.ids[n] for n in reversed(list(self.ids)) if not names or n in names]


@pytest.fixture(scope="module")
async def seeded():
    redis = connect(REDIS_URL)
    table = JobTable(redis, shards=SHARDS, namespace=NAMESPACE, clock=SteppingClock())
    paid = datetime(2025, 3, 1, 11, 0, tzinfo=UTC)
    ids = {}
    ids["new"] = (await make_job(table, S.NEW)).job_id
    ids["pending"] = (await make_job(table, S.PENDING)).job_id  # price 384
    ids["done_a"] = (await make_job(table, S.COMPLETED)).job_id  # price 384
    ids["done_b"] = (await make_job(table, S.COMPLETED, price_cents=1000)).job_id
    ids["failed"] = (await make_job(table, S.FAILED, price_cents=500)).job_id
    ids["abandoned"] = (await make_job(table, S.ABANDONED)).job_id  # never paid: not charged
    for name in ("pending", "done_a", "done_b", "failed"):
        await table.update(ids[name], {"paid_at": paid})
    await table.update(ids["done_a"], {"cost_cents": 64, "credits": 16})
    await table.update(ids["done_b"], {"cost_cents": 200, "credits": 50})
    await table.update(ids["failed"], {"cost_cents": 120, "refund_id": "re_test", "refund_amount_cents": 500,
                                       "refunded_at": paid})
    await table.mark_done(ids["failed"], "email:refund")  # the refund email, sent
    # The oldest job is the last one written, so updated_at orders it first.
    await table.update(ids["new"], {"post_id": 8})
    yield Seeded(ids)
    await redis.aclose()


# ------------------------------------------------------------------------ jobs list


async def test_list_gives_every_job_newest_first(seeded):
    run = await smi("jobs", "list", "--json")
    assert run.code == 0, run.err
    listing = run.json()
    assert [job["job_id"] for job in listing["jobs"]] == seeded.newest_first()
    assert listing["next_cursor"] is None
    assert EMAIL not in run.out and all("email" not in job and job["has_email"] for job in listing["jobs"])


async def test_list_filters_by_status(seeded):
    run = await smi("jobs", "list", "--status", "completed,failed", "--json")
    assert run.code == 0, run.err
    assert [job["job_id"] for job in run.json()["jobs"]] == seeded.newest_first("done_a", "done_b", "failed")
    assert {job["status"] for job in run.json()["jobs"]} == {"completed", "failed"}


async def test_list_pages_with_limit_and_cursor(seeded):
    first = (await smi("jobs", "list", "--limit", "4", "--json")).json()
    assert [job["job_id"] for job in first["jobs"]] == seeded.newest_first()[:4]
    rest = (await smi("jobs", "list", "--limit", "4", "--cursor", first["next_cursor"], "--json")).json()
    assert [job["job_id"] for job in rest["jobs"]] == seeded.newest_first()[4:]
    assert rest["next_cursor"] is None


async def test_list_orders_by_updated_at(seeded):
    run = await smi("jobs", "list", "--order-by", "updated_at", "--limit", "2", "--json")
    assert run.code == 0, run.err
    assert [job["job_id"] for job in run.json()["jobs"]] == [seeded.ids["new"], seeded.ids["failed"]]


async def test_list_as_a_table_for_people(seeded):
    run = await smi("jobs", "list", "--status", "failed")
    assert run.code == 0, run.err
    assert "1 job" in run.out and "failed" in run.out and EMAIL not in run.out


# ------------------------------------------------------------------------ jobs show


async def test_show_gives_the_redacted_job_the_steps_done_and_its_history(seeded):
    job_id = seeded.ids["failed"]
    run = await smi("jobs", "show", job_id, "--json")
    assert run.code == 0, run.err
    view = run.json()
    assert (view["job_id"], view["status"], view["refund_amount_cents"]) == (job_id, "failed", 500)
    assert [(h["from"], h["to"]) for h in view["history"]] == [
        (None, "new"), ("new", "awaiting_payment"), ("awaiting_payment", "pending"), ("pending", "processing"),
        ("processing", "failed")]
    assert all(h["at"] and h["by"] for h in view["history"])
    assert "email" not in view and view["has_email"] is True and EMAIL not in run.out
    assert view["done"] == ["email:refund"]

    table = await smi("jobs", "show", job_id)
    assert table.code == 0, table.err
    assert "history" in table.out and "processing" in table.out and EMAIL not in table.out
    assert re.search(r"done\s*│\s*email:refund", table.out), table.out


@pytest.mark.parametrize("job_id", [str(uuid.uuid4()), "not-a-job-id", "{s1}"], ids=["unknown", "malformed", "braces"])
async def test_show_of_no_such_job_exits_1(seeded, job_id):
    run = await smi("jobs", "show", job_id, "--json")
    assert (run.code, run.out) == (1, "")
    assert job_id in run.err


async def test_find_gives_the_job_of_a_stripe_or_upscaler_id():
    # A namespace of its own: the revenue tests count every job of the seeded one.
    namespace = f"clifind{uuid.uuid4().hex[:10]}:"
    redis = connect(REDIS_URL)
    table = JobTable(redis, shards=SHARDS, namespace=namespace)
    try:
        job = await make_job(table, S.COMPLETED)
        session, intent, upscaled = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex[:24]}", str(uuid.uuid4())
        await table.update(job.job_id, {"stripe_checkout_session_id": session, "stripe_payment_intent_id": intent,
                                        "upsampler_job_id": upscaled})
    finally:
        await redis.aclose()
    for flag, value in (("--checkout-session", session), ("--payment-intent", intent), ("--upsampler-job", upscaled)):
        run = await smi("jobs", "find", flag, value, "--json", namespace=namespace)
        assert run.code == 0, run.err
        view = run.json()
        assert view["job_id"] == job.job_id and view["history"][-1]["to"] == "completed"
        assert "email" not in view and EMAIL not in run.out
    readable = await smi("jobs", "find", "--payment-intent", intent, namespace=namespace)
    assert readable.code == 0 and job.job_id in readable.out and "history" in readable.out


@pytest.mark.parametrize("args", [("--payment-intent", "pi_nobody"), ("--checkout-session", "cs with spaces"),
                                  ("--upsampler-job", "x" * 300)])
async def test_find_of_an_id_no_job_has_exits_1(seeded, args):
    run = await smi("jobs", "find", *args, "--json")
    assert (run.code, run.out) == (1, "")
    assert "no job with" in run.err


# ------------------------------------------------------------------------ commands


async def test_retry_and_resend_publish_the_command_keyed_by_job(seeded):
    watcher = await TopicWatcher(BOOTSTRAP, ["jobs.commands"]).start()  # from the end offsets of now
    try:
        failed, done = seeded.ids["failed"], seeded.ids["done_a"]
        unknown = str(uuid.uuid4())
        runs = [await smi("jobs", "retry", failed, "--force"), await smi("jobs", "resend", done),
                await smi("jobs", "retry", failed)]
        assert [r.code for r in runs] == [0, 0, 0], [r.err for r in runs]
        assert (await smi("jobs", "retry", unknown)).code == 1

        retries = await watcher.wait_for("jobs.commands", for_job(failed), count=2)
        [resend] = await watcher.wait_for("jobs.commands", for_job(done))
        by = f"cli:{getpass.getuser()}"
        assert [r.json() for r in retries] == [
            {"command": "retry", "job_id": failed, "requested_by": by, "force": True},
            {"command": "retry", "job_id": failed, "requested_by": by, "force": False}]
        assert resend.json() == {"command": "resend_download", "job_id": done, "requested_by": by, "force": False}
        assert watcher.matching("jobs.commands", for_job(unknown)) == []
    finally:
        await watcher.stop()


# ------------------------------------------------------------------------ revenue


async def test_revenue_matches_a_hand_computation(seeded):
    charged = 384 + 384 + 1000 + 500  # pending, done_a, done_b, failed: the jobs with paid_at
    cost = 64 + 200  # completed jobs only: the failed job's upscaler cost is not counted
    refunded = 500
    profit = charged - refunded - cost
    run = await smi("revenue", "--json")
    assert run.code == 0, run.err
    assert run.json() == {"charged_cents": charged, "cost_cents": cost, "refunded_cents": refunded,
                          "profit_cents": profit, "margin_percent": round(profit * 100 / (charged - refunded), 2),
                          "paid_jobs": 4, "refunded_jobs": 1}
    assert profit == 1504 and run.json()["margin_percent"] == 85.07

    table = await smi("revenue")
    assert table.code == 0, table.err
    assert "$22.68" in table.out and "$15.04" in table.out and "85.07%" in table.out


async def test_revenue_recount_matches_the_running_totals(seeded):
    run = await smi("revenue", "--recount")
    assert run.code == 0, run.err
    assert "$22.68" in run.out and "match" in run.out
    run = await smi("revenue", "--recount", "--json")
    assert run.code == 0, run.err
    report = run.json()
    assert report["match"] is True and report["recount"] == report["totals"] and report["incomplete_shards"] == []
    assert report["recount"]["charged_cents"] == 2268 and report["recount"]["refunded_jobs"] == 1


async def test_revenue_recount_finds_tampered_totals_and_rebuild_fixes_them(seeded):
    redis = connect(REDIS_URL)
    table = JobTable(redis, shards=SHARDS, namespace=NAMESPACE)
    shard = int(table.keys.tag_of(seeded.ids["done_b"]).split("{s")[1].rstrip("}"))
    try:
        await redis.hincrby(table.keys.revenue(shard), "cost", 36)
        run = await smi("revenue", "--recount")
        assert run.code == 3, (run.out, run.err)
        assert "DIFFER" in run.err and "cost_cents 264 (recount) vs 300 (running totals)" in run.err
        assert "--rebuild" in run.err
        run = await smi("revenue", "--recount", "--json")
        assert run.code == 3
        assert run.json()["match"] is False and run.json()["totals"]["cost_cents"] == 300
        assert (await smi("revenue", "--json")).json()["cost_cents"] == 300  # the fast path reads the totals
    finally:
        rebuilt = await smi("revenue", "--rebuild")
        await redis.aclose()
    assert rebuilt.code == 0, (rebuilt.out, rebuilt.err)
    assert "rebuilt the running totals from 6 jobs" in rebuilt.out and "match" in rebuilt.out
    assert (await smi("revenue", "--json")).json()["cost_cents"] == 264


async def test_revenue_of_a_table_older_than_the_totals(seeded):
    redis = connect(REDIS_URL)
    table = JobTable(redis, shards=SHARDS, namespace=NAMESPACE)
    try:
        await redis.delete(*(table.keys.revenue(shard) for shard in range(SHARDS)))
        run = await smi("revenue", "--json")  # recounted, with a warning naming the fix
        assert run.code == 0, run.err
        assert run.json()["charged_cents"] == 2268 and run.json()["cost_cents"] == 264
        assert "predates" in run.err and "--rebuild" in run.err
        run = await smi("revenue", "--recount")
        assert run.code == 3 and "no complete running totals" in run.err and "--rebuild" in run.err
    finally:
        rebuilt = await smi("revenue", "--rebuild", "--json")
        await redis.aclose()
    assert rebuilt.code == 0, rebuilt.err
    assert rebuilt.json()["match"] is True and rebuilt.json()["rebuilt_jobs"] == 6
    run = await smi("revenue", "--recount")
    assert run.code == 0 and run.err == ""


# ------------------------------------------------------------------------ lag


async def test_lag_json_lists_every_stage_group():
    run = await smi("lag", "--json")
    assert run.code == 0, run.err
    groups = run.json()
    assert [g["group"] for g in groups] == ["checkout", "processor", "notifier", "janitor"]
    for group in groups:
        assert group["status"] in {"ok", "lagging", "stalled", "stopped"}
        assert group["total_lag"] == sum(p["lag"] for p in group["partitions"])
        assert all({"topic", "partition", "committed", "end", "lag"} <= set(p) for p in group["partitions"])


# ------------------------------------------------------------------------ bad usage


@pytest.mark.parametrize("args, mentions", [
    (["jobs", "list", "--limit", "abc"], "--limit"),
    (["jobs", "list", "--limit", "0"], "--limit"),
    (["jobs", "list", "--limit", "1001"], "--limit"),
    (["jobs", "list", "--status", "nonsense"], "nonsense"),
    (["jobs", "list", "--status", "failed,paid"], "paid"),
    (["jobs", "list", "--order-by", "x"], "--order-by"),
    (["jobs", "show"], "ID"),
    (["jobs", "find"], "one of the arguments"),
    (["jobs", "find", "--payment-intent", "pi_1", "--upsampler-job", "u"], "not allowed"),
    (["jobs", "frobnicate"], "frobnicate"),
    (["jobs", "resend", str(uuid.uuid4()), "--force"], "--force"),
    (["revenue", "--watch"], "--watch"),
    (["revenue", "--recount", "--rebuild"], "not allowed"),
    (["run", "all", "--workers", "checkout"], "STAGE=N"),
    (["run", "all", "--workers", "checkout=0"], "from 1 to 32"),
    (["run", "all", "--workers", "checkout=2,notifier=many"], "notifier"),
    (["run", "all", "--workers", "checkout=2", "--workers", "checkout=3"], "twice"),
    (["run", "all", "--workers", "upscaler=2"], "'upscaler' is not one of checkout, processor, notifier, janitor, gateway"),
    (["run", "checkout", "--workers", "checkout=2"], "goes with `smi run all`"),
])
async def test_bad_usage_exits_2_with_a_message(args, mentions):
    run = await smi(*args)
    assert run.code == 2, (run.out, run.err)
    assert "error:" in run.err and mentions in run.err
    assert run.out == ""
