"""The stage processes of a chaos run: `python -m services.<stage>`, each with a
log file per start, that the driver SIGKILLs and starts again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from chaos.stack import REPO

STAGES = ("checkout", "processor", "notifier", "janitor", "gateway")


@dataclass
class Worker:
    """One process of a stage (``name`` tells two workers of one stage apart)."""
    name: str
    stage: str
    env: dict[str, str]
    logdir: Path
    proc: subprocess.Popen | None = None
    starts: int = 0
    exits: list[int | None] = field(default_factory=list)  # return codes of exits we did not cause
    wanted: bool = False  # should be running (the supervisor restarts it otherwise)

    def start(self) -> Worker:
        self.starts += 1
        self.logdir.mkdir(parents=True, exist_ok=True)
        with (self.logdir / f"{self.name}-{self.starts}.log").open("wb") as log:
            # Its own session: a Ctrl-C at the terminal reaches the driver, which
            # tears everything down in order, not the stages behind its back.
            self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.stage}"], cwd=REPO,
                                         env={**os.environ, **self.env}, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True)
        self.wanted = True
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def kill(self) -> None:
        """SIGKILL, no warning: whatever it was doing stops mid-step."""
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        self.wanted = False
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 30) -> str:
        path = self.logdir / f"{self.name}-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


def stop_all(workers: list[Worker], timeout: float = 15.0) -> None:
    """SIGTERM to all at once, then wait; SIGKILL what is left."""
    for worker in workers:
        worker.wanted = False
        if worker.alive:
            worker.proc.terminate()
    deadline = time.monotonic() + timeout
    for worker in workers:
        if worker.proc is None:
            continue
        try:
            worker.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            worker.kill()
