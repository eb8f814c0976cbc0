"""HTML of the admin page: small functions over ``html.escape``, no template engine.
Every value from a job, a query string or Kafka goes through ``esc`` (text and
attribute values alike: it escapes quotes too). Jobs arrive here redacted, as
``Job.redacted()`` dicts, so no customer email can be rendered by mistake."""

from __future__ import annotations

from html import escape
from typing import Any, Iterable, Mapping
from urllib.parse import quote

from schemas.money import format_usd
from smi.ops.lag import GroupLag
from smi.ops.revenue import Revenue

# The page's URLs, for the routes and the links alike. Under /admin, the session
# cookie's path; under /admin/ui, apart from the API's /admin/jobs.
HOME = "/admin"
LOGIN = "/admin/ui/login"
LOGOUT = "/admin/ui/logout"
JOBS = "/admin/ui/jobs"
REVENUE = "/admin/ui/revenue"
LAG = "/admin/ui/lag"

PAYMENT_STATUSES = ("unpaid", "paid", "failed", "refunded")
PAGE_SIZES = (10, 25, 50, 100)
SENT_NOTICES = {
    "retry": "Retry requested: the command is on jobs.commands; the processor takes it from there.",
    "resend_download": "Resend requested: the command is on jobs.commands; the notifier emails a new link.",
}
# Which operator command applies to a job in which status (the stages refuse the rest).
RETRYABLE = ("failed", "pending")
RESENDABLE = ("completed",)

STYLE = """
body{font-family:system-ui,sans-serif;margin:0;color:#222;background:#fafafa}
header{background:#243447;color:#fff;padding:.6rem 1.5rem;display:flex;gap:1.2rem;align-items:center}
header a{color:#fff;text-decoration:none}header .brand{font-weight:600;margin-right:auto}
main{padding:1rem 1.5rem;max-width:72rem}
table{border-collapse:collapse;background:#fff;margin:.5rem 0 1rem}
th,td{border:1px solid #ddd;padding:.3rem .6rem;text-align:left;font-size:.9rem}th{background:#eef1f5}
td.num{text-align:right;font-variant-numeric:tabular-nums}code{font-size:.85rem}
form.filters{display:flex;flex-wrap:wrap;gap:.8rem;align-items:end;margin-bottom:.5rem}
form.filters label{display:flex;flex-direction:column;font-size:.8rem;gap:.2rem}
form.inline{display:inline}button{padding:.35rem .9rem;cursor:pointer}
.notice{background:#e7f6e7;border:1px solid #8c8;padding:.5rem .8rem}
.error{background:#fbeaea;border:1px solid #d88;padding:.5rem .8rem}
.status-failed,.status-stalled,.status-stopped{color:#b00020;font-weight:600}
.status-completed,.status-ok{color:#1b6e1b}.status-lagging{color:#a66300;font-weight:600}
.actions{display:flex;gap:1.5rem;margin:1rem 0}.actions form{border:1px solid #ddd;background:#fff;padding:.7rem}
"""


def esc(value: Any) -> str:
    return escape("" if value is None else str(value))


def job_url(job_id: str) -> str:
    return f"{JOBS}/{quote(job_id, safe='')}"


def command_url(job_id: str, action: str) -> str:
    return f"{job_url(job_id)}/{action}"


def layout(title: str, content: str, *, csrf: str | None = None) -> str:
    """The whole document; the navigation (with its logout form) only when logged in."""
    nav = ""
    if csrf is not None:
        nav = (f'<a href="{JOBS}">Jobs</a><a href="{REVENUE}">Revenue</a><a href="{LAG}">Consumer lag</a>'
               f'<form class="inline" method="post" action="{LOGOUT}">{csrf_field(csrf)}'
               f'<button type="submit">Log out</button></form>')
    return (f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{esc(title)} - smi admin</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{STYLE}</style></head>'
            f'<body><header><span class="brand">smi admin</span>{nav}</header>'
            f'<main><h1>{esc(title)}</h1>{content}</main></body></html>')


