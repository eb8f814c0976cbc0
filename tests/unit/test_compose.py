"""docker-compose.yml and the Dockerfile, checked statically (Docker is not needed:
the file is parsed, never run)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

from smi.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"

STAGES = ("checkout", "processor", "notifier", "janitor", "gateway")
INFRA = ("kafka", "redis", "stripe-mock", "mailsink", "topics")
APP_SERVICES = STAGES + ("mailsink", "topics")
SECRETS = ("STRIPE_API_KEY", "STRIPE_WEBHOOK_SECRET", "ADMIN_TOKEN", "UPSAMPLER_API_KEY")
SETTINGS_ENV = {name.upper() for name in Settings.model_fields}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def env_of(service: dict) -> dict[str, str]:
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def command_of(service: dict) -> list[str]:
    cmd = service.get("command") or []
    return shlex.split(cmd) if isinstance(cmd, str) else [str(c) for c in cmd]


def default_of(value: str) -> str:
    """`${VAR:-default}` -> default; a plain value is returned as it is."""
    match = re.fullmatch(r"\$\{(\w+)(?::?-([^}]*))?\}", value)
    return (match.group(2) or "") if match else value


def depends(service: dict) -> dict[str, str]:
    deps = service.get("depends_on") or {}
    if isinstance(deps, list):
        return {name: "service_started" for name in deps}
    return {name: (spec or {}).get("condition", "service_started") for name, spec in deps.items()}


def test_every_service_exists(services):
    for name in STAGES + INFRA:
        assert name in services, name


def test_app_env_anchor(compose):
    anchor = compose["x-app-env"]
    assert anchor["KAFKA_BOOTSTRAP_SERVERS"] == "kafka:9092"
    assert anchor["REDIS_URL"] == "redis://redis:6379/0"
    assert anchor["STRIPE_API_BASE"] == "http://stripe-mock:12111"
    assert anchor["SMTP_URL"] == "smtp://mailsink:2525"
    assert anchor["STORAGE_DIR"] == "/data/storage"
    assert "PUBLIC_BASE_URL" in anchor
    text = COMPOSE.read_text()
    assert "x-app-env: &app-env" in text  # shared by anchor, not copied by hand


def test_kafka_is_kraft_single_node(services):
    kafka = services["kafka"]
    image, _, tag = kafka["image"].partition(":")
    assert image == "apache/kafka"
    assert re.fullmatch(r"4\.\d+\.\d+", tag), tag
    env = env_of(kafka)
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    node_id = env["KAFKA_NODE_ID"]
    voters = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].split(",")
    assert len(voters) == 1 and voters[0].startswith(f"{node_id}@")
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] == "CONTROLLER"
    assert "CONTROLLER://" in env["KAFKA_LISTENERS"]
    assert "PLAINTEXT://kafka:9092" in env["KAFKA_ADVERTISED_LISTENERS"].split(",")
    protocol_map = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listener_names = {item.split("://")[0] for item in env["KAFKA_LISTENERS"].split(",")}
    assert listener_names <= set(protocol_map)
    for name in ("KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR", "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
                 "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR"):
        assert env[name] == "1", name
    assert env["KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS"] == "0"
    assert "-Xmx" in env["KAFKA_HEAP_OPTS"]
    assert kafka.get("healthcheck", {}).get("test")


def test_redis_fsyncs_every_write(services):
    redis = services["redis"]
    assert redis["image"].split(":")[0] == "redis"
    assert redis["image"].split(":")[1].startswith("7")
    cmd = command_of(redis)
    assert cmd[cmd.index("--appendonly") + 1] == "yes"
    assert cmd[cmd.index("--appendfsync") + 1] == "always"
    assert any(v.split(":")[1] == "/data" for v in redis.get("volumes", []))


def test_redis_keeps_job_hashes_compact_like_the_local_stack(services, tmp_path):
    from smi.stack.layout import Layout
    from smi.stack.redis_server import HASH_MAX_LISTPACK_VALUE, prepare

    local = prepare("127.0.0.1", 6379, Layout(tmp_path, tmp_path))
    compose = command_of(services["redis"])
    for cmd in (local, compose):
        assert int(cmd[cmd.index("--hash-max-listpack-value") + 1]) == HASH_MAX_LISTPACK_VALUE >= 1024


def test_stripe_mock(services):
    mock = services["stripe-mock"]
    assert mock["image"].startswith("stripe/stripe-mock:")
    assert any("12111" in str(p) for p in mock.get("ports", []))


def test_mailsink_command(services):
    cmd = command_of(services["mailsink"])
    assert cmd[:3] == ["python", "-m", "smi.stack.mailsink"]
    assert cmd[cmd.index("--port") + 1] == "2525"
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    assert cmd[cmd.index("--dir") + 1] == "/data/mail"


def test_topics_is_a_one_shot(services):
    topics = services["topics"]
    assert command_of(topics) == ["smi", "topics", "create"]
    assert str(topics.get("restart", "no")) == "no"
    assert depends(topics).get("kafka") == "service_healthy"


@pytest.mark.parametrize("stage", STAGES)
def test_stage_command(services, stage):
    assert command_of(services[stage]) == ["smi", "run", stage]


@pytest.mark.parametrize("stage", STAGES)
def test_stages_wait_for_their_dependencies(services, stage):
    deps = depends(services[stage])
    assert deps.get("kafka") == "service_healthy"
    assert deps.get("redis") == "service_healthy"
    assert deps.get("topics") == "service_completed_successfully"


def test_conditions_match_healthchecks(services):
    for name, service in services.items():
        for dep, condition in depends(service).items():
            assert dep in services, f"{name} depends on unknown service {dep}"
            if condition == "service_healthy":
                assert services[dep].get("healthcheck"), f"{name} waits for {dep}'s health, which has no check"
            elif services[dep].get("healthcheck") and condition == "service_started":
                pytest.fail(f"{name} should wait for {dep} to be healthy")


def test_notifier_waits_for_mailsink_and_checkout_for_stripe(services):
    assert "mailsink" in depends(services["notifier"])
    assert "stripe-mock" in depends(services["checkout"])


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_build_the_repo_image(services, name):
    build = services[name].get("build")
    context = build if isinstance(build, str) else (build or {}).get("context")
    assert context in (".", "./"), name
    dockerfile = "Dockerfile" if isinstance(build, str) else build.get("dockerfile", "Dockerfile")
    assert dockerfile == "Dockerfile"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_services_reach_the_infrastructure(services, name):
    env = env_of(services[name])
    needed = {"KAFKA_BOOTSTRAP_SERVERS", "REDIS_URL", "STRIPE_API_BASE", "SMTP_URL", "STORAGE_DIR", "PUBLIC_BASE_URL"}
    assert needed <= SETTINGS_ENV  # the names are the ones Settings reads
    assert needed <= set(env), needed - set(env)
    assert env["KAFKA_BOOTSTRAP_SERVERS"].split(":")[0] == "kafka"
    assert env["KAFKA_BOOTSTRAP_SERVERS"].split(":")[1] == "9092"
    assert urlsplit(env["REDIS_URL"]).hostname == "redis"
    assert urlsplit(env["STRIPE_API_BASE"]).hostname == "stripe-mock"
    assert urlsplit(env["STRIPE_API_BASE"]).port == 12111
    smtp = urlsplit(env["SMTP_URL"])
    assert smtp.scheme in ("smtp", "smtps") and smtp.hostname == "mailsink" and smtp.port == 2525
    for host in ("kafka", "redis", "stripe-mock", "mailsink"):
        assert host in services


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_env_names_are_all_settings(services, name):
    unknown = set(env_of(services[name])) - SETTINGS_ENV
    assert not unknown, f"{name} sets variables Settings does not read: {unknown}"


@pytest.mark.parametrize("name", APP_SERVICES)
def test_app_env_defaults_are_valid_settings(services, name, monkeypatch):
    for key in list(__import__("os").environ):
        if key.lower() in Settings.model_fields:
            monkeypatch.delenv(key)
    for key, value in env_of(services[name]).items():
        monkeypatch.setenv(key, default_of(value))
    s = Settings()
    assert s.kafka_bootstrap_servers == "kafka:9092"
    assert str(s.storage_dir) == "/data/storage"


@pytest.mark.parametrize("secret", SECRETS)
def test_secrets_come_from_the_host(services, secret):
    for name in APP_SERVICES:
        value = env_of(services[name]).get(secret)
        assert value is not None, f"{name} lacks {secret}"
        assert value.startswith("${" + secret), f"{name}: {secret} must be passed through from the host"


def test_live_looking_keys_are_never_defaults():
    text = COMPOSE.read_text()
    assert "sk_live_" not in text
    assert "rk_live_" not in text


@pytest.mark.parametrize("name", ["processor", "gateway", "janitor"])
def test_storage_volume_is_shared(services, name):
    mounts = {v.split(":")[1]: v.split(":")[0] for v in services[name].get("volumes", [])}
    assert mounts.get("/data/storage") == "storage"


def test_named_volumes_declared(compose, services):
    declared = set(compose.get("volumes") or {})
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if not source.startswith((".", "/")):
                assert source in declared, f"{name} uses undeclared volume {source}"


def test_gateway_port(services):
    gateway = services["gateway"]
    assert any(str(p).endswith("8080:8080") for p in gateway.get("ports", []))
    assert env_of(gateway).get("GATEWAY_PORT", "8080") == "8080"


def test_dockerfile_installs_the_package():
    assert DOCKERFILE.exists()
    lines = [line.strip() for line in DOCKERFILE.read_text().splitlines() if line.strip() and not line.strip().startswith("#")]
    text = "\n".join(lines)
    assert re.search(r"^FROM python:3\.11-slim\b", text, re.M)
    assert re.search(r"pip install (--no-cache-dir )?\.(\s|$)", text)
    for package in ("schemas", "smi", "services", "pyproject.toml"):
        assert re.search(rf"^COPY .*\b{re.escape(package)}\b", text, re.M), package
    users = re.findall(r"^USER\s+(\S+)", text, re.M)
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
