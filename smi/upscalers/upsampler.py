"""Client of the Upsampler API (upsampler.com; notes.md, "Upsampler API"): the
precise upscale, which keeps the image faithful, and status polling.

Errors: what a retry may cure (timeouts, connection errors, 5xx, 429) raises
UpscalerUnavailable, a TransientError carrying Retry-After, and marked in doubt when
the request may have arrived all the same (a timeout or a lost connection after it
left, a 504 from a gateway in front); everything else raises PermanentError with a
short reason. The API key, the image URL and the callback
URL (it holds the per-job secret) never appear in messages or logs."""

from __future__ import annotations

import email.utils
import json
import logging
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

import aiohttp

from smi.errors import PermanentError
from smi.upscalers.base import FAILED, SUCCESS, UPSCALER_STATUSES, Submission, UpscalerUnavailable

log = logging.getLogger(__name__)

MAX_FACTOR = 16  # precise-upscale accepts 1..16
INPUT_IMAGE_TYPE = "universal"
RETRYABLE_STATUSES = frozenset({408, 425, 429})
GATEWAY_TIMEOUT = 504
# Community clients treat these as final whatever the HTTP status says.
PERMANENT_PHRASES = ("invalid api key", "insufficient credits", "unsupported", "too large")
MAX_REASON_CHARS = 200


class UpsamplerClient:
    def __init__(self, base_url: str, api_key: str, *, session: aiohttp.ClientSession | None = None,
                 timeout: float = 30):
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._session = session
        self._owns_session = session is None
        # Finding a connection (a free one of the pool, or a new one) has half of the
        # time, and its own error: a request that timed out after that may have been
        # taken, one that timed out before it never left.
        self._timeout = aiohttp.ClientTimeout(total=timeout, connect=timeout / 2)

    async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
        if not 1 <= factor <= MAX_FACTOR:
            raise PermanentError(f"upscale factor {factor} is outside 1..{MAX_FACTOR}")
        request = {"input": {"imageUrl": image_url, "inputImageType": INPUT_IMAGE_TYPE, "upscaleFactor": factor},
                   "webhook": callback_url}
        body = _status_body(await self._call("POST", "/precise-upscale", json=request))
        if body["status"] == FAILED:
            raise PermanentError(f"Upsampler refused the job: {self._short(body.get('error') or 'no reason given')}")
        # Per job, so DEBUG: the table records the submission (upscaler id, attempt).
        log.debug("upsampler job %s submitted: %s, %s credits", body["id"], body["status"], body.get("creditCost"))
        return Submission(id=body["id"], status=body["status"], credit_cost=body.get("creditCost"))

    async def status(self, upscaler_id: str) -> dict[str, Any]:
        return _status_body(await self._call("GET", f"/status/{quote(upscaler_id, safe='')}"))

    async def close(self) -> None:
        if self._owns_session and self._session is not None:
            await self._session.close()
            self._session = None

    async def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        if self._session is None:
            self._session = aiohttp.ClientSession()
        headers = {"Authorization": f"Bearer {self._api_key}"}
        try:
            async with self._session.request(method, self._base_url + path, headers=headers,
                                             timeout=self._timeout, raise_for_status=False, **kwargs) as response:
                status, raw = response.status, await response.read()
                retry_after = parse_retry_after(response.headers.get("Retry-After"))
        except aiohttp.ConnectionTimeoutError:  # no connection (or pool slot) in time: nothing was sent
            raise UpscalerUnavailable(f"Upsampler {method}: no connection in time") from None
        except TimeoutError:
            raise UpscalerUnavailable(f"Upsampler {method} timed out", in_doubt=True) from None
        except aiohttp.ClientConnectorError as exc:  # refused, unresolvable: nothing was sent
            raise UpscalerUnavailable(f"Upsampler unreachable: {type(exc).__name__}") from None
        except aiohttp.ClientError as exc:
            raise UpscalerUnavailable(f"Upsampler connection lost: {type(exc).__name__}", in_doubt=True) from None
        payload = _json(raw)
        if 200 <= status < 300:
            return payload
        raise self._error_for(status, _error_message(payload, raw), retry_after)

    def _error_for(self, status: int, message: str, retry_after: float | None) -> Exception:
        message = self._short(message)
        lowered = message.lower()
        if status in (401, 403) or "invalid api key" in lowered:
            return PermanentError(f"Upsampler rejected the API key (HTTP {status})")
        described = f"Upsampler HTTP {status}" + (f": {message}" if message else "")
        if any(phrase in lowered for phrase in PERMANENT_PHRASES):
            return PermanentError(described)
        if status >= 500 or status in RETRYABLE_STATUSES:
            # A gateway's timeout says nothing of whether Upsampler behind it took the job.
            return UpscalerUnavailable(described, retry_after=retry_after, in_doubt=status == GATEWAY_TIMEOUT)
        return PermanentError(described)

    def _short(self, text: str) -> str:
        if self._api_key:  # an error page that echoes the request must not leak the key
            text = text.replace(self._api_key, "***")
        return " ".join(text.split())[:MAX_REASON_CHARS]


def parse_retry_after(value: str | None, *, now: datetime | None = None) -> float | None:
    """Retry-After as seconds from now: delta-seconds or an HTTP date."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return max(0.0, (moment - (now or datetime.now(UTC))).total_seconds())


def _json(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return None


def _error_message(payload: Any, raw: bytes) -> str:
    if isinstance(payload, dict):
        for key in ("error", "message", "detail"):
            if isinstance(payload.get(key), str):
                return payload[key]
    text = raw.decode("utf-8", "replace") if payload is None else ""
    return "" if text.lstrip().startswith("<") else text  # an HTML error page says nothing useful


def _status_body(payload: Any) -> dict[str, Any]:
    """The documented shape, or PermanentError: a body we cannot read will not
    become readable by asking again."""
    if not (isinstance(payload, dict)
            and isinstance(payload.get("id"), str) and payload["id"]
            and payload.get("status") in UPSCALER_STATUSES
            and _is_number_or_none(payload.get("creditCost"))
            and all(isinstance(payload.get(key), (str, type(None)))
                    for key in ("imageUrl", "compressedImageUrl", "error"))
            and (payload["status"] != SUCCESS or payload.get("imageUrl"))):
        raise PermanentError("unexpected Upsampler response")
    return payload


def _is_number_or_none(value: Any) -> bool:
    return value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
