"""FakeUpsampler: a loopback double of the Upsampler API (notes.md, "Upsampler API")
that really does the work, so the pipeline is tested end to end without the
service: it fetches ``input.imageUrl``, upscales it with Pillow, serves the result
and POSTs the callback to ``webhook``.

Routes, under ``base_url`` (``…/api/v1``, like the real one):
  POST /precise-upscale   Bearer key, body {"input": {"imageUrl", "inputImageType",
                          "upscaleFactor"}, "webhook"} -> {"id", "status": "IN_QUEUE", "creditCost"}
  GET  /status/{id}       {"id", "status", "creditCost", "imageUrl", "compressedImageUrl", "error"}
and, outside it, the results: GET /results/{id}.png (full PNG) and /results/{id}.jpg.

The input is fetched during the submit, as the real service must to price the job
and check credits; an input that cannot be fetched or read is answered 400.
A job is IN_QUEUE for half of ``latency``, IN_PROGRESS for the other half, then
final. Per test, ``script(...)`` sets:
  latency            seconds from submit to the final status
  answer_after       seconds a submit waits, the job already accepted (and paid), before
                     its answer: a client stopped meanwhile, or one that gave up waiting,
                     has a job it does not know of
  late_fraction      the share of submits that wait ``answer_after`` (1: all; drawn from
                     the fake's ``seed``)
  fail_submits_with  HTTP statuses answered to the next submits, in order (429 carries Retry-After)
  outcome            "SUCCESS" or "FAILED" (with ``error``)
  callback           False: no callback (the processor must poll)
  result             what the result URL gives: "normal"; "bad_url" (404, as an expired
                     temporary URL); "not_image" (text/plain); "oversized" (a PNG
                     signature then zeros, streamed without end, up to 1 GiB)
Every request is recorded: ``submissions``, ``status_calls``, ``callbacks_sent``."""

from __future__ import annotations

import asyncio
import io
import math
import random
import time
import uuid
from dataclasses import dataclass, field, replace
from typing import Any

import aiohttp
from aiohttp import web

from tests.support.loopback import serve_on_loopback
from PIL import Image

DEFAULT_API_KEY = "upsampler-test-key"
RETRY_AFTER_SECONDS = 2
IMAGE_TYPES = ("realism", "anime", "universal")
RESULTS = ("normal", "bad_url", "not_image", "oversized")
OVERSIZED_LIMIT = 1024 ** 3
ERROR_BODIES = {429: "Rate limit exceeded", 500: "Internal server error", 502: "Bad gateway",
                503: "Service unavailable", 402: "Insufficient credits"}


@dataclass
class Script:
    latency: float = 0.05
    fail_submits_with: list[int] = field(default_factory=list)
    outcome: str = "SUCCESS"
    error: str = "Upscaling failed"
    callback: bool = True
    callback_first: bool = False  # finish and call back before answering the submit
    answer_after: float = 0.0
    late_fraction: float = 1.0
    result: str = "normal"


@dataclass
class FakeJob:
    id: str
    factor: int
    webhook: str | None
    script: Script
    source: Image.Image
    status: str = "IN_QUEUE"
    credit_cost: float | None = None
    error: str | None = None
    png: bytes | None = None
    jpeg: bytes | None = None


