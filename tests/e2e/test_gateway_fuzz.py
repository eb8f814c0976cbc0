"""The gateway under bad requests (issue 7): generated webhook bodies and headers,
bodies over 1 MiB, slow clients, and download-token guessing, against a gateway
process of this module's own. The guessing comes from an address of its own: the
failed-lookup limits are kept in Redis, shared by every gateway of the session,
and must not lock the later tests' client (127.0.0.1) out.

Requests go out over raw sockets, so a header may hold bytes an HTTP library
would refuse to send. The contract (design.md): a bad signature or body is a
4xx and publishes nothing; only a broker that cannot take the event makes a 5xx
(503), and the broker is up here, so no 5xx at all."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import secrets
import time
import uuid
from dataclasses import dataclass, field
from urllib.parse import quote

import pytest

from schemas.status import JobStatus as S
from smi import stripe_webhooks
from smi.jobtable import hash_token
from tests.e2e.conftest import WEBHOOK_SECRET, start_gateway
from tests.support.bad_inputs import SIGNATURE_KINDS, download_tokens, samples, webhook_bodies, webhook_requests
from tests.support.jobs import make_job

FUZZ_COUNT = int(os.environ.get("WEBHOOK_FUZZ_COUNT", "260"))
MAX_BODY = 1024 * 1024
SLOW_CLIENTS = 20
PROMPT_SECONDS = 2.0  # a normal request's answer while the slow clients hang on
BODY_TIMEOUT_SECONDS = 15.0  # what "times a stalled upload out" is held to
GUESSER = "127.0.0.240"  # a client of its own, for its own rate-limit bucket


@pytest.fixture(scope="module")
async def fuzz_gateway(stage_env, tmp_path_factory, http, topics_ready):
    stage = await start_gateway(http, stage_env, tmp_path_factory.mktemp("fuzz-gateway-logs"))
    stage.port = int(stage.url.rsplit(":", 1)[1])
    yield stage
    stage.stop()


@dataclass
class Reply:
    status: int | None  # None: the connection closed without a status line
    head: bytes = b""
    error: str | None = None
    body: bytes = b""

    def header(self, name: str) -> str | None:
        for line in self.head.split(b"\r\n")[1:]:
            key, _, value = line.partition(b":")
            if key.strip().lower() == name.lower().encode():
                return value.strip().decode("latin-1")
        return None


async def raw_request(port: int, method: str, path: str, headers=(), body: bytes = b"", *,
                      content_length: int | None = None, chunked: bool = False, timeout: float = 15.0,
                      source: str = "127.0.0.1") -> Reply:
    """One HTTP/1.1 request over a fresh connection from ``source``, bytes as given."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
    try:
        lines = [f"{method} {path} HTTP/1.1".encode(), b"Host: 127.0.0.1", b"Connection: close"]
        if chunked:
            lines.append(b"Transfer-Encoding: chunked")
            payload = b"".join(b"%x\r\n%s\r\n" % (len(body[i:i + 65536]), body[i:i + 65536])
                               for i in range(0, len(body), 65536)) + b"0\r\n\r\n"
        else:
            lines.append(b"Content-Length: %d" % (len(body) if content_length is None else content_length))
            payload = body
        lines += [name + b": " + value for name, value in headers]
        error = None
        try:
            writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + payload)
            await writer.drain()
        except ConnectionError as exc:  # answered (413, 415) and closed before the body was all sent
            error = type(exc).__name__
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        except asyncio.IncompleteReadError as exc:
            head = exc.partial
        except ConnectionError as exc:
            return Reply(None, b"", type(exc).__name__)
        parts = head.split(b" ", 2)
        status = int(parts[1]) if len(parts) > 1 and parts[0].startswith(b"HTTP/") else None
        try:  # Connection: close, so the body ends with the connection
            body = await asyncio.wait_for(reader.read(65536), timeout)
        except (ConnectionError, asyncio.TimeoutError):
            body = b""
        return Reply(status, head, error, body)
    finally:
        writer.close()


def signed(event: dict) -> tuple[bytes, tuple]:
    body = stripe_webhooks.encode(event)
    return body, ((b"Content-Type", b"application/json"),
                  (b"Stripe-Signature", stripe_webhooks.sign(body, WEBHOOK_SECRET).encode()))


