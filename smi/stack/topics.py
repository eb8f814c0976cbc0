"""Creates the topics of the registry (schemas.topics) with the configured partition
count and replication. Faust declares only the topics it owns, and a topic the broker
auto-creates on first produce would get the broker's defaults, so the stack creates
every source and status topic up front."""

from __future__ import annotations

import logging

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType
from aiokafka.errors import TopicAlreadyExistsError, for_code

from schemas.topics import ALL_TOPICS, TopicSpec
from smi.settings import Settings

log = logging.getLogger(__name__)

# DescribeConfigs config_source of a value set on the topic itself.
DYNAMIC_TOPIC_CONFIG = 1


def topic_configs(spec: TopicSpec) -> dict[str, str]:
    """Topic-level overrides the registry asks for."""
    return {"max.message.bytes": str(spec.max_message_bytes)} if spec.max_message_bytes else {}


async def ensure_topics(settings: Settings) -> list[str]:
    """Creates the topics of ALL_TOPICS (in KAFKA_NAMESPACE) that do not exist yet and
    brings the overrides of existing ones up to the registry; returns the created
    names, as the broker has them."""
    names = settings.kafka_names
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        created = await create_missing(admin, [
            NewTopic(names.topic(spec), settings.topic_partitions, settings.topic_replication,
                     topic_configs=topic_configs(spec))
            for spec in ALL_TOPICS
        ])
        await _update_overrides(admin, {names.topic(spec): spec for spec in ALL_TOPICS
                                        if names.topic(spec) not in created})
        return created
    finally:
        await admin.close()


async def delete_namespace(settings: Settings) -> list[str]:
    """Deletes every topic of KAFKA_NAMESPACE: the registry's and those Faust made for
    the namespace's groups (``<group>-__assignor-__leader``). The groups themselves
    expire with their offsets. Refuses the empty namespace (that would be every topic)."""
    namespace = settings.kafka_namespace
    if not namespace:
        raise ValueError("no KAFKA_NAMESPACE: refusing to delete topics")
    admin = AIOKafkaAdminClient(bootstrap_servers=settings.kafka_bootstrap_servers)
    await admin.start()
    try:
        doomed = sorted(t for t in await admin.list_topics() if t.startswith(namespace))
        if doomed:
            await admin.delete_topics(doomed)
        return doomed
    finally:
        await admin.close()


async def create_missing(admin: AIOKafkaAdminClient, topics: list[NewTopic]) -> list[str]:
    """Creates those of topics that are missing. A topic created concurrently by
    someone else (TopicAlreadyExists) counts as present, not as an error."""
    existing = set(await admin.list_topics())
    missing = [t for t in topics if t.name not in existing]
    if not missing:
        return []
    response = await admin.create_topics(missing)
    created = []
    for name, code, *rest in response.topic_errors:
        if code == 0:
            created.append(name)
        elif code != TopicAlreadyExistsError.errno:
            message = rest[0] if rest and rest[0] else ""
            raise for_code(code)(f"creating topic {name}: {message}".rstrip(": "))
    return created


async def _update_overrides(admin: AIOKafkaAdminClient, specs: dict[str, TopicSpec]) -> None:
    """Sets the registry's overrides on topics (by the broker's name) created before
    the registry asked for them (e.g. a larger max.message.bytes)."""
    wanted = {name: topic_configs(spec) for name, spec in specs.items() if topic_configs(spec)}
    if not wanted:
        return
    responses = await admin.describe_configs([ConfigResource(ConfigResourceType.TOPIC, name) for name in wanted])
    changes = []
    for response in responses:
        for code, message, _type, name, entries in response.resources:
            if code != 0:
                raise for_code(code)(f"describing topic {name}: {message}")
            # AlterConfigs replaces all of a topic's overrides: send the ones it has too.
            current = {key: value for key, value, _ro, source, *_ in entries if source == DYNAMIC_TOPIC_CONFIG}
            if any(current.get(key) != value for key, value in wanted[name].items()):
                changes.append(ConfigResource(ConfigResourceType.TOPIC, name, {**current, **wanted[name]}))
    if not changes:
        return
    for response in await admin.alter_configs(changes):
        for code, message, _type, name in response.resources:
            if code != 0:
                raise for_code(code)(f"updating topic {name}: {message}")
    log.info("updated topic overrides: %s", ", ".join(c.name for c in changes))
