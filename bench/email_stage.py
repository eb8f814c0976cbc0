"""The real notifier stage (``python -m services.notifier``: Faust, Kafka, the job
table, pooled SMTP) emailing N completed jobs into an SMTP sink of its own
(bench.email_sink): emails per second, and the CPU per email of the notifier
process and of the sink (from /proc, so they hold on a busy machine).

    python -m bench.email_stage [--count N] [--builder fast|reference] [--smtp-connections C]

Needs KAFKA_BOOTSTRAP_SERVERS and REDIS_URL of a stack of your own (it consumes
``jobs.completed`` as the group ``notifier``, so nothing else may run that group
there). Its jobs live in a namespace of their own, deleted afterwards.
``--builder reference`` runs the stage with the email package composing the ready
email (what it did before services/notifier/outgoing.py), for comparison."""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid

from bench.email_compose import _completed_jobs, _cpu_seconds, _free_port

# The stage, with the ready email optionally composed by the email package.
STAGE = """
import sys
from smi.settings import get_settings
from smi.stages import run_stage
if sys.argv[1] == "reference":
    from services.notifier import emails, handlers
    from smi.mailer import Outgoing
    handlers.outgoing.download_ready = lambda *a, **k: Outgoing.from_message(emails.download_ready(*a, **k))
run_stage("notifier", get_settings())
"""


async def run(count: int, builder: str, connections: int | None, log_path: str) -> None:
    from schemas.events import JobEvent
    from schemas.topics import JOBS_COMPLETED
    from smi.jobtable.connection import connect
    from smi.jobtable.table import JobTable
    from smi.kafka.producer import EventProducer
    from smi.settings import Settings

    settings = Settings()
    namespace = f"bench-email-stage-{uuid.uuid4().hex[:8]}"
    redis = connect(settings.redis_url)
    table = JobTable(redis, shards=settings.redis_shards, namespace=namespace)
    port = _free_port()
    sink = subprocess.Popen([sys.executable, "-m", "bench.email_sink", str(port)], stdout=subprocess.PIPE, text=True)
    env = {**os.environ, "REDIS_NAMESPACE": namespace, "SMTP_URL": f"smtp://127.0.0.1:{port}", "METRICS_PORT": "0"}
    if connections:
        env["SMTP_CONNECTIONS"] = str(connections)
    with open(log_path, "w") as log:
        stage = subprocess.Popen([sys.executable, "-c", STAGE, builder], env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        assert sink.stdout is not None and sink.stdout.readline().strip() == "ready"
        warm = await _completed_jobs(table, 64)
        jobs = await _completed_jobs(table, count)

        async def emailed(some) -> int:
            return sum(await asyncio.gather(*(table.is_done(j.job_id, "email:ready") for j in some)))

        async with EventProducer.from_settings(settings, client_id="bench-email-stage") as producer:
            for job in warm:  # the stage starts, joins the group, opens its connections
                await producer.send(JOBS_COMPLETED, job.job_id, JobEvent.new("completed", job.job_id))
            deadline = time.monotonic() + 120
            while await emailed(warm) < len(warm):
                if time.monotonic() > deadline or stage.poll() is not None:
                    raise SystemExit(f"the notifier did not start; see {log_path}")
                await asyncio.sleep(0.5)

            stage_cpu, sink_cpu, started = _cpu_seconds(stage.pid), _cpu_seconds(sink.pid), time.perf_counter()
            await asyncio.gather(*(producer.send(JOBS_COMPLETED, j.job_id, JobEvent.new("completed", j.job_id))
                                   for j in jobs))
            while await emailed(jobs[-100:]) < min(100, count) or await emailed(jobs) < count:
                await asyncio.sleep(0.2)
            wall = time.perf_counter() - started
            stage_cpu, sink_cpu = _cpu_seconds(stage.pid) - stage_cpu, _cpu_seconds(sink.pid) - sink_cpu
        print(f"{builder} builder: {count} ready emails in {wall:.1f} s = {count / wall:.0f}/s; "
              f"notifier {stage_cpu / count * 1e6:.0f} µs CPU per email ({stage_cpu / wall:.2f} of a core), "
              f"sink {sink_cpu / count * 1e6:.0f} µs ({sink_cpu / wall:.2f} of a core)")
    finally:
        stage.terminate()
        stage.wait(30)
        sink.terminate()
        sink.wait(10)
        async for key in redis.scan_iter(match=f"*{namespace}*", count=1000):
            await redis.unlink(key)
        await redis.aclose()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.email_stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=4000)
    parser.add_argument("--builder", choices=("fast", "reference"), default="fast")
    parser.add_argument("--smtp-connections", type=int, default=None, help="SMTP_CONNECTIONS (default: settings)")
    parser.add_argument("--log", default="/tmp/bench-email-stage.log", help="the stage's log")
    args = parser.parse_args(argv)
    asyncio.run(run(args.count, args.builder, args.smtp_connections, args.log))


if __name__ == "__main__":
    main()
