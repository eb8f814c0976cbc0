"""smi.jobtable.autopipeline on the real Redis: concurrent commands share a
pipeline (and so a connection), each caller still gets its own reply or error."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from redis import exceptions as redis_errors
from redis.asyncio import BlockingConnectionPool, Redis

from smi.jobtable.autopipeline import AutoPipelineRedis
from tests.integration.conftest import REDIS_URL


async def clients_named(name: str) -> int:
    async with Redis.from_url(REDIS_URL) as admin:
        return sum(1 for client in await admin.client_list() if client.get("name") == name)


def a_client(kind: type[Redis], name: str) -> Redis:
    pool = BlockingConnectionPool.from_url(REDIS_URL, max_connections=50, timeout=10, client_name=name)
    return kind(connection_pool=pool)


@pytest.mark.parametrize("kind, most_connections", [(AutoPipelineRedis, 1), (Redis, None)])
async def test_concurrent_commands_of_one_tick_travel_together(kind, most_connections):
    """The plain client is the control: the same burst opens a connection per
    command in flight; the pipelining client needs one."""
    name = f"autopipe-{uuid.uuid4().hex[:8]}"
    prefix = f"test:{name}:"
    client = a_client(kind, name)
    try:
        replies = await asyncio.gather(*(client.incrby(f"{prefix}{i % 7}", i) for i in range(200)))
        totals = {k: int(await client.get(f"{prefix}{k}")) for k in range(7)}
        connections = await clients_named(name)
    finally:
        await client.delete(*(f"{prefix}{k}" for k in range(7)))
        await client.aclose()
    assert totals == {k: sum(i for i in range(200) if i % 7 == k) for k in range(7)}
    if kind is AutoPipelineRedis:
        assert connections == most_connections
        # Commands leave in the order issued: each reply is its key's running
        # total right after its own increment.
        for i, reply in enumerate(replies):
            assert reply == sum(j for j in range(i + 1) if j % 7 == i % 7)
    else:
        assert connections > 1


async def test_an_error_reaches_only_its_own_caller():
    client = a_client(AutoPipelineRedis, f"autopipe-{uuid.uuid4().hex[:8]}")
    key = f"test:autopipe:{uuid.uuid4().hex}"
    try:
        await client.set(key, "a string")
        results = await asyncio.gather(client.get(key), client.hgetall(key), client.strlen(key),
                                       return_exceptions=True)
    finally:
        await client.delete(key)
        await client.aclose()
    assert results[0] == b"a string"
    assert isinstance(results[1], redis_errors.ResponseError) and "WRONGTYPE" in str(results[1])
    assert results[2] == len("a string")


async def test_scripts_reload_after_the_server_forgot_them():
    client = a_client(AutoPipelineRedis, f"autopipe-{uuid.uuid4().hex[:8]}")
    script = client.register_script(f"-- {uuid.uuid4().hex}\nreturn tonumber(ARGV[1]) * 2")
    try:
        assert await asyncio.gather(*(script(args=[n]) for n in range(5))) == [0, 2, 4, 6, 8]
        await client.script_flush()  # as after a Redis restart from its AOF
        assert await asyncio.gather(*(script(args=[n]) for n in range(5))) == [0, 2, 4, 6, 8]
    finally:
        await client.aclose()


async def test_a_dead_server_fails_every_waiting_caller():
    pool = BlockingConnectionPool.from_url("redis://127.0.0.1:1/0", max_connections=5, timeout=2)
    client = AutoPipelineRedis(connection_pool=pool)
    try:
        results = await asyncio.gather(*(client.get(f"k{i}") for i in range(3)), return_exceptions=True)
    finally:
        await client.aclose()
    assert all(isinstance(r, (redis_errors.ConnectionError, ConnectionError)) for r in results), results
