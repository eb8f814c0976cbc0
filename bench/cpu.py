"""Where a pipeline phase spends its time: the CPU each process used during the
phase (from /proc, so no agent in the processes), and, when py-spy is installed,
a sampled profile of the stage that owns the phase.

The bottleneck read-out follows from the numbers: a process near one full core is
CPU-bound (Python runs one thread at a time); if none is, the phase waits on
something (round trips, a pool, the broker) and the profile shows where."""

from __future__ import annotations

import asyncio
import collections
import os
import shutil
import signal
import tempfile
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from smi.stack.layout import Layout
from smi.supervisor import Worker

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
# The stage whose handlers do a phase's work (the gateway also takes the webhooks).
PHASE_OWNERS = {
    "request_to_awaiting_payment": "checkout",
    "webhook_to_pending": "checkout",
    "pending_to_completed": "processor",
    "request_to_email": "notifier",
    "alone_request_to_awaiting_payment": "checkout",
    "alone_webhook_to_pending": "checkout",
    "alone_pending_to_completed": "processor",
    "alone_completed_to_email": "notifier",
}
SATURATED = 0.85  # of one core
OUR_CODE = ("(services/", "(smi/", "(schemas/", "/services/", "/smi/", "/schemas/")


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of one process, None once it is gone (its live
    children, e.g. a process pool's workers, are added by ``_tree_cpu``)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / CLOCK_TICKS


def children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(p) for p in (task / "children").read_text().split()]
        except OSError:
            continue
    return found


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


def system_processes(supervisor_pid: int, layout: Layout | None = None) -> dict[str, int]:
    """name → pid: the stages under `smi run all` (a stage's second and later
    workers as "<stage>.2", ...; a process's own children, e.g. the local
    upscaler's pool, count with it), Kafka and Redis."""
    found: dict[str, int] = {}
    seen: collections.Counter[str] = collections.Counter()
    # By pid: pids rise in the order the supervisor starts its workers (until one restarts).
    for pid in sorted(children(supervisor_pid)):
        line = command_line(pid)
        stage = next((part.split(".", 1)[1] for part in line if part.startswith("services.")), None)
        if stage:
            seen[stage] += 1
            found[Worker(stage, seen[stage]).label] = pid  # the supervisor's own names
    return found | stack_processes(layout)


def stack_processes(layout: Layout | None = None) -> dict[str, int]:
    """name → pid of the stack's Kafka and Redis (those `smi stack` runs)."""
    found: dict[str, int] = {}
    layout = layout or Layout.from_env()
    for component in ("kafka", "redis"):
        try:
            found[component] = int(layout.pid_file(component).read_text().split()[0])
        except (OSError, ValueError, IndexError):
            pass
    return found


