"""GET /downloads/{token}: stream a completed job's upscaled image (design.md, "HTTP
gateway"): 400 malformed token, 404 unknown or revoked, 410 expired or cleaned up,
425 not completed yet, 429 for a client with too many failed lookups.

The raw token is a secret: it is only ever hashed and compared (the job table does
that in constant time) and never logged; logs name the job id."""

from __future__ import annotations

import asyncio
import logging
import re
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from schemas.events import utcnow
from schemas.job import Job
from schemas.status import JobStatus
from services.gateway.context import CONTEXT
from services.gateway.ratelimit import FailedAttemptLimiter, client_of
from services.gateway.bodies import problem
from smi.jobtable import is_well_formed_token

log = logging.getLogger(__name__)

FAILED_LOOKUPS = web.AppKey("smi_gateway_failed_lookups", FailedAttemptLimiter)

# Every download answer, refusals included, sits behind a secret URL: keep it out
# of caches and out of the Referer of anything the browser loads next.
PRIVATE = {"Cache-Control": "no-store", "Referrer-Policy": "no-referrer"}

# (magic bytes at offset 0, content type, file extension); WebP is checked apart.
SIGNATURES = ((b"\x89PNG\r\n\x1a\n", "image/png", "png"), (b"\xff\xd8\xff", "image/jpeg", "jpg"))


@dataclass(frozen=True)
class StoredImage:
    path: Path
    content_type: str
    extension: str


class OutsideStorage(Exception):
    """The job's file path does not resolve inside STORAGE_DIR."""


def sniff_image_type(head: bytes) -> tuple[str, str]:
    """(content type, extension) by magic bytes; the file name's suffix is not trusted."""
    for magic, content_type, extension in SIGNATURES:
        if head.startswith(magic):
            return content_type, extension
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image/webp", "webp"
    return "application/octet-stream", "bin"


def locate_stored_image(storage_dir: Path, stored_path: str | None) -> StoredImage | None:
    """The image a job's ``upscaled_file_path`` names, or None if it is gone.
    Relative paths are relative to the working directory, as the processor wrote
    them. Symlinks are resolved before the check, so one pointing out of storage is
    refused too. Blocking (stat and a small read): run it in a thread."""
    if stored_path is None:
        return None
    try:
        path = Path(stored_path).resolve()
    except (OSError, RuntimeError, ValueError) as exc:  # symlink loop, NUL byte
        raise OutsideStorage(type(exc).__name__) from None
    if not path.is_relative_to(storage_dir.resolve()):
        raise OutsideStorage(str(path))
    if not path.is_file():
        return None
    with path.open("rb") as file:
        head = file.read(12)
    return StoredImage(path, *sniff_image_type(head))


def download_filename(job: Job, extension: str) -> str:
    # Only letters and digits of the resolution reach the header: nothing that
    # could end the quoted string or the header line.
    resolution = re.sub(r"[^0-9A-Za-z]", "", job.resolution)
    return f"upscaled-{resolution}-{job.job_id[:8]}.{extension}"


def refusal(status: int, message: str, **headers: str) -> web.Response:
    response = problem(status, message)
    response.headers.update({**PRIVATE, **headers})
    return response


def is_expired(job: Job) -> bool:
    # No expiry on record means no valid link was ever issued for it: fail closed.
    return (job.download_expired_at is not None or job.download_expires_at is None
            or job.download_expires_at <= utcnow())


async def download(request: web.Request) -> web.StreamResponse:
    response = await _answer(request)
    request.app[CONTEXT].metrics.downloads.labels(str(response.status)).inc()
    return response


async def _answer(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CONTEXT]
    limiter = request.app[FAILED_LOOKUPS]
    client = client_of(request)
    # Checked before the lookup, hits included: a blocked client that could still
    # tell a hit from a miss would keep its guessing oracle.
    wait = await limiter.retry_after(client)
    if wait:
        return refusal(429, "too many failed download lookups, retry later", **{"Retry-After": str(wait)})
    token = request.match_info["token"]
    if not is_well_formed_token(token):
        await limiter.charge(client)
        return refusal(400, "malformed download link")
    job = await ctx.table.find_by_token(token)
    if job is None:
        await limiter.charge(client)
        return refusal(404, "unknown download link")
    if is_expired(job):
        return refusal(410, "this download link has expired")
    if job.status is not JobStatus.COMPLETED:
        return refusal(425, "the image is not ready yet")
    try:
        image = await asyncio.to_thread(locate_stored_image, ctx.settings.storage_dir, job.upscaled_file_path)
    except OutsideStorage as exc:
        log.warning("job %s: upscaled file path resolves outside STORAGE_DIR (%s); refusing", job.job_id, exc)
        return refusal(404, "unknown download link")
    if image is None:
        log.info("job %s: download asked for, but its file is gone", job.job_id)
        return refusal(410, "this download is no longer available")
    log.info("job %s: serving download (%s)", job.job_id, request.method)
    headers = {
        **PRIVATE,
        "Content-Type": image.content_type,
        "Content-Disposition": f'attachment; filename="{download_filename(job, image.extension)}"',
        "X-Content-Type-Options": "nosniff",
    }
    # FileResponse streams from disk, answers Range requests (206) and sets
    # Content-Length to what it actually sends.
    return web.FileResponse(image.path, headers=headers)
