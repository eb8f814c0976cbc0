"""The admin page (/admin): server-rendered HTML over the same operations as the
admin API -- jobs with filters and paging, a job's detail and history with Retry
and Resend, revenue, consumer lag. Log in with ADMIN_TOKEN; the session lives in an
HttpOnly, SameSite=Strict cookie, and every form that changes something carries a
CSRF token (auth.py). Pages are never cached, framed, or sent as a Referer.

Emails: like the API, the page shows jobs redacted and never displays an address.
It can still find a customer's jobs BY address (the whole address, ignoring case,
never a part of it), because "where is my download?" mails arrive with nothing
else; matching happens here, against the job table, so addresses never leave it."""

from __future__ import annotations

from typing import Awaitable, Callable
from urllib.parse import urlencode

from aiohttp import web

from schemas.job import Job
from schemas.status import JobStatus
from services.gateway import auth
from services.gateway.admin_api import Unavailable, measure_lag, parse_limit, parse_statuses, publish_command
from services.gateway.context import CONTEXT
from services.gateway.templates import admin as html
from smi.jobtable import JobNotFound, JobTable
from smi.ops import jobs, revenue

ROWS_DEFAULT = 25
ROWS_MIN, ROWS_MAX = 10, 100
# Payment status and email are not indexed: filtering by them reads jobs newest
# first until the page is full or this many were read, and "Next" goes on from there.
SCAN_BUDGET = 5000
FILTERS = ("status", "payment_status", "email", "job_id")
HEADERS = {
    "Cache-Control": "no-store", "Referrer-Policy": "no-referrer", "X-Frame-Options": "DENY",
    "Content-Security-Policy": "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; "
                               "frame-ancestors 'none'; base-uri 'none'",
}

PageHandler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]


def register(app: web.Application) -> None:
    auth.setup(app)
    app.router.add_get(html.HOME, home)
    app.router.add_get(html.LOGIN, login_form)
    app.router.add_post(html.LOGIN, login)
    app.router.add_post(html.LOGOUT, logged_in(logout))
    app.router.add_get(html.JOBS, logged_in(job_list))
    app.router.add_get(html.JOBS + "/{job_id}", logged_in(job_detail))
    app.router.add_post(html.JOBS + "/{job_id}/retry", logged_in(retry))
    app.router.add_post(html.JOBS + "/{job_id}/resend", logged_in(resend))
    app.router.add_get(html.REVENUE, logged_in(revenue_view))
    app.router.add_get(html.LAG, logged_in(lag_view))


def page(body: str, status: int = 200, **headers: str) -> web.Response:
    return web.Response(text=body, status=status, content_type="text/html", headers={**HEADERS, **headers})


def enabled_token(request: web.Request) -> str:
    token = auth.configured_token(request)
    if token is None:
        raise web.HTTPServiceUnavailable(text=auth.DISABLED)
    return token


def logged_in(handler: PageHandler) -> PageHandler:
    """Wrap a page handler: to the login form without a valid session; a POST must
    also carry the session's CSRF token. The handler gets the session too."""
    async def guarded(request: web.Request) -> web.StreamResponse:
        session = request.cookies.get(auth.SESSION_COOKIE, "")
        if not auth.session_is_valid(enabled_token(request), session):
            raise web.HTTPSeeOther(html.LOGIN)
        if request.method == "POST":
            form = await request.post()
            if not auth.csrf_is_valid(session, str(form.get("csrf", ""))):
                return page(html.error_page("Refused", "The form was stale or not ours: reload the page and "
                                            "try again."), 403)
        return await handler(request, session)
    return guarded


# -- login -------------------------------------------------------------------------

async def home(request: web.Request) -> web.Response:
    raise web.HTTPSeeOther(html.JOBS)


async def login_form(request: web.Request) -> web.Response:
    if auth.session_is_valid(enabled_token(request), request.cookies.get(auth.SESSION_COOKIE, "")):
        raise web.HTTPSeeOther(html.JOBS)
    return page(html.login_page())


async def login(request: web.Request) -> web.Response:
    token = enabled_token(request)
    await auth.refuse_if_throttled(request)
    given = str((await request.post()).get("token", ""))
    if not auth.token_matches(token, given):
        await auth.charge_failure(request)
        return page(html.login_page("Wrong token."), 401)
    response = web.HTTPSeeOther(html.JOBS)
    secure = request.app[CONTEXT].settings.public_base_url.startswith("https://")
    response.set_cookie(auth.SESSION_COOKIE, auth.new_session(token), path=html.HOME, httponly=True,
                        samesite="Strict", secure=secure, max_age=auth.SESSION_TTL_SECONDS)
    raise response


async def logout(request: web.Request, session: str) -> web.Response:
    # The session value stays valid until it expires (sessions are stateless);
    # changing ADMIN_TOKEN ends every session at once.
    response = web.HTTPSeeOther(html.LOGIN)
    response.del_cookie(auth.SESSION_COOKIE, path=html.HOME)
    raise response


# -- jobs --------------------------------------------------------------------------