class FakeUpsampler:
    def __init__(self, api_key: str = DEFAULT_API_KEY, *, seed: int | None = None):
        self.api_key = api_key
        self._random = random.Random(seed)
        # {"body", "authorized", "answered", "at" (time.time() of arrival), "id" (once accepted)}
        self.submissions: list[dict[str, Any]] = []
        self.status_calls: list[str] = []
        self.callbacks_sent: list[dict[str, Any]] = []  # {"url", "body", "status" or "error"}
        self.jobs: dict[str, FakeJob] = {}
        self._script = Script()
        self._tasks: set[asyncio.Task] = set()
        self._runner: web.AppRunner | None = None
        self._client: aiohttp.ClientSession | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"{self.url}/api/v1"

    def script(self, **changes: Any) -> None:
        """Set how the next submits behave (unnamed settings keep their values)."""
        if changes.get("outcome", "SUCCESS") not in ("SUCCESS", "FAILED"):
            raise ValueError(f"outcome must be SUCCESS or FAILED, not {changes['outcome']!r}")
        if changes.get("result", "normal") not in RESULTS:
            raise ValueError(f"result must be one of {RESULTS}, not {changes['result']!r}")
        if "fail_submits_with" in changes:
            changes["fail_submits_with"] = list(changes["fail_submits_with"])
        self._script = replace(self._script, **changes)

    async def start(self) -> "FakeUpsampler":
        self._client = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_post("/api/v1/precise-upscale", self._submit)
        app.router.add_get("/api/v1/status/{id}", self._status)
        app.router.add_get("/results/{id}.{ext:png|jpg}", self._result)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._runner is not None:
            await self._runner.cleanup()
        if self._client is not None:
            await self._client.close()

    async def __aenter__(self) -> "FakeUpsampler":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def settled(self, timeout: float = 10) -> None:
        """Wait until every job has reached its final status and sent its callback."""
        if self._tasks:
            await asyncio.wait_for(asyncio.gather(*list(self._tasks)), timeout)

    def _authorized(self, request: web.Request) -> bool:
        return request.headers.get("Authorization") == f"Bearer {self.api_key}"

    async def _submit(self, request: web.Request) -> web.Response:
        record: dict[str, Any] = {"body": None, "authorized": self._authorized(request), "answered": None,
                                  "at": time.time(), "id": None}
        self.submissions.append(record)
        response = await self._accept(request, record)
        record["answered"] = response.status
        return response

    async def _accept(self, request: web.Request, record: dict[str, Any]) -> web.Response:
        try:
            record["body"] = body = await request.json()
        except ValueError:
            body = None
        if not record["authorized"]:
            return _error(401, "Invalid API key")
        script = self._script
        if script.fail_submits_with:
            code = script.fail_submits_with.pop(0)
            headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if code == 429 else {}
            return _error(code, ERROR_BODIES.get(code, f"HTTP {code}"), headers)
        problem = _invalid_request(body)
        if problem:
            return _error(400, problem)
        try:
            source = await self._download(body["input"]["imageUrl"])
        except ValueError as exc:
            return _error(400, str(exc))
        factor = int(body["input"]["upscaleFactor"])
        output_mp = source.width * factor * source.height * factor / 1e6
        job = FakeJob(id=uuid.uuid4().hex, factor=factor, webhook=body.get("webhook"),
                      script=replace(script, fail_submits_with=[]), source=source,
                      credit_cost=max(1, math.ceil(output_mp / 4)))
        self.jobs[job.id] = job
        record["id"] = job.id
        late = script.answer_after and (script.late_fraction >= 1 or self._random.random() < script.late_fraction)
        delay = script.answer_after if late else 0.0
        if script.callback_first:
            # The race a fast real API can produce: the callback lands before the
            # client has even seen the job's id.
            await asyncio.sleep(delay)
            await self._work(job)
            return web.json_response({k: v for k, v in self._public(job).items() if k != "error" or v is not None})
        # The job is taken: it goes on, and calls back, even if the client hangs up
        # before the answer (a timeout, a crash), which cancels this handler.
        task = asyncio.create_task(self._work(job, after=delay))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        await asyncio.sleep(delay)
        return web.json_response({"id": job.id, "status": job.status, "creditCost": job.credit_cost})

    async def _download(self, url: str) -> Image.Image:
        try:
            async with self._client.get(url, timeout=aiohttp.ClientTimeout(total=10)) as response:
                if response.status != 200:
                    raise ValueError(f"Could not download the image (HTTP {response.status})")
                data = await response.read()
        except (aiohttp.ClientError, TimeoutError):
            raise ValueError("Could not download the image") from None
        try:
            image = Image.open(io.BytesIO(data))
            image.load()
        except (OSError, Image.DecompressionBombError):
            raise ValueError("Unsupported image format") from None
        return image

    async def _work(self, job: FakeJob, after: float = 0.0) -> None:
        await asyncio.sleep(after + job.script.latency / 2)
        job.status = "IN_PROGRESS"
        if job.script.outcome == "SUCCESS":
            job.png, job.jpeg = await asyncio.to_thread(_upscale, job.source, job.factor)
        await asyncio.sleep(job.script.latency / 2)
        if job.script.outcome == "FAILED":
            job.status, job.error, job.credit_cost = "FAILED", job.script.error, 0
        else:
            job.status = "SUCCESS"
        if job.script.callback and job.webhook:
            await self._send_callback(job)

    async def _send_callback(self, job: FakeJob) -> None:
        body = {key: value for key, value in self._public(job).items() if key != "error" or value is not None}
        sent: dict[str, Any] = {"url": job.webhook, "body": body}
        try:
            async with self._client.post(job.webhook, json=body, timeout=aiohttp.ClientTimeout(total=10)) as response:
                sent["status"] = response.status
        except (aiohttp.ClientError, TimeoutError) as exc:
            sent["error"] = repr(exc)
        self.callbacks_sent.append(sent)

    def _public(self, job: FakeJob) -> dict[str, Any]:
        done = job.status == "SUCCESS"
        return {"id": job.id, "status": job.status, "creditCost": job.credit_cost,
                "imageUrl": f"{self.url}/results/{job.id}.png" if done else None,
                "compressedImageUrl": f"{self.url}/results/{job.id}.jpg" if done else None,
                "error": job.error}

    async def _status(self, request: web.Request) -> web.Response:
        job_id = request.match_info["id"]
        self.status_calls.append(job_id)
        if not self._authorized(request):
            return _error(401, "Invalid API key")
        job = self.jobs.get(job_id)
        if job is None:
            return _error(404, "Job not found")
        return web.json_response(self._public(job))

    async def _result(self, request: web.Request) -> web.StreamResponse:
        job = self.jobs.get(request.match_info["id"])
        if job is None or job.png is None or job.script.result == "bad_url":
            return _error(404, "Not found")
        if job.script.result == "not_image":
            return web.Response(text="<html>not an image</html>", content_type="text/plain")
        if job.script.result == "oversized":
            return await _stream_endless_png(request)
        if request.match_info["ext"] == "jpg":
            return web.Response(body=job.jpeg, content_type="image/jpeg")
        return web.Response(body=job.png, content_type="image/png")


