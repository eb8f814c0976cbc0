"""The admin page in headless Chromium (Debian's package, scripts/install-browser),
driven by playwright, against a real gateway process with its own ADMIN_TOKEN.
An operator logs in, filters, opens a failed job, clicks Retry, sees the command
go out and, once the job moves, its new status."""

from __future__ import annotations

import json
import uuid

import pytest
from playwright.async_api import async_playwright

from schemas.status import JobStatus as S
from schemas.status import Stage
from tests.e2e.conftest import KAFKA_NAMES, start_gateway
from tests.support.jobs import make_job
from tests.support.kafka_watch import for_job

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TOKEN = "admin-page-" + uuid.uuid4().hex


@pytest.fixture(scope="module")
async def admin(stage_env, tmp_path_factory, http, topics_ready):
    stage = await start_gateway(http, {**stage_env, "ADMIN_TOKEN": TOKEN}, tmp_path_factory.mktemp("admin-page"))
    yield stage
    stage.stop()


@pytest.fixture
async def browser():
    async with async_playwright() as driver:
        chromium = await driver.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        context = await chromium.new_context(viewport={"width": 1280, "height": 900})
        yield context
        await chromium.close()


async def log_in(page, token: str):
    await page.fill("input[name=token]", token)
    async with page.expect_navigation():
        await page.click("button[type=submit]")


async def test_an_operator_logs_in_filters_and_retries_a_failed_job(admin, browser, table, watcher, tmp_path):
    # Refunded, as checkout leaves every failed paid job: a running processor
    # refuses the retry without force, so the job moves only when this test moves it.
    failed = await make_job(table, S.FAILED, refund_id=f"re_{uuid.uuid4().hex[:12]}", refund_amount_cents=384)
    await table.mark_done(failed.job_id, "email:refund")  # the refund email, sent
    completed = await make_job(table, S.COMPLETED)
    page = await browser.new_page()

    response = await page.goto(f"{admin.url}/admin")
    assert page.url == f"{admin.url}/admin/ui/login" and response.status == 200
    await log_in(page, "not-the-token")
    assert page.url.endswith("/admin/ui/login")
    assert await page.locator(".error").inner_text() == "Wrong token."

    await log_in(page, TOKEN)
    assert page.url == f"{admin.url}/admin/ui/jobs"
    [cookie] = await browser.cookies()
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/admin"
    assert TOKEN not in cookie["value"] and not cookie["secure"]  # PUBLIC_BASE_URL is http here

    await page.select_option("select[name=status]", "failed")
    await page.select_option("select[name=limit]", "100")
    async with page.expect_navigation():
        await page.click("button:has-text('Filter')")
    statuses = await page.locator("tbody tr td:nth-child(2)").all_inner_texts()
    assert statuses and set(statuses) == {"failed"}
    assert await page.locator(f"a:has-text('{failed.job_id}')").count() == 1
    assert await page.locator(f"a:has-text('{completed.job_id}')").count() == 0

    async with page.expect_navigation():
        await page.click(f"a:has-text('{failed.job_id}')")
    assert await page.locator("#job-status").inner_text() == "failed"
    history = await page.locator("h2:has-text('History') + table tbody tr").count()
    assert history == 5  # new, awaiting_payment, pending, processing, failed
    assert await page.locator("h2:has-text('Fields') + table tr:has(th:text-is('done')) td").inner_text() \
        == "email:refund"
    async with page.expect_navigation():
        await page.click("button:has-text('Retry')")
    assert "Retry requested" in await page.locator(".notice").inner_text()
    [message] = await watcher.wait_for("jobs.commands", for_job(failed.job_id))
    assert json.loads(message.value) == {"command": "retry", "job_id": failed.job_id,
                                         "requested_by": "admin-page", "force": False}

    # What the processor would do with a retry it accepts.
    moved = await table.transition(failed.job_id, S.PROCESSING, actor=Stage.PROCESSOR,
                                   event_id=f"admin-page-test-{uuid.uuid4()}")
    assert moved.applied
    await page.reload()
    assert await page.locator("#job-status").inner_text() == "processing"
    assert await page.locator("h2:has-text('History') + table tbody tr").count() == 6
    await page.screenshot(path=str(tmp_path / "admin-job.png"), full_page=True)


