"""What one customer email costs the notifier, in CPU microseconds per email
(time.process_time of this process, so the figures hold on a busy machine).

    python -m bench.email_compose [--count N] [--runs R] [--letterhead plain|full]
    python -m bench.email_compose --full [--count N]   # needs REDIS_URL (a Redis of your own)

Composing: each kind of email, built the way the notifier sends it:

- ``reference``: the email package's EmailMessage (services/notifier/emails.py),
  then what aiosmtplib's send_message does with it before any I/O (sender and
  recipients from the headers, the message flattened without Bcc): what the
  notifier did per email before services/notifier/outgoing.py;
- ``reference compose`` / ``reference flatten``: the two halves of that;
- ``fast``: services/notifier/outgoing.py, the same bytes.

Every email gets its own job id, customer address, image URL and download token,
so nothing per email is served from a cache.

``--full`` adds the notifier's per-email path without Kafka, against the job
table in REDIS_URL (a namespace of its own, deleted afterwards) and an SMTP sink
in its own process (bench.email_sink): the handler for ``jobs.completed``
(``Notifier.on_completed``: job read, done-marker check, token issue, compose,
send, done marker, logs at INFO into /dev/null) over fresh completed jobs, in
batches of STAGE_BATCH_SIZE handled concurrently over SMTP_CONNECTIONS pooled
connections, as the stage runs it; and its parts one at a time."""

from __future__ import annotations

import argparse
import asyncio
import logging.config
import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Callable

from schemas.job import Job
from services.notifier import emails, outgoing
from services.notifier.emails import DownloadLink, Letterhead
from smi.mailer import Outgoing

KINDS = ("ready", "resend", "expiring", "refund")
LETTERHEADS = {
    # The defaults of smi.settings.
    "plain": Letterhead("Sell My Images", "Sell My Images <shop@localhost>"),
    # Everything set, and a shop name that needs RFC 2047 and quoted-printable.
    "full": Letterhead("Bildermarkt Zürich & Co", "Bildermarkt Zürich & Co <shop@bilder.example.com>",
                       reply_to="hilfe@bilder.example.com", admin_email="admin@bilder.example.com"),
}
START = datetime(2025, 5, 13, 9, 30, tzinfo=UTC)


# -- composing ---------------------------------------------------------------------


def sample_job(n: int) -> Job:
    return Job(job_id=str(uuid.uuid4()), status="completed", resolution=("2x", "4x", "8x")[n % 3],
               image_url=f"https://images.example.com/uploads/2025/05/{uuid.uuid4().hex}.jpg",
               email=f"customer.{n}.{secrets.token_hex(3)}@example.com", image_width=800 + n % 400,
               image_height=600 + n % 300, created_at=START, updated_at=START)


def inputs(count: int) -> list[tuple[Job, DownloadLink, datetime, str]]:
    """One email's worth of distinct inputs per item: job, link, send time, occurrence."""
    items = []
    for n in range(count):
        sent_at = START + timedelta(seconds=n)
        link = DownloadLink(emails.download_url("https://shop.example.com", secrets.token_urlsafe(48)[:64]),
                            sent_at + timedelta(hours=72))
        items.append((sample_job(n), link, sent_at, str(uuid.uuid4())))
    return items


def builders(letterhead: Letterhead) -> dict[str, dict[str, Callable]]:
    """builder name -> kind -> f(job, link, sent_at, occurrence)."""
    lh = letterhead

    def email_package(kind: str) -> Callable:
        return {
            "ready": lambda j, l, t, o: emails.download_ready(lh, j, l, sent_at=t),
            "resend": lambda j, l, t, o: emails.download_resent(lh, j, l, occurrence=o, sent_at=t),
            "expiring": lambda j, l, t, o: emails.download_expiring(lh, j, l, occurrence=o, sent_at=t),
            "refund": lambda j, l, t, o: emails.refund_processed(lh, j, amount_cents=384, sent_at=t),
        }[kind]

    fast = {
        "ready": lambda j, l, t, o: outgoing.download_ready(lh, j, l, sent_at=t),
        "resend": lambda j, l, t, o: outgoing.download_resent(lh, j, l, occurrence=o, sent_at=t),
        "expiring": lambda j, l, t, o: outgoing.download_expiring(lh, j, l, occurrence=o, sent_at=t),
        "refund": lambda j, l, t, o: outgoing.refund_processed(lh, j, amount_cents=384, sent_at=t),
    }
    return {
        "reference": {k: (lambda f: lambda *a: Outgoing.from_message(f(*a)))(email_package(k)) for k in KINDS},
        "reference compose": {k: email_package(k) for k in KINDS},
        "fast": fast,
    }