def marker_event() -> tuple[str, dict]:
    """A well-formed, signed event of a type no stage handles (both ignore it): once
    it is on payments.events, everything sent before it has had its answer."""
    marker = f"fuzz_{uuid.uuid4().hex}"
    event = {"id": f"evt_{marker}", "object": "event", "type": "fuzz.marker", "created": int(time.time()),
             "livemode": False, "data": {"object": {"id": marker, "object": "fuzz"}}}
    return marker, event


async def nothing_published(port: int, watcher, topic: str, bodies: set[bytes], since: int) -> list:
    """After a marker went through: the watched records of ``topic`` since ``since``
    that carry one of ``bodies`` (verbatim, as the gateway would publish them)."""
    marker, event = marker_event()
    body, headers = signed(event)
    assert (await raw_request(port, "POST", "/webhooks/stripe", headers, body)).status == 200
    await watcher.wait_for("payments.events", lambda m: m.key == marker.encode())
    return [m for m in watcher.seen[since:] if m.topic == topic and m.value in bodies]


# -- generated webhook requests ------------------------------------------------------------


async def test_generated_webhook_requests_get_4xx_and_publish_nothing(fuzz_gateway, watcher):
    since = len(watcher.seen)
    now = int(time.time())
    per_kind = max(1, FUZZ_COUNT // len(SIGNATURE_KINDS))
    requests = [request for i, kind in enumerate(SIGNATURE_KINDS)
                for request in samples(webhook_requests(WEBHOOK_SECRET, now, kind), per_kind, seed_value=100 + i)]
    replies = []
    for request in requests:
        replies.append((request, await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe", request.headers,
                                                   request.body)))
    wrong = [(reply.status, reply.body[:80], request.kind, request.body[:80]) for request, reply in replies
             if reply.status is None or not 400 <= reply.status < 500]
    assert not wrong, f"{len(wrong)} of {len(replies)} not 4xx:\n" + "\n".join(map(repr, wrong[:15]))
    # Each refusal for its reason: a JSON content type and a valid signature reach
    # the body check, and a UTF-8 body is then refused as no Stripe event.
    for request, reply in replies:
        content_type = dict(request.headers).get(b"Content-Type", b"")
        json_type = content_type.split(b";")[0].strip().lower() == b"application/json"
        error = json.loads(reply.body)["error"] if reply.body.startswith(b"{") else reply.body[:80]
        if request.kind.endswith("header noise") or any(_parser_refuses(value) for _, value in request.headers):
            continue  # refused by the HTTP parser before the handler: any 4xx
        if not json_type:
            assert reply.status == 415, (request.kind, reply.status, error)
        elif request.kind.startswith("valid signature") and _utf8(request.body):
            assert reply.status == 400 and error.startswith("not a Stripe event"), (request.kind, error)
        else:
            assert reply.status == 400, (request.kind, reply.status, error)
    published = await nothing_published(fuzz_gateway.port, watcher, "payments.events",
                                         {r.body for r in requests}, since)
    assert not published, published[:3]
    assert fuzz_gateway.alive


async def test_a_signed_well_formed_event_with_ids_that_are_not_unicode_is_refused(fuzz_gateway, watcher):
    """``"\\ud800"`` is valid JSON but no Unicode: the event cannot be keyed (UTF-8)
    for Kafka. A 5xx would have Stripe retry it for days; it is a bad body."""
    since = len(watcher.seen)
    bodies = set()
    for job_id in ("\ud800", "a\udfffb"):
        event = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=job_id,
                                                       session_id="cs_fuzz", amount_total=384)
        body, headers = signed(event)  # json.dumps escapes the surrogate: ASCII on the wire
        bodies.add(body)
        reply = await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe", headers, body)
        assert reply.status is not None and 400 <= reply.status < 500, (job_id, reply.head)
    assert not await nothing_published(fuzz_gateway.port, watcher, "payments.events", bodies, since)