def csrf_field(csrf: str) -> str:
    return f'<input type="hidden" name="csrf" value="{esc(csrf)}">'


def message(text: str | None, kind: str = "notice") -> str:
    return f'<p class="{kind}" role="status">{esc(text)}</p>' if text else ""


def error_page(title: str, text: str, *, csrf: str | None = None) -> str:
    return layout(title, message(text, "error"), csrf=csrf)


def login_page(error: str | None = None) -> str:
    form = (f'{message(error, "error")}<form method="post" action="{LOGIN}">'
            '<p><label>Admin token <input type="password" name="token" autocomplete="current-password" '
            'required autofocus></label></p><button type="submit">Log in</button></form>')
    return layout("Log in", form)


def _options(values: Iterable[Any], selected: str, *, any_label: str | None = None) -> str:
    options = [f'<option value="">{esc(any_label)}</option>'] if any_label else []
    options += [f'<option value="{esc(v)}"{" selected" if str(v) == selected else ""}>{esc(v)}</option>'
                for v in values]
    return "".join(options)


def jobs_page(*, jobs: list[dict[str, Any]], form: Mapping[str, str], statuses: Iterable[str], csrf: str,
              next_url: str | None = None, note: str | None = None, error: str | None = None) -> str:
    """``form`` holds the filter values as typed, to fill the form in again."""
    filters = (
        f'<form class="filters" method="get" action="{JOBS}">'
        f'<label>Status<select name="status">{_options(statuses, form.get("status", ""), any_label="any")}'
        f'</select></label>'
        f'<label>Payment<select name="payment_status">'
        f'{_options(PAYMENT_STATUSES, form.get("payment_status", ""), any_label="any")}</select></label>'
        f'<label>Customer email (whole address)<input type="email" name="email" value="{esc(form.get("email"))}">'
        f'</label>'
        f'<label title="the job id, a Stripe cs_... or pi_... id, or the upscaler\'s job id">Job, Stripe or upscaler id'
        f'<input name="job_id" size="38" value="{esc(form.get("job_id"))}"></label>'
        f'<label>Rows<select name="limit">{_options(PAGE_SIZES, form.get("limit", ""))}</select></label>'
        f'<button type="submit">Filter</button><a href="{JOBS}">Clear</a></form>')
    rows = "".join(
        f'<tr><td><a href="{esc(job_url(job["job_id"]))}"><code>{esc(job["job_id"])}</code></a></td>'
        f'<td class="status-{esc(job["status"])}">{esc(job["status"])}</td><td>{esc(job["payment_status"] or "-")}</td>'
        f'<td>{esc(job["resolution"])}</td><td class="num">{_money(job["price_cents"])}</td>'
        f'<td class="num">{esc(job["attempts"])}</td><td>{_moment(job["created_at"])}</td>'
        f'<td>{_moment(job["updated_at"])}</td></tr>'
        for job in jobs)
    table = ('<table><thead><tr><th>Job id</th><th>Status</th><th>Payment</th><th>Res.</th><th>Price</th>'
             f'<th>Attempts</th><th>Created (UTC)</th><th>Updated (UTC)</th></tr></thead><tbody>{rows}</tbody></table>'
             if jobs else "<p>No jobs match.</p>")
    paging = f'<p><a href="{esc(next_url)}" rel="next">Next page (older) &rarr;</a></p>' if next_url else ""
    return layout("Jobs", f"{message(error, 'error')}{filters}{message(note)}{table}{paging}", csrf=csrf)


