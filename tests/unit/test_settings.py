"""Configuration (design.md, "Configuration", a contract): defaults, overrides, ranges."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from pydantic import ValidationError

from smi.settings import STAGE_METRICS_PORTS, Settings


@pytest.fixture(autouse=True)
def clean_env(monkeypatch, tmp_path):
    """No ambient variable (CI, a developer's shell) may leak into these tests."""
    names = set(Settings.model_fields)
    for key in list(os.environ):
        if key.lower() in names:
            monkeypatch.delenv(key)
    monkeypatch.chdir(tmp_path)  # and no stray .env file is read


DESIGN_DEFAULTS = {
    "KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9092",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "GATEWAY_PORT": 8080,
    "PUBLIC_BASE_URL": "http://127.0.0.1:8080",
    "DOWNLOAD_TTL_HOURS": 24,
    "EXPIRY_WARNING_HOURS": 4,
    "PAYMENT_TIMEOUT_MINUTES": 60,
    "JANITOR_INTERVAL_SECONDS": 30,
    "MARKUP_PERCENT": 500,
    "CREDIT_PRICE_CENTS": 4,
}


@pytest.mark.parametrize("name,value", sorted(DESIGN_DEFAULTS.items()))
def test_design_defaults(name, value):
    assert getattr(Settings(), name.lower()) == value


def test_other_defaults():
    s = Settings()
    assert s.payments in ("stripe", "local")
    assert s.upscaler in ("local", "upsampler")
    assert s.stripe_api_base == "http://127.0.0.1:12111"  # stripe-mock
    assert s.smtp_url.startswith("smtp://")
    assert s.url_allow_hosts == []  # empty by default
    assert s.allowed_resolutions == ["2x", "4x", "8x"]
    assert s.metrics_port is None
    assert s.event_loop == "uvloop"


def test_every_design_variable_is_a_setting():
    design_vars = ["KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "PAYMENTS", "STRIPE_API_KEY", "STRIPE_API_BASE",
                   "STRIPE_WEBHOOK_SECRET", "UPSCALER", "UPSAMPLER_API_KEY", "UPSAMPLER_BASE_URL", "SMTP_URL",
                   "GATEWAY_PORT", "PUBLIC_BASE_URL", "STORAGE_DIR", "ADMIN_TOKEN", "URL_ALLOW_HOSTS",
                   "DOWNLOAD_TTL_HOURS", "EXPIRY_WARNING_HOURS", "PAYMENT_TIMEOUT_MINUTES",
                   "JANITOR_INTERVAL_SECONDS", "MARKUP_PERCENT", "CREDIT_PRICE_CENTS", "METRICS_PORT"]
    missing = [v for v in design_vars if v.lower() not in Settings.model_fields]
    assert missing == []


@pytest.mark.parametrize("stage,port", [("checkout", 9101), ("processor", 9102), ("notifier", 9103), ("janitor", 9104)])
def test_metrics_port_per_stage(stage, port):
    assert STAGE_METRICS_PORTS[stage] == port
    assert Settings().metrics_port_for(stage) == port


def test_metrics_port_override_applies_to_every_stage(monkeypatch):
    monkeypatch.setenv("METRICS_PORT", "0")
    s = Settings()
    assert s.metrics_port == 0
    assert {s.metrics_port_for(stage) for stage in STAGE_METRICS_PORTS} == {0}


def test_a_stages_later_workers_serve_metrics_stepped_up_from_its_port(monkeypatch):
    monkeypatch.setenv("WORKER_NUMBER", "3")
    assert Settings().metrics_port_for("checkout") == STAGE_METRICS_PORTS["checkout"] + 200
    monkeypatch.setenv("METRICS_PORT", "9500")
    assert Settings().metrics_port_for("notifier") == 9700
    monkeypatch.setenv("METRICS_PORT", "0")
    assert Settings().metrics_port_for("notifier") == 0  # a free one, for every worker
    monkeypatch.setenv("METRICS_PORT", "65500")
    assert Settings().metrics_port_for("notifier") == 0  # past the last port: a free one
    monkeypatch.setenv("WORKER_NUMBER", "0")
    with pytest.raises(ValidationError, match="worker_number"):
        Settings()


def test_env_overrides(monkeypatch):
    env = {
        "KAFKA_BOOTSTRAP_SERVERS": "kafka:9092",
        "REDIS_URL": "redis://redis:6379/2",
        "PAYMENTS": "local",
        "STRIPE_API_KEY": "sk_test_other",
        "STRIPE_API_BASE": "http://stripe-mock:12111",
        "STRIPE_WEBHOOK_SECRET": "whsec_other",
        "UPSCALER": "upsampler",
        "UPSAMPLER_API_KEY": "up_key",
        "SMTP_URL": "smtps://user:pass@mail.example.com:465",
        "GATEWAY_PORT": "9090",
        "PUBLIC_BASE_URL": "https://shop.example.com",
        "STORAGE_DIR": "/data/storage",
        "ADMIN_TOKEN": "admin-secret",
        "DOWNLOAD_TTL_HOURS": "48",
        "EXPIRY_WARNING_HOURS": "6",
        "PAYMENT_TIMEOUT_MINUTES": "45",
        "JANITOR_INTERVAL_SECONDS": "2.5",
        "MARKUP_PERCENT": "300",
        "CREDIT_PRICE_CENTS": "5",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = Settings()
    assert s.kafka_bootstrap_servers == "kafka:9092"
    assert s.redis_url == "redis://redis:6379/2"
    assert s.payments == "local"
    assert s.stripe_api_key == "sk_test_other"
    assert s.stripe_api_base == "http://stripe-mock:12111"
    assert s.stripe_webhook_secret == "whsec_other"
    assert s.upscaler == "upsampler"
    assert s.upsampler_api_key == "up_key"
    assert s.smtp_url == "smtps://user:pass@mail.example.com:465"
    assert s.gateway_port == 9090
    assert s.public_base_url == "https://shop.example.com"
    assert s.storage_dir == Path("/data/storage")
    assert s.admin_token == "admin-secret"
    assert s.download_ttl_hours == 48
    assert s.expiry_warning_hours == 6
    assert s.payment_timeout_minutes == 45
    assert s.janitor_interval_seconds == 2.5
    assert s.markup_percent == 300
    assert s.credit_price_cents == 5


def test_lower_case_names_work_too(monkeypatch):
    monkeypatch.setenv("redis_url", "redis://elsewhere:6379/0")
    assert Settings().redis_url == "redis://elsewhere:6379/0"


@pytest.mark.parametrize("value,ok", [("0", False), ("1", True), ("168", True), ("169", False), ("-1", False),
                                      ("abc", False)])
def test_download_ttl_range(monkeypatch, value, ok):
    monkeypatch.setenv("DOWNLOAD_TTL_HOURS", value)
    if ok:
        assert Settings().download_ttl_hours == int(value)
    else:
        with pytest.raises(ValidationError, match="download_ttl_hours"):
            Settings()


@pytest.mark.parametrize("value,ok", [("49", False), ("50", True), ("500", True), ("1200", True), ("1201", False),
                                      ("0", False), ("12.5", False)])
def test_markup_range(monkeypatch, value, ok):
    monkeypatch.setenv("MARKUP_PERCENT", value)
    if ok:
        assert Settings().markup_percent == int(value)
    else:
        with pytest.raises(ValidationError, match="markup_percent"):
            Settings()


@pytest.mark.parametrize("value,after", [(None, 0.01), ("25", 0.025), ("0", None)])
def test_stage_batching(monkeypatch, value, after):
    if value is not None:
        monkeypatch.setenv("STAGE_SECOND_BATCH_AFTER_MS", value)
    monkeypatch.setenv("STAGE_BATCH_SIZE", "64")
    assert Settings().stage_batching() == {"batch_size": 64, "batches_in_flight": 2, "second_batch_after": after}


@pytest.mark.parametrize("value", ["-1", "60001", "1.5", "soon"])
def test_stage_second_batch_after_refuses_what_is_no_delay(monkeypatch, value):
    monkeypatch.setenv("STAGE_SECOND_BATCH_AFTER_MS", value)
    with pytest.raises(ValidationError, match="stage_second_batch_after_ms"):
        Settings()


@pytest.mark.parametrize("name,value", [("PAYMENTS", "paypal"), ("UPSCALER", "magic"), ("GATEWAY_PORT", "70000"),
                                        ("PAYMENT_TIMEOUT_MINUTES", "0"), ("JANITOR_INTERVAL_SECONDS", "0"),
                                        ("CREDIT_PRICE_CENTS", "-1"), ("METRICS_PORT", "-1"),
                                        ("EVENT_LOOP", "trio")])
def test_other_invalid_values(monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        Settings()


def test_url_allow_hosts_comma_list(monkeypatch):
    monkeypatch.setenv("URL_ALLOW_HOSTS", " 127.0.0.0/8, imagehost.test ,,")
    s = Settings()
    assert s.url_allow_hosts == ["127.0.0.0/8", "imagehost.test"]
    allow = s.request_policy.allow_hosts
    assert allow.allows_host("imagehost.test")
    import ipaddress
    assert allow.allows_address(ipaddress.ip_address("127.0.0.1"))
    assert not allow.allows_address(ipaddress.ip_address("10.0.0.1"))


def test_trusted_proxies_are_networks(monkeypatch):
    assert Settings().trusted_proxies == []
    monkeypatch.setenv("TRUSTED_PROXIES", " 10.0.0.0/8, 192.0.2.7 ,2001:db8::/32,,")
    assert [str(n) for n in Settings().trusted_proxies] == ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]


@pytest.mark.parametrize("value, says", [("10.0.0.1/8", "host bits set"), ("lb.internal", "'lb.internal'")])
def test_trusted_proxies_refuse_what_is_not_a_network(monkeypatch, value, says):
    monkeypatch.setenv("TRUSTED_PROXIES", value)
    with pytest.raises(ValidationError, match="TRUSTED_PROXIES takes addresses and networks") as refused:
        Settings()
    assert says in str(refused.value)


def test_allowed_resolutions_comma_list(monkeypatch):
    monkeypatch.setenv("ALLOWED_RESOLUTIONS", "4x, 8x")
    s = Settings()
    assert s.allowed_resolutions == ["4x", "8x"]
    assert s.request_policy.resolutions == ("4x", "8x")


@pytest.mark.parametrize("value", ["", "4x,big", "0x", "4"])
def test_allowed_resolutions_invalid(monkeypatch, value):
    monkeypatch.setenv("ALLOWED_RESOLUTIONS", value)
    with pytest.raises(ValidationError, match="allowed_resolutions"):
        Settings()


@pytest.mark.parametrize("minutes,ttl", [(1, 30), (29, 30), (30, 30), (60, 60), (1440, 1440), (1441, 1440), (5000, 1440)])
def test_stripe_session_ttl_is_clamped(monkeypatch, minutes, ttl):
    monkeypatch.setenv("PAYMENTS", "stripe")
    monkeypatch.setenv("PAYMENT_TIMEOUT_MINUTES", str(minutes))
    s = Settings()
    assert s.payment_timeout_minutes == minutes
    assert s.checkout_session_ttl_minutes == ttl


@pytest.mark.parametrize("minutes", [1, 5, 29, 60, 1441, 5000])
def test_local_session_ttl_is_not_clamped(monkeypatch, minutes):
    monkeypatch.setenv("PAYMENTS", "local")
    monkeypatch.setenv("PAYMENT_TIMEOUT_MINUTES", str(minutes))
    assert Settings().checkout_session_ttl_minutes == minutes


@pytest.mark.parametrize("url", ["smtp://127.0.0.1:2525", "smtp://mailsink:2525", "smtps://user:pass@mail.example.com:465"])
def test_smtp_url_accepted(monkeypatch, url):
    monkeypatch.setenv("SMTP_URL", url)
    assert Settings().smtp_url == url


@pytest.mark.parametrize("url", ["http://mail.example.com", "mail.example.com:25", "", "SMTP-ish://x", "smtp:/x"])
def test_smtp_url_rejected(monkeypatch, url):
    monkeypatch.setenv("SMTP_URL", url)
    with pytest.raises(ValidationError, match="smtp"):
        Settings()


def test_request_policy_defaults():
    policy = Settings().request_policy
    assert policy.resolutions == ("2x", "4x", "8x")
    assert not policy.allow_hosts.hosts and not policy.allow_hosts.networks
