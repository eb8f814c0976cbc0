"""A recording HTTP proxy in front of stripe-mock: every request the pipeline makes
to "Stripe" is forwarded unchanged and kept (method, path, headers, form body), so
tests can check amounts, metadata and idempotency keys of real API calls."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl

import aiohttp
from aiohttp import web

from tests.support.loopback import serve_on_loopback


@dataclass(frozen=True)
class RecordedRequest:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]  # Stripe's form encoding, flattened keys like "metadata[job_id]"
    status: int

    @property
    def idempotency_key(self) -> str | None:
        return self.headers.get("Idempotency-Key")


class RecordingStripeProxy:
    def __init__(self, upstream: str):
        self.upstream = upstream.rstrip("/")
        self.requests: list[RecordedRequest] = []
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.url = ""

    async def start(self) -> str:
        self._session = aiohttp.ClientSession()
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self._runner, port = await serve_on_loopback(app)
        self.url = f"http://127.0.0.1:{port}"
        return self.url

    async def stop(self) -> None:
        if self._runner:
            await self._runner.cleanup()
        if self._session:
            await self._session.close()

    def matching(self, method: str, path: str, **form: str) -> list[RecordedRequest]:
        return [r for r in self.requests if r.method == method and r.path == path
                and all(r.form.get(k) == v for k, v in form.items())]

    async def _forward(self, request: web.Request) -> web.Response:
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in ("host", "content-length")}
        async with self._session.request(request.method, self.upstream + request.path_qs, data=body,
                                         headers=headers) as resp:
            payload = await resp.read()
            status, content_type = resp.status, resp.headers.get("Content-Type", "application/json")
        self.requests.append(RecordedRequest(request.method, request.path, dict(request.headers),
                                             dict(parse_qsl(body.decode(), keep_blank_values=True)), status))
        return web.Response(body=payload, status=status, headers={"Content-Type": content_type})
