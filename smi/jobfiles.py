"""Where a job's files live under STORAGE_DIR, shared by the processor (and its
local upscaler), which writes them, and the janitor, which deletes them.

    STORAGE_DIR/<job_id>/                     the job's directory
    STORAGE_DIR/<job_id>/attempt-<N>/         everything processing attempt N writes
                                              (N is the job's ``attempts`` once it is
                                              processing: the source, temp files, the result)
    STORAGE_DIR/<job_id>/<file>               files written before attempts had
                                              directories of their own

Why one directory per attempt: an operator's retry (failed -> processing) can land
while the janitor is purging the failed job's files. The janitor read ``attempts``
= N with the job failed, so attempts 1..N are over and their directories are
dead; the retry is attempt N+1 (the transition that starts it sets the number)
and writes only under attempt-<N+1>, which the purge never names. No lock, no
marker, no coordination between the two: the attempt number already orders them.
(A ``purging`` marker the retry refuses would need the check inside the retry's
transition script to be race-free, and would refuse the operator for nothing.)"""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

log = logging.getLogger(__name__)

_ATTEMPT_DIR = re.compile(r"attempt-(\d{1,9})")


def job_dir(storage_dir: Path, job_id: str) -> Path:
    return storage_dir / job_id


def attempt_dir(storage_dir: Path, job_id: str, attempt: int) -> Path:
    return job_dir(storage_dir, job_id) / f"attempt-{attempt}"


def remove_attempts(storage_dir: Path, job_id: str, through: int) -> None:
    """Delete what attempts 1..``through`` of the job left (their directories) and
    the loose files of the older layout, then the job's directory if that leaves it
    empty. A later attempt's directory is kept: its attempt may be running. Nothing
    outside STORAGE_DIR/<job_id> is touched. Blocking: run it in a thread."""
    root = storage_dir.resolve()
    directory = (root / job_id).resolve()
    if directory.parent != root:
        log.warning("job %s: job directory resolves outside STORAGE_DIR; not deleted", job_id)
        return
    try:
        entries = list(directory.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return
    for entry in entries:
        match = _ATTEMPT_DIR.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink():
            if int(match.group(1)) <= through:
                shutil.rmtree(entry, ignore_errors=True)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)  # not ours to keep: no attempt writes one
        else:
            entry.unlink(missing_ok=True)  # older layout, or a symlink (removed, never followed)
    try:
        # Only if empty: a retry that made its attempt's directory since keeps it
        # (and one that makes it right after re-creates the parent: mkdir(parents=True)).
        directory.rmdir()
    except OSError:
        pass
