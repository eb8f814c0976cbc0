"""Brings the local stack up, reports on it and takes it down.

A component is "ours" when its pid file names a live process of the right program,
"external" when its configured address answers but we did not start it (that is how
one points the stack at an existing Kafka or Redis), and "down" otherwise. `down`
signals only pids from our pid files, never processes found by name."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from smi.settings import Settings
from smi.stack import kafka_broker, mailsink, probes, redis_server, stripemock
from smi.stack.component import Component
from smi.stack.layout import Layout
from smi.stack.process import read_pid, spawn, stop, tail, tracked_pid
from smi.stack.topics import ensure_topics

BUILDERS: dict[str, Callable[[Settings, Layout], Component]] = {
    "kafka": kafka_broker.component,
    "redis": redis_server.component,
    "stripe-mock": stripemock.component,
    "mail": mailsink.component,
}
COMPONENT_NAMES = tuple(BUILDERS)


class StackError(Exception):
    pass


@dataclass
class ComponentState:
    name: str
    state: str  # "ours", "external" or "down"
    pid: int | None
    address: str
    answers: bool
    note: str = ""
    started: bool = False  # `up` started its process this time


@dataclass
class UpReport:
    components: list[ComponentState]
    topics_created: list[str] | None = None  # None: Kafka did not answer, topics not checked
    topics_error: str = ""

    @property
    def ok(self) -> bool:
        return all(c.answers for c in self.components) and not self.topics_error

    @property
    def started_any(self) -> bool:
        return any(c.started for c in self.components)


@dataclass
class StopResult:
    name: str
    pid: int | None  # None when the pid file held no pid
    outcome: str  # "terminated", "killed" or "stale pid file removed"


@dataclass
class Stack:
    settings: Settings
    layout: Layout
    components: list[Component]

    @classmethod
    def build(cls, only: Sequence[str] | None = None) -> Stack:
        settings, layout = Settings(), Layout.from_env()
        names = only or COMPONENT_NAMES
        return cls(settings, layout, [BUILDERS[name](settings, layout) for name in names])

    def pid_of(self, component: Component) -> int | None:
        return tracked_pid(self.layout.pid_file(component.name), component.program)

    async def status(self) -> list[ComponentState]:
        return list(await asyncio.gather(*(self._status_of(c) for c in self.components)))

    async def _status_of(self, component: Component) -> ComponentState:
        pid = self.pid_of(component)
        answers = await component.answers()
        state = "ours" if pid else "external" if answers else "down"
        return ComponentState(component.name, state, pid, component.address, answers)

    async def up(self) -> UpReport:
        outcomes = await asyncio.gather(*(self._bring_up(c) for c in self.components), return_exceptions=True)
        report = UpReport([
            outcome if isinstance(outcome, ComponentState)
            else ComponentState(c.name, "down", None, c.address, False,
                                note=str(outcome) or type(outcome).__name__)
            for c, outcome in zip(self.components, outcomes)
        ])
        kafka = next((c for c in report.components if c.name == "kafka"), None)
        if kafka is not None and kafka.answers:
            try:
                report.topics_created = await ensure_topics(self.settings)
            except Exception as exc:  # reported, and makes `up` exit non-zero
                report.topics_error = f"{type(exc).__name__}: {exc}"
        return report

    async def _bring_up(self, component: Component) -> ComponentState:
        pid_file = self.layout.pid_file(component.name)
        pid = self.pid_of(component)
        if pid is not None:
            if await component.ready():
                return ComponentState(component.name, "ours", pid, component.address, True, "already running")
            # An earlier `up` started it and it is still coming up (or hung): wait for it.
            await self._wait_ready(component, pid,
                                   exited=lambda: None if self.pid_of(component) else "process gone")
            return ComponentState(component.name, "ours", pid, component.address, True, "was starting, now ready")
        pid_file.unlink(missing_ok=True)  # stale: its process is gone or is not ours
        if await component.answers():
            return ComponentState(component.name, "external", None, component.address, True,
                                  "answering, not started by us: using it")
        if component.cannot_start:
            raise StackError(f"{component.address} does not answer and {component.cannot_start}")
        if await probes.tcp_open(component.host, component.port):
            raise StackError(f"{component.address} is taken by a program that does not answer as {component.name}")
        started = time.monotonic()
        command = await asyncio.to_thread(component.prepare)
        process = spawn(command, self.layout.log_file(component.name), pid_file)
        await self._wait_ready(component, process.pid,
                               exited=lambda: None if process.poll() is None else f"exit status {process.returncode}")
        return ComponentState(component.name, "ours", process.pid, component.address, True,
                              f"started in {time.monotonic() - started:.1f} s", started=True)

    async def _wait_ready(self, component: Component, pid: int, exited: Callable[[], str | None]) -> None:
        """Polls component.ready() until it passes; fails fast, with the tail of the
        component's log, when the process exits (exited() describes how) or the
        timeout runs out."""
        log_file = self.layout.log_file(component.name)
        deadline = time.monotonic() + component.ready_timeout
        while time.monotonic() < deadline:
            how = exited()
            if how is not None:
                self.layout.pid_file(component.name).unlink(missing_ok=True)
                raise StackError(f"exited while starting ({how}); "
                                 f"last lines of {log_file}:\n{tail(log_file)}")
            # Open port first: cheap, and keeps client libraries from logging refusals.
            if await probes.tcp_open(component.host, component.port) and await component.ready():
                return
            await asyncio.sleep(0.25)
        await asyncio.to_thread(stop, pid, component.stop_timeout)
        self.layout.pid_file(component.name).unlink(missing_ok=True)
        raise StackError(f"not ready at {component.address} after {component.ready_timeout:.0f} s (stopped it); "
                         f"last lines of {log_file}:\n{tail(log_file)}")

    def down(self) -> list[StopResult]:
        results = []
        for component in self.components:
            pid_file = self.layout.pid_file(component.name)
            if not pid_file.exists():
                continue
            recorded = read_pid(pid_file)
            pid = self.pid_of(component)
            outcome = stop(pid, component.stop_timeout) if pid else "stale pid file removed"
            pid_file.unlink(missing_ok=True)
            results.append(StopResult(component.name, recorded, outcome))
        return results