def cpu_per_item(function: Callable, items: list) -> float:
    """CPU microseconds per call of ``function(*item)``."""
    started = time.process_time()
    for item in items:
        function(*item)
    return (time.process_time() - started) / len(items) * 1e6


def measure_composing(count: int, runs: int, letterhead: Letterhead) -> dict[str, dict[str, list[float]]]:
    table = builders(letterhead)
    results: dict[str, dict[str, list[float]]] = {name: {k: [] for k in KINDS} for name in
                                                  ("reference", "reference compose", "reference flatten", "fast")}
    for _ in range(runs):
        items = inputs(count)
        for kind in KINDS:
            for name in ("reference", "reference compose", "fast"):
                results[name][kind].append(cpu_per_item(table[name][kind], items))
            messages = [(table["reference compose"][kind](*item),) for item in items]
            results["reference flatten"][kind].append(cpu_per_item(Outgoing.from_message, messages))
    return results


def print_composing(results: dict[str, dict[str, list[float]]]) -> None:
    print(f"{'CPU µs per email':<20}" + "".join(f"{k:>24}" for k in KINDS))
    for name, per_kind in results.items():
        cells = []
        for kind in KINDS:
            values = per_kind[kind]
            cells.append(f"{statistics.median(values):8.1f} ({min(values):.0f}–{max(values):.0f})")
        print(f"{name:<20}" + "".join(f"{c:>24}" for c in cells))
    print("(median of the runs, and the range)")


def measure_token(count: int) -> float:
    from smi.jobtable.table import new_download_token

    started = time.process_time()
    for _ in range(count):
        new_download_token()
    return (time.process_time() - started) / count * 1e6


# -- the notifier's path without Kafka ---------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _cpu_seconds(pid: int) -> float:
    from bench.cpu import cpu_seconds

    return cpu_seconds(pid) or 0.0


async def _completed_jobs(table, count: int) -> list[Job]:
    from schemas.status import JobStatus as S
    from schemas.status import find_transition

    route = [S.AWAITING_PAYMENT, S.PENDING, S.PROCESSING, S.COMPLETED]

    async def one(n: int) -> str:
        job, _ = await table.create({"image_url": f"https://images.example.com/{uuid.uuid4().hex}.jpg",
                                     "resolution": "4x", "email": f"customer.{n}.{secrets.token_hex(3)}@example.com",
                                     "post_id": n, "image_width": 800, "image_height": 600, "price_cents": 384})
        current = S.NEW
        for target in route:
            owner = find_transition(current, target).owner
            result = await table.transition(job.job_id, target, actor=owner, event_id=f"bench-{uuid.uuid4().hex}")
            assert result.applied, result
            current = target
        return job.job_id

    ids = []
    for start in range(0, count, 500):
        ids += await asyncio.gather(*(one(n) for n in range(start, min(count, start + 500))))
    return await asyncio.gather(*(table.get(i) for i in ids))


async def _batched(items: list, batch: int, function: Callable) -> None:
    for start in range(0, len(items), batch):
        await asyncio.gather(*(function(item) for item in items[start:start + batch]))


