"""Crash points for fault-injection tests: ``SMI_CRASH_AT=<name>`` makes the process
die at that point as a SIGKILL would (no cleanup, no offset commit), to prove a
handler is idempotent when it is killed between a side effect and its record."""

from __future__ import annotations

import os


def crash_point(name: str) -> None:
    if os.environ.get("SMI_CRASH_AT") == name:
        os._exit(137)
