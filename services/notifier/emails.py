"""The customer emails, built without I/O: what each kind says (a ``Letter``: the
subject and the paragraphs and links, rendered as a plain-text body and an HTML
alternative), and ``compose``, which builds it as an EmailMessage with the email
package.

The notifier sends the same emails built by services/notifier/outgoing.py, which
writes the bytes directly (the email package costs about 1.5 ms of CPU per email,
composing and flattening); ``compose`` stays the reference it is tested against
(tests/unit/test_emails.py) and what is sent when the fast path does not apply.

Every value that goes into the HTML is escaped (the shop name, the image URL and
the link all come from configuration or upstream systems). The Message-ID is
derived from the kind, the job and the occurrence (a resend command, an expiry
warning), so a message sent twice after a crash carries the same id and mail
clients and operators can tell it is a repeat."""

from __future__ import annotations

import email.policy
import html
from functools import lru_cache
from dataclasses import dataclass
from datetime import UTC, datetime
from email.headerregistry import HeaderRegistry
from email.message import EmailMessage
from email.utils import format_datetime

from schemas.job import Job
from schemas.money import format_usd, resolution_factor

READY = "ready"
RESEND = "resend"
EXPIRING = "expiring"
REFUND = "refund"
MESSAGE_ID_DOMAIN = "smi-pipeline"


@dataclass(frozen=True)
class Letterhead:
    """Who the emails come from (MAIL_FROM, SHOP_NAME, REPLY_TO, ADMIN_EMAIL)."""

    shop_name: str
    mail_from: str
    reply_to: str = ""
    admin_email: str = ""  # gets a blind copy of every email when set


@dataclass(frozen=True)
class DownloadLink:
    url: str
    expires_at: datetime


@dataclass(frozen=True)
class Link:
    label: str
    url: str


Block = str | Link  # a paragraph of text, or a labelled link


def download_url(public_base_url: str, token: str) -> str:
    return f"{public_base_url.rstrip('/')}/downloads/{token}"


def message_id(kind: str, job_id: str, occurrence: str = "1") -> str:
    return f"<{kind}.{job_id}.{occurrence}@{MESSAGE_ID_DOMAIN}>"


