"""A throwaway 3-node Redis Cluster of Debian redis-server processes on loopback,
for running the job-table suite unchanged on Redis Cluster."""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from pathlib import Path


def _bindable(port: int) -> bool:
    try:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
        return True
    except OSError:
        return False


def _cluster_ports() -> list[int]:
    """Three ports whose bus ports (port + 10000) are free too, all below the
    kernel's ephemeral range (32768 and up here): a port from that range can be
    taken by any outgoing connection before the node binds it."""
    ports: list[int] = []
    while len(ports) < 3:
        port = random.randrange(20000, 22768)
        if port not in ports and _bindable(port) and _bindable(port + 10000):
            ports.append(port)
    return ports


class LocalRedisCluster:
    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.ports = _cluster_ports()
        self.procs: list[subprocess.Popen] = []

    @property
    def nodes(self) -> str:
        return ",".join(f"127.0.0.1:{p}" for p in self.ports)

    def start(self, timeout: float = 30.0) -> None:
        server = shutil.which("redis-server")
        if not server:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        for port in self.ports:
            node_dir = self.workdir / str(port)
            node_dir.mkdir(parents=True, exist_ok=True)
            self.procs.append(subprocess.Popen(
                [server, "--port", str(port), "--bind", "127.0.0.1", "--cluster-enabled", "yes",
                 "--cluster-config-file", "nodes.conf", "--dir", str(node_dir), "--save", "",
                 "--appendonly", "yes", "--appendfsync", "always"],
                stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        for port in self.ports:
            while self._cli(port, "ping").strip() != "PONG":
                if time.monotonic() > deadline:
                    raise RuntimeError(f"cluster node {port} did not answer PING")
                time.sleep(0.05)
        subprocess.run(["redis-cli", "--cluster", "create", *[f"127.0.0.1:{p}" for p in self.ports],
                        "--cluster-replicas", "0", "--cluster-yes"], check=True, capture_output=True, timeout=timeout)
        for port in self.ports:
            while "cluster_state:ok" not in self._cli(port, "cluster", "info"):
                if time.monotonic() > deadline:
                    raise RuntimeError("Redis Cluster did not reach cluster_state:ok")
                time.sleep(0.1)

    def stop(self) -> None:
        for proc in self.procs:
            proc.terminate()
        for proc in self.procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()

    @staticmethod
    def _cli(port: int, *args: str) -> str:
        done = subprocess.run(["redis-cli", "-p", str(port), *args], capture_output=True, text=True)
        return done.stdout
