"""Background processes tracked by pid files. A pid is trusted only while
/proc/<pid>/cmdline still names the program we started, so a stale pid file whose
pid was reused never makes us signal someone else's process."""

from __future__ import annotations

import os
import shlex
import signal
import subprocess
import time
from datetime import datetime, timezone
from pathlib import Path


def read_pid(pid_file: Path) -> int | None:
    try:
        return int(pid_file.read_text().split()[0])
    except (FileNotFoundError, IndexError, ValueError):
        return None


def write_pid(pid_file: Path, pid: int) -> None:
    pid_file.parent.mkdir(parents=True, exist_ok=True)
    tmp = pid_file.with_name(f".{pid_file.name}.tmp")
    tmp.write_text(f"{pid}\n")
    os.replace(tmp, pid_file)


def is_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds no ports
    and will never answer; os.kill(pid, 0) alone would call it alive)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    state = stat.rsplit(")", 1)[1].split()[0]
    return state not in ("Z", "X")


def cmdline(pid: int) -> str:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace")


def tracked_pid(pid_file: Path, program: str) -> int | None:
    """The pid in pid_file if that process is alive and still runs `program`."""
    pid = read_pid(pid_file)
    if pid is not None and is_alive(pid) and program in cmdline(pid):
        return pid
    return None


def spawn(command: list[str], log_file: Path, pid_file: Path) -> subprocess.Popen:
    """Start command in its own session (so the terminal's Ctrl-C and the end of
    the `smi` process leave it running), output appended to log_file."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with log_file.open("ab") as log:
        stamp = datetime.now(timezone.utc).isoformat(timespec="seconds")
        log.write(f"\n=== {stamp} smi stack: {shlex.join(command)}\n".encode())
        log.flush()
        proc = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    write_pid(pid_file, proc.pid)
    return proc


def stop(pid: int, timeout: float) -> str:
    """SIGTERM, then SIGKILL if it is still alive after timeout seconds.
    Returns how it ended: "terminated" or "killed"."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return "terminated"
    if _wait_gone(pid, timeout):
        return "terminated"
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        return "terminated"
    _wait_gone(pid, 10)
    return "killed"


def _wait_gone(pid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not is_alive(pid):
            return True
        time.sleep(0.05)
    return not is_alive(pid)


def tail(path: Path, lines: int = 40) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 64 * 1024))
            text = f.read().decode(errors="replace")
    except FileNotFoundError:
        return f"({path} does not exist)"
    return "\n".join(text.splitlines()[-lines:])