def job_page(view: dict[str, Any], *, csrf: str, sent: str | None = None) -> str:
    """``view`` is smi.ops.jobs.show_job's: the redacted job, the steps done and
    its history."""
    fields = "".join(f"<tr><th>{esc(name)}</th><td>{_field(name, value)}</td></tr>"
                     for name, value in view.items() if name != "history" and value is not None)
    history = "".join(
        f'<tr><td>{_moment(entry["at"])}</td><td>{esc(entry["from"] or "(new)")}</td>'
        f'<td class="status-{esc(entry["to"])}">{esc(entry["to"])}</td><td>{esc(entry["by"])}</td>'
        f'<td><code>{esc(entry["event_id"] or "-")}</code></td></tr>'
        for entry in view["history"])
    content = (f'{message(SENT_NOTICES.get(sent or ""))}'
               f'<p>Status: <strong class="status-{esc(view["status"])}" id="job-status">{esc(view["status"])}'
               f'</strong></p>{_actions(view, csrf)}'
               f'<h2>History</h2><table><thead><tr><th>At (UTC)</th><th>From</th><th>To</th><th>By</th>'
               f'<th>Event id</th></tr></thead><tbody>{history}</tbody></table>'
               f'<h2>Fields</h2><table><tbody>{fields}</tbody></table>')
    return layout(f"Job {view['job_id']}", content, csrf=csrf)


def _actions(view: dict[str, Any], csrf: str) -> str:
    forms = []
    if view["status"] in RETRYABLE:
        force = ('<p><label><input type="checkbox" name="force" value="true"> force: this job was refunded; '
                 'retry it anyway</label></p>' if view.get("refund_id") else "")
        forms.append(f'<form method="post" action="{esc(command_url(view["job_id"], "retry"))}">{csrf_field(csrf)}'
                     f'{force}<button type="submit">Retry</button></form>')
    if view["status"] in RESENDABLE:
        forms.append(f'<form method="post" action="{esc(command_url(view["job_id"], "resend"))}">'
                     f'{csrf_field(csrf)}<p>Email the customer a new download link.</p>'
                     f'<button type="submit">Resend download</button></form>')
    if not forms:
        return f'<p>No operator action applies to a job that is {esc(view["status"])}.</p>'
    return f'<div class="actions">{"".join(forms)}</div>'


def revenue_page(totals: Revenue, *, csrf: str) -> str:
    margin = "-" if totals.margin_percent is None else f"{totals.margin_percent:.2f}%"
    rows = (("Charged", f"{_money(totals.charged_cents)} ({totals.paid_jobs} paid jobs)"),
            ("Refunds", f"{_money(totals.refunded_cents)} ({totals.refunded_jobs} jobs)"),
            ("Upscaler cost", _money(totals.cost_cents)),
            ("Profit", _money(totals.profit_cents)),
            ("Margin", esc(margin)))
    body = "".join(f'<tr><th>{label}</th><td class="num">{value}</td></tr>' for label, value in rows)
    return layout("Revenue", f"<table><tbody>{body}</tbody></table>", csrf=csrf)


def lag_page(groups: list[GroupLag] | None, *, csrf: str, error: str | None = None) -> str:
    rows = "".join(f'<tr><td>{esc(g.group)}</td><td class="status-{esc(g.status)}">{esc(g.status)}</td>'
                   f'<td class="num">{g.members}</td><td class="num">{g.total_lag}</td></tr>' for g in groups or [])
    table = ('<table><thead><tr><th>Stage group</th><th>Status</th><th>Members</th><th>Lag (messages)</th></tr>'
             f'</thead><tbody>{rows}</tbody></table>' if groups else "")
    note = ("<p>Statuses follow Burrow's rules over a short window: ok; lagging (lag growing); "
            "stalled (lag, and no commits); stopped (no members).</p>")
    return layout("Consumer lag", f"{message(error, 'error')}{table}{note}", csrf=csrf)


def _money(cents: int | None) -> str:
    return "-" if cents is None else esc(format_usd(cents))


def _moment(iso: str | None) -> str:
    """An RFC 3339 UTC time, to the second."""
    return esc(iso[:19].replace("T", " ")) if iso else "-"


def _field(name: str, value: Any) -> str:
    if isinstance(value, bool):
        return "yes" if value else "no"
    if name.endswith("_cents") and isinstance(value, int):
        return _money(value)
    if isinstance(value, list):  # the steps done: "email:ready, email:expiring:…"
        return esc(", ".join(value)) or "-"
    return esc(value)
