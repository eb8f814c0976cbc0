"""One place that turns settings into a Redis client: a single server from
REDIS_URL, or Redis Cluster when REDIS_CLUSTER_NODES lists seed nodes."""

from __future__ import annotations

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster

MAX_CONNECTIONS = 100


def connect(redis_url: str, cluster_nodes: str = "", *, max_connections: int = MAX_CONNECTIONS) -> Redis | RedisCluster:
    if cluster_nodes.strip():
        seeds = []
        for item in cluster_nodes.split(","):
            host, _, port = item.strip().rpartition(":")
            seeds.append(ClusterNode(host or "127.0.0.1", int(port)))
        return RedisCluster(startup_nodes=seeds, decode_responses=False, max_connections=max_connections)
    # A burst of concurrent calls waits for a free connection instead of failing
    # with "Too many connections" (the default pool's behaviour).
    pool = BlockingConnectionPool.from_url(redis_url, max_connections=max_connections, timeout=30)
    return Redis(connection_pool=pool, decode_responses=False)
