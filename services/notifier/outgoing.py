"""The customer emails as the SMTP server receives them, built without the email
package's message objects: the envelope and the DATA bytes that
``aiosmtplib.SMTP.send_message`` would transmit for the EmailMessage of
services/notifier/emails.py (Bcc left out, CRLF line endings, a server with
8BITMIME) — the same bytes, apart from the random MIME boundary.

Composing an EmailMessage and flattening it cost about 1.3 ms of CPU per email,
nearly all of it parsing and re-folding headers that are the same in every
email. Here:

- the headers that depend only on the letterhead and the kind (Subject, From,
  Reply-To, the envelope sender and the Bcc recipients) are parsed and folded by
  the email package once, and cached;
- the headers that change per email (To, Date, Message-ID) are written directly
  when they have the simple shape they have in practice (a plain ASCII address;
  an id of letters, digits, dots and hyphens), and folded by the email package
  otherwise;
- the bodies go through the same choice of transfer encoding as
  ``email.contentmanager`` (7bit, 8bit, quoted-printable or base64) with the
  standard library's encoders (``email.quoprimime.body_encode``,
  ``binascii.b2a_base64``); quoted-printable works line by line, so the lines
  that repeat from email to email are encoded once (cached), and only those with
  a link, or with the size or the expiry when they are new, per email.

Anything outside the fast path (a customer address that is not plain ASCII,
which needs SMTPUTF8 and different header rules; a letterhead with a non-ASCII
address) is composed with the email package and flattened as aiosmtplib would;
so is every email to a server without 8BITMIME (``Outgoing.as_message``).
tests/unit/test_emails.py holds the two builders to the same output."""

from __future__ import annotations

import binascii
import email.policy
import random
import re
import sys
from dataclasses import dataclass
from datetime import datetime
from email import quoprimime
from email.message import EmailMessage
from functools import lru_cache

from aiosmtplib.email import extract_recipients, extract_sender

from schemas.job import Job
from services.notifier import emails
from services.notifier.emails import DownloadLink, Letter, Letterhead
from smi.mailer import Outgoing

# What aiosmtplib flattens with (email.policy.SMTP: CRLF, 78-character lines).
WIRE_POLICY = email.policy.SMTP
MAX_LINE = emails.POLICY.max_line_length  # 78: what email.contentmanager measures lines against
BASE64_CHUNK = MAX_LINE // 4 * 3  # bytes per base64 line, as email.contentmanager cuts them


# -- the emails (the signatures of services/notifier/emails.py's builders) -----------


def download_ready(letterhead: Letterhead, job: Job, link: DownloadLink, *, sent_at: datetime) -> Outgoing:
    return render(letterhead, job, emails.ready_letter(letterhead, job, link), sent_at=sent_at)


def download_resent(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str,
                    sent_at: datetime) -> Outgoing:
    return render(letterhead, job, emails.resent_letter(letterhead, job, link, occurrence=occurrence),
                  sent_at=sent_at)


def download_expiring(letterhead: Letterhead, job: Job, link: DownloadLink, *, occurrence: str,
                      sent_at: datetime) -> Outgoing:
    return render(letterhead, job, emails.expiring_letter(letterhead, job, link, occurrence=occurrence),
                  sent_at=sent_at)


def refund_processed(letterhead: Letterhead, job: Job, *, amount_cents: int, sent_at: datetime) -> Outgoing:
    return render(letterhead, job, emails.refund_letter(letterhead, job, amount_cents=amount_cents),
                  sent_at=sent_at)


# -- rendering ---------------------------------------------------------------------

# An addr-spec that the header registry writes back unchanged and unfolded (the
# length is checked separately): dot-atom local part, ASCII host name.
_ATEXT = r"[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+"
_SIMPLE_ADDRESS = re.compile(rf"{_ATEXT}(?:\.{_ATEXT})*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*")
_SIMPLE_MESSAGE_ID = re.compile(r"<[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_-]+)*@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*>")
_BOUNDARY_DIGITS = len(repr(sys.maxsize - 1))  # as email.generator makes them


def render(letterhead: Letterhead, job: Job, letter: Letter, *, sent_at: datetime) -> Outgoing:
    """The caller makes sure the job has an email address."""
    to = job.email
    head = _letterhead_headers(letterhead, letter.subject)

    def reference() -> EmailMessage:
        return emails.compose(letterhead, job, letter, sent_at=sent_at)

    if (head is None or not isinstance(to, str) or len(to) > MAX_LINE - 4
            or not _SIMPLE_ADDRESS.fullmatch(to)):
        return Outgoing.from_message(reference(), reference)

    mid_header, mid = _message_id_header(emails.message_id(letter.kind, job.job_id, letter.occurrence))
    text = _encode_part(b'Content-Type: text/plain; charset="utf-8"\r\n', emails.text_body(letter), b"")
    html = _encode_part(b'Content-Type: text/html; charset="utf-8"\r\n', emails.html_body(letter),
                        b"MIME-Version: 1.0\r\n")
    boundary = _boundary()
    while boundary in text or boundary in html:  # as good as never: a 19-digit random number
        boundary = _boundary()
    data = b"".join((
        head.before_to, b"To: ", to.encode("ascii"), b"\r\n", head.after_to,
        b"Date: ", emails.format_date(sent_at).encode("ascii"), b"\r\n",
        mid_header,
        b"Auto-Submitted: auto-generated\r\nMIME-Version: 1.0\r\n"
        b'Content-Type: multipart/alternative;\r\n boundary="', boundary, b'"\r\n\r\n',
        b"--", boundary, b"\r\n", text,
        b"\r\n--", boundary, b"\r\n", html,
        b"\r\n--", boundary, b"--\r\n",
    ))
    return Outgoing(mid, head.sender, (to, *head.bcc), data, False, reference)


