"""`smi run all`: every stage as its own process under one small supervisor. Output
is one stream with a stage prefix per line; a stage that dies is restarted with
backoff; Ctrl-C (or SIGTERM) stops them all gracefully.

A stage may run as several worker processes (``--workers checkout=2``), so a stage
that holds one core can use more where the machine has them. A Faust stage's
workers join its consumer group and split its partitions; the gateway's share its
port (SO_REUSEPORT) and its rate limits (kept in Redis). Worker N of a stage
serves its metrics 100 × (N − 1) above the stage's port (checkout's second on
9201; the gateway's workers on 9105, 9205, ...), so a scrape configuration can
name every one."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from dataclasses import dataclass
from typing import Awaitable, Callable, Mapping

RESTART_BACKOFF = (1, 2, 4, 8, 16, 30)  # seconds; reset once a stage has run a minute
STABLE_AFTER_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20
MAX_WORKERS = 32  # per stage: past the partitions (TOPIC_PARTITIONS, 6) a worker only idles


@dataclass(frozen=True)
class Worker:
    """One process of a stage: ``number`` 1 is the stage's first (its name alone in
    the output), 2 and up are more workers of the same consumer group."""

    stage: str
    number: int = 1

    @property
    def label(self) -> str:
        return self.stage if self.number == 1 else f"{self.stage}.{self.number}"


def workers_of(stages: list[str], counts: Mapping[str, int] | None = None) -> list[Worker]:
    """Every stage's workers, one unless ``counts`` says more."""
    counts = counts or {}
    unknown = set(counts) - set(stages)
    if unknown:
        raise ValueError(f"no stage {', '.join(sorted(unknown))} to run more workers of")
    return [Worker(stage, n) for stage in stages for n in range(1, counts.get(stage, 1) + 1)]


class Supervisor:
    def __init__(self, stages: list[str], env: dict[str, str] | None = None,
                 companion: Callable[[], Awaitable[int]] | None = None, stop_after_companion: bool = False,
                 workers: Mapping[str, int] | None = None):
        """``companion`` runs beside the stages once they are started (the demo);
        with ``stop_after_companion`` its exit code ends the whole run. ``workers``:
        processes per stage where more than one."""
        self.stages = stages
        self.workers = workers_of(stages, workers)
        self.shared_port = (workers or {}).get("gateway", 1) > 1
        self.companion = companion
        self.stop_after_companion = stop_after_companion
        self.exit_code = 0
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, asyncio.subprocess.Process] = {}  # by worker label
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        try:
            tasks = [self._keep_running(worker) for worker in self.workers]
            if self.companion is not None:
                tasks.append(self._run_companion())
            await asyncio.gather(*tasks)
        finally:
            # The loop may go on (a test's): Ctrl-C is its own again.
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
        return self.exit_code

    async def _run_companion(self) -> None:
        try:
            self.exit_code = await self.companion()
        except Exception as exc:
            print(f"demo failed: {exc}", flush=True)
            self.exit_code = 1
        if self.stop_after_companion:
            self.stopping.set()

    async def _keep_running(self, worker: Worker) -> None:
        stage = worker.label
        # Two exporters cannot share a port: worker N serves its metrics on its own,
        # stepped up from the stage's (smi.settings.Settings.metrics_port_for).
        env = {**self.env, "WORKER_NUMBER": str(worker.number)}
        if worker.stage == "gateway" and self.shared_port:
            env["GATEWAY_REUSE_PORT"] = "1"
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{worker.stage}", env=env,
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
            self.procs[stage] = proc
            self._say(stage, f"started (pid {proc.pid})")
            copy = asyncio.create_task(self._copy_output(stage, proc))
            stop = asyncio.create_task(self.stopping.wait())
            await asyncio.wait([asyncio.create_task(proc.wait()), stop], return_when=asyncio.FIRST_COMPLETED)
            if self.stopping.is_set():
                await self._stop(stage, proc)
                await copy
                return
            stop.cancel()
            await copy
            failures = 0 if time.monotonic() - started > STABLE_AFTER_SECONDS else failures + 1
            delay = RESTART_BACKOFF[min(failures, len(RESTART_BACKOFF) - 1)]
            self._say(stage, f"exited with {proc.returncode}; restarting in {delay}s")
            try:
                await asyncio.wait_for(self.stopping.wait(), delay)
            except TimeoutError:
                pass

    async def _stop(self, stage: str, proc: asyncio.subprocess.Process) -> None:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), STOP_TIMEOUT_SECONDS)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        self._say(stage, f"stopped ({proc.returncode})")

    async def _copy_output(self, stage: str, proc: asyncio.subprocess.Process) -> None:
        async for line in proc.stdout:
            self._say(stage, line.decode(errors="replace").rstrip())

    @staticmethod
    def _say(stage: str, text: str) -> None:
        print(f"{stage:>9} | {text}", flush=True)


def parse_workers(specs: list[str], stages: tuple[str, ...]) -> dict[str, int]:
    """``["checkout=2", "notifier=2,processor=3"]`` → ``{"checkout": 2, ...}``; a
    ValueError that says what is wrong otherwise."""
    counts: dict[str, int] = {}
    for spec in specs:
        for part in spec.split(","):
            stage, sep, number = part.strip().partition("=")
            if not sep or not stage:
                raise ValueError(f"--workers takes STAGE=N, e.g. checkout=2; got {part.strip()!r}")
            if stage not in stages:
                raise ValueError(f"--workers: {stage!r} is not one of {', '.join(stages)}")
            if not number.isdigit() or not 1 <= int(number) <= MAX_WORKERS:
                raise ValueError(f"--workers {stage}: N must be a whole number from 1 to {MAX_WORKERS}, "
                                 f"not {number!r}")
            if stage in counts:
                raise ValueError(f"--workers names {stage} twice")
            counts[stage] = int(number)
    return counts