def format_moment(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%A %d %B %Y, %H:%M UTC")


def describe_output(job: Job) -> str:
    factor = resolution_factor(job.resolution)
    return f"{job.resolution} ({job.image_width * factor} × {job.image_height * factor} pixels)"


# -- the emails: what each kind says -------------------------------------------------


@dataclass(frozen=True)
class Letter:
    """One email's content, before any MIME: both builders (the email package's
    below, the fast one in services/notifier/outgoing.py) render it."""

    kind: str
    occurrence: str
    subject: str
    blocks: tuple[Block, ...]  # ends with the shop's name


def ready_letter(letterhead: Letterhead, job: Job, link: DownloadLink) -> Letter:
    return _letter(letterhead, READY, "1", f"Your high-resolution image is ready - {letterhead.shop_name}",
                   "Hello,",
                   f"Thank you for your purchase. Your image has been upscaled to {describe_output(job)} "
                   "and is ready to download:",
                   Link("Download your image", link.url),
                   f"The link works until {format_moment(link.expires_at)}; after that the file is deleted, "
                   "so please save it before then.",
                   Link("Original image", job.image_url))


def resent_letter(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str) -> Letter:
    return _letter(letterhead, RESEND, occurrence, f"Your new download link - {letterhead.shop_name}",
                   "Hello,",
                   f"Here is a new link to your image, upscaled to {describe_output(job)}:",
                   Link("Download your image", link.url),
                   f"It works until {format_moment(link.expires_at)}. Links we sent you earlier no longer work.",
                   Link("Original image", job.image_url))


def expiring_letter(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str) -> Letter:
    return _letter(letterhead, EXPIRING, occurrence, f"Your download link expires soon - {letterhead.shop_name}",
                   "Hello,",
                   f"Your upscaled image ({describe_output(job)}) can be downloaded until "
                   f"{format_moment(link.expires_at)}. After that the file is deleted.",
                   Link("Download your image", link.url),
                   Link("Original image", job.image_url))


def refund_letter(letterhead: Letterhead, job: Job, *, amount_cents: int) -> Letter:
    return _letter(letterhead, REFUND, "1", f"Refund Processed - {letterhead.shop_name}",
                   "Hello,",
                   "We are sorry: we could not complete the upscaling of your image, so we have refunded "
                   f"your payment of {format_usd(amount_cents)} in full.",
                   "The money should be back on your card or account within 3-5 business days, "
                   "depending on your bank.",
                   Link("Original image", job.image_url))


def _letter(letterhead: Letterhead, kind: str, occurrence: str, subject: str, *blocks: Block) -> Letter:
    return Letter(kind, occurrence, subject, (*blocks, letterhead.shop_name))


# -- built with the email package (the reference; services/notifier/outgoing.py -----
# -- builds the same bytes without it) ----------------------------------------------


def download_ready(letterhead: Letterhead, job: Job, link: DownloadLink, *, sent_at: datetime) -> EmailMessage:
    return compose(letterhead, job, ready_letter(letterhead, job, link), sent_at=sent_at)


def download_resent(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str,
                    sent_at: datetime) -> EmailMessage:
    return compose(letterhead, job, resent_letter(letterhead, job, link, occurrence=occurrence), sent_at=sent_at)


def download_expiring(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str,
                      sent_at: datetime) -> EmailMessage:
    return compose(letterhead, job, expiring_letter(letterhead, job, link, occurrence=occurrence), sent_at=sent_at)


def refund_processed(letterhead: Letterhead, job: Job, *, amount_cents: int, sent_at: datetime) -> EmailMessage:
    return compose(letterhead, job, refund_letter(letterhead, job, amount_cents=amount_cents), sent_at=sent_at)


def compose(letterhead: Letterhead, job: Job, letter: Letter, *, sent_at: datetime) -> EmailMessage:
    """The caller makes sure the job has an email address."""
    message = EmailMessage(policy=POLICY)
    message["Subject"] = parsed_header("Subject", letter.subject)
    message["From"] = parsed_header("From", letterhead.mail_from)
    message["To"] = job.email
    if letterhead.reply_to:
        message["Reply-To"] = parsed_header("Reply-To", letterhead.reply_to)
    if letterhead.admin_email:
        message["Bcc"] = parsed_header("Bcc", letterhead.admin_email)
    message["Date"] = format_date(sent_at)
    message["Message-ID"] = message_id(letter.kind, job.job_id, letter.occurrence)
    # RFC 3834: a machine sent this; out-of-office replies should not answer it.
    message["Auto-Submitted"] = parsed_header("Auto-Submitted", "auto-generated")
    message.set_content(text_body(letter))
    message.add_alternative(html_body(letter), subtype="html")
    return message


def format_date(moment: datetime) -> str:
    """The Date header's value (RFC 5322, UTC)."""
    return format_datetime(moment.astimezone(UTC))


class _HeaderClasses(HeaderRegistry):
    """The standard header registry, except that it builds each header's class
    once: the stdlib's ``__getitem__`` creates a new class (``type(...)``) for every
    header it parses, which made up a fifth of the notifier's time."""

    def __init__(self) -> None:
        super().__init__()
        self._built: dict[str, type] = {}

    def __getitem__(self, name: str) -> type:
        key = name.lower()
        built = self._built.get(key)
        if built is None:
            built = self._built[key] = super().__getitem__(name)
        return built


# email.policy.default with the registry above: the same headers, folded the same.
POLICY = email.policy.default.clone(header_factory=_HeaderClasses())


@lru_cache(maxsize=256)
def parsed_header(name: str, value: str):
    """A header the way EmailMessage stores it, parsed once: the shop's headers and
    subjects repeat in every email (the message keeps a parsed header as it is;
    parsed headers are immutable)."""
    return POLICY.header_factory(name, value)


def text_body(letter: Letter) -> str:
    return "\n\n".join(f"{b.label}: {b.url}" if isinstance(b, Link) else b for b in letter.blocks) + "\n"


def html_body(letter: Letter) -> str:
    e = html.escape
    body = "\n".join(f'<p><a href="{e(b.url)}">{e(b.label)}</a></p>' if isinstance(b, Link) else f"<p>{e(b)}</p>"
                     for b in letter.blocks)
    return (f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{e(letter.subject)}</title></head>\n'
            f"<body>\n{body}\n</body></html>\n")
