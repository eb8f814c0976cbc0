"""A loopback HTTP server of generated images and of the ways a server can misbehave,
for tests that fetch over real HTTP.

Routes:
  /img/<w>x<h>.<png|jpg|jpeg|webp>  a generated image of that size
  /lying/<w>x<h>.png                 a PNG whose header claims w×h but holds 1×1 of data
  /redirect?to=<url>[&code=302]      a redirect to ``to``
  /hops/<n>                          n redirects in a row, then an 8×8 PNG
  /big?size=<bytes>[&declare=1]      PNG magic then zeros, streamed; Content-Length only with declare=1
  /text                              text/plain
  /status/<code>                     that status (Retry-After: 1 on 429 and 503)
  /slow?seconds=<s>                  an image after a pause
Every request is recorded in ``hits`` (path with query as sent, and the Host header)."""

from __future__ import annotations

import asyncio
import io
import struct
import zlib
from dataclasses import dataclass

from aiohttp import web

from tests.support.loopback import serve_on_loopback
from PIL import Image

PILLOW_FORMATS = {"png": "PNG", "jpg": "JPEG", "jpeg": "JPEG", "webp": "WEBP"}
CONTENT_TYPES = {"PNG": "image/png", "JPEG": "image/jpeg", "WEBP": "image/webp"}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make_image(width: int, height: int, kind: str = "png") -> bytes:
    """An image with some structure (a gradient), so resizing has work to do."""
    image = Image.linear_gradient("L").resize((width, height)).convert("RGB")
    out = io.BytesIO()
    image.save(out, format=PILLOW_FORMATS[kind])
    return out.getvalue()


def lying_png(width: int, height: int) -> bytes:
    """A PNG whose IHDR says width×height (checksum fixed up) over a 1×1 image's
    data: only a reader that decodes pixels can tell."""
    data = bytearray(make_image(1, 1, "png"))
    # Signature (8), IHDR length (4), "IHDR" (4), then width and height.
    struct.pack_into(">II", data, 16, width, height)
    struct.pack_into(">I", data, 29, zlib.crc32(bytes(data[12:29])))
    return bytes(data)


@dataclass(frozen=True)
class Hit:
    path_qs: str
    host: str | None


class ImageServer:
    def __init__(self) -> None:
        self.hits: list[Hit] = []
        self._runner: web.AppRunner | None = None
        self.port: int | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def count(self, path: str) -> int:
        return sum(1 for hit in self.hits if hit.path_qs.split("?")[0] == path)

    async def start(self) -> "ImageServer":
        app = web.Application(middlewares=[self._record])
        app.router.add_get("/img/{width:\\d+}x{height:\\d+}.{kind:png|jpg|jpeg|webp}", self._image)
        app.router.add_get("/lying/{width:\\d+}x{height:\\d+}.png", self._lying)
        app.router.add_get("/redirect", self._redirect)
        app.router.add_get("/hops/{n:\\d+}", self._hops)
        app.router.add_get("/big", self._big)
        app.router.add_get("/text", self._text)
        app.router.add_get("/status/{code:\\d+}", self._status)
        app.router.add_get("/slow", self._slow)
        self._runner, self.port = await serve_on_loopback(app)
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> "ImageServer":
        return await self.start()

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    @web.middleware
    async def _record(self, request: web.Request, handler):
        self.hits.append(Hit(request.raw_path, request.headers.get("Host")))
        return await handler(request)

    async def _image(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = make_image(int(request.match_info["width"]), int(request.match_info["height"]), kind)
        return web.Response(body=body, content_type=CONTENT_TYPES[PILLOW_FORMATS[kind]])

    async def _lying(self, request: web.Request) -> web.Response:
        body = lying_png(int(request.match_info["width"]), int(request.match_info["height"]))
        return web.Response(body=body, content_type="image/png")

    async def _redirect(self, request: web.Request) -> web.Response:
        code = int(request.query.get("code", "302"))
        return web.Response(status=code, headers={"Location": request.query["to"]})

    async def _hops(self, request: web.Request) -> web.Response:
        n = int(request.match_info["n"])
        if n == 0:
            return web.Response(body=make_image(8, 8), content_type="image/png")
        return web.Response(status=302, headers={"Location": f"/hops/{n - 1}"})

    async def _big(self, request: web.Request) -> web.StreamResponse:
        size = int(request.query.get("size", str(1024 * 1024)))
        response = web.StreamResponse(headers={"Content-Type": "image/png"})
        if request.query.get("declare") == "1":
            response.content_length = size
        await response.prepare(request)
        await response.write(PNG_MAGIC)
        sent, chunk = len(PNG_MAGIC), b"\0" * 65536
        try:
            while sent < size:
                part = chunk[:size - sent]
                await response.write(part)
                sent += len(part)
        except ConnectionError:  # the client gave up at its cap, as it should
            return response
        await response.write_eof()
        return response

    async def _text(self, request: web.Request) -> web.Response:
        return web.Response(text="this is not an image, it only says so\n", content_type="text/plain")

    async def _status(self, request: web.Request) -> web.Response:
        code = int(request.match_info["code"])
        headers = {"Retry-After": "1"} if code in (429, 503) else {}
        return web.Response(status=code, text=f"status {code}\n", headers=headers)

    async def _slow(self, request: web.Request) -> web.Response:
        await asyncio.sleep(float(request.query.get("seconds", "5")))
        return web.Response(body=make_image(8, 8), content_type="image/png")
