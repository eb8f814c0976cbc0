"""Who may use the admin routes: holders of ADMIN_TOKEN.

The API takes it as a bearer token on every request. The page takes it once, on
its login form, and then keeps a session cookie whose value is derived from the
token (an HMAC over the login time), never the token itself: a leaked cookie
expires and cannot be turned back into the token, and changing ADMIN_TOKEN ends
every session. Its forms carry a CSRF token derived from the session the same way.
Every comparison is constant-time. With ADMIN_TOKEN empty the admin routes answer
503: an unset secret never means "open"."""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from typing import Awaitable, Callable

from aiohttp import web

from services.gateway.context import CONTEXT
from services.gateway.ratelimit import FailedAttemptLimiter, client_of

DISABLED = "admin disabled: set ADMIN_TOKEN"
SESSION_COOKIE = "smi_admin_session"
SESSION_TTL_SECONDS = 12 * 3600
# Wrong tokens, bearer or login form, per client: the token is chosen by a person,
# so guessing it must stay slow. (Behind a proxy not named in TRUSTED_PROXIES all
# clients share its address and one bucket: a guesser can lock the admins out for a
# minute, never get in.)
FAILED_ATTEMPTS = web.AppKey("smi_admin_failed_attempts", FailedAttemptLimiter)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def setup(app: web.Application) -> None:
    """Give ``app`` its failed-attempt limiter (once; the API and the page share it)."""
    if FAILED_ATTEMPTS not in app:
        ctx = app[CONTEXT]
        app[FAILED_ATTEMPTS] = FailedAttemptLimiter(ctx.table.redis, "admin", namespace=ctx.table.keys.namespace,
                                                    capacity=20, window_seconds=60.0)


def _sign(key: str, message: str) -> str:
    return hmac.new(key.encode("utf-8"), message.encode("utf-8"), hashlib.sha256).hexdigest()


def configured_token(request: web.Request) -> str | None:
    return request.app[CONTEXT].settings.admin_token or None


def token_matches(expected: str, given: str) -> bool:
    return hmac.compare_digest(expected.encode("utf-8"), given.encode("utf-8"))


async def refuse_if_throttled(request: web.Request) -> None:
    wait = await request.app[FAILED_ATTEMPTS].retry_after(client_of(request))
    if wait:
        raise web.HTTPTooManyRequests(text="too many wrong admin tokens, retry later",
                                      headers={"Retry-After": str(wait)})


async def charge_failure(request: web.Request) -> None:
    await request.app[FAILED_ATTEMPTS].charge(client_of(request))


def _json_error(error: type[web.HTTPException], message: str, **headers: str) -> web.HTTPException:
    return error(text=json.dumps({"error": message}), content_type="application/json", headers=headers)


def bearer_required(handler: Handler) -> Handler:
    """Wrap an API handler: 503 while admin is disabled, 401 without the right
    ``Authorization: Bearer <ADMIN_TOKEN>``."""
    async def guarded(request: web.Request) -> web.StreamResponse:
        expected = configured_token(request)
        if expected is None:
            raise _json_error(web.HTTPServiceUnavailable, DISABLED)
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            raise _json_error(web.HTTPUnauthorized, "bearer token required", **{"WWW-Authenticate": "Bearer"})
        await refuse_if_throttled(request)
        if not token_matches(expected, given.strip()):
            await charge_failure(request)
            raise _json_error(web.HTTPUnauthorized, "wrong token",
                              **{"WWW-Authenticate": 'Bearer error="invalid_token"'})
        return await handler(request)
    return guarded


# -- the page's session and CSRF tokens ----------------------------------------------

def new_session(token: str, now: float | None = None) -> str:
    issued = int(time.time() if now is None else now)
    return f"{issued}.{_sign(token, f'admin-session:{issued}')}"


def session_is_valid(token: str, session: str, now: float | None = None) -> bool:
    issued, _, _ = session.partition(".")
    if not issued.isdigit():
        return False
    age = (time.time() if now is None else now) - int(issued)
    return 0 <= age < SESSION_TTL_SECONDS and token_matches(new_session(token, int(issued)), session)


def csrf_token(session: str) -> str:
    return _sign(session, "csrf")


def csrf_is_valid(session: str, given: str) -> bool:
    return token_matches(csrf_token(session), given)