async def measure_path(count: int, letterhead: Letterhead, builder_names: list[str]) -> None:
    from schemas.events import JobEvent
    from services.notifier import handlers
    from services.notifier.handlers import Notifier, NotifierConfig
    from smi.jobtable.connection import connect
    from smi.jobtable.table import JobTable
    from smi.logs import logging_config
    from smi.mailer import Mailer
    from smi.settings import Settings

    settings = Settings()
    config = logging_config("notifier", "info", "text")
    config["handlers"]["stage"]["stream"] = open(os.devnull, "w")
    logging.config.dictConfig(config)
    batch, connections = settings.stage_batch_size, settings.smtp_connections

    namespace = f"bench-email-{uuid.uuid4().hex[:8]}"
    redis = connect(settings.redis_url)
    table = JobTable(redis, shards=settings.redis_shards, namespace=namespace)
    port = _free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.email_sink", str(port)], stdout=subprocess.PIPE, text=True)
    mailer = Mailer.from_url(f"smtp://127.0.0.1:{port}", connections=connections)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        notifier = Notifier(table, mailer, NotifierConfig(letterhead, "https://shop.example.com", 72, 24))
        print(f"\nthe notifier's path without Kafka: {count} emails per figure, batches of {batch}, "
              f"{connections} SMTP connections, Redis {settings.redis_url}")

        def report(name: str, cpu: float, wall: float, sink_cpu: float | None = None) -> None:
            extra = f", sink {sink_cpu / count * 1e6:6.0f} µs" if sink_cpu is not None else ""
            print(f"  {name:<38} {cpu / count * 1e6:7.0f} µs CPU per email, {count / wall:7.0f}/s{extra}")

        async def timed(name: str, items: list, function: Callable, with_sink: bool = False) -> None:
            sink_before = _cpu_seconds(sink.pid)
            cpu, wall = time.process_time(), time.perf_counter()
            await _batched(items, batch, function)
            cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
            report(name, cpu, wall, _cpu_seconds(sink.pid) - sink_before if with_sink else None)

        # Warm up: connections, scripts, caches.
        warm = await _completed_jobs(table, 64)
        await _batched([JobEvent.new("completed", j.job_id).model_dump_json().encode() for j in warm], batch,
                       notifier.on_completed)

        for name in builder_names:
            jobs = await _completed_jobs(table, count)
            raws = [JobEvent.new("completed", j.job_id).model_dump_json().encode() for j in jobs]
            original = handlers.outgoing.download_ready
            if name == "reference":
                handlers.outgoing.download_ready = lambda *a, **k: Outgoing.from_message(emails.download_ready(*a, **k))
            try:
                await timed(f"on_completed, {name} builder", raws, notifier.on_completed, with_sink=True)
            finally:
                handlers.outgoing.download_ready = original

        jobs = await _completed_jobs(table, count)
        await timed("  table.get + is_done", jobs, lambda j: asyncio.gather(
            table.get(j.job_id), table.is_done(j.job_id, "email:ready")))
        links: dict[str, DownloadLink] = {}

        async def issue(job: Job) -> None:
            links[job.job_id] = await notifier._issue(job.job_id, warn_hours=24)
        await timed("  issue_download_token", jobs, issue)
        messages = []

        async def compose(job: Job) -> None:
            messages.append(outgoing.download_ready(letterhead, job, links[job.job_id], sent_at=datetime.now(UTC)))
        await timed("  compose (fast)", jobs, compose)
        await timed("  mailer.send", messages, mailer.send, with_sink=True)
        await timed("  mark_done", jobs, lambda j: table.mark_done(j.job_id, "email:ready"))
    finally:
        await mailer.close()
        sink.terminate()
        sink.wait(10)
        deleted = 0
        async for key in redis.scan_iter(match=f"*{namespace}*", count=1000):
            deleted += await redis.unlink(key)
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.email_compose", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=2000, help="emails per figure (default 2000)")
    parser.add_argument("--runs", type=int, default=3, help="runs of the composing figures (default 3)")
    parser.add_argument("--letterhead", choices=sorted(LETTERHEADS), default="full")
    parser.add_argument("--full", action="store_true", help="also the notifier's path (needs REDIS_URL)")
    parser.add_argument("--builders", default="reference,fast", help="for --full: reference,fast")
    args = parser.parse_args(argv)
    letterhead = LETTERHEADS[args.letterhead]

    print(f"composing: {args.count} emails per figure, {args.runs} runs, letterhead {args.letterhead!r}")
    print_composing(measure_composing(args.count, args.runs, letterhead))
    print(f"download token (smi.jobtable.table.new_download_token): {measure_token(args.count):.1f} µs CPU each")
    if args.full:
        asyncio.run(measure_path(args.count, letterhead, [b for b in args.builders.split(",") if b]))


if __name__ == "__main__":
    main()
