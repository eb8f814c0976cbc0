"""Time for stages that act on deadlines: UTC now, plus an offset that tests move
while the process runs, so a timer is tested by moving time rather than sleeping.

``SMI_CLOCK_OFFSET_FILE`` names a file holding the offset in seconds (a float).
Unset, the clock is real time. The file is read again at most every
``reread_seconds``, so a test's move reaches a running process within that."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Callable

OFFSET_FILE_ENV = "SMI_CLOCK_OFFSET_FILE"


class Clock:
    def __init__(self, offset_file: Path | None = None, *, reread_seconds: float = 0.2,
                 monotonic: Callable[[], float] = time.monotonic):
        self.offset_file = offset_file
        self.reread_seconds = reread_seconds
        self._monotonic = monotonic
        self._offset = 0.0
        self._read_at: float | None = None

    @classmethod
    def from_env(cls) -> Clock:
        name = os.environ.get(OFFSET_FILE_ENV, "").strip()
        return cls(Path(name) if name else None)

    def now(self) -> datetime:
        return datetime.now(UTC) + timedelta(seconds=self.offset())

    def offset(self) -> float:
        if self.offset_file is None:
            return 0.0
        moment = self._monotonic()
        if self._read_at is None or moment - self._read_at >= self.reread_seconds:
            self._read_at = moment
            try:
                self._offset = float(self.offset_file.read_text())
            except FileNotFoundError:
                self._offset = 0.0
            except ValueError:
                pass  # not a number (edited by hand): keep the last good offset
        return self._offset


def set_offset(offset_file: Path, seconds: float) -> None:
    """Move every clock that reads ``offset_file`` to real time + ``seconds``.
    Written to a temporary file and renamed, so a reader never sees half a number."""
    partial = offset_file.with_name(f".{offset_file.name}.{os.getpid()}")
    partial.write_text(repr(float(seconds)))
    os.replace(partial, offset_file)
