"""Stage processes for end-to-end tests: real `python -m services.<stage>` processes
with their own environment, that tests can SIGKILL and start again."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path


class StageProcess:
    def __init__(self, stage: str, env: dict[str, str], logdir: Path):
        self.stage = stage
        self.env = env
        self.logdir = logdir
        self.proc: subprocess.Popen | None = None
        self.starts = 0

    def start(self, **extra_env: str) -> "StageProcess":
        self.starts += 1
        log = open(self.logdir / f"{self.stage}-{self.starts}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", f"services.{self.stage}"],
                                     env={**os.environ, **self.env, **extra_env}, stdout=log, stderr=subprocess.STDOUT)
        return self

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def wait_exit(self, timeout: float) -> int:
        return self.proc.wait(timeout=timeout)

    def kill(self) -> None:
        if self.alive:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.alive:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.kill()

    def log_tail(self, lines: int = 40) -> str:
        path = self.logdir / f"{self.stage}-{self.starts}.log"
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""
