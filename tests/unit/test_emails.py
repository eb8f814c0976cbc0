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
    emails_module._parsed.cache_clear()
    standard = flattened()
    emails_module._parsed.cache_clear()
    # Date headers come from the same fixed sent_at; nothing else may differ.
    assert fast == standard
    assert all(re.search(rb"^Message-ID: <", raw, re.MULTILINE) for raw in fast.values())
