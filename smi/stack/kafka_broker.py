"""A single-node Apache Kafka broker in KRaft mode (broker and controller in one
process), run from the jars of kafka-pom.xml, fetched once by Maven into the cache."""

from __future__ import annotations

import hashlib
import shutil
import subprocess
import xml.etree.ElementTree as ET
from functools import partial
from pathlib import Path

from smi.settings import Settings
from smi.stack import probes
from smi.stack.component import Component, not_loopback, split_host_port
from smi.stack.layout import Layout

POM = Path(__file__).with_name("kafka-pom.xml")
LOG4J2_CONFIG = Path(__file__).with_name("log4j2.properties")
# -Xmx bounds the heap (the JVM would otherwise take a quarter of RAM); ≤ 1 GiB.
BROKER_JVM = ["-Xms512m", "-Xmx768m", "-XX:+UseG1GC", "-Djava.awt.headless=true"]
TOOL_JVM = ["-Xmx256m", "-Djava.awt.headless=true"]


def kafka_version() -> str:
    """The version pinned in kafka-pom.xml, so the pom stays the one place to change it."""
    ns = {"m": "http://maven.apache.org/POM/4.0.0"}
    return ET.parse(POM).getroot().findtext("m:properties/m:kafka.version", namespaces=ns)


def ensure_libs(cache_dir: Path) -> Path:
    """The directory of broker jars, fetched by Maven unless a complete copy for this
    exact pom is cached (the marker holds the pom's hash and is written last)."""
    libs = cache_dir / f"kafka-{kafka_version()}" / "libs"
    marker = libs.parent / "libs.complete"
    pom_hash = hashlib.sha256(POM.read_bytes()).hexdigest()
    if marker.is_file() and marker.read_text().strip() == pom_hash:
        return libs
    if shutil.which("mvn") is None:
        raise RuntimeError("mvn not found: install Maven (apt-get install maven) to fetch Kafka")
    # Fetch into a scratch directory and swap it in, so an interrupted download
    # never leaves a half-filled libs/ that looks usable.
    scratch = libs.with_name("libs.partial")
    shutil.rmtree(scratch, ignore_errors=True)
    _run(["mvn", "-q", "-B", "-f", str(POM), "dependency:copy-dependencies",
          f"-DoutputDirectory={scratch}", "-DincludeScope=runtime"], "fetching Kafka jars with Maven")
    shutil.rmtree(libs, ignore_errors=True)
    scratch.rename(libs)
    marker.write_text(pom_hash + "\n")
    return libs


def server_properties(host: str, port: int, data_dir: Path) -> str:
    controller = f"{host}:{port + 1}"
    return "\n".join([
        "process.roles=broker,controller",
        "node.id=1",
        f"controller.quorum.voters=1@{controller}",
        f"listeners=PLAINTEXT://{host}:{port},CONTROLLER://{controller}",
        f"advertised.listeners=PLAINTEXT://{host}:{port}",
        "controller.listener.names=CONTROLLER",
        "inter.broker.listener.name=PLAINTEXT",
        "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT",
        f"log.dirs={data_dir}",
        # One node: every internal topic can have only one replica.
        "offsets.topic.replication.factor=1",
        "transaction.state.log.replication.factor=1",
        "transaction.state.log.min.isr=1",
        "share.coordinator.state.topic.replication.factor=1",
        "share.coordinator.state.topic.min.isr=1",
        # Consumers join at once instead of waiting 3 s for more members.
        "group.initial.rebalance.delay.ms=0",
        "num.partitions=6",
        "auto.create.topics.enable=true",
        "",
    ])


def prepare(host: str, port: int, layout: Layout) -> list[str]:
    if shutil.which("java") is None:
        raise RuntimeError("java not found: install a JRE 17+ (apt-get install default-jre-headless)")
    libs = ensure_libs(layout.cache_dir)
    classpath = f"{libs}/*"
    home = layout.data_dir("kafka")
    data_dir = home / "data"
    home.mkdir(parents=True, exist_ok=True)
    props = home / "server.properties"
    props.write_text(server_properties(host, port, data_dir))

    cluster_id_file = home / "cluster-id"
    if not cluster_id_file.is_file():
        cluster_id = _run(["java", *TOOL_JVM, "-cp", classpath, "kafka.tools.StorageTool", "random-uuid"],
                          "generating a Kafka cluster id").strip()
        cluster_id_file.write_text(cluster_id + "\n")
    # Formatting writes meta.properties; once it exists the storage is ours and
    # formatting again would only cost a JVM start.
    if not (data_dir / "meta.properties").is_file():
        _run(["java", *TOOL_JVM, "-cp", classpath, "kafka.tools.StorageTool", "format",
              "-t", cluster_id_file.read_text().strip(), "-c", str(props), "--ignore-formatted"],
             "formatting Kafka storage")
    return ["java", *BROKER_JVM, f"-Dlog4j2.configurationFile={LOG4J2_CONFIG}",
            "-cp", classpath, "kafka.Kafka", str(props)]


def component(settings: Settings, layout: Layout) -> Component:
    bootstrap = settings.kafka_bootstrap_servers
    host, port = split_host_port(bootstrap.split(",")[0], 9092)
    return Component(
        name="kafka",
        program="kafka.Kafka",
        host=host,
        port=port,
        answers=partial(probes.kafka_metadata, bootstrap),
        ready=partial(probes.kafka_roundtrip, bootstrap),
        prepare=partial(prepare, host, port, layout),
        cannot_start=not_loopback(host, "KAFKA_BOOTSTRAP_SERVERS"),
        ready_timeout=120.0,
        stop_timeout=30.0,
    )


def _run(command: list[str], what: str) -> str:
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError(f"{what} failed (exit {result.returncode}):\n{result.stdout}{result.stderr}")
    return result.stdout


if __name__ == "__main__":
    # .ci/run fetches the jars as a step of its own, so a slow download shows up there.
    print(ensure_libs(Layout.from_env().cache_dir))
