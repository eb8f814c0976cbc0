"""The local stack, with real processes.

Most tests use the stack that `make test` / .ci/run brought up on the default ports
before the suite; they fail (not skip) when it is not up. The `down` tests run a
separate instance (own SMI_VAR_DIR, Redis and mail sink on free ports) so taking it
down does not pull the stack from under the rest of the suite."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from email.message import EmailMessage
from email.parser import BytesParser
from email.policy import default as default_policy
from pathlib import Path
from urllib.parse import urlsplit

import aiosmtplib
import pytest
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from schemas.topics import ALL_TOPICS
from smi.settings import Settings
from smi.stack.manager import COMPONENT_NAMES
from smi.stack.process import is_alive
from smi.stack.topics import ensure_topics
from tests.support.ports import free_port

REPO_ROOT = Path(__file__).resolve().parents[2]


def smi(*args: str, env: dict[str, str] | None = None, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "smi.cli", *args], cwd=REPO_ROOT, env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def main_stack() -> dict:
    """`smi stack status --json` of the stack the suite runs against."""
    result = smi("stack", "status", "--json")
    if result.returncode != 0:
        pytest.fail("the local stack is not up: run `smi stack up` first (`make test` does)\n"
                    f"{result.stdout}{result.stderr}", pytrace=False)
    return json.loads(result.stdout)


def test_status_json_shows_every_component_answering(main_stack: dict) -> None:
    assert main_stack["ok"] is True
    assert set(main_stack["components"]) == set(COMPONENT_NAMES)
    for name, component in main_stack["components"].items():
        assert component["answers"] is True, name
        assert component["state"] in ("ours", "external"), name


def test_second_up_is_a_no_op(main_stack: dict) -> None:
    result = smi("stack", "up")

    assert result.returncode == 0, result.stdout + result.stderr
    assert "already running: nothing to do" in result.stdout
    after = json.loads(smi("stack", "status", "--json").stdout)
    assert {n: c["pid"] for n, c in after["components"].items()} == \
           {n: c["pid"] for n, c in main_stack["components"].items()}


async def test_ensure_topics_creates_every_topic_once(main_stack: dict) -> None:
    settings = Settings()
    assert await ensure_topics(settings) == []  # `up` created them already

    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        described = await admin.describe_topics([t.name for t in ALL_TOPICS])
        configs = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, t.name) for t in ALL_TOPICS])
    finally:
        await admin.close()
    assert {d["topic"]: (d["error_code"], len(d["partitions"])) for d in described} == \
           {t.name: (0, settings.topic_partitions) for t in ALL_TOPICS}
    max_bytes = {name: int(value) for response in configs for _, _, _, name, entries in response.resources
                 for key, value, *_ in entries if key == "max.message.bytes"}
    for spec in ALL_TOPICS:
        if spec.max_message_bytes:
            assert max_bytes[spec.name] == spec.max_message_bytes, spec.name


async def test_mail_sent_to_the_sink_lands_as_an_eml_file(main_stack: dict) -> None:
    if main_stack["components"]["mail"]["state"] != "ours":
        pytest.fail("the mail sink is external: its messages are not written under our var directory")
    smtp = urlsplit(Settings().smtp_url)
    subject = f"stack test {uuid.uuid4()}"
    message = EmailMessage()
    message["From"] = "shop@localhost"
    message["To"] = "customer@example.com"
    message["Subject"] = subject
    message.set_content("hello")

    # The second recipient is a Bcc: only the envelope (X-RcptTo) shows it.
    await aiosmtplib.send(message, hostname=smtp.hostname, port=smtp.port,
                          recipients=["customer@example.com", "audit@example.com"])

    mail_dir = Path(main_stack["var_dir"]) / "mail"
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for path in sorted(mail_dir.glob("*.eml")):
            parsed = BytesParser(policy=default_policy).parsebytes(path.read_bytes())
            if parsed["Subject"] == subject:
                assert parsed["X-RcptTo"] == "customer@example.com, audit@example.com"
                assert parsed.get_content().strip() == "hello"
                return
        await asyncio.sleep(0.1)
    pytest.fail(f"no .eml with subject {subject!r} in {mail_dir} after 10 s")


def test_down_stops_every_process_of_its_instance(tmp_path: Path) -> None:
    env = {"SMI_VAR_DIR": str(tmp_path), "REDIS_URL": f"redis://127.0.0.1:{free_port()}/0",
           "SMTP_URL": f"smtp://127.0.0.1:{free_port()}"}
    up = smi("stack", "up", "--only", "redis,mail", env=env)
    assert up.returncode == 0, up.stdout + up.stderr
    pids = {name: int((tmp_path / "run" / f"{name}.pid").read_text()) for name in ("redis", "mail")}
    try:
        status = json.loads(smi("stack", "status", "--only", "redis,mail", "--json", env=env).stdout)
        assert status["ok"] is True
        assert {n: (c["state"], c["pid"]) for n, c in status["components"].items()} == \
               {n: ("ours", pid) for n, pid in pids.items()}

        down = smi("stack", "down", env=env)

        assert down.returncode == 0, down.stdout + down.stderr
        assert [name for name, pid in pids.items() if is_alive(pid)] == []
        assert list((tmp_path / "run").glob("*.pid")) == []
        after = json.loads(smi("stack", "status", "--only", "redis,mail", "--json", env=env).stdout)
        assert {n: c["state"] for n, c in after["components"].items()} == {"redis": "down", "mail": "down"}
    finally:
        for pid in pids.values():  # only if an assertion above failed with them running
            if is_alive(pid):
                os.kill(pid, 9)


def test_down_never_signals_a_process_it_did_not_start(tmp_path: Path) -> None:
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        (tmp_path / "run").mkdir()
        # A stale pid file whose pid now belongs to some other program.
        (tmp_path / "run" / "redis.pid").write_text(f"{bystander.pid}\n")

        down = smi("stack", "down", env={"SMI_VAR_DIR": str(tmp_path)})

        assert down.returncode == 0, down.stdout + down.stderr
        assert "stale pid file removed" in down.stdout
        assert bystander.poll() is None
        assert not (tmp_path / "run" / "redis.pid").exists()
    finally:
        bystander.kill()
        bystander.wait()