async def test_bodies_over_1_mib_get_413_and_publish_nothing(fuzz_gateway, watcher):
    since = len(watcher.seen)
    sizes = [MAX_BODY + 1, MAX_BODY + 4096, 3 * MAX_BODY // 2, 3 * MAX_BODY]
    bodies, statuses = set(), []
    for size in sizes:
        event = stripe_webhooks.checkout_session_event("checkout.session.completed", job_id=str(uuid.uuid4()),
                                                       session_id="cs_big", amount_total=384)
        small = stripe_webhooks.encode(event)
        body = small[:-1] + b"," + b'"pad":"' + b"x" * (size - len(small) - 9) + b'"}'
        assert len(body) == size
        bodies.add(body)
        mac = stripe_webhooks.sign(body, WEBHOOK_SECRET).encode()
        headers = ((b"Content-Type", b"application/json"), (b"Stripe-Signature", mac))
        statuses.append(("content-length", size, (await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe",
                                                                    headers, body)).status))
        statuses.append(("chunked", size, (await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe",
                                                             headers, body, chunked=True)).status))
    # A declared length far past the limit, with no body at all: refused unread.
    started = time.monotonic()
    reply = await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe", ((b"Content-Type", b"application/json"),
                                                                             (b"Stripe-Signature", b"t=1,v1=00")),
                              b"", content_length=10 * 1024 ** 3)
    statuses.append(("10 GiB declared", 0, reply.status))
    assert time.monotonic() - started < PROMPT_SECONDS
    assert all(status == 413 for *_, status in statuses), statuses
    assert not await nothing_published(fuzz_gateway.port, watcher, "payments.events", bodies, since)


# -- the Upsampler callback ------------------------------------------------------------------


async def test_generated_upsampler_callbacks_get_4xx_and_publish_nothing(fuzz_gateway, table, watcher):
    since = len(watcher.seen)
    job = await make_job(table, S.PROCESSING)
    token = secrets.token_urlsafe(32)
    await table.update(job.job_id, {"callback_token_hash": hash_token(token)})
    json_header = ((b"Content-Type", b"application/json"),)
    bodies = samples(webhook_bodies(), 60, seed_value=300)
    # The body is what the job's token carries; every JSON object is published.
    not_objects = [b for b in bodies if not _json_object(b)]
    replies = []
    for guess in samples(download_tokens(), 40, seed_value=301):  # no such callback: 404 before the body is read
        replies.append(("guessed token", await raw_request(fuzz_gateway.port, "POST",
                                                           f"/webhooks/upsampler/{quote(guess, safe='')}",
                                                           json_header, b'{"status": "SUCCESS"}')))
    for body in not_objects:
        replies.append(("not an object", await raw_request(fuzz_gateway.port, "POST",
                                                           f"/webhooks/upsampler/{token}", json_header, body)))
    replies.append(("text/plain", await raw_request(fuzz_gateway.port, "POST", f"/webhooks/upsampler/{token}",
                                                    ((b"Content-Type", b"text/plain"),), b"{}")))
    replies.append(("over 1 MiB", await raw_request(fuzz_gateway.port, "POST", f"/webhooks/upsampler/{token}",
                                                    json_header, b'{"a":"' + b"x" * MAX_BODY + b'"}')))
    # JSON escapes of lone surrogates: an object, but no Unicode, so it cannot be
    # published as UTF-8 JSON. A bad body (4xx), not "event log unavailable" (503).
    surrogate = b'{"status": "SUCCESS", "id": "\\ud800"}'
    replies.append(("lone surrogate", await raw_request(fuzz_gateway.port, "POST", f"/webhooks/upsampler/{token}",
                                                        json_header, surrogate)))
    wrong = [(what, reply.status, reply.head[:60]) for what, reply in replies
             if reply.status is None or not 400 <= reply.status < 500]
    assert not wrong, wrong[:10]
    assert {reply.status for what, reply in replies if what == "guessed token"} == {404}
    await nothing_published(fuzz_gateway.port, watcher, "payments.events", set(), since)  # the marker's round trip
    assert not [m for m in watcher.seen[since:] if m.topic == "upscaler.events" and m.key == job.job_id.encode()]


def _parser_refuses(value: bytes) -> bool:
    """A header value aiohttp's parser answers 400 itself: control bytes, or too long."""
    return len(value) > 8190 or any(b < 0x20 and b != 0x09 or b == 0x7f for b in value)


def _utf8(body: bytes) -> bool:
    try:
        body.decode("utf-8")
        return True
    except UnicodeDecodeError:
        return False


def _json_object(body: bytes) -> bool:
    try:
        return isinstance(json.loads(body), dict)
    except (ValueError, RecursionError):
        return False


# -- slow clients ----------------------------------------------------------------------------