def machine_busy_seconds() -> float:
    """CPU seconds the whole machine spent busy since boot, every core (/proc/stat:
    all but idle and iowait): what the bench itself, its profiler and anything else
    on the machine use counts too."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    # guest time is counted in user already (fields 8 and 9)
    return (sum(fields[:8]) - idle) / CLOCK_TICKS


def _tree_cpu(pid: int) -> float:
    """A process's CPU plus that of its live children (a stage's process pool)."""
    total = cpu_seconds(pid) or 0.0
    for child in children(pid):
        total += cpu_seconds(child) or 0.0
    return total


@dataclass
class CpuWindow:
    """CPU use per process between ``start`` and ``stop``, in cores (1.0 = one
    core busy the whole time)."""

    processes: Mapping[str, int]
    started: dict[str, float] | None = None
    start_time: float = 0.0
    seconds: float = 0.0  # the window's length, once stopped
    machine: float | None = None  # cores the whole machine used, once stopped
    _machine_started: float = 0.0

    def start(self) -> CpuWindow:
        self.start_time = asyncio.get_running_loop().time()
        self.started = {name: _tree_cpu(pid) for name, pid in self.processes.items()}
        self._machine_started = machine_busy_seconds()
        return self

    def stop(self) -> dict[str, float]:
        self.seconds = wall = asyncio.get_running_loop().time() - self.start_time
        if wall <= 0 or self.started is None:
            return {}
        self.machine = round((machine_busy_seconds() - self._machine_started) / wall, 2)
        return {name: round((_tree_cpu(pid) - self.started[name]) / wall, 2)
                for name, pid in self.processes.items()}


def bottleneck(phase: str, cores: Mapping[str, float], machine: float | None = None) -> str:
    """One sentence: which process limits the phase, by its CPU use; or the machine,
    when its cores are all but used up (``machine``: the cores every process on it
    used, the bench's own included; else the sum of ``cores``)."""
    if not cores:
        return "no CPU figures"
    busiest, used = max(cores.items(), key=lambda item: item[1])
    owner = PHASE_OWNERS.get(phase)
    if used >= SATURATED:
        return f"{busiest} is CPU-bound ({used:.2f} of one core)"
    ours = sum(cores.values())
    machine = max(machine or 0.0, ours)
    if machine >= SATURATED * (os.cpu_count() or 1):
        rest = f", the system's processes {ours:.2f}" if machine - ours >= 0.05 else ""
        return (f"the machine is CPU-bound ({machine:.2f} of {os.cpu_count()} cores in use{rest}; "
                f"{busiest} the busiest)")
    who = owner or busiest
    return (f"no process is CPU-bound (busiest {busiest} at {used:.2f} of a core): {who} waits, "
            f"on round trips or its worker pool; see its profile")


def cpu_per_item(entry: Mapping, count: int | None) -> dict[str, float]:
    """CPU milliseconds per item each process spent in a phase: unlike a rate, this
    barely moves when other work shares the machine, so runs compare."""
    if not count:
        return {}
    seconds = entry.get("seconds") or 0
    return {name: round(cores * seconds * 1000 / count, 3) for name, cores in entry.get("cores", {}).items()}


def py_spy() -> str | None:
    return shutil.which("py-spy")


class Profiler:
    """py-spy sampling one process from ``start`` until ``stop`` (SIGINT makes it
    write what it has): the functions with the most samples on top of the stack
    (self) and, among ours, anywhere on it (inclusive)."""

    def __init__(self, pid: int):
        self.pid = pid
        self._dir = Path(tempfile.mkdtemp(prefix="smi-bench-profile-"))
        self._proc: asyncio.subprocess.Process | None = None

    async def start(self) -> Profiler:
        spy = py_spy()
        if spy is not None:
            self._proc = await asyncio.create_subprocess_exec(
                spy, "record", "-p", str(self.pid), "-d", "3600", "-f", "raw", "-o", str(self._dir / "raw"),
                "--nonblocking", stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL)
        return self

    async def stop(self, *, top: int = 12) -> dict[str, list[tuple[str, float]]] | None:
        try:
            if self._proc is None:
                return None
            if self._proc.returncode is None:
                self._proc.send_signal(signal.SIGINT)
                try:
                    await asyncio.wait_for(self._proc.wait(), 30)
                except TimeoutError:
                    self._proc.kill()
                    return None
            out = self._dir / "raw"
            return summarize(out.read_text(), top=top) if out.exists() else None
        finally:
            shutil.rmtree(self._dir, ignore_errors=True)


def summarize(raw: str, *, top: int = 12) -> dict[str, list[tuple[str, float]]]:
    """py-spy's raw (collapsed stack) output as percentages of the samples."""
    own: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for frame in set(frames):
            if any(part in frame for part in OUR_CODE):
                inclusive[frame] += n
    if not total:
        return {"self": [], "ours_inclusive": []}

    def share(counter: collections.Counter[str]) -> list[tuple[str, float]]:
        return [(frame, round(100 * n / total, 1)) for frame, n in counter.most_common(top)]
    return {"self": share(own), "ours_inclusive": share(inclusive)}


@asynccontextmanager
async def phase_watch(processes: dict[str, int], into: dict, profile: bool, phase: str):
    """CPU use per process during a phase, the bottleneck it points at, and (with
    --profile and py-spy) a profile of the stage that owns the phase."""
    window = CpuWindow(processes).start()
    owner = PHASE_OWNERS.get(phase)
    profiler = await Profiler(processes[owner]).start() if profile and owner in processes else None
    try:
        yield
    finally:
        cores = window.stop()
        into[phase] = entry = {"cores": cores, "machine_cores": window.machine,
                               "seconds": round(window.seconds, 2),
                               "bottleneck": bottleneck(phase, cores, window.machine)}
        if profiler is not None:
            summary = await profiler.stop()
            if summary:
                entry["profile"] = {"stage": owner, **summary}