async def job_list(request: web.Request, session: str) -> web.Response:
    table = request.app[CONTEXT].table
    form = {name: request.query.get(name, "").strip() for name in FILTERS}
    show = dict(form=form, statuses=[s.value for s in JobStatus], csrf=auth.csrf_token(session))
    try:
        statuses = parse_statuses(form["status"])
        limit = parse_limit(request.query.get("limit"), ROWS_DEFAULT)
        if not ROWS_MIN <= limit <= ROWS_MAX:
            raise ValueError(f"rows must be {ROWS_MIN}..{ROWS_MAX}")
        if form["payment_status"] and form["payment_status"] not in html.PAYMENT_STATUSES:
            raise ValueError(f"unknown payment status {form['payment_status']!r}")
    except ValueError as exc:
        return page(html.jobs_page(jobs=[], error=str(exc), **show), 400)
    form["limit"] = str(limit)
    if form["job_id"]:
        try:
            job = await jobs.job_named(table, form["job_id"])
        except JobNotFound:
            return page(html.jobs_page(jobs=[], error=f"No job with id {form['job_id']}.", **show), 404)
        raise web.HTTPSeeOther(html.job_url(job.job_id))
    wanted = _matcher(form["payment_status"], form["email"])
    found, cursor, scanned = await _find(table, statuses, wanted, limit, request.query.get("cursor") or None)
    next_url = f"{html.JOBS}?{urlencode({**_set(form), 'cursor': cursor})}" if cursor else None
    note = (f"Looked through {scanned} jobs and found {len(found)}; the next page searches older jobs."
            if wanted and cursor and len(found) < limit else None)
    return page(html.jobs_page(jobs=[job.redacted() for job in found], next_url=next_url, note=note, **show))


def _set(form: dict[str, str]) -> dict[str, str]:
    return {name: value for name, value in form.items() if value}


def _matcher(payment_status: str, email: str) -> Callable[[Job], bool] | None:
    if not payment_status and not email:
        return None
    address = email.casefold()
    return lambda job: ((not payment_status or job.payment_status == payment_status)
                        and (not address or (job.email or "").casefold() == address))


async def _find(table: JobTable, statuses: list[JobStatus] | None, wanted: Callable[[Job], bool] | None,
                limit: int, cursor: str | None) -> tuple[list[Job], str | None, int]:
    """Up to ``limit`` jobs, newest first, that ``wanted`` accepts; with the cursor
    after the last job read, and how many were read."""
    if wanted is None:
        found = await jobs.list_jobs(table, statuses=statuses, limit=limit, cursor=cursor)
        return found.jobs, found.next_cursor, len(found.jobs)
    matches: list[Job] = []
    scanned = 0
    while len(matches) < limit and scanned < SCAN_BUDGET:
        # Never read more than the page still needs: then the page's cursor is
        # exactly where the reading stopped, and no match is skipped.
        batch = await jobs.list_jobs(table, statuses=statuses, limit=limit - len(matches), cursor=cursor)
        scanned += len(batch.jobs)
        matches += [job for job in batch.jobs if wanted(job)]
        cursor = batch.next_cursor
        if cursor is None:
            break
    return matches, cursor, scanned


async def job_detail(request: web.Request, session: str) -> web.Response:
    csrf = auth.csrf_token(session)
    try:
        view = await jobs.show_job(request.app[CONTEXT].table, request.match_info["job_id"])
    except JobNotFound:
        return page(html.error_page("No such job", "There is no job with this id.", csrf=csrf), 404)
    return page(html.job_page(view, csrf=csrf, sent=request.query.get("sent")))


async def retry(request: web.Request, session: str) -> web.Response:
    force = (await request.post()).get("force") == "true"
    return await _command(request, session, "retry", force=force)


async def resend(request: web.Request, session: str) -> web.Response:
    return await _command(request, session, "resend_download")


async def _command(request: web.Request, session: str, command: str, *, force: bool = False) -> web.Response:
    job_id = request.match_info["job_id"]
    csrf = auth.csrf_token(session)
    try:
        await publish_command(request.app[CONTEXT], command, job_id, requested_by="admin-page", force=force)
    except JobNotFound:
        return page(html.error_page("No such job", "There is no job with this id.", csrf=csrf), 404)
    except Unavailable as exc:
        return page(html.error_page("Not sent", f"{exc}: the command may not have gone out.", csrf=csrf), 503)
    # Post/redirect/get: reloading the job's page shows it again, never resends.
    raise web.HTTPSeeOther(f"{html.job_url(job_id)}?{urlencode({'sent': command})}")


# -- money and lag -----------------------------------------------------------------

async def revenue_view(request: web.Request, session: str) -> web.Response:
    totals = await revenue.revenue(request.app[CONTEXT].table)
    return page(html.revenue_page(totals, csrf=auth.csrf_token(session)))


async def lag_view(request: web.Request, session: str) -> web.Response:
    csrf = auth.csrf_token(session)
    try:
        groups = await measure_lag(request.app[CONTEXT])
    except Unavailable as exc:
        return page(html.lag_page(None, csrf=csrf, error=str(exc)), 503)
    return page(html.lag_page(groups, csrf=csrf))
