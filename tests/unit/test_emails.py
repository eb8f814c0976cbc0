"""The customer emails (services/notifier/emails.py): both parts, subjects, headers,
deterministic Message-IDs, escaping; no I/O."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from email.message import EmailMessage

import pytest

from schemas.job import Job
from services.notifier import emails
from services.notifier.emails import DownloadLink, Letterhead

JOB_ID = "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d"
NOW = datetime(2025, 5, 13, 9, 30, tzinfo=UTC)
TOKEN = "T" * 64
LINK = DownloadLink(emails.download_url("https://shop.example.com/", TOKEN), datetime(2025, 5, 14, 9, 30, tzinfo=UTC))
SHOP = Letterhead("Pixel & Co", "Pixel & Co <shop@example.com>")


def job(**overrides) -> Job:
    fields = dict(job_id=JOB_ID, status="completed", image_url="https://images.example.com/a.png",
                  resolution="4x", email="buyer@example.com", image_width=2000, image_height=1500,
                  created_at=NOW, updated_at=NOW)
    return Job(**{**fields, **overrides})


def build_all(letterhead: Letterhead = SHOP, the_job: Job | None = None) -> dict[str, EmailMessage]:
    the_job = the_job or job()
    return {
        "ready": emails.download_ready(letterhead, the_job, LINK, sent_at=NOW),
        "resend": emails.download_resent(letterhead, the_job, LINK, occurrence="3-17", sent_at=NOW),
        "expiring": emails.download_expiring(letterhead, the_job, LINK, occurrence="ev-1", sent_at=NOW),
        "refund": emails.refund_processed(letterhead, the_job, amount_cents=384, sent_at=NOW),
    }


def parts(message: EmailMessage) -> tuple[str, str]:
    return (message.get_body(("plain",)).get_content(), message.get_body(("html",)).get_content())


def test_every_email_has_a_plain_text_and_an_html_part_with_the_same_details():
    for kind, message in build_all().items():
        assert message.get_content_type() == "multipart/alternative", kind
        text, html = parts(message)
        assert "Pixel & Co" in text and "Pixel &amp; Co" in html, kind
        assert "https://images.example.com/a.png" in text and 'href="https://images.example.com/a.png"' in html


def test_subjects_say_what_happened_and_name_the_shop():
    subjects = {kind: m["Subject"] for kind, m in build_all().items()}
    assert subjects == {
        "ready": "Your high-resolution image is ready - Pixel & Co",
        "resend": "Your new download link - Pixel & Co",
        "expiring": "Your download link expires soon - Pixel & Co",
        "refund": "Refund Processed - Pixel & Co",
    }


def test_download_emails_carry_the_link_expiry_and_resolution_but_never_the_token_in_a_header():
    for kind in ("ready", "resend", "expiring"):
        message = build_all()[kind]
        text, html = parts(message)
        assert f"https://shop.example.com/downloads/{TOKEN}" in text, kind
        assert f'href="https://shop.example.com/downloads/{TOKEN}"' in html, kind
        assert "Wednesday 14 May 2025, 09:30 UTC" in text and "Wednesday 14 May 2025, 09:30 UTC" in html
        assert "4x (8000 × 6000 pixels)" in text
        assert all(TOKEN not in str(value) for value in message.values()), kind


def test_the_refund_email_gives_the_amount_what_happened_and_when_the_money_arrives():
    text, html = parts(build_all()["refund"])
    for body in (text, html):
        assert "$3.84" in body and "could not complete" in body and "3-5 business days" in body
    assert "/downloads/" not in text


def test_message_ids_derive_from_kind_job_and_occurrence():
    first, again = build_all(), build_all()
    ids = {kind: m["Message-ID"] for kind, m in first.items()}
    assert ids == {kind: m["Message-ID"] for kind, m in again.items()}
    assert ids == {
        "ready": f"<ready.{JOB_ID}.1@smi-pipeline>",
        "resend": f"<resend.{JOB_ID}.3-17@smi-pipeline>",
        "expiring": f"<expiring.{JOB_ID}.ev-1@smi-pipeline>",
        "refund": f"<refund.{JOB_ID}.1@smi-pipeline>",
    }
    other = emails.download_resent(SHOP, job(), LINK, occurrence="3-18", sent_at=NOW)
    assert other["Message-ID"] != ids["resend"]


def test_everything_interpolated_into_html_is_escaped():
    hostile = job(image_url='https://images.example.com/a.png?x="><script>alert(1)</script>&y=1')
    letterhead = Letterhead('<b>Shop</b> "quoted"', "shop@example.com")
    link = DownloadLink('https://shop.example.com/downloads/a"onmouseover="x', LINK.expires_at)
    messages = [*build_all(letterhead, hostile).values(),
                emails.download_ready(letterhead, hostile, link, sent_at=NOW)]
    for message in messages:
        html = message.get_body(("html",)).get_content()
        assert "<script>" not in html and "<b>" not in html and '"onmouseover' not in html
        assert "&lt;script&gt;" in html and "&lt;b&gt;Shop&lt;/b&gt; &quot;quoted&quot;" in html
    assert 'href="https://shop.example.com/downloads/a&quot;onmouseover=&quot;x"' in \
        messages[-1].get_body(("html",)).get_content()


def test_from_to_reply_to_and_date_headers():
    message = emails.download_ready(Letterhead("Shop", "Shop <shop@example.com>", reply_to="help@example.com"),
                                    job(), LINK, sent_at=NOW)
    assert message["From"] == "Shop <shop@example.com>"
    assert message["To"] == "buyer@example.com"
    assert message["Reply-To"] == "help@example.com"
    assert message["Date"] == "Tue, 13 May 2025 09:30:00 +0000"
    assert message["Auto-Submitted"] == "auto-generated"
    assert emails.download_ready(SHOP, job(), LINK, sent_at=NOW)["Reply-To"] is None


@pytest.mark.parametrize("admin_email, bcc", [("", None), ("admin@example.com", "admin@example.com")])
def test_the_admin_gets_a_blind_copy_only_when_configured(admin_email, bcc):
    letterhead = Letterhead("Shop", "shop@example.com", admin_email=admin_email)
    for kind, message in build_all(letterhead).items():
        assert message["Bcc"] == bcc, kind
        assert message["Cc"] is None


def test_download_url_joins_the_public_base_url_and_the_token():
    assert emails.download_url("http://127.0.0.1:8080", "abc") == "http://127.0.0.1:8080/downloads/abc"
    assert emails.download_url("https://shop.example.com/", "abc") == "https://shop.example.com/downloads/abc"


def test_expiry_times_are_shown_in_utc_whatever_the_zone_they_come_in():
    moment = datetime(2025, 5, 14, 11, 30, tzinfo=timezone(timedelta(hours=2)))
    assert emails.format_moment(moment) == "Wednesday 14 May 2025, 09:30 UTC"


def test_the_fast_header_registry_gives_byte_for_byte_the_standard_email(monkeypatch):
    import email.policy
    import re

    import services.notifier.emails as emails_module

    def flattened() -> dict[str, bytes]:
        out = {}
        for kind, message in build_all().items():
            raw = message.as_bytes()
            boundary = message.get_boundary().encode()
            out[kind] = raw.replace(boundary, b"BOUNDARY")
        return out

    fast = flattened()
    monkeypatch.setattr(emails_module, "POLICY", email.policy.default)
    emails_module.parsed_header.cache_clear()
    standard = flattened()
    emails_module.parsed_header.cache_clear()
    # Date headers come from the same fixed sent_at; nothing else may differ.
    assert fast == standard
    assert all(re.search(rb"^Message-ID: <", raw, re.MULTILINE) for raw in fast.values())


# -- the fast builder (services/notifier/outgoing.py) against the email package ------
#
# The reference is the email package: services/notifier/emails.py composes an
# EmailMessage, and Outgoing.from_message flattens it the way aiosmtplib's
# send_message does for a server with 8BITMIME (sender and recipients from the
# headers, Bcc left out, CRLF). The fast builder must give the same envelope and
# the same bytes (the random MIME boundary aside), hence the same email when
# parsed.

import email  # noqa: E402
import io  # noqa: E402
import re  # noqa: E402
from email.generator import BytesGenerator  # noqa: E402

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from services.notifier import outgoing  # noqa: E402
from smi.mailer import Outgoing  # noqa: E402

KINDS = ("ready", "resend", "expiring", "refund")
_BOUNDARY = re.compile(rb'boundary="([^"]+)"')


def build(module, kind: str, letterhead: Letterhead, the_job: Job, link: DownloadLink, *, occurrence: str = "1",
          amount_cents: int = 384, sent_at: datetime = NOW):
    if kind == "ready":
        return module.download_ready(letterhead, the_job, link, sent_at=sent_at)
    if kind == "resend":
        return module.download_resent(letterhead, the_job, link, occurrence=occurrence, sent_at=sent_at)
    if kind == "expiring":
        return module.download_expiring(letterhead, the_job, link, occurrence=occurrence, sent_at=sent_at)
    return module.refund_processed(letterhead, the_job, amount_cents=amount_cents, sent_at=sent_at)


def both(*args, **kwargs) -> tuple[Outgoing, Outgoing]:
    """(fast, reference) for the same email."""
    return build(outgoing, *args, **kwargs), Outgoing.from_message(build(emails, *args, **kwargs))


def normalised(data: bytes) -> bytes:
    boundary = _BOUNDARY.search(data)
    return data.replace(boundary.group(1), b"BOUNDARY") if boundary else data


def parsed(data: bytes) -> list[tuple[list[tuple[str, str]], str | None]]:
    """Every part of the email as the standard parser sees it: its headers (names
    and decoded values) and, for a leaf, its decoded content."""
    message = email.message_from_bytes(normalised(data), policy=email.policy.default)
    return [([(name, str(value)) for name, value in part.items()],
             None if part.is_multipart() else part.get_content())
            for part in message.walk()]


def differences(fast: Outgoing, reference: Outgoing) -> list[str]:
    found = []
    if (fast.sender, fast.recipients, fast.smtputf8) != (reference.sender, reference.recipients, reference.smtputf8):
        found.append(f"envelope: {(fast.sender, fast.recipients, fast.smtputf8)} != "
                     f"{(reference.sender, reference.recipients, reference.smtputf8)}")
    if fast.message_id != reference.message_id:
        found.append(f"message id: {fast.message_id} != {reference.message_id}")
    if parsed(fast.data) != parsed(reference.data):
        found.append("parsed differently")
    if normalised(fast.data) != normalised(reference.data):
        found.append("bytes differ")
    return found


LETTERHEADS = [
    SHOP,
    Letterhead("Pixel & Co", "shop@example.com", reply_to="Pixel & Co <help@example.com>",
               admin_email="admin@example.com"),
    Letterhead("Bildermarkt Zürich — Ünïcödé 画像ショップ", "Bildermarkt Zürich <shop@bilder.example.com>",
               reply_to="Hilfe Zürich <hilfe@bilder.example.com>", admin_email="a@example.com, b@example.com"),
    Letterhead("画像" * 40, "画像 <shop@example.com>"),  # a body mostly non-ASCII: base64
    Letterhead("Shop", "shop@example.com", admin_email="ädmin@example.com"),  # SMTPUTF8: the slow path
]
JOBS = [
    job(),
    job(email="Mixed.Case+tag@Sub.Example.COM", image_url="https://images.example.com/" + "x" * 300),
    job(image_url="https://bilder.example.com/Grüße/𝔘𝔫𝔦𝔠𝔬𝔡𝔢.png?a=1&b=<2>", resolution="8x"),
    job(email="a" * 60 + "@example.com"),
    job(email="a" * 70 + "@example.com"),  # longer than a header line: the slow path
    job(email="josé@example.com"),  # SMTPUTF8: the slow path
    job(email='"john doe"@example.com'),
]
LINKS = [LINK, DownloadLink("https://shop.example.com/a/much/longer/path/downloads/" + "Tz9" * 60,
                            datetime(2031, 12, 31, 23, 59, 59, tzinfo=timezone(timedelta(hours=-8))))]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("letterhead", LETTERHEADS, ids=range(len(LETTERHEADS)))
def test_the_fast_builder_sends_the_bytes_the_email_package_would(kind, letterhead):
    for the_job in JOBS:
        for link in LINKS:
            # "000000": an expiring email's Message-ID line of 79 characters, which the
            # email package moves to a continuation line (found by hypothesis).
            for occurrence in ("1", "3-17", "000000", "3f1c2a9e-8d4b-4c6a-9f2e-1b7d5e0a4c3d", "odd id with spaces ü"):
                fast, reference = both(kind, letterhead, the_job, link, occurrence=occurrence)
                assert differences(fast, reference) == [], (kind, letterhead, the_job.email, link, occurrence)


def test_the_examples_cover_quoted_printable_base64_and_both_paths():
    encodings, paths = set(), set()
    for letterhead in LETTERHEADS:
        for the_job in JOBS:
            for kind in KINDS:
                fast = build(outgoing, kind, letterhead, the_job, LINK)
                encodings |= set(re.findall(rb"Content-Transfer-Encoding: (\S+)", fast.data))
                paths.add(fast.smtputf8)
    # (Every email has a paragraph longer than a line: never 7bit or 8bit, see below.)
    assert encodings == {b"quoted-printable", b"base64"} and paths == {True, False}


def stdlib_part(body: str) -> tuple[bytes, bytes]:
    """email.contentmanager's transfer encoding and payload for a text part, as
    aiosmtplib flattens it."""
    part = EmailMessage(policy=emails.POLICY)
    part.set_content(body)
    out = io.BytesIO()
    BytesGenerator(out, policy=email.policy.SMTP).flatten(part)
    head, _, payload = out.getvalue().partition(b"\r\n\r\n")
    return re.search(rb"Content-Transfer-Encoding: (\S+)", head).group(1), payload


_LINE = st.text(st.characters(blacklist_categories=("Cs",)), max_size=200)


@settings(max_examples=300, deadline=None)
@given(lines=st.lists(st.one_of(_LINE, st.sampled_from(["", " ", "a=b ", "x" * 76 + "=", "é" * 40, "\t",
                                                      "ends in space " * 6 + " "])), min_size=1, max_size=14))
def test_bodies_get_the_transfer_encoding_and_the_payload_of_the_email_package(lines):
    body = "\n".join(lines) + "\n"
    assert outgoing._encode_text(body) == stdlib_part(body)


def test_short_bodies_go_as_7bit_or_8bit_like_the_email_package():
    for body, cte in (("Hello,\n\nShop\n", b"7bit"), ("Grüße,\n\nShop\n", b"8bit")):
        assert outgoing._encode_text(body) == stdlib_part(body) and stdlib_part(body)[0] == cte


_ADDRESS = st.one_of(
    st.from_regex(outgoing._SIMPLE_ADDRESS, fullmatch=True),
    st.sampled_from(["buyer@example.com", "josé@example.com", '"john doe"@example.com', "a" * 74 + "@b.c",
                     "x@" + "d" * 72, "x@" + "d" * 73]))
_TEXT = st.text(st.characters(whitelist_categories=("L", "N", "P", "S", "Zs")), min_size=1, max_size=90)


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(kind=st.sampled_from(KINDS), shop=_TEXT,
       reply_to=st.sampled_from(["", "help@example.com", "Hilfe Zürich <hilfe@example.com>"]),
       admin=st.sampled_from(["", "admin@example.com", "a@example.com, b@example.com"]),
       address=_ADDRESS, image_path=st.text(max_size=250), token=st.text(
           "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_=.~", max_size=200),
       resolution=st.sampled_from(["2x", "4x", "8x"]), width=st.integers(1, 100_000),
       expires_at=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.sampled_from(
           [UTC, timezone(timedelta(hours=5, minutes=30)), timezone(-timedelta(hours=8))])),
       sent_at=st.datetimes(datetime(2000, 1, 1), datetime(2100, 1, 1), timezones=st.just(UTC)),
       occurrence=st.one_of(st.uuids().map(str), st.text(max_size=40)), amount=st.integers(0, 10**9))
def test_the_fast_builder_gives_the_same_email_for_any_input(kind, shop, reply_to, admin, address, image_path,
                                                            token, resolution, width, expires_at, sent_at,
                                                            occurrence, amount):
    letterhead = Letterhead(shop, f"{shop} <shop@example.com>", reply_to=reply_to, admin_email=admin)
    the_job = job(email=address, image_url=f"https://images.example.com/{image_path}", resolution=resolution,
                  image_width=width)
    link = DownloadLink(emails.download_url("https://shop.example.com", token), expires_at)

    def outcome(module):
        try:
            message = build(module, kind, letterhead, the_job, link, occurrence=occurrence, amount_cents=amount,
                            sent_at=sent_at)
            return message if module is outgoing else Outgoing.from_message(message)
        except Exception as exc:  # noqa: BLE001 - fails the same way, e.g. a Message-ID that cannot be sent
            # (non-ASCII), a display name the stdlib's header parser trips over (". <a@b>")
            return type(exc)

    fast, reference = outcome(outgoing), outcome(emails)
    if isinstance(reference, Outgoing) and isinstance(fast, Outgoing):
        assert differences(fast, reference) == []
    else:
        assert fast == reference


def test_the_comparison_catches_a_wrong_charset_a_broken_line_and_a_changed_header():
    fast, reference = both("ready", LETTERHEADS[2], job(), LINK)
    assert differences(fast, reference) == []

    def mutated(old: bytes, new: bytes) -> Outgoing:
        assert old in fast.data
        return Outgoing(fast.message_id, fast.sender, fast.recipients, fast.data.replace(old, new, 1),
                        fast.smtputf8, fast.build_message)

    for broken in (mutated(b'charset="utf-8"', b'charset="iso-8859-1"'),  # mojibake
                   mutated(b"=\r\n", b"\r\n"),  # a soft line break made hard
                   mutated(b"Subject: Your high-resolution", b"Subject: Your high resolution")):
        assert "parsed differently" in differences(broken, reference)


def test_the_comparison_catches_quoted_printable_lines_cut_differently(monkeypatch):
    """email.contentmanager cuts quoted-printable lines at 78 characters (not the
    76 of RFC 2045): a builder that cuts at 76 decodes the same but is not the
    same email."""
    monkeypatch.setattr(outgoing, "MAX_LINE", 76)
    outgoing._qp_line.cache_clear()
    try:
        fast, reference = both("ready", SHOP, job(), LINK)
        assert differences(fast, reference) == ["bytes differ"]
    finally:
        monkeypatch.undo()
        outgoing._qp_line.cache_clear()


def test_the_slow_paths_give_what_aiosmtplib_would():
    # A customer address that needs SMTPUTF8: its headers are not RFC 2047-encoded.
    fast = outgoing.download_ready(SHOP, job(email="josé@example.com"), LINK, sent_at=NOW)
    assert fast.smtputf8 and fast.recipients == ("josé@example.com",) and b"To: jos\xc3\xa9@example.com\r\n" in fast.data
    # A server without 8BITMIME gets the email package's message (it re-encodes 8-bit parts).
    message = outgoing.download_ready(SHOP, job(), LINK, sent_at=NOW).as_message()
    assert isinstance(message, EmailMessage)
    assert normalised(Outgoing.from_message(message).data) == normalised(
        Outgoing.from_message(emails.download_ready(SHOP, job(), LINK, sent_at=NOW)).data)


def test_the_fast_builder_never_transmits_the_bcc_and_keeps_the_message_id():
    letterhead = Letterhead("Shop", "Shop <shop@example.com>", admin_email="admin@example.com")
    for kind in KINDS:
        fast = build(outgoing, kind, letterhead, job(), LINK, occurrence="3-17")
        assert fast.recipients == ("buyer@example.com", "admin@example.com") and b"Bcc" not in fast.data
        assert fast.message_id == build(emails, kind, letterhead, job(), LINK, occurrence="3-17")["Message-ID"]
        assert b"\r\nMessage-ID: " + fast.message_id.encode() + b"\r\n" in fast.data
        assert all(len(line) <= 78 for line in fast.data.split(b"\r\n"))


def test_no_download_link_is_kept_in_the_line_cache():
    """Lines that repeat are encoded once; a line with a link (the raw download
    token) is encoded for its email only."""
    def ready(token: str) -> Outgoing:
        link = DownloadLink(emails.download_url("https://shop.example.com", token), LINK.expires_at)
        return outgoing.download_ready(LETTERHEADS[2], job(), link, sent_at=NOW)

    ready("A" * 64)
    misses = outgoing._qp_line.cache_info().misses
    second = ready("B" * 64)
    assert outgoing._qp_line.cache_info().misses == misses and b"B" * 20 in second.data
