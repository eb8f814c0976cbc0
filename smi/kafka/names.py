"""The Kafka names of one deployment: ``KAFKA_NAMESPACE`` goes in front of every
topic and consumer group, so several deployments (staging next to production, one
shop per tenant, a test session next to a bench) share a cluster without reading
each other's messages or joining each other's groups. It is Kafka's counterpart of
REDIS_NAMESPACE.

The code speaks of topics by their registry names (schemas/topics.py) and of groups
by stage names; this is the one place that turns them into what the broker holds,
at the edge: the producer, the stage agents, the topic creation, the lag reader."""

from __future__ import annotations

import re
from dataclasses import dataclass

from schemas.topics import TopicSpec

# Kafka's legal topic characters, and room left for the registry names (249 at most).
NAMESPACE = re.compile(r"[A-Za-z0-9._-]{0,100}")


def check_namespace(namespace: str) -> str:
    if not NAMESPACE.fullmatch(namespace):
        raise ValueError("KAFKA_NAMESPACE may hold up to 100 of the characters a Kafka topic name may: "
                         "letters, digits, '.', '_' and '-'")
    return namespace


@dataclass(frozen=True)
class KafkaNames:
    namespace: str = ""

    def __post_init__(self) -> None:
        check_namespace(self.namespace)

    def topic(self, topic: TopicSpec | str) -> str:
        """The broker's name of a registry topic (or of a topic named by its registry name)."""
        return self.namespace + (topic if isinstance(topic, str) else topic.name)

    def group(self, stage: str) -> str:
        """The consumer group (the Faust app id) of a stage."""
        return self.namespace + stage

    def local(self, name: str) -> str:
        """A broker's topic or group name without the namespace (as handlers, dead
        letters and metrics speak of it); a name outside the namespace as it is."""
        return name[len(self.namespace):] if self.namespace and name.startswith(self.namespace) else name


DEFAULT = KafkaNames()
