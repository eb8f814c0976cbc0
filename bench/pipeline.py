"""Jobs through the running system, timed by the Kafka timestamps of the events:

- requests published as fast as the producer takes them (send_many) until every
  one is ``awaiting_payment`` (the request's record timestamp against its
  jobs.awaiting_payment event's), and a paced run at 1,000 requests/s;
- a signed ``checkout.session.completed`` per job POSTed to the gateway (256 at a
  time, ``--pay-concurrency``), until every job is ``pending``, then ``completed``,
  then emailed."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import aiohttp

from bench.report import stage_figures
from bench.system import EventWatch, MailSink
from schemas.topics import JOBS_FAILED, JOBS_REQUESTED
from smi.kafka.producer import EventProducer
from smi.payments import local_id
from smi.stripe_webhooks import checkout_session_event, encode, sign

# Webhooks in flight at once. Stripe delivers over many connections; with 64 the
# bench, not the gateway, set the pace (64 in flight over a 50-70 ms answer: about
# 1,000/s); with 256 the gateway takes 1,100-1,200/s and answers in about 185 ms.
PAY_CONCURRENCY = 256
PUBLISH_BATCH = 1000


def phase_timeout(count: int, per_second: float) -> float:
    """How long a phase may take: generous, so a slow stage shows as a low rate
    rather than as a missing figure."""
    return 120 + count / per_second


@dataclass
class Flow:
    """What one run needs to reach the system and what it has seen of it."""
    run_id: str
    image_url: str
    gateway: str
    webhook_secret: str
    producer: EventProducer
    watch: EventWatch
    sink: MailSink | None = None
    pay_concurrency: int = PAY_CONCURRENCY
    requested: dict[str, float] = field(default_factory=dict)  # request id -> record timestamp
    jobs: dict[str, dict] = field(default_factory=dict)  # job id -> its awaiting_payment event
    job_requested: dict[str, float] = field(default_factory=dict)  # job id -> its request's timestamp
    _serial: int = 0

    def requests(self, count: int, tag: str) -> list[dict]:
        out = []
        for _ in range(count):
            self._serial += 1
            out.append({"request_id": f"bench-{self.run_id}-{tag}-{self._serial}", "image_url": self.image_url,
                        "resolution": "2x", "email": f"bench{self._serial}@example.com", "post_id": self._serial,
                        "image_width": 8, "image_height": 8})
        return out

    async def publish(self, requests: Sequence[dict]) -> dict[str, float]:
        """All at once, in send_many batches; returns request id -> record timestamp."""
        batches = [requests[i:i + PUBLISH_BATCH] for i in range(0, len(requests), PUBLISH_BATCH)]
        acked = await asyncio.gather(*(self.producer.send_many(
            [(JOBS_REQUESTED, r["request_id"], r) for r in batch]) for batch in batches))
        return self._note(requests, [m for metas in acked for m in metas])

    async def publish_paced(self, requests: Sequence[dict], per_second: int, tick: float = 0.01) -> dict[str, float]:
        per_tick = max(1, round(per_second * tick))
        sends, started = [], time.monotonic()
        for n, start in enumerate(range(0, len(requests), per_tick)):
            await asyncio.sleep(max(0.0, started + n * tick - time.monotonic()))
            batch = requests[start:start + per_tick]
            sends.append(asyncio.create_task(self.producer.send_many(
                [(JOBS_REQUESTED, r["request_id"], r) for r in batch])))
        acked = await asyncio.gather(*sends)
        return self._note(requests, [m for metas in acked for m in metas])

    def _note(self, requests: Sequence[dict], metas: list) -> dict[str, float]:
        sent = {r["request_id"]: m.timestamp / 1000 for r, m in zip(requests, metas)}
        self.requested.update(sent)
        return sent

    async def until_awaiting_payment(self, sent: dict[str, float], timeout: float) -> dict:
        seen = self.watch.by_request
        await self.watch.wait(lambda: sum(1 for r in sent if r in seen) >= len(sent), timeout=timeout,
                              what="awaiting_payment")
        ends: dict[str, float] = {}
        for request_id in sent:
            if request_id in seen:
                at, event = seen[request_id]
                ends[request_id] = at
                self.jobs[event["job_id"]] = event
                self.job_requested[event["job_id"]] = sent[request_id]
        return stage_figures(sent, ends, len(sent))

    async def pay(self, job_ids: Sequence[str]) -> tuple[dict[str, float], dict[str, float], Counter]:
        """Returns (job id -> POST sent, job id -> 200 received, non-200 answers by status)."""
        url = f"{self.gateway}/webhooks/stripe"
        sent_at, acked_at, refused = {}, {}, Counter()
        limit = asyncio.Semaphore(self.pay_concurrency)
        connector = aiohttp.TCPConnector(limit=self.pay_concurrency)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as http:
            async def pay_one(job_id: str) -> None:
                data = self.jobs[job_id]["data"]
                body = encode(checkout_session_event(
                    "checkout.session.completed", job_id=job_id, session_id=data["checkout_session_id"],
                    amount_total=data["price_cents"], payment_intent=local_id("pi", job_id)))
                async with limit:
                    headers = {"Content-Type": "application/json", "Stripe-Signature": sign(body, self.webhook_secret)}
                    sent_at[job_id] = time.time()
                    try:
                        async with http.post(url, data=body, headers=headers) as resp:
                            await resp.read()
                            if resp.status == 200:
                                acked_at[job_id] = time.time()
                            else:
                                refused[resp.status] += 1
                    except (aiohttp.ClientError, TimeoutError) as exc:
                        refused[type(exc).__name__] += 1

            await asyncio.gather(*(pay_one(job_id) for job_id in job_ids))
        return sent_at, acked_at, refused

    async def until(self, topic: str, job_ids: Sequence[str], timeout: float) -> dict[str, float]:
        seen = self.watch.first[topic]
        await self.watch.wait(lambda: sum(1 for j in job_ids if j in seen) >= len(job_ids), timeout=timeout,
                              what=topic)
        return self.watch.times(topic, job_ids)

    async def until_emailed(self, job_ids: Sequence[str], timeout: float) -> dict[str, float]:
        await self.watch.wait(lambda: sum(1 for j in job_ids if j in self.sink.ready) >= len(job_ids),
                              timeout=timeout, what="download-ready emails")
        emails = self.sink.emails()
        return {j: emails[j] for j in job_ids if j in emails}

    def problems(self, job_ids: Sequence[str]) -> list[str]:
        """What went wrong with these jobs: failed ones and this run's dead letters."""
        found = []
        if failed := self.watch.times(JOBS_FAILED.name, job_ids):
            found.append(f"{len(failed)} jobs failed")
        if dead := self.dead_letters():
            found.append(f"{len(dead)} dead letters, e.g. {dead[0].get('error')}")
        return found

    def dead_letters(self) -> list[dict]:
        """Dead letters about this run's requests or jobs."""
        mine = f"bench-{self.run_id}-"
        return [d for d in self.watch.dead_letters
                if d.get("key") in self.jobs or mine in (d.get("key") or "") or mine in (d.get("value") or "")]
