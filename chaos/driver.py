"""The chaos run itself: jobs through the whole system while processes die.

1. A stack of its own (chaos.stack), and beside it in this process: stripe-mock
   behind a recording proxy, a loopback image server, an SMTP sink.
2. Every stage as its own process (chaos.stages), PAYMENTS=stripe, UPSCALER=local (or
   upsampler: the fake Upsampler server of tests/support, in this process).
3. Job requests published to ``jobs.requested`` at a steady pace over the publish
   window (so the faults hit jobs in every step); about 10 % name an image that
   404s. Each job seen ``awaiting_payment`` in the table is paid by a signed
   ``checkout.session.completed`` POSTed to the gateway, again only until the
   gateway answers 200 (as Stripe retries).
4. Meanwhile: a random stage process SIGKILLed (and started again) every few
   seconds; a second worker of one stage started and later SIGKILLed
   (rebalances); Redis SIGKILLed once and started again from its AOF; the Kafka
   broker stopped and started once. A process that dies on its own is started
   again by the driver's supervisor loop and reported.
5. Once every job is final, emailed and refunded where due, and every stage group
   has committed everything, the run reads the table, the histories, the Stripe
   calls, the emails and the status topics, and runs chaos.checks on them."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from aiokafka import AIOKafkaConsumer, TopicPartition

from chaos.checks import (BAD_PATH, REFUSED_PATH, Event, JobRecord, StripeCall, Transition, parse_message_id,
                          run_checks)
from chaos.stack import OwnStack, pick_ports
from chaos.stages import STAGES, Worker, stop_all
from schemas.status import JobStatus
from schemas.topics import (JOBS_AWAITING_PAYMENT, JOBS_COMPLETED, JOBS_DEAD_LETTER, JOBS_FAILED, JOBS_PENDING,
                            JOBS_PROCESSING, JOBS_REQUESTED, PAYMENTS_REFUNDS)
from smi.jobtable import JobTable, connect
from smi.kafka.producer import EventProducer
from smi.ops.lag import STAGE_SOURCE_TOPICS, sample
from smi.stripe_webhooks import checkout_session_event, encode, sign
from tests.support.fake_upsampler import DEFAULT_API_KEY as UPSAMPLER_API_KEY, FakeUpsampler
from tests.support.image_server import ImageServer
from tests.support.smtp_sink import SmtpSink
from tests.support.stripe_proxy import RecordingStripeProxy

STATUS_TOPICS = (JOBS_AWAITING_PAYMENT.name, JOBS_PENDING.name, JOBS_PROCESSING.name, JOBS_COMPLETED.name,
                 JOBS_FAILED.name, PAYMENTS_REFUNDS.name)
SHARDS = 16
PAY_CONCURRENCY = 16
GOOD_IMAGE, BAD_IMAGE = "/img/8x8.png", "/status/404"
PUBLISH_OVERRUN = 300.0  # seconds past the window before publishing gives up
# --upsampler-late: answered after the request timeout, and after a first retry's
# backoff (2-4 s) would have submitted again, as a real upscale's callback comes
# long after a first retry; before the 10 s wait for a callback is over.
LATE_REQUEST_TIMEOUT_SECONDS, LATE_ANSWER_SECONDS = 1, 6


class Upstream:
    """The upstream system's producer (smi's EventProducer: idempotent, acks=all).
    A send that fails across a broker restart can leave aiokafka's idempotent
    sequence numbers out of step with the broker (OutOfOrderSequenceNumber on every
    later send), so a failure retires the producer and the next send makes a new
    one, with a new producer id."""

    def __init__(self, bootstrap: str):
        self.bootstrap = bootstrap
        self.producer: EventProducer | None = None
        self.generation = 0
        self.replaced = 0
        self._lock = asyncio.Lock()
        self._retired: list[EventProducer] = []

    async def get(self) -> tuple[EventProducer, int]:
        async with self._lock:
            if self.producer is None:
                producer = EventProducer(self.bootstrap, client_id="chaos-upstream", request_timeout_ms=15_000)
                await producer.start()
                self.producer, self.generation = producer, self.generation + 1
            return self.producer, self.generation

    async def broken(self, generation: int) -> None:
        async with self._lock:
            if generation == self.generation and self.producer is not None:
                self._retired.append(self.producer)
                self.producer = None
                self.replaced += 1

    async def close(self) -> None:
        async def stop(producer: EventProducer) -> None:
            try:
                await asyncio.wait_for(producer.stop(), 30)
            except Exception:
                pass
        await asyncio.gather(*(stop(p) for p in [*self._retired, *filter(None, [self.producer])]))


@dataclass
class ChaosConfig:
    jobs: int = 2000
    seed: int = 0
    bad_fraction: float = 0.1
    publish_seconds: float | None = None  # default: max(40, jobs / 15)
    kill_every: tuple[float, float] = (3.0, 6.0)
    second_worker: str = "processor"
    redis_kill: bool = True
    kafka_restart: bool = True
    session_timeout: float = 6.0
    settle_timeout: float | None = None  # default: 180 + jobs / 10
    ready_timeout: float = 180.0
    port_range: tuple[int, int] = (29000, 29999)
    run_dir: Path = Path("var/chaos/run")
    keep_data: bool = False
    extra_env: dict[str, str] = field(default_factory=dict)  # on top of the stages' environment
    # "local" (Pillow in the processor) or "upsampler": the paid API's path, against
    # the fake Upsampler server of tests/support running in this process.
    upscaler: str = "local"
    # With "upsampler": the share of submissions the fake answers only after the
    # processor's request timeout (1 s here): taken and paid for, yet unanswered.
    upsampler_late: float = 0.0
    say: Callable[[str], None] = print

    @property
    def window(self) -> float:
        return self.publish_seconds if self.publish_seconds is not None else max(40.0, self.jobs / 15)

    @property
    def settle(self) -> float:
        return self.settle_timeout if self.settle_timeout is not None else 180.0 + self.jobs / 10


@dataclass
class Timeline:
    started: float = field(default_factory=time.monotonic)
    entries: list[dict[str, Any]] = field(default_factory=list)

    def at(self) -> float:
        return round(time.monotonic() - self.started, 1)

    def note(self, what: str, **details: Any) -> dict[str, Any]:
        entry = {"t": self.at(), "what": what, **details}
        self.entries.append(entry)
        return entry


class ChaosRun:
    def __init__(self, config: ChaosConfig):
        self.config = config
        self.say = config.say
        self.rng = random.Random(config.seed)  # which jobs are bad
        self.chaos_rng = random.Random(config.seed + 1)  # which stage dies, and when
        self.run_id = uuid.uuid4().hex[:8]
        self.run_dir = config.run_dir
        self.logdir = self.run_dir / "logs"
        self.timeline = Timeline()
        self.secret = f"whsec_chaos_{uuid.uuid4().hex}"
        self.requests: dict[str, dict] = {}  # request id -> body
        self.bad: dict[str, bool] = {}  # request id -> meant to fail
        self.published: set[str] = set()
        self.publish_errors = Counter()
        self.jobs: dict[str, Any] = {}  # job id -> Job (latest snapshot)
        self.snapshot_errors = Counter()
        self.paid: dict[str, float] = {}  # job id -> when the gateway said 200
        self.pay_attempts = Counter()
        self.pay_refusals = Counter()
        self.kills = Counter()
        self.unexpected_exits: list[dict[str, Any]] = []
        self.faults_done = False
        self.publishing_done = False
        self.stop = asyncio.Event()
        self.workers: dict[str, Worker] = {}
        self.extra: Worker | None = None
        self.phases: dict[str, float] = {}

    # -- the whole run ----------------------------------------------------------------

    async def run(self) -> dict[str, Any]:
        cfg = self.config
        self.run_dir.mkdir(parents=True, exist_ok=True)
        kafka, stripe, redis_port, gateway_port = pick_ports(4, cfg.port_range, random.Random(), pairs=2)
        self.stack = OwnStack(self.run_dir / "stack", kafka, redis_port, stripe)
        self.gateway_url = f"http://127.0.0.1:{gateway_port}"
        self.gateway_port = gateway_port
        results: dict[str, Any] = {"run_id": self.run_id, "config": self._config_dict(), "ports": {
            "kafka": kafka, "kafka_controller": kafka + 1, "redis": redis_port, "stripe_mock": stripe,
            "gateway": gateway_port}, "run_dir": str(self.run_dir)}
        self.sink = self.images = self.proxy = self.redis = self.upsampler = None
        started = time.monotonic()
        try:
            self.say(f"stack of our own in {self.stack.var_dir}: Kafka {self.stack.bootstrap}, "
                     f"Redis {self.stack.redis_url}, stripe-mock {self.stack.stripe_url}")
            t = time.monotonic()
            await self.stack.up()
            self.phases["stack_up"] = round(time.monotonic() - t, 1)
            self.sink = SmtpSink().start()
            self.images = await ImageServer().start()
            if cfg.upscaler == "upsampler":
                self.upsampler = await FakeUpsampler(seed=cfg.seed).start()
                if cfg.upsampler_late:
                    self.upsampler.script(answer_after=LATE_ANSWER_SECONDS, late_fraction=cfg.upsampler_late)
            self.proxy = RecordingStripeProxy(self.stack.stripe_url)
            await self.proxy.start()
            self.redis = connect(self.stack.redis_url)
            self.table = JobTable(self.redis, shards=SHARDS)
            await self._start_stages()
            results.update(await self._flow())
        finally:
            await self._teardown()
            results["seconds"] = round(time.monotonic() - started, 1)
            results["phases"] = self.phases
        return results

    def _config_dict(self) -> dict[str, Any]:
        cfg = self.config
        return {"jobs": cfg.jobs, "seed": cfg.seed, "bad_fraction": cfg.bad_fraction, "publish_seconds": cfg.window,
                "kill_every": list(cfg.kill_every), "second_worker": cfg.second_worker, "redis_kill": cfg.redis_kill,
                "kafka_restart": cfg.kafka_restart, "session_timeout": cfg.session_timeout,
                "settle_timeout": cfg.settle, "payments": "stripe", "upscaler": cfg.upscaler,
                "upsampler_late": cfg.upsampler_late,
                "extra_env": cfg.extra_env}

    def stage_env(self) -> dict[str, str]:
        return {**self.stack.env(), "PAYMENTS": "stripe", "STRIPE_API_BASE": self.proxy.url,
                "STRIPE_API_KEY": "sk_test_123", "STRIPE_WEBHOOK_SECRET": self.secret,
                **self._upscaler_env(),
                "REDIS_SHARDS": str(SHARDS), "SMTP_URL": self.sink.url, "GATEWAY_PORT": str(self.gateway_port),
                "PUBLIC_BASE_URL": self.gateway_url, "STORAGE_DIR": str(self.run_dir / "storage"),
                "URL_ALLOW_HOSTS": "127.0.0.0/8", "METRICS_PORT": "0",
                "KAFKA_SESSION_TIMEOUT_SECONDS": str(self.config.session_timeout), "LOG_FORMAT": "text",
                "ADMIN_TOKEN": "", "GATEWAY_REUSE_PORT": "1",  # a second gateway (--second-worker) shares the port
                **self.config.extra_env}

    def _upscaler_env(self) -> dict[str, str]:
        if self.upsampler is None:
            return {"UPSCALER": "local"}
        # A callback lost to a killed gateway is made up for by polling, soon; a
        # submission in doubt after a kill waits 10 s for its callback (the fake calls
        # back at once) before it is made again.
        return {"UPSCALER": "upsampler", "UPSAMPLER_BASE_URL": self.upsampler.base_url,
                "UPSAMPLER_API_KEY": UPSAMPLER_API_KEY, "UPSAMPLER_POLL_AFTER_SECONDS": "5",
                "UPSAMPLER_IN_DOUBT_WAIT_SECONDS": "10",
                **({"UPSAMPLER_REQUEST_TIMEOUT_SECONDS": str(LATE_REQUEST_TIMEOUT_SECONDS)}
                   if self.config.upsampler_late else {})}

    async def _start_stages(self) -> None:
        env = self.stage_env()
        t = time.monotonic()
        for stage in STAGES:
            self.workers[stage] = Worker(stage, stage, env, self.logdir).start()
        self.say(f"stages started: {', '.join(f'{w.name} (pid {w.pid})' for w in self.workers.values())}")
        deadline = time.monotonic() + self.config.ready_timeout
        members: dict[str, int] = {}
        while time.monotonic() < deadline:
            dead = [w for w in self.workers.values() if not w.alive]
            if dead:
                raise RuntimeError(f"{dead[0].name} exited while starting:\n{dead[0].log_tail()}")
            try:
                members = {g.group: g.members for g in await sample(self.stack.bootstrap, list(STAGE_SOURCE_TOPICS))}
            except Exception:
                members = {}
            if members and all(members.values()) and await self._gateway_up():
                self.phases["stages_ready"] = round(time.monotonic() - t, 1)
                self.say(f"stages ready in {self.phases['stages_ready']}s")
                return
            await asyncio.sleep(0.5)
        raise RuntimeError(f"stages not ready after {self.config.ready_timeout:.0f}s (group members {members}); "
                           f"logs in {self.logdir}")

    async def _gateway_up(self) -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3)) as http:
                async with http.get(f"{self.gateway_url}/healthz") as resp:
                    return resp.status == 200
        except (aiohttp.ClientError, TimeoutError):
            return False

    async def _flow(self) -> dict[str, Any]:
        self._make_requests()
        self.timeline = Timeline()
        t = time.monotonic()
        tasks = [asyncio.create_task(coro, name=name) for name, coro in [
            ("snapshots", self._snapshots()), ("payer", self._payer()), ("supervisor", self._supervisor()),
            ("progress", self._progress())]]
        publisher = asyncio.create_task(self._publisher(), name="publisher")
        faults = asyncio.create_task(self._faults(), name="faults")
        try:
            try:
                await asyncio.wait_for(asyncio.shield(publisher), self.config.window + PUBLISH_OVERRUN)
            except TimeoutError:
                publisher.cancel()
                self.publishing_done = True
                self.timeline.note("publishing gave up", published=len(self.published))
                self.say(f"  publishing did not finish in time: {len(self.published)}/{len(self.requests)}")
            await faults
            self.phases["faults"] = round(time.monotonic() - t, 1)
            self.say(f"faults over at {self.timeline.at()}s; settling (at most {self.config.settle:.0f}s)")
            settled = await self._settle(self.config.settle)
            self.phases["flow"] = round(time.monotonic() - t, 1)
        finally:
            self.stop.set()
            for task in (*tasks, publisher, faults):
                task.cancel()
            await asyncio.gather(*tasks, publisher, faults, return_exceptions=True)
        return await self._collect(settled)

    # -- requests and payments ---------------------------------------------------------

    def _make_requests(self) -> None:
        n = self.config.jobs
        bad = set(self.rng.sample(range(n), round(n * self.config.bad_fraction)))
        for i in range(n):
            request_id = f"chaos-{self.run_id}-{i}"
            path = BAD_IMAGE if i in bad else GOOD_IMAGE
            self.requests[request_id] = {
                "request_id": request_id, "image_url": self.images.url + path, "resolution": "2x",
                "email": f"buyer{i}@example.com", "post_id": i + 1, "image_width": 8, "image_height": 8}
            self.bad[request_id] = i in bad

    async def _publisher(self) -> None:
        """The requests, evenly over the publish window; a send that fails (the broker
        is restarting) is sent again: the request id makes a repeat harmless."""
        bodies = list(self.requests.values())
        spacing = self.config.window / len(bodies)
        sends = []
        self.upstream = Upstream(self.stack.bootstrap)
        try:
            started = time.monotonic()
            for n, body in enumerate(bodies):
                ahead = started + n * spacing - time.monotonic()
                if ahead > 0.01:
                    await asyncio.sleep(ahead)
                sends.append(asyncio.create_task(self._publish(body)))
            await asyncio.gather(*sends)
        finally:
            for task in sends:
                task.cancel()
            await self.upstream.close()
        self.publishing_done = True
        self.timeline.note("all requests published", count=len(self.published),
                           producers_replaced=self.upstream.replaced)

    async def _publish(self, body: dict) -> None:
        raw = json.dumps(body).encode()
        while True:
            generation = None
            try:
                producer, generation = await self.upstream.get()
                await producer.send_raw(JOBS_REQUESTED.name, body["request_id"].encode(), raw)
                self.published.add(body["request_id"])
                return
            except Exception as exc:  # a broker restart: retried until it is back
                self.publish_errors[type(exc).__name__] += 1
                if generation is not None:
                    await self.upstream.broken(generation)
                await asyncio.sleep(1.0)

    async def _snapshots(self) -> None:
        """Every job in the table, once a second (the run's Redis holds only ours)."""
        while not self.stop.is_set():
            try:
                self.jobs = {j.job_id: j for j in await self._all_jobs()}
            except Exception as exc:  # Redis killed, or loading its AOF
                self.snapshot_errors[type(exc).__name__] += 1
            await asyncio.sleep(1.0)

    async def _all_jobs(self) -> list:
        jobs, cursor = [], None
        while True:
            page = await self.table.get_jobs(limit=10_000, cursor=cursor)
            jobs += page.jobs
            if page.next_cursor is None:
                return jobs
            cursor = page.next_cursor

    async def _payer(self) -> None:
        """Pays each job seen awaiting_payment until the gateway answers 200 once."""
        limit = asyncio.Semaphore(PAY_CONCURRENCY)
        retry_at: dict[str, float] = {}
        inflight: set[str] = set()
        tasks: set[asyncio.Task] = set()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as http:
            async def pay(job) -> None:
                try:
                    async with limit:
                        await self._pay_one(http, job, retry_at)
                finally:
                    inflight.discard(job.job_id)

            try:
                while not self.stop.is_set():
                    now = time.monotonic()
                    for job in list(self.jobs.values()):
                        if (job.status is JobStatus.AWAITING_PAYMENT and job.job_id not in self.paid
                                and job.job_id not in inflight and retry_at.get(job.job_id, 0) <= now):
                            inflight.add(job.job_id)
                            task = asyncio.create_task(pay(job))
                            tasks.add(task)
                            task.add_done_callback(tasks.discard)
                    await asyncio.sleep(0.3)
            finally:
                for task in list(tasks):
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)

    async def _pay_one(self, http: aiohttp.ClientSession, job, retry_at: dict[str, float]) -> None:
        body = encode(checkout_session_event(
            "checkout.session.completed", job_id=job.job_id, session_id=job.stripe_checkout_session_id,
            amount_total=job.price_cents, payment_intent="pi_chaos_" + job.job_id.replace("-", "")[:24]))
        headers = {"Content-Type": "application/json", "Stripe-Signature": sign(body, self.secret)}
        self.pay_attempts[job.job_id] += 1
        try:
            async with http.post(f"{self.gateway_url}/webhooks/stripe", data=body, headers=headers) as resp:
                await resp.read()
                if resp.status == 200:
                    self.paid[job.job_id] = time.monotonic()
                    return
                self.pay_refusals[str(resp.status)] += 1
        except (aiohttp.ClientError, TimeoutError) as exc:
            self.pay_refusals[type(exc).__name__] += 1
        attempts = self.pay_attempts[job.job_id]
        retry_at[job.job_id] = time.monotonic() + min(5.0, 0.25 * 2 ** attempts)

    # -- faults ----------------------------------------------------------------------

    async def _faults(self) -> None:
        """Random SIGKILLs all through the window, and the scheduled faults in it;
        over when the window has passed and every scheduled fault is done."""
        cfg, window = self.config, self.config.window
        scheduled: list[tuple[float, str, Callable]] = []
        if cfg.second_worker:
            scheduled += [(0.10 * window, "second worker starts", self._second_worker_start),
                          (0.45 * window, "second worker killed", self._second_worker_kill)]
        if cfg.redis_kill:
            scheduled.append((0.30 * window, "redis killed", self._redis_kill))
        if cfg.kafka_restart:
            scheduled.append((0.60 * window, "kafka restarted", self._kafka_restart))
        scheduled.sort(key=lambda s: s[0])
        running: list[asyncio.Task] = []
        low, high = cfg.kill_every
        next_kill = self.timeline.at() + self.chaos_rng.uniform(low, high) if high > 0 else float("inf")
        while True:
            now = self.timeline.at()
            while scheduled and scheduled[0][0] <= now:
                _, what, action = scheduled.pop(0)
                running.append(asyncio.create_task(self._fault(what, action)))
            if now >= next_kill:
                self._kill_random()
                next_kill = now + self.chaos_rng.uniform(low, high)
            if not scheduled and all(t.done() for t in running) and now >= window and self.publishing_done:
                break
            await asyncio.sleep(0.1)
        for task in running:
            task.result()  # a fault that could not be made is an error of the run
        self.faults_done = True

    async def _fault(self, what: str, action: Callable) -> None:
        started = self.timeline.at()
        details = await action() or {}
        self.timeline.note(what, started=started, **details)
        self.say(f"  {started:6.1f}s {what} {details or ''}")

    def _kill_random(self) -> None:
        worker = self.workers[self.chaos_rng.choice(STAGES)]
        pid = worker.pid
        worker.kill()
        worker.start()
        self.kills[worker.name] += 1
        self.timeline.note("SIGKILL", worker=worker.name, pid=pid, new_pid=worker.pid)

    async def _second_worker_start(self) -> dict:
        stage = self.config.second_worker
        self.extra = Worker(f"{stage}#2", stage, self.stage_env(), self.logdir).start()
        return {"worker": self.extra.name, "pid": self.extra.pid}

    async def _second_worker_kill(self) -> dict:
        pid = self.extra.pid
        self.extra.wanted = False
        self.extra.kill()
        return {"worker": self.extra.name, "pid": pid}

    async def _redis_kill(self) -> dict:
        return {"down_seconds": round(await self.stack.kill_redis(), 1)}

    async def _kafka_restart(self) -> dict:
        return {"down_seconds": round(await self.stack.restart_kafka(), 1)}

    async def _supervisor(self) -> None:
        """A stage that exits by itself (not one of our SIGKILLs) is started again,
        as `smi run all` would, and reported."""
        while not self.stop.is_set():
            for worker in [*self.workers.values(), *([self.extra] if self.extra else [])]:
                if worker.wanted and not worker.alive:
                    code = worker.proc.returncode if worker.proc else None
                    entry = {"t": self.timeline.at(), "worker": worker.name, "exit_code": code,
                             "log": str(self.logdir / f"{worker.name}-{worker.starts}.log"),
                             "last_line": (worker.log_tail(1) or "")[-300:]}
                    self.unexpected_exits.append(entry)
                    self.say(f"  {entry['t']:6.1f}s {worker.name} exited by itself ({code}); starting it again")
                    worker.start()
            await asyncio.sleep(0.5)

    # -- settling --------------------------------------------------------------------

    def _outstanding(self) -> dict[str, int]:
        """What the run still waits for (all zero: every job where it should end)."""
        by_request = {j.request_id: j for j in self.jobs.values()}
        emails = self._email_jobs()
        out = Counter()
        for request_id in self.requests:
            job = by_request.get(request_id)
            if job is None:
                out["no job yet"] += 1
            elif job.status not in (JobStatus.COMPLETED, JobStatus.FAILED):
                out[str(job.status)] += 1
            elif job.status is JobStatus.FAILED and not job.refund_id:
                out["refund"] += 1
            elif job.status is JobStatus.COMPLETED and job.job_id not in emails["ready"]:
                out["ready email"] += 1
            elif job.refund_id and job.job_id not in emails["refund"]:
                out["refund email"] += 1
        return dict(out)

    def _email_jobs(self) -> dict[str, set[str]]:
        seen: dict[str, set[str]] = {"ready": set(), "refund": set()}
        for delivery in self.sink.deliveries():
            parsed = parse_message_id(delivery.message["Message-ID"])
            if parsed and parsed[0] in seen:
                seen[parsed[0]].add(parsed[1])
        return seen

    async def _settle(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if not self._outstanding():
                break
            await asyncio.sleep(1.0)
        else:
            self.say(f"  not settled after {timeout:.0f}s: {self._outstanding()}")
            return False
        self.timeline.note("every job final", outstanding=0)
        # Everything handled and committed: redeliveries after the last kill are done too.
        while time.monotonic() < deadline:
            lag = await self._lag()
            if lag and all(n == 0 for n in lag.values()):
                self.timeline.note("every stage group caught up")
                return True
            await asyncio.sleep(1.0)
        self.say(f"  stage groups still behind after {timeout:.0f}s: {await self._lag()}")
        return False

    async def _lag(self) -> dict[str, int | None]:
        try:
            return {g.group: g.total_lag for g in await sample(self.stack.bootstrap, list(STAGE_SOURCE_TOPICS))}
        except Exception:
            return {}

    async def _progress(self, every: float = 5.0) -> None:
        while not self.stop.is_set():
            await asyncio.sleep(every)
            statuses = Counter(str(j.status) for j in self.jobs.values())
            emails = self._email_jobs()
            self.say(f"  {self.timeline.at():6.1f}s published {len(self.published)}/{len(self.requests)}  "
                     + "  ".join(f"{s} {n}" for s, n in sorted(statuses.items()))
                     + f"  paid {len(self.paid)}  emails {len(emails['ready'])}+{len(emails['refund'])}"
                     + f"  kills {sum(self.kills.values())}")

    # -- results ---------------------------------------------------------------------

    def _upscales(self, jobs: list[JobRecord]) -> dict[str, dict[str, int]]:
        """Where the fake Upsampler's accepted upscales went: how each submission was
        answered (200, or none: the client had gone) and each callback (an HTTP
        status, or the error of one refused), for all and for those no job holds."""
        held = {j.upscaler_job_id for j in jobs}
        callbacks = {c["body"]["id"]: str(c.get("status") or c.get("error", "?").split("(")[0])
                     for c in self.upsampler.callbacks_sent}
        counts: dict[str, Counter] = {"answers": Counter(), "callbacks": Counter(), "unused_answers": Counter(),
                                      "unused_callbacks": Counter()}
        for submission in self.upsampler.submissions:
            if submission["id"] is None:
                continue
            answer, callback = str(submission["answered"] or "none"), callbacks.get(submission["id"], "none")
            counts["answers"][answer] += 1
            counts["callbacks"][callback] += 1
            if submission["id"] not in held:
                counts["unused_answers"][answer] += 1
                counts["unused_callbacks"][callback] += 1
        return {name: dict(counter) for name, counter in counts.items()}

    async def _collect(self, settled: bool) -> dict[str, Any]:
        jobs = await self._final_jobs()
        calls = [StripeCall(r.method, r.path, r.idempotency_key, r.form, r.status) for r in self.proxy.requests]
        deliveries = self.sink.deliveries()
        message_ids = [d.message["Message-ID"] for d in deliveries]
        events, dead_letters = await read_status_topics(self.stack.bootstrap)
        lag = await self._lag()
        checks = run_checks(requests=self.bad, jobs=jobs, stripe_calls=calls, message_ids=message_ids,
                            events=events, dead_letters=dead_letters, lag=lag or {"(unreadable)": None},
                            upscaler_jobs=None if self.upsampler is None else list(self.upsampler.jobs),
                            bad_path=BAD_PATH if self.upsampler is None else REFUSED_PATH)
        statuses = Counter(j.status for j in jobs)
        upscales = {} if self.upsampler is None else {"upscales": self._upscales(jobs)}
        return {
            "settled": settled,
            "checks": [c.as_dict() for c in checks],
            "ok": settled and all(c.ok for c in checks),
            "counts": {"requests": len(self.requests), "bad_requests": sum(self.bad.values()), "jobs": len(jobs),
                       "statuses": dict(statuses), "webhooks_acknowledged": len(self.paid),
                       "webhook_posts": sum(self.pay_attempts.values()), "webhook_refusals": dict(self.pay_refusals),
                       "publish_errors": dict(self.publish_errors), "snapshot_errors": dict(self.snapshot_errors),
                       "emails_delivered": len(deliveries), "stripe_requests": len(calls),
                       "status_topic_events": len(events), "dead_letters": len(dead_letters), **upscales},
            "faults": {"sigkills": dict(self.kills), "sigkills_total": sum(self.kills.values()),
                       "unexpected_exits": self.unexpected_exits,
                       "starts": {w.name: w.starts for w in [*self.workers.values(), *filter(None, [self.extra])]}},
            "timeline": [e for e in self.timeline.entries if e["what"] != "SIGKILL"],
            "sigkill_log": [e for e in self.timeline.entries if e["what"] == "SIGKILL"],
            "dead_letter_samples": dead_letters[:5],
        }

    async def _final_jobs(self) -> list[JobRecord]:
        jobs = await self._all_jobs()
        records = []
        for start in range(0, len(jobs), 200):
            chunk = jobs[start:start + 200]
            histories = await asyncio.gather(*(self.table.history(j.job_id) for j in chunk))
            for job, history in zip(chunk, histories):
                records.append(JobRecord(
                    job.job_id, job.request_id, str(job.status), job.payment_status, job.refund_id,
                    tuple(Transition(str(h.source) if h.source else None, str(h.target), h.event_id, h.actor)
                          for h in history), job.upsampler_job_id))
        return records

    async def _teardown(self) -> None:
        workers = [*self.workers.values(), *filter(None, [self.extra])]
        await asyncio.to_thread(stop_all, workers)
        for closer in (self.proxy and self.proxy.stop, self.images and self.images.stop,
                       self.upsampler and self.upsampler.stop, self.redis and self.redis.aclose):
            if closer:
                try:
                    await closer()
                except Exception:
                    pass
        if self.sink:
            self.sink.stop()
        try:
            await self.stack.down()
        except Exception as exc:
            self.say(f"stack down failed: {exc}")
        for leftover in ("kafka", "redis"):
            if self.stack.pid(leftover):
                self.say(f"warning: {leftover} pid file left in {self.stack.var_dir / 'run'}")
        if not self.config.keep_data:
            for data in (self.stack.var_dir / "kafka", self.stack.var_dir / "redis", self.run_dir / "storage"):
                shutil.rmtree(data, ignore_errors=True)



async def read_status_topics(bootstrap: str) -> tuple[list[Event], list[dict]]:
    """Everything on the status topics and jobs.dead_letter, from the beginning to the
    end offsets of now (the run's broker holds only the run's messages)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False, fetch_max_wait_ms=50,
                                max_partition_fetch_bytes=8 * 1024 * 1024)
    await consumer.start()
    events: list[Event] = []
    dead: list[dict] = []
    try:
        cluster = await consumer._client.fetch_all_metadata()
        topics = [*STATUS_TOPICS, JOBS_DEAD_LETTER.name]
        partitions = [TopicPartition(t, p) for t in topics for p in cluster.partitions_for_topic(t) or ()]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends = await consumer.end_offsets(partitions)
        remaining = {tp for tp, end in ends.items() if end > 0}
        deadline = time.monotonic() + 120
        while remaining and time.monotonic() < deadline:
            for tp, messages in (await consumer.getmany(timeout_ms=500, max_records=10_000)).items():
                for m in messages:
                    try:
                        value = json.loads(m.value)
                    except (TypeError, ValueError):
                        value = {"raw": repr(m.value[:200])}
                    if tp.topic == JOBS_DEAD_LETTER.name:
                        dead.append(value if isinstance(value, dict) else {"value": value})
                    elif isinstance(value, dict):
                        events.append(Event(tp.topic, value.get("job_id"), value.get("event_id")))
                    if m.offset + 1 >= ends[tp]:
                        remaining.discard(tp)
    finally:
        await consumer.stop()
    return events, dead
