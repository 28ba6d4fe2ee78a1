"""The fleet's Redis clients: redis-py's cluster client for a Redis Cluster, else a plain one;
both answering with str. One place, so every part of the fleet connects the same way."""

from __future__ import annotations

from typing import Any


def sync_client(url: str, cluster: bool, timeout: float) -> Any:
    """A blocking client (`hubhost fleet status`, `hubhost.fleet` views)."""
    if cluster:
        from redis.cluster import RedisCluster
        return RedisCluster.from_url(url, decode_responses=True, socket_timeout=timeout,
                                     socket_connect_timeout=timeout)
    import redis
    return redis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                socket_connect_timeout=timeout)


def async_client(url: str, cluster: bool, timeout: float) -> Any:
    """An asyncio client (the hub's fleet node and exec, `hubhost.fleet.exec`)."""
    if cluster:
        from redis.asyncio.cluster import RedisCluster
        return RedisCluster.from_url(url, decode_responses=True, socket_timeout=timeout,
                                     socket_connect_timeout=timeout)
    import redis.asyncio as aioredis
    return aioredis.Redis.from_url(url, decode_responses=True, socket_timeout=timeout,
                                   socket_connect_timeout=timeout)
