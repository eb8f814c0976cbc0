"""One place that turns settings into a Redis client: a single server from
REDIS_URL, or Redis Cluster when REDIS_CLUSTER_NODES lists seed nodes."""

from __future__ import annotations

import asyncio
import contextvars
from functools import partial

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, ClusterPipeline, RedisCluster

from smi.jobtable.autopipeline import AutoPipelineRedis

MAX_CONNECTIONS = 100

# The cluster client whose permit the running task holds (tasks it starts inherit it).
_permit_of: contextvars.ContextVar[BoundedRedisCluster | None] = contextvars.ContextVar("cluster_permit_of",
                                                                                          default=None)


class BoundedRedisCluster(RedisCluster):
    """A RedisCluster whose callers wait for a connection instead of failing.

    The cluster client has no blocking pool: a node's pool raises
    MaxConnectionsError (a ConnectionError) the moment ``max_connections`` commands
    are in flight to that node. A burst of concurrent calls (a stage's batch, a
    gateway's requests) then failed as if Redis were away: the gateway answered 503
    and the stages backed off as from an outage. Here at most ``max_connections``
    commands or pipelines are in flight from the client at once; each holds at most
    one connection per node, so no node's pool runs out, and the rest wait."""

    def __init__(self, *args, max_connections: int = MAX_CONNECTIONS, **kwargs):
        super().__init__(*args, max_connections=max_connections, **kwargs)
        self.in_flight = asyncio.Semaphore(max_connections)

    async def execute_command(self, *args, **kwargs):
        return await self.bounded(partial(super().execute_command, *args, **kwargs))

    def pipeline(self, transaction=None, shard_hint=None) -> ClusterPipeline:
        if shard_hint:
            return super().pipeline(transaction, shard_hint)  # refused there, with its message
        return _BoundedClusterPipeline(self, transaction)

    async def bounded(self, call):
        """Call and await ``call`` under one of the client's permits. A call made while
        holding one (a pipeline resends a redirected command on its own) runs under
        it: waiting for a second could wait forever once every permit is so held."""
        if _permit_of.get() is self:
            return await call()
        async with self.in_flight:
            held = _permit_of.set(self)
            try:
                return await call()
            finally:
                _permit_of.reset(held)


class _BoundedClusterPipeline(ClusterPipeline):
    async def execute(self, raise_on_error: bool = True, allow_redirections: bool = True):
        return await self.cluster_client.bounded(partial(super().execute, raise_on_error, allow_redirections))


def connect(redis_url: str, cluster_nodes: str = "", *, max_connections: int = MAX_CONNECTIONS,
            autopipeline: bool = True) -> Redis | RedisCluster:
    """A client for REDIS_URL, or for the cluster REDIS_CLUSTER_NODES seeds. On a
    single server, the commands of one event-loop tick travel as one pipeline
    (smi.jobtable.autopipeline); the cluster client sends them one by one."""
    if cluster_nodes.strip():
        seeds = []
        for item in cluster_nodes.split(","):
            host, _, port = item.strip().rpartition(":")
            seeds.append(ClusterNode(host or "127.0.0.1", int(port)))
        return BoundedRedisCluster(startup_nodes=seeds, decode_responses=False, max_connections=max_connections)
    # A burst of concurrent calls waits for a free connection instead of failing
    # with "Too many connections" (the default pool's behaviour).
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=30)
    client = AutoPipelineRedis if autopipeline else Redis
    return client(connection_pool=pool, decode_responses=False)


def open_table(settings, *, clock=None, max_connections: int = MAX_CONNECTIONS):
    """The job table a process uses, from its settings (REDIS_URL or
    REDIS_CLUSTER_NODES, REDIS_SHARDS, REDIS_NAMESPACE) and its clock."""
    from smi.jobtable.table import JobTable

    client = connect(settings.redis_url, settings.redis_cluster_nodes, max_connections=max_connections)
    options = {"clock": clock} if clock is not None else {}
    return JobTable(client, shards=settings.redis_shards, namespace=settings.redis_namespace, **options)