async def test_the_email_filter_finds_a_customer_by_whole_address_and_pages(admin, browser, table):
    address = f"customer-{uuid.uuid4().hex[:8]}@example.com"
    mine = [await make_job(table, S.COMPLETED, email=address) for _ in range(11)]
    await make_job(table, S.COMPLETED, email=f"x{address}")  # not a match: the whole address only
    page = await browser.new_page()
    await page.goto(f"{admin.url}/admin")
    await log_in(page, TOKEN)

    await page.fill("input[name=email]", address.upper())
    await page.select_option("select[name=limit]", "10")
    async with page.expect_navigation():
        await page.click("button:has-text('Filter')")
    first = await page.locator("tbody tr td:first-child").all_inner_texts()
    async with page.expect_navigation():
        await page.click("a[rel=next]")
    second = await page.locator("tbody tr td:first-child").all_inner_texts()
    assert len(first) == 10 and len(second) == 1 and set(first + second) == {job.job_id for job in mine}
    # The address is what the operator typed into the filter, never shown with the jobs.
    assert address not in (await page.locator("table").inner_text()).lower()


async def test_the_job_id_box_takes_a_stripe_payment_or_upscaler_id_too(admin, browser, table):
    job = await make_job(table, S.COMPLETED)
    session, intent, upscaled = f"cs_test_{uuid.uuid4().hex}", f"pi_{uuid.uuid4().hex[:24]}", str(uuid.uuid4())
    await table.update(job.job_id, {"stripe_checkout_session_id": session, "stripe_payment_intent_id": intent,
                                    "upsampler_job_id": upscaled})
    page = await browser.new_page()
    await page.goto(f"{admin.url}/admin")
    await log_in(page, TOKEN)
    for typed in (session, intent, upscaled, job.job_id):
        await page.fill("input[name=job_id]", typed)
        async with page.expect_navigation():
            await page.click("button:has-text('Filter')")
        assert page.url.endswith(f"/admin/ui/jobs/{job.job_id}"), typed
        await page.go_back()
    await page.fill("input[name=job_id]", f"pi_{uuid.uuid4().hex[:24]}")
    async with page.expect_navigation():
        await page.click("button:has-text('Filter')")
    assert "No job with id pi_" in await page.content()


async def test_forms_need_the_csrf_token_and_logout_ends_the_session(admin, browser, table, watcher):
    job = await make_job(table, S.COMPLETED)
    page = await browser.new_page()
    await page.goto(f"{admin.url}/admin")
    await log_in(page, TOKEN)

    forged = await page.request.post(f"{admin.url}/admin/ui/jobs/{job.job_id}/resend",
                                     form={"csrf": "0" * 64}, max_redirects=0)
    assert forged.status == 403
    await page.goto(f"{admin.url}/admin/ui/jobs/{job.job_id}")
    async with page.expect_navigation():
        await page.click("button:has-text('Resend download')")
    assert "Resend requested" in await page.locator(".notice").inner_text()
    [message] = await watcher.wait_for("jobs.commands", for_job(job.job_id))
    assert json.loads(message.value)["command"] == "resend_download"

    async with page.expect_navigation():
        await page.click("text=Revenue")
    assert {"Charged", "Refunds", "Upscaler cost", "Profit", "Margin"} <= set(
        await page.locator("th").all_inner_texts())
    async with page.expect_navigation():
        await page.click("text=Consumer lag")
    groups = await page.locator("tbody tr td:first-child").all_inner_texts()
    # As the broker names them: in the session's namespace.
    assert set(groups) == {KAFKA_NAMES.group(stage) for stage in ("checkout", "processor", "notifier", "janitor")}

    async with page.expect_navigation():
        await page.click("button:has-text('Log out')")
    assert page.url.endswith("/admin/ui/login")
    await page.goto(f"{admin.url}/admin/ui/jobs")
    assert page.url.endswith("/admin/ui/login")
