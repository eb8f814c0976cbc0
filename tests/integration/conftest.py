"""Fixtures for tests against the real Redis (and a real 3-node Redis Cluster).

REDIS_URL points at the Redis the stack runs (`smi stack up`); REDIS_CLUSTER_NODES,
when set, at an existing cluster, else the cluster is started here. Every test gets
its own key namespace, so tests never flush or disturb each other's data."""

from __future__ import annotations

import os
import uuid

import pytest

from smi.jobtable import JobTable, connect
from tests.support.redis_cluster import LocalRedisCluster

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")


@pytest.fixture(scope="session")
def redis_cluster_nodes(tmp_path_factory):
    existing = os.environ.get("REDIS_CLUSTER_NODES", "").strip()
    if existing:
        yield existing
        return
    cluster = LocalRedisCluster(tmp_path_factory.mktemp("redis-cluster"))
    cluster.start()
    try:
        yield cluster.nodes
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
async def redis_single():
    client = connect(REDIS_URL)
    try:
        await client.ping()
    except Exception as exc:  # a clear message instead of a connection traceback
        pytest.fail(f"Redis at {REDIS_URL} does not answer ({exc}); run `smi stack up` or set REDIS_URL")
    yield client
    await client.aclose()


@pytest.fixture(scope="session")
async def redis_cluster(redis_cluster_nodes):
    client = connect("", redis_cluster_nodes)
    await client.initialize()
    yield client
    await client.aclose()


@pytest.fixture(params=["single", "cluster"])
def redis(request):
    """Every test using this runs twice: on one Redis server and on Redis Cluster."""
    return request.getfixturevalue(f"redis_{request.param}")


@pytest.fixture
def namespace() -> str:
    return f"t{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def table(redis, namespace) -> JobTable:
    return JobTable(redis, shards=8, namespace=namespace)
