"""smi.kafka.names: KAFKA_NAMESPACE in front of topics and groups, and back off."""

from __future__ import annotations

import pytest

from schemas.topics import JOBS_REQUESTED
from smi.kafka.names import DEFAULT, KafkaNames
from smi.settings import Settings


@pytest.mark.parametrize("bad", ["has space", "a/b", "x" * 101, "ünï", "a:b"])
def test_a_namespace_kafka_would_refuse_is_refused_with_the_variable_named(bad):
    with pytest.raises(ValueError, match="KAFKA_NAMESPACE"):
        KafkaNames(bad)
    with pytest.raises(ValueError, match="KAFKA_NAMESPACE"):
        Settings(kafka_namespace=bad)


def test_names_go_in_front_of_topics_and_groups_and_come_off_again():
    names = Settings(kafka_namespace="prod-eu.").kafka_names
    assert names.topic(JOBS_REQUESTED) == names.topic("jobs.requested") == "prod-eu.jobs.requested"
    assert names.group("checkout") == "prod-eu.checkout"
    assert names.local("prod-eu.jobs.requested") == "jobs.requested"
    assert names.local("jobs.requested") == "jobs.requested"  # not of the namespace: as it is
    assert names.local("prod-eu.") == ""


def test_without_a_namespace_names_are_the_registry_names(monkeypatch):
    monkeypatch.delenv("KAFKA_NAMESPACE", raising=False)
    assert DEFAULT == Settings().kafka_names
    assert DEFAULT.topic(JOBS_REQUESTED) == "jobs.requested" and DEFAULT.group("notifier") == "notifier"
    assert DEFAULT.local("prod-eu.jobs.requested") == "prod-eu.jobs.requested"