def _invalid_request(body: Any) -> str | None:
    if not isinstance(body, dict) or not isinstance(body.get("input"), dict):
        return "Request body must be JSON with an 'input' object"
    given = body["input"]
    if not isinstance(given.get("imageUrl"), str) or not given["imageUrl"]:
        return "input.imageUrl is required"
    if given.get("inputImageType") not in IMAGE_TYPES:
        return f"input.inputImageType must be one of {', '.join(IMAGE_TYPES)}"
    factor = given.get("upscaleFactor")
    if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not 1 <= factor <= 16:
        return "input.upscaleFactor must be between 1 and 16"
    if "webhook" in body and not isinstance(body["webhook"], str):
        return "webhook must be a URL"
    return None


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _upscale(source: Image.Image, factor: int) -> tuple[bytes, bytes]:
    result = source.convert("RGBA" if source.has_transparency_data else "RGB")
    result = result.resize((source.width * factor, source.height * factor), Image.LANCZOS)
    png, jpeg = io.BytesIO(), io.BytesIO()
    result.save(png, format="PNG")
    result.convert("RGB").save(jpeg, format="JPEG", quality=80)
    return png.getvalue(), jpeg.getvalue()


async def _stream_endless_png(request: web.Request) -> web.StreamResponse:
    response = web.StreamResponse(headers={"Content-Type": "image/png"})
    await response.prepare(request)
    await response.write(b"\x89PNG\r\n\x1a\n")
    chunk, sent = b"\0" * 65536, 0
    try:
        while sent < OVERSIZED_LIMIT:
            await response.write(chunk)
            sent += len(chunk)
    except ConnectionError:  # the client stopped at its cap
        return response
    await response.write_eof()
    return response
