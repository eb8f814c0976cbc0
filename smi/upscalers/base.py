"""What the processor needs from a remote upscaler (the Upsampler API, or a double
of it in tests): submit a job that reports back to a callback URL, and poll it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from smi.errors import TransientError

# The Upsampler job statuses, as they appear in status bodies and callbacks.
IN_QUEUE, IN_PROGRESS, SUCCESS, FAILED = "IN_QUEUE", "IN_PROGRESS", "SUCCESS", "FAILED"
UPSCALER_STATUSES = frozenset({IN_QUEUE, IN_PROGRESS, SUCCESS, FAILED})
FINAL_STATUSES = frozenset({SUCCESS, FAILED})


@dataclass(frozen=True)
class Submission:
    id: str
    status: str
    credit_cost: float | None


class UpscalerUnavailable(TransientError):
    """Worth retrying later; ``retry_after`` is the server's Retry-After in seconds
    when it sent one, so a retry loop can wait at least that long. ``in_doubt``: the
    request may have reached the server all the same (it timed out, or the connection
    was lost, after it left), so a submit may have been taken and paid for."""

    def __init__(self, reason: str, *, retry_after: float | None = None, in_doubt: bool = False):
        super().__init__(reason)
        self.retry_after = retry_after
        self.in_doubt = in_doubt


class RemoteUpscaler(Protocol):
    async def submit(self, image_url: str, factor: int, callback_url: str) -> Submission:
        """Start a job; its final status is POSTed to ``callback_url``. Raises
        TransientError (retry) or PermanentError (the job cannot be done)."""
        ...

    async def status(self, upscaler_id: str) -> dict[str, Any]:
        """The status body: id, status (one of UPSCALER_STATUSES), creditCost,
        imageUrl, compressedImageUrl, error."""
        ...

    async def close(self) -> None: ...
