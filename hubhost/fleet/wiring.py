"""How a hub takes part in exec across hubs: one call the supervisor makes once it has its
fleet Redis client and knows which devices it drives.

`attach_exec` starts the ExecServer on this hub's stream (its `run` is the supervisor's
local exec, with routing off so a call that reached its owner never leaves it again) and
gives RoutedFunctions an ExecClient: a local exec whose device is not on this hub
(`unknown_device`) goes to the device's owner instead (hubhost/supervisor/routing.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from hubhost.fleet.execs import ExecClient, ExecServer, OwnsFn
from hubhost.fleet.keys import FleetKeys


@dataclass
class FleetExec:
    server: ExecServer
    client: ExecClient

    async def stop(self, grace: float = 5.0) -> None:
        await self.server.stop(grace)


def attach_exec(sup: Any, redis: Any, keys: FleetKeys, hub_id: str, owns: OwnsFn, *,
                concurrency: int = 64) -> FleetExec:
    """Serve `keys.exec_stream(hub_id)` and route calls for devices elsewhere. Call on the
    supervisor's loop after `sup.functions` exists; `await result.stop()` before closing
    `redis`. The client's socket timeout must exceed 1 s (the server's XREADGROUP BLOCK)."""
    functions = sup.functions

    async def run(device: str, function: str, args: Any, level: str, timeout: float) -> str:
        return await functions.exec(device, function, args, level=level, timeout=timeout, route=False)

    server = ExecServer(redis, keys, hub_id, run, owns, concurrency=concurrency)
    client = ExecClient(redis, keys, hub_id, default_timeout=functions.default_timeout)
    functions.remote = client
    sup.spawn(server.serve())
    return FleetExec(server, client)
