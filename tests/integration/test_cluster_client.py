"""The Redis Cluster client of smi.jobtable.connection, on a real 3-node cluster:
more concurrent calls than it has connections wait for one instead of failing
(redis-py's cluster pool raises MaxConnectionsError at once), and a call made
while holding a permit never waits for a second."""

from __future__ import annotations

import asyncio

import pytest

from smi.jobtable import JobTable, connect
from smi.jobtable.connection import BoundedRedisCluster
from tests.support.jobs import job_fields


@pytest.fixture
async def small_cluster_client(redis_cluster_nodes):
    client = connect("", redis_cluster_nodes, max_connections=2)
    assert isinstance(client, BoundedRedisCluster)
    await client.initialize()
    yield client
    await client.aclose()


async def test_a_burst_of_commands_waits_for_connections(small_cluster_client, namespace):
    keys = [f"{namespace}burst:{n}" for n in range(300)]  # spread over every node
    await asyncio.gather(*(small_cluster_client.set(key, n) for n, key in enumerate(keys)))
    values = await asyncio.gather(*(small_cluster_client.get(key) for key in keys))
    assert values == [str(n).encode() for n in range(300)]
    for node in small_cluster_client.get_nodes():
        assert len(node._connections) <= 2  # no node's pool grew past its limit


async def test_a_burst_of_pipelines_waits_for_connections(small_cluster_client, namespace):
    async def one(n: int) -> list:
        pipe = small_cluster_client.pipeline(transaction=False)
        for part in range(5):  # keys of several slots, so of several nodes
            pipe.set(f"{namespace}pipe:{n}:{part}", f"{n}.{part}")
        pipe.get(f"{namespace}pipe:{n}:0")
        return await pipe.execute()

    results = await asyncio.gather(*(one(n) for n in range(100)))
    assert [result[-1] for result in results] == [f"{n}.0".encode() for n in range(100)]


async def test_the_job_table_takes_a_burst_on_two_connections(small_cluster_client, namespace):
    table = JobTable(small_cluster_client, shards=8, namespace=namespace)
    created = await asyncio.gather(*(
        table.create(job_fields(), request_id=f"r{n}")
        for n in range(150)))
    assert all(was_new for _, was_new in created)
    jobs = await asyncio.gather(*(table.get(job.job_id) for job, _ in created))
    assert sorted(job.job_id for job in jobs) == sorted(job.job_id for job, _ in created)


async def test_a_call_under_a_permit_runs_under_it(redis_cluster_nodes, namespace):
    # One permit, held by the outer call: the inner command (as a pipeline's resent
    # redirect is) must not wait for a second one, which would never come.
    client = connect("", redis_cluster_nodes, max_connections=1)
    try:
        await client.set(f"{namespace}k", "v")

        async def nested():
            return await client.get(f"{namespace}k")

        assert await asyncio.wait_for(client.bounded(nested), timeout=10) == b"v"
        assert client.in_flight.locked() is False
    finally:
        await client.aclose()
