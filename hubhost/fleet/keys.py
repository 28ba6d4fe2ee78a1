"""The fleet's Redis key names (DESIGN section 8), in one place.

`P` is `redis.prefix`, `F` the fleet id. Keys in braces share a Redis Cluster slot: every
fleet-wide key (hubs, leases, leader, epoch, state, the device table) is in `{fleet:F}`, so
one script can renew a hub's registration and all its leases atomically; a hub's exec stream
and its result cache are in `{hub:<id>}`; a device's shared store is in `{dev:<id>}`.
"""

from __future__ import annotations

from dataclasses import dataclass

EXEC_GROUP = "exec"          # the consumer group on every hub's exec stream
DONE_TTL_MS = 5 * 60 * 1000  # how long an exec result stays cached for redeliveries


@dataclass(frozen=True)
class FleetKeys:
    """Key names for one fleet under one prefix."""

    prefix: str
    fleet: str

    @property
    def _f(self) -> str:
        return f"{self.prefix}{{fleet:{self.fleet}}}"

    # -- fleet-wide, one slot ----------------------------------------------------------
    def hub(self, hub_id: str) -> str:
        """JSON registration (id, weight, tags, ready, epoch, config, started, token) with a TTL."""
        return f"{self._f}:hub:{hub_id}"

    @property
    def hubs(self) -> str:
        """Set of hub ids that registered (a hub whose `hub` key expired is dead)."""
        return f"{self._f}:hubs"

    def lease(self, device_id: str) -> str:
        """`<hub_id> <token>` of the hub driving a movable device, with a TTL."""
        return f"{self._f}:lease:{device_id}"

    @property
    def leader(self) -> str:
        return f"{self._f}:leader"

    @property
    def epoch(self) -> str:
        return f"{self._f}:epoch"

    @property
    def state(self) -> str:
        """`ready <epoch>` once every live hub is ready for the epoch."""
        return f"{self._f}:state"

    @property
    def members(self) -> str:
        """JSON list of the serving hubs the current epoch was counted for (the leader's)."""
        return f"{self._f}:members"

    @property
    def devices(self) -> str:
        """Hash device id -> JSON {"driver", "hub" (pinned hub or null), "needs": [tags]}."""
        return f"{self._f}:devices"

    # -- per hub ---------------------------------------------------------------------------
    def exec_stream(self, hub_id: str) -> str:
        return f"{self.prefix}{{hub:{hub_id}}}:exec"

    def done(self, hub_id: str, request_id: str) -> str:
        return f"{self.prefix}{{hub:{hub_id}}}:done:{request_id}"

    def reply(self, owner: str, request_id: str) -> str:
        """A caller's reply list (`owner` is the calling hub's id, or a client's own id)."""
        return f"{self.prefix}{{reply:{owner}}}:{request_id}"

    # -- per device ------------------------------------------------------------------------
    def store(self, device_id: str) -> str:
        """A movable device's persistent_store: JSON {"v": version, "hub": writer, "data": {...}}."""
        return f"{self.prefix}{{dev:{device_id}}}:store"

    def fence(self, device_id: str) -> str:
        """Counter incremented by each new lease holder: a store write carrying an older
        number (a hub that lost the device) is refused."""
        return f"{self.prefix}{{dev:{device_id}}}:fence"

    # -- the single-hub keys of DESIGN section 5 (prefix applied) ------------------------
    def status(self, device_id: str) -> str:
        return f"{self.prefix}status/{device_id}"

    def system(self, system_id: str) -> str:
        return f"{self.prefix}system/{system_id}"

    def interface(self, device_id: str) -> str:
        return f"{self.prefix}interface/{device_id}"


def lease_value(hub_id: str, token: str) -> str:
    return f"{hub_id} {token}"


def lease_holder(value: str | bytes | None) -> str | None:
    """The hub id in a lease value, or None."""
    if value is None:
        return None
    if isinstance(value, bytes):
        value = value.decode()
    return value.split(" ", 1)[0] or None
