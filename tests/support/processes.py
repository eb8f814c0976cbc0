"""Stage processes for end-to-end tests: real `python -m services.<stage>` processes
with their own environment, that tests can SIGKILL and start again.

A StageProcess is one stage: by default one process, or ``workers`` processes of
the same stage (one consumer group, to scale out), handled as one. Every start
writes one log, ``<stage>-<start>.log`` in ``logdir``, shared by the start's
workers: opened for appending, so their lines interleave whole."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path


class StageProcess:
    def __init__(self, stage: str, env: dict[str, str], logdir: Path, *, workers: int = 1):
        if workers < 1:
            raise ValueError("a stage runs at least one process")
        self.stage = stage
        self.env = env
        self.logdir = logdir
        self.workers = workers
        self.procs: list[subprocess.Popen] = []
        self.starts = 0

    @property
    def proc(self) -> subprocess.Popen | None:
        """The first worker (the only one, by default)."""
        return self.procs[0] if self.procs else None

    @property
    def log_path(self) -> Path:
        """The log of the latest start (all its workers)."""
        return self.logdir / f"{self.stage}-{self.starts}.log"

    def start(self, **extra_env: str) -> "StageProcess":
        """Start the stage's workers, with ``extra_env`` on top of its environment
        (a crash point applies to every worker). Workers still running from the
        last start are killed first: a start is always the whole stage afresh."""
        self.kill()
        self.starts += 1
        env = {**os.environ, **self.env, **extra_env}
        if self.workers > 1:
            env.setdefault("METRICS_PORT", "0")  # one fixed port per stage: the others would only warn
        with open(self.log_path, "ab") as log:
            self.procs = [subprocess.Popen([sys.executable, "-m", f"services.{self.stage}"], env=env, stdout=log,
                                           stderr=subprocess.STDOUT) for _ in range(self.workers)]
        return self

    @property
    def alive(self) -> bool:
        """Every worker of the latest start is running."""
        return bool(self.procs) and all(proc.poll() is None for proc in self.procs)

    def wait_exit(self, timeout: float) -> int:
        """The exit code of the first worker to exit. The stage is then down as a
        whole, as one process would be: the other workers are SIGKILLed at once, before
        the group hands them the dead one's partitions (so a crash point is passed
        once, not once a worker)."""
        deadline = time.monotonic() + timeout
        while True:
            for proc in self.procs:
                code = proc.poll()
                if code is not None:
                    self.kill()
                    return code
            if time.monotonic() > deadline:
                raise subprocess.TimeoutExpired(f"services.{self.stage}", timeout)
            time.sleep(0.05)

    def kill(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
        for proc in self.procs:
            proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (a graceful leave of the group) to every worker at once; SIGKILL
        to one that has not exited after 20 s."""
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 20
        for proc in self.procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)

    def log_text(self) -> str:
        path = self.log_path
        return path.read_text(errors="replace") if path.exists() else ""

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])
