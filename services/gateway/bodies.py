"""Reading a webhook's body: JSON content type, at most MAX_BODY_BYTES. Shared by
the Stripe and Upsampler webhooks; each refusal is a JSON error with its status."""

from __future__ import annotations

import asyncio

from aiohttp import web

MAX_BODY_BYTES = 1024 * 1024
# A client that sends its headers and then stalls or dribbles its body would hold a
# handler (and a connection) for as long as it likes; this bounds it.
BODY_READ_TIMEOUT_SECONDS = 10.0


class BadBody(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def problem(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


async def read_body(request: web.Request) -> bytes:
    """The raw body (Stripe's signature covers the exact bytes)."""
    if request.content_type != "application/json":
        raise BadBody(415, "content type must be application/json")
    if request.content_length is not None and request.content_length > MAX_BODY_BYTES:
        raise BadBody(413, f"body over {MAX_BODY_BYTES} bytes")
    try:
        return await asyncio.wait_for(request.read(), BODY_READ_TIMEOUT_SECONDS)
    except web.HTTPRequestEntityTooLarge:  # chunked, without a Content-Length
        raise BadBody(413, f"body over {MAX_BODY_BYTES} bytes") from None
    except TimeoutError:
        raise BadBody(408, f"request body not received within {BODY_READ_TIMEOUT_SECONDS:.0f} s") from None
