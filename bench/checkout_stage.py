"""The real checkout stage (``smi run checkout``, ``PAYMENTS=local``) alone, in a
Kafka and Redis namespace of its own, deleted afterwards:

- ``backlog``: N job requests published first, then the stage started; the rate
  at which it drains them into ``jobs.awaiting_payment`` (first to last event) and
  its CPU per request. A stage that is behind, with nothing else on its cores.
- ``paced``: the stage warmed up, then requests at R/s for S seconds; latency
  request → ``awaiting_payment`` (Kafka record timestamps) and the stage's cores.

    python -m bench.checkout_stage backlog [--count 20000]
    python -m bench.checkout_stage paced [--rate 1000] [--seconds 15]

Settings come from the environment (KAFKA_BOOTSTRAP_SERVERS, REDIS_URL, and for
A/Bs e.g. ``STAGE_BATCHES_IN_FLIGHT=1``), passed on to the stage."""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import uuid
from pathlib import Path

from bench.cpu import CpuWindow
from bench.pipeline import Flow
from bench.report import stage_figures
from bench.system import EventWatch, SystemProcess
from bench.table import unlink_namespace
from schemas.topics import JOBS_AWAITING_PAYMENT, JOBS_DEAD_LETTER
from smi.jobtable import connect
from smi.kafka.producer import EventProducer
from smi.settings import Settings
from smi.stack.topics import delete_namespace, ensure_topics


async def run(args: argparse.Namespace) -> dict:
    run_id = uuid.uuid4().hex[:8]
    settings = Settings().model_copy(update={"kafka_namespace": f"bench-checkout-{run_id}."})
    redis_namespace = f"bench-checkout-{run_id}:"
    env = {"PAYMENTS": "local", "KAFKA_NAMESPACE": settings.kafka_namespace, "REDIS_NAMESPACE": redis_namespace,
           "URL_ALLOW_HOSTS": "127.0.0.1/32", "METRICS_PORT": "0"}
    log = Path(tempfile.gettempdir()) / f"bench-checkout-{run_id}.log"
    await ensure_topics(settings)
    watch = await EventWatch(settings.kafka_bootstrap_servers, [JOBS_AWAITING_PAYMENT.name, JOBS_DEAD_LETTER.name],
                             settings.kafka_names).start()
    stage: SystemProcess | None = None
    redis = connect(settings.redis_url, settings.redis_cluster_nodes)
    try:
        async with EventProducer.from_settings(settings, client_id="bench-checkout") as producer:
            flow = Flow(run_id, "http://127.0.0.1/tiny.png", gateway="", webhook_secret="", producer=producer,
                        watch=watch)
            if args.mode == "backlog":
                sent = await flow.publish(flow.requests(args.count, "backlog"))
                stage = await SystemProcess("checkout", env, log).start()
                await watch.wait(lambda: bool(watch.by_request), timeout=120, what="the first event")
                cpu = CpuWindow({"checkout": stage.proc.pid}).start()
            else:
                stage = await SystemProcess("checkout", env, log).start()
                warm = await flow.publish(flow.requests(200, "warm"))
                await watch.wait(lambda: all(r in watch.by_request for r in warm), timeout=120, what="warm-up")
                cpu = CpuWindow({"checkout": stage.proc.pid}).start()
                sent = await flow.publish_paced(flow.requests(args.rate * args.seconds, "paced"), args.rate)
            await watch.wait(lambda: all(r in watch.by_request for r in sent), timeout=300, what="awaiting_payment")
            cores = cpu.stop()["checkout"]
        done = {r: watch.by_request[r][0] for r in sent if r in watch.by_request}
        # A backlog's rate counts from its first event (the requests were published
        # before the stage started); a paced run's latency from each request.
        since = min(done.values(), default=None) if args.mode == "backlog" else None
        return {"mode": args.mode, **stage_figures(sent, done, len(sent), since=since),
                "dead_letters": len(watch.dead_letters), "stage_cores": cores,
                "cpu_ms_per_request": round(cores * cpu.seconds * 1000 / max(1, len(done)), 3)}
    finally:
        if stage is not None:
            await stage.stop()
        await watch.stop()
        await delete_namespace(settings)
        await unlink_namespace(redis, redis_namespace)
        await redis.aclose()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.checkout_stage", description=__doc__.split("\n\n")[0])
    parser.add_argument("mode", choices=["backlog", "paced"])
    parser.add_argument("--count", type=int, default=20_000, help="requests of the backlog (20,000)")
    parser.add_argument("--rate", type=int, default=1000, help="requests per second of the paced run (1,000)")
    parser.add_argument("--seconds", type=int, default=15, help="length of the paced run (15)")
    args = parser.parse_args(argv)
    if min(args.count, args.rate, args.seconds) < 1:
        parser.error("--count, --rate and --seconds must be at least 1")
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