@dataclass(frozen=True)
class _Head:
    before_to: bytes  # Subject, From
    after_to: bytes  # Reply-To (the Bcc header is never transmitted)
    sender: str
    bcc: tuple[str, ...]


@lru_cache(maxsize=64)
def _letterhead_headers(letterhead: Letterhead, subject: str) -> _Head | None:
    """The headers that are the same in every email of one kind, folded by the email
    package; None when the letterhead's addresses need SMTPUTF8 (no fast path)."""
    probe = EmailMessage(policy=emails.POLICY)
    probe["From"] = emails.parsed_header("From", letterhead.mail_from)
    if letterhead.admin_email:
        probe["Bcc"] = emails.parsed_header("Bcc", letterhead.admin_email)
    sender = extract_sender(probe)
    bcc = tuple(extract_recipients(probe))
    if sender is None or not (sender + "".join(bcc)).isascii():
        return None
    before = _fold("Subject", subject) + _fold("From", letterhead.mail_from)
    after = _fold("Reply-To", letterhead.reply_to) if letterhead.reply_to else b""
    return _Head(before, after, sender, bcc)


def _fold(name: str, value: str) -> bytes:
    """One header line as aiosmtplib's flattening writes it (the header parsed as
    services/notifier/emails.py stores it, folded by email.policy.SMTP)."""
    return WIRE_POLICY.fold_binary(name, emails.parsed_header(name, value))


def _message_id_header(mid: str) -> tuple[bytes, str]:
    """The Message-ID line, and the id as the email package reads it back."""
    if len("Message-ID: ") + len(mid) <= MAX_LINE and _SIMPLE_MESSAGE_ID.fullmatch(mid):
        # On one line as it is. A longer id is moved to a continuation line by the
        # email package when it fits there (and kept when it does not): folded below.
        return b"Message-ID: " + mid.encode("ascii") + b"\r\n", mid
    _, header = emails.POLICY.header_store_parse("Message-ID", mid)
    return WIRE_POLICY.fold_binary("Message-ID", header), str(header)


def _boundary() -> bytes:
    token = random.randrange(sys.maxsize)
    return b"=" * 15 + b"%0*d" % (_BOUNDARY_DIGITS, token) + b"=="


# -- bodies ------------------------------------------------------------------------


def _encode_part(content_type: bytes, body: str, trailer: bytes) -> bytes:
    cte, payload = _encode_text(body)
    return b"".join((content_type, b"Content-Transfer-Encoding: ", cte, b"\r\n", trailer, b"\r\n", payload))


def _encode_text(body: str) -> tuple[bytes, bytes]:
    """email.contentmanager's choice of transfer encoding for a utf-8 text part
    (email.policy.default: 8bit allowed, lines of 78), and the encoded payload
    with CRLF line endings."""
    lines = body.encode("utf-8").splitlines()
    if max(map(len, lines), default=0) <= MAX_LINE:
        # 7bit when it is ASCII, 8bit otherwise: the bytes are the same.
        return (b"7bit" if body.isascii() else b"8bit"), b"\r\n".join(lines) + b"\r\n"
    # Lines with a link are encoded every time: they hold the email's own download
    # link, whose raw token should not outlive the email in a cache.
    qp = [_qp(line) if b"://" in line else _qp_line(line) for line in lines]
    # email.contentmanager compares the encodings of the first ten lines, each
    # followed by a line break, and encodes the whole body in the shorter one.
    sniff_qp = sum(map(len, qp[:10])) + len(qp[:10])
    sniff_bytes = sum(map(len, lines[:10])) + len(lines[:10])
    if sniff_qp > 4 * ((sniff_bytes + 2) // 3) + 1:  # len(binascii.b2a_base64(sniff))
        data = b"\n".join(lines) + b"\n"
        return b"base64", b"".join(binascii.b2a_base64(data[i:i + BASE64_CHUNK])[:-1] + b"\r\n"
                                   for i in range(0, len(data), BASE64_CHUNK))
    return b"quoted-printable", (b"\n".join(qp) + b"\n").replace(b"\n", b"\r\n")


def _qp(line: bytes) -> bytes:
    """One line (no line break in it) in quoted-printable, soft line breaks as LF:
    quoprimime.body_encode works line by line, so a body's encoding is its lines'
    encodings joined."""
    return quoprimime.body_encode(line.decode("latin-1"), MAX_LINE).encode("ascii")


# Most lines are the same from email to email (the text around the links).
_qp_line = lru_cache(maxsize=1024)(_qp)
