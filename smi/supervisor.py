"""`smi run all`: every stage as its own process under one small supervisor. Output
is one stream with a stage prefix per line; a stage that dies is restarted with
backoff; Ctrl-C (or SIGTERM) stops them all gracefully."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Awaitable, Callable

RESTART_BACKOFF = (1, 2, 4, 8, 16, 30)  # seconds; reset once a stage has run a minute
STABLE_AFTER_SECONDS = 60
STOP_TIMEOUT_SECONDS = 20


class Supervisor:
    def __init__(self, stages: list[str], env: dict[str, str] | None = None,
                 companion: Callable[[], Awaitable[int]] | None = None, stop_after_companion: bool = False):
        """``companion`` runs beside the stages once they are started (the demo);
        with ``stop_after_companion`` its exit code ends the whole run."""
        self.stages = stages
        self.companion = companion
        self.stop_after_companion = stop_after_companion
        self.exit_code = 0
        self.env = {**os.environ, **(env or {}), "PYTHONUNBUFFERED": "1"}
        self.procs: dict[str, asyncio.subprocess.Process] = {}
        self.stopping = asyncio.Event()

    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        tasks = [self._keep_running(stage) for stage in self.stages]
        if self.companion is not None:
            tasks.append(self._run_companion())
        await asyncio.gather(*tasks)
        return self.exit_code

    async def _run_companion(self) -> None:
        try:
            self.exit_code = await self.companion()
        except Exception as exc:
            print(f"demo failed: {exc}", flush=True)
            self.exit_code = 1
        if self.stop_after_companion:
            self.stopping.set()

    async def _keep_running(self, stage: str) -> None:
        failures = 0
        while not self.stopping.is_set():
            started = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", f"services.{stage}", env=self.env,
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
