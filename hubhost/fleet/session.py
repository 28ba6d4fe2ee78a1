"""`hubhost.fleet.connect(url)`: a fleet as a backoffice script sees it (seed 002) — status and
system views, exec routed to the owning hub, the live hubs and who owns a device.

Synchronous, because scripts are. The views use redis-py's sync client; `exec` runs the one
ExecClient (the same code a hub uses) on a private event loop in a daemon thread, so there
is one implementation of the exec protocol, not a sync copy of it.
"""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import orjson
import redis as _redis

from hubhost.fleet.execs import ExecClient, _s, parse_target
from hubhost.fleet.keys import FleetKeys, lease_holder
from hubhost.fleet.clients import async_client, sync_client
from hubhost.fleet.views import StatusView, SystemView

__all__ = ["Fleet", "connect", "is_cluster"]


def is_cluster(url: str, timeout: float = 5.0) -> bool:
    """Whether the server at `url` is a Redis Cluster node (`INFO cluster` cluster_enabled)."""
    r = _redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    try:
        return bool(int(r.info("cluster").get("cluster_enabled", 0)))
    finally:
        r.close()


class Fleet:
    """One fleet under one prefix on one Redis (or Redis Cluster)."""

    def __init__(self, url: str, *, prefix: str = "", fleet: str = "F", cluster: bool | None = None,
                 client_id: str | None = None, timeout: float = 10.0, socket_timeout: float = 5.0) -> None:
        self.url = url
        self.keys = FleetKeys(prefix, fleet)
        self.cluster = is_cluster(url, socket_timeout) if cluster is None else cluster
        self.default_timeout = timeout
        self._socket_timeout = socket_timeout
        self.redis: Any = sync_client(url, self.cluster, socket_timeout)
        self._client_id = client_id
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._exec: ExecClient | None = None
        self._lock = threading.Lock()

    # -- views -------------------------------------------------------------------------------
    def status(self, device_id: str) -> StatusView:
        return StatusView(self.redis, self.keys, device_id)

    def system(self, system_id: str) -> SystemView:
        return SystemView(self.redis, self.keys, system_id)

    def hubs(self) -> dict[str, dict[str, Any]]:
        """The live hubs (registration present): hub id -> registration."""
        k = self.keys
        ids = sorted(_s(h) for h in self.redis.smembers(k.hubs))
        pipe = self.redis.pipeline(transaction=False)
        for h in ids:
            pipe.get(k.hub(h))
        out = {}
        for h, raw in zip(ids, pipe.execute()):
            if raw is not None:
                out[h] = orjson.loads(raw)
        return out

    def owner(self, device_id: str) -> str | None:
        """The hub that drives a device: its pinned hub, else its lease holder; None while no
        hub holds its lease. KeyError for a device the fleet does not have."""
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(k.devices, device_id)
        pipe.get(k.lease(device_id))
        rec, lease = pipe.execute()
        if rec is None:
            raise KeyError(f"no device {device_id!r} in fleet {k.fleet}")
        return orjson.loads(rec).get("hub") or lease_holder(lease)

    # -- exec --------------------------------------------------------------------------------
    def exec(self, target: str, *names: str, args: Any = None, level: str = "administrator",
             timeout: float | None = None, **named: Any) -> Any:
        """`exec("S1", "Display_1", "power", state=True)` or `exec("d1", "power", state=True)`;
        positional function arguments go in `args=[...]` (also for a parameter named `level`,
        `timeout` or `args`: `args={...}`). Returns the decoded result or raises ExecError."""
        if len(names) == 1:
            dest: Any = target
            function = names[0]
        elif len(names) == 2:
            dest = parse_target(target, names[0])
            function = names[1]
        else:
            raise TypeError("exec(device, function, ...) or exec(system, module, function, ...)")
        if named:
            if args is not None:
                raise TypeError("give the function's arguments by name or in args=, not both")
            args = named
        fut = asyncio.run_coroutine_threadsafe(
            self._exec_async(dest, function, args, level, self.default_timeout if timeout is None else timeout),
            self._start())
        return fut.result()

    async def _exec_async(self, dest: Any, function: str, args: Any, level: str, timeout: float) -> Any:
        client = self._client()
        if client.redis is None:
            client.redis = await self._aredis()
        return await client.exec(dest, function, args, level=level, timeout=timeout)

    def _start(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                t = threading.Thread(target=loop.run_forever, name="hubhost-fleet-exec", daemon=True)
                t.start()
                self._loop, self._thread = loop, t
            return self._loop

    def _client(self) -> ExecClient:
        with self._lock:
            if self._exec is None:
                self._exec = ExecClient(None, self.keys, self._client_id, default_timeout=self.default_timeout)
        return self._exec

    async def _aredis(self) -> Any:
        return async_client(self.url, self.cluster, max(self._socket_timeout, 2.0))

    # -- lifecycle ---------------------------------------------------------------------------
    def close(self) -> None:
        loop, self._loop = self._loop, None
        if loop is not None:
            ex = self._exec
            if ex is not None and ex.redis is not None:
                asyncio.run_coroutine_threadsafe(ex.redis.aclose(), loop).result(5)
            loop.call_soon_threadsafe(loop.stop)
            if self._thread is not None:
                self._thread.join(5)
            loop.close()
        self._exec = None
        self.redis.close()

    def __enter__(self) -> Fleet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def connect(url: str, *, prefix: str = "", fleet: str = "F", cluster: bool | None = None,
            client_id: str | None = None, timeout: float = 10.0) -> Fleet:
    """A fleet on the Redis (or Redis Cluster, detected unless `cluster` is given) at `url`."""
    return Fleet(url, prefix=prefix, fleet=fleet, cluster=cluster, client_id=client_id, timeout=timeout)
