"""One place that turns settings into a Redis client: a single server from
REDIS_URL, or Redis Cluster when REDIS_CLUSTER_NODES lists seed nodes."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

from smi.jobtable.autopipeline import AutoPipelineRedis

MAX_CONNECTIONS = 100


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
        return RedisCluster(startup_nodes=seeds, decode_responses=False, max_connections=max_connections)
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
