"""Status of the devices other hubs drive, followed from Redis into this hub's memory.

A subscription of driver code (`driver:system(...):get(...):subscribe`), a WebSocket client
of this hub's API, or `GET /api/v1/devices/<id>/status` all read the status store of the
hub they talk to. In a fleet, a device may run on another hub, and move: this feed keeps a
replica of every device of the shared config that is not driven here, from the owners'
`PUBLISH status/<id>/<name>` messages (and a full read of `status/<id>` whenever the feed
(re)connects), so subscriptions keep following a device wherever it runs. The mirror never
writes a replica back (the devices are released there); a device that arrives here
replaces its replica with what its driver sets.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("hubhost.fleet")


class RemoteStatus:
    """Feeds `sup.status` with the status of devices driven elsewhere."""

    def __init__(self, node: Any) -> None:
        self.node = node
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hubhost-fleet-feed")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass

    def remote(self, device_id: str) -> bool:
        """A device of the shared config that this hub does not drive now (the functions'
        device table is the running config's, kept current on every change: one lookup per
        message, not a walk over the config)."""
        return device_id in self.node.driver_of and self.node.sup.functions.device_slot(device_id) is None

    async def resync(self) -> None:
        """Make every replica equal its `status/<id>` hash."""
        keys = self.node.keys
        status = self.node.sup.status
        for dev_id in list(self.node.driver_of):
            if not self.remote(dev_id):
                continue
            fields = await self.node.redis.hgetall(keys.status(dev_id))
            have = status.device(dev_id)
            for name in set(have) - set(fields):
                status.set(dev_id, name, None)
            for name, value in fields.items():
                if have.get(name) != value:
                    status.set(dev_id, name, value)

    async def _run(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        node = self.node
        base = node.keys.status("")          # "<prefix>status/"
        delay = 0.1
        while True:
            # PUBLISH reaches every node of a cluster: one node's subscriber hears them all
            client = aioredis.Redis.from_url(node.full.redis.url, decode_responses=True,
                                             socket_timeout=None, socket_connect_timeout=2)
            try:
                pubsub = client.pubsub()
                await pubsub.psubscribe(base + "*")
                await self.resync()
                delay = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") != "pmessage":
                        continue
                    channel = msg["channel"]
                    if not channel.startswith(base):
                        continue
                    dev_id, _, name = channel[len(base):].partition("/")
                    if not name or not self.remote(dev_id):
                        continue
                    data = msg["data"]
                    node.sup.status.set(dev_id, name, None if data == "null" else data)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.debug("fleet status feed: %s; retrying in %.1f s", e, delay)
            finally:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
