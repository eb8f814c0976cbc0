"""A stack of the chaos run's own: Kafka, Redis and stripe-mock on free ports in a
var directory of its own, brought up and down with `smi stack` (so the commands,
data directories and pid files are the ones `make run` uses), never the shared
development stack (9092, 6379, 12111, 2525), which the run kills and restarts."""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHARED_PORTS = frozenset({9092, 9093, 6379, 12111, 12112, 2525, 8080})
COMPONENTS = ("kafka", "redis", "stripe-mock")  # mail: the run's own sink, in its process
STACK_TIMEOUT = 300.0


class StackFailure(RuntimeError):
    pass


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def pick_ports(count: int, port_range: tuple[int, int], rng: random.Random, *, pairs: int = 0) -> list[int]:
    """``count`` free ports in ``port_range`` (inclusive); the first ``pairs`` of
    them with the next port free too (Kafka's controller, stripe-mock's HTTPS)."""
    low, high = port_range
    chosen: list[int] = []
    taken: set[int] = set()
    for n in range(count):
        need_pair = n < pairs
        for _ in range(2000):
            port = rng.randint(low, high - 1)
            span = {port, port + 1} if need_pair else {port}
            if span & taken or span & SHARED_PORTS or not all(_bindable(p) for p in span):
                continue
            chosen.append(port)
            taken |= span
            break
        else:
            raise StackFailure(f"no free port in {low}-{high}")
    return chosen


@dataclass
class OwnStack:
    var_dir: Path
    kafka_port: int
    redis_port: int
    stripe_port: int

    @classmethod
    def on_free_ports(cls, var_dir: Path, port_range: tuple[int, int], rng: random.Random) -> OwnStack:
        kafka, stripe, redis = pick_ports(3, port_range, rng, pairs=2)
        return cls(var_dir, kafka, redis, stripe)

    @property
    def bootstrap(self) -> str:
        return f"127.0.0.1:{self.kafka_port}"

    @property
    def redis_url(self) -> str:
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def stripe_url(self) -> str:
        return f"http://127.0.0.1:{self.stripe_port}"

    def env(self) -> dict[str, str]:
        """What every process of the run gets: our addresses, never the defaults."""
        path = os.environ.get("PATH", "")
        extra = [p for p in ("/usr/local/go/bin", str(Path.home() / "go" / "bin")) if p not in path.split(":")]
        return {"SMI_VAR_DIR": str(self.var_dir), "KAFKA_BOOTSTRAP_SERVERS": self.bootstrap,
                "REDIS_URL": self.redis_url, "REDIS_CLUSTER_NODES": "", "REDIS_NAMESPACE": "",
                "STRIPE_API_BASE": self.stripe_url, "PATH": ":".join([path, *extra]).strip(":"),
                "PYTHONUNBUFFERED": "1"}

    # -- smi stack ---------------------------------------------------------------

    async def smi(self, *args: str, timeout: float = STACK_TIMEOUT) -> str:
        """`python -m smi.cli <args>` with our environment; its output, or StackFailure."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "smi.cli", *args, cwd=REPO, env={**os.environ, **self.env()},
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout)
        except TimeoutError:
            proc.kill()
            await proc.wait()
            raise StackFailure(f"smi {' '.join(args)}: no answer after {timeout:.0f}s") from None
        text = out.decode(errors="replace")
        if proc.returncode:
            raise StackFailure(f"smi {' '.join(args)} exited {proc.returncode}:\n{text}")
        return text

    async def up(self, only: tuple[str, ...] = COMPONENTS) -> None:
        await self.smi("stack", "up", "--only", ",".join(only))
        await self.require_ours(only)

    async def require_ours(self, only: tuple[str, ...] = COMPONENTS) -> None:
        """Started by us (a pid file of this var dir): an "external" answer on a port
        we picked would be someone else's server, and we kill what we use."""
        status = json.loads(await self.smi("stack", "status", "--json", "--only", ",".join(only)))
        foreign = {name: c["state"] for name, c in status["components"].items() if c["state"] != "ours"}
        if foreign:
            raise StackFailure(f"components not started by this run: {foreign}")

    async def down(self) -> str:
        return await self.smi("stack", "down", "--only", ",".join(COMPONENTS))

    def pid(self, component: str) -> int | None:
        try:
            return int((self.var_dir / "run" / f"{component}.pid").read_text().split()[0])
        except (FileNotFoundError, IndexError, ValueError):
            return None

    def log_file(self, component: str) -> Path:
        return self.var_dir / "log" / f"{component}.log"

    # -- faults ------------------------------------------------------------------

    async def kill_redis(self) -> float:
        """SIGKILL our redis-server, then start it again from its AOF (same command
        line and directory: `smi stack up --only redis`). Returns seconds down."""
        pid = self.pid("redis")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode() if pid else ""
        if not pid or "redis-server" not in cmdline or f":{self.redis_port}" not in cmdline:
            raise StackFailure(f"no redis-server of ours to kill (pid {pid}, {cmdline!r})")
        started = time.monotonic()
        os.kill(pid, signal.SIGKILL)
        await _gone(pid, 10)
        await self.up(("redis",))
        return time.monotonic() - started

    async def restart_kafka(self) -> float:
        """Stop the broker (SIGTERM: a controlled shutdown) and start it again.
        Returns seconds down."""
        started = time.monotonic()
        await self.smi("stack", "down", "--only", "kafka")
        await self.up(("kafka",))
        return time.monotonic() - started


async def _gone(pid: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return
        if state in ("Z", "X"):
            return
        await asyncio.sleep(0.05)
