"""`MutableMapping` views of the status and system keys (DESIGN sections 5 and 8), for scripts
with nothing but a Redis URL (seed 002), on a single Redis or a Redis Cluster.

They write exactly what the hub's mirror writes: status values are JSON text and a change
is published on `status/<id>/<name>` (`null` for a deletion) by the mirror's own script
(compare inside Redis, so an unchanged value is not published again); system entries are
"<Module>/<index>" -> device id (plain text, as the mirror writes them) and a change
publishes `lookup-change <system_id>`. Every command touches one key, so they work on a
cluster unchanged.

Status on a hub is the hub's memory; a write here to a field that a hub owns is replaced
by the hub's value at its next resync. The views are for reading, and for writing keys no
hub owns (or that a hub reads back).
"""

from __future__ import annotations

from collections.abc import Iterator, MutableMapping
from typing import Any

import orjson

from hubhost.fleet.execs import _s, _Script
from hubhost.fleet.keys import FleetKeys
from hubhost.status.mirror import _UPDATE_FIELDS

__all__ = ["StatusView", "SystemView"]

_STATUS_UPDATE = _Script(_UPDATE_FIELDS)

# KEYS: system/<id>. ARGV: channel, message, field, device id ("" deletes). -> 1 if changed.
_INDEX_FIELD = _Script("""
local old = redis.call('HGET', KEYS[1], ARGV[3])
if ARGV[4] == '' then
  if not old then return 0 end
  redis.call('HDEL', KEYS[1], ARGV[3])
else
  if old == ARGV[4] then return 0 end
  redis.call('HSET', KEYS[1], ARGV[3], ARGV[4])
end
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
""")


class StatusView(MutableMapping[str, Any]):
    """`status/<device_id>`: status name -> decoded JSON value."""

    def __init__(self, redis: Any, keys: FleetKeys, device_id: str) -> None:
        self.redis = redis
        self.fleet_keys = keys   # not `keys`: that is Mapping.keys()
        self.device_id = device_id
        self.key = keys.status(device_id)
        self.channel_base = f"{keys.prefix}status/{device_id}/"

    def __getitem__(self, name: str) -> Any:
        raw = self.redis.hget(self.key, name)
        if raw is None:
            raise KeyError(name)
        return orjson.loads(raw)

    def __setitem__(self, name: str, value: Any) -> None:
        if not isinstance(name, str) or not name:
            raise KeyError(f"a status name is a non-empty string, got {name!r}")
        try:
            text = orjson.dumps(value).decode()
        except TypeError as e:
            raise TypeError(f"status {self.device_id}/{name}: value is not JSON ({e})") from None
        _STATUS_UPDATE.sync(self.redis, [self.key], [self.channel_base, 1, name, text])

    def __delitem__(self, name: str) -> None:
        if not _STATUS_UPDATE.sync(self.redis, [self.key], [self.channel_base, 0, name]):
            raise KeyError(name)

    def __iter__(self) -> Iterator[str]:
        return iter([_s(k) for k in self.redis.hkeys(self.key)])

    def __len__(self) -> int:
        return int(self.redis.hlen(self.key))

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and bool(self.redis.hexists(self.key, name))

    def to_dict(self) -> dict[str, Any]:
        """Every field in one HGETALL."""
        return {_s(k): orjson.loads(v) for k, v in self.redis.hgetall(self.key).items()}

    def __repr__(self) -> str:
        return f"StatusView({self.key!r})"


class SystemView(MutableMapping[str, str]):
    """`system/<system_id>`: "<Module>/<index>" (e.g. "Display/1") -> device id."""

    def __init__(self, redis: Any, keys: FleetKeys, system_id: str) -> None:
        self.redis = redis
        self.fleet_keys = keys   # not `keys`: that is Mapping.keys()
        self.system_id = system_id
        self.key = keys.system(system_id)
        self.channel = f"{keys.prefix}lookup-change"

    def __getitem__(self, field: str) -> str:
        raw = self.redis.hget(self.key, field)
        if raw is None:
            raise KeyError(field)
        return _s(raw)

    def __setitem__(self, field: str, device_id: str) -> None:
        if not isinstance(field, str) or not field or not isinstance(device_id, str) or not device_id:
            raise TypeError(f"system {self.system_id!r}: entry {field!r} -> {device_id!r} rejected, "
                            "the field (\"Module/index\") and the device id must be non-empty strings")
        _INDEX_FIELD.sync(self.redis, [self.key], [self.channel, self.system_id, field, device_id])

    def __delitem__(self, field: str) -> None:
        if not _INDEX_FIELD.sync(self.redis, [self.key], [self.channel, self.system_id, field, ""]):
            raise KeyError(field)

    def __iter__(self) -> Iterator[str]:
        return iter([_s(k) for k in self.redis.hkeys(self.key)])

    def __len__(self) -> int:
        return int(self.redis.hlen(self.key))

    def __contains__(self, field: object) -> bool:
        return isinstance(field, str) and bool(self.redis.hexists(self.key, field))

    def to_dict(self) -> dict[str, str]:
        return {_s(k): _s(v) for k, v in self.redis.hgetall(self.key).items()}

    def __repr__(self) -> str:
        return f"SystemView({self.key!r})"
