"""Error classes shared by stages and adapters. A handler raises TransientError for
what a retry may cure (timeouts, 5xx, 429, a broker or server briefly away) and
PermanentError for what it never will; the stage retries the first with backoff
and dead-letters the second."""

from __future__ import annotations


class TransientError(Exception):
    """Retry with backoff; dead-letter when the retries run out."""


class PermanentError(Exception):
    """Do not retry: record the reason and dead-letter (or fail the job)."""