@dataclass
class SlowClients:
    """Connections that sent their headers and then a body slowly (a byte a second)
    or not at all (a few bytes, then nothing)."""

    opened_at: float
    connections: list = field(default_factory=list)  # (mode, reader, writer)
    tasks: list = field(default_factory=list)
    closed: dict = field(default_factory=dict)  # index -> (seconds after opening, what the server did)

    async def watch(self, index: int, mode: str, reader, writer) -> None:
        """Until the server answers or hangs up: what it did and when."""
        try:
            if mode == "dribble":
                async def dribble():
                    while True:
                        await asyncio.sleep(1)
                        writer.write(b" ")
                        await writer.drain()
                feeding = asyncio.create_task(dribble())
            data = await reader.read(200)
            outcome = data.split(b"\r\n", 1)[0].decode("latin-1") if data else "closed"
        except ConnectionError as exc:
            outcome = type(exc).__name__
        finally:
            if mode == "dribble":
                feeding.cancel()
        self.closed[index] = (time.monotonic() - self.opened_at, outcome)


@pytest.fixture(scope="module")
async def slow_clients(fuzz_gateway):
    clients = SlowClients(time.monotonic())
    mac = hmac.new(WEBHOOK_SECRET.encode(), b"x", hashlib.sha256).hexdigest()
    for i in range(SLOW_CLIENTS):
        mode = "dribble" if i % 2 else "stall"
        reader, writer = await asyncio.open_connection("127.0.0.1", fuzz_gateway.port)
        writer.write(b"POST /webhooks/stripe HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                     + f"Stripe-Signature: t={int(time.time())},v1={mac}\r\n".encode()
                     + b"Content-Length: 100000\r\n\r\n{\"id\": ")
        await writer.drain()
        clients.connections.append((mode, reader, writer))
        clients.tasks.append(asyncio.create_task(clients.watch(i, mode, reader, writer)))
    yield clients
    for task in clients.tasks:
        task.cancel()
    for _, _, writer in clients.connections:
        writer.close()


async def test_the_gateway_keeps_serving_while_slow_clients_hang_on(fuzz_gateway, slow_clients, http, watcher):
    await asyncio.sleep(1)  # every slow request is in its handler, waiting for its body
    timings = []
    for _ in range(5):
        started = time.monotonic()
        async with http.get(f"{fuzz_gateway.url}/healthz") as resp:
            assert resp.status == 200
        timings.append(("healthz", time.monotonic() - started))
        marker, event = marker_event()
        body, headers = signed(event)
        started = time.monotonic()
        reply = await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe", headers, body)
        assert reply.status == 200, reply.head
        timings.append(("signed webhook, published", time.monotonic() - started))
        started = time.monotonic()
        reply = await raw_request(fuzz_gateway.port, "POST", "/webhooks/stripe", ((b"Content-Type", b"text/plain"),),
                                  b"{}")
        assert reply.status == 415
        timings.append(("bad webhook", time.monotonic() - started))
    assert max(t for _, t in timings) < PROMPT_SECONDS, timings
    assert fuzz_gateway.alive


async def test_a_stalled_or_dribbled_upload_is_timed_out(fuzz_gateway, slow_clients):
    remaining = BODY_TIMEOUT_SECONDS + 2 - (time.monotonic() - slow_clients.opened_at)
    if remaining > 0:
        await asyncio.wait(slow_clients.tasks, timeout=remaining)
    held = [i for i in range(SLOW_CLIENTS) if i not in slow_clients.closed]
    assert not held, (f"{len(held)} of {SLOW_CLIENTS} slow uploads still held by the gateway after "
                      f"{BODY_TIMEOUT_SECONDS:.0f} s; answered: {slow_clients.closed}")


# -- download-token guessing -------------------------------------------------------------


async def test_guessing_download_tokens_is_rate_limited(fuzz_gateway):
    guesses = samples(download_tokens(), 40, seed_value=400)
    started = time.monotonic()
    replies = [await raw_request(fuzz_gateway.port, "GET", f"/downloads/{quote(guess, safe='')}", source=GUESSER)
               for guess in guesses]
    elapsed = time.monotonic() - started
    statuses = [reply.status for reply in replies]
    # 20 failed lookups a minute per client, refilled continuously (one every 3 s):
    # sent within 3 s, the 21st and every one after it is refused.
    assert elapsed < 3, elapsed
    assert set(statuses[:20]) <= {400, 404}, list(zip(guesses, statuses))[:20]
    assert set(statuses[20:]) == {429}, statuses
    assert all(int(reply.header("Retry-After")) >= 1 for reply in replies[20:])
    assert all(reply.header("Cache-Control") == "no-store" for reply in replies)
