"""Mirror the in-memory StatusStore to Redis (DESIGN section 5).

Why it is built this way:

* The hot path is `StatusStore.set` on a driver thread. The mirror's listener only
  records "(device, name) is dirty" in a dict under a tiny lock and, when the writer
  is idle, wakes the asyncio loop once (`call_soon_threadsafe`). It never touches
  the network, so a slow, dead or stalled Redis cannot stall a driver.
* The writer task reads the *current* values from the store when it sends a batch.
  Repeated changes of a field while a batch is in flight therefore coalesce to the
  latest value, pending memory is bounded by the number of distinct fields, and a
  field can never be published older-after-newer (batches go out one after the
  other on one connection).
* Each device's batch is one EVALSHA of a small Lua script on the single key
  `status/<id>`: it compares with what Redis holds, HSETs/HDELs only real changes and
  PUBLISHes each changed field (`null` for deletions). One command per device keeps
  the Python side cheap; comparing inside Redis means a value that comes back to what
  Redis already holds is not published again.
* While fields change faster than batches go out ("hits" on pending fields), the
  writer waits up to `coalesce_window` between batches, so a hot field costs a few
  commands per window instead of a few per change. Fields that change slowly are
  sent at once.
* Every (re)connection starts with a full resync: status hashes are replaced by
  memory (differences published), system indexes and interface strings rewritten.
  A connection that timed out may still have commands queued inside a stalled
  Redis; before resyncing we `CLIENT KILL` it (by id AND address, so a restarted
  server's reused id can never hit someone else), so stale writes cannot land after
  the resync.
* Redis Cluster (`cluster=True`): every command touches exactly one key (scripts
  declare it in KEYS[1]; their PUBLISHes take no key and reach every node), so no
  command ever spans slots and no hash tags or temp keys are needed: the public key
  names stay exactly `status/<id>` etc. The atomic index rewrite is a script on
  `system/<id>` itself, not a temp key + RENAME. redis-py's RedisCluster routes each
  command by its key. The CLIENT KILL safety net is single-node only.
* Writes Redis refuses (OOM, ACL, read-only replica) are logged once per kind and
  redone as whole-key rewrites every `refused_retry` seconds until accepted.

All key and channel names come from `Keys`, the one place that applies the prefix.
"""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import AbstractConnection, ConnectionPool
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import (
    AskError,
    ClusterError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TryAgainError,
)

from hubhost.status.store import StatusStore

try:  # redis-py >= 8 probes for "maintenance notifications" on connect; we don't need them
    from redis.maint_notifications import MaintNotificationsConfig

    _POOL_EXTRA: dict[str, Any] = {
        "maint_notifications_config": MaintNotificationsConfig(enabled=False)
    }
except ImportError:  # older redis-py: nothing to switch off
    _POOL_EXTRA = {}

__all__ = ["Keys", "RedisMirror"]

_DEFAULT_LOGGER = logging.getLogger("hubhost.status.mirror")


class Keys:
    """The only place that builds Redis key and channel names (prefix included)."""

    __slots__ = ("prefix",)

    def __init__(self, prefix: str = "") -> None:
        if not isinstance(prefix, str):
            raise TypeError(f"redis prefix must be a string, not {type(prefix).__name__}")
        self.prefix = prefix

    def status(self, device_id: str) -> str:
        return f"{self.prefix}status/{device_id}"

    def status_channel_base(self, device_id: str) -> str:
        """Channel of a field minus the field name: `<prefix>status/<id>/`."""
        return f"{self.prefix}status/{device_id}/"

    def status_channel(self, device_id: str, name: str) -> str:
        return f"{self.prefix}status/{device_id}/{name}"

    def system(self, system_id: str) -> str:
        return f"{self.prefix}system/{system_id}"

    def interface(self, device_id: str) -> str:
        return f"{self.prefix}interface/{device_id}"

    def lookup_change(self) -> str:
        return f"{self.prefix}lookup-change"


# --- Lua scripts: each touches only KEYS[1]; channels come in ARGV (already prefixed).

_LUA_HELPERS = """
local function chunked(cmd, key, list)
  for i = 1, #list, 4000 do
    redis.call(cmd, key, unpack(list, i, math.min(i + 3999, #list)))
  end
end
local function own_hash(key)
  local t = redis.call('TYPE', key)['ok']
  if t ~= 'hash' and t ~= 'none' then redis.call('DEL', key) end
end
"""

# Partial update. ARGV: channel base, n, n (name, json) pairs, then names to delete.
_UPDATE_FIELDS = _LUA_HELPERS + """
local key, base = KEYS[1], ARGV[1]
local dstart = 3 + 2 * tonumber(ARGV[2])
local names = {}
for i = 3, dstart - 1, 2 do names[#names + 1] = ARGV[i] end
for i = dstart, #ARGV do names[#names + 1] = ARGV[i] end
local old = {}
for i = 1, #names, 4000 do
  local got = redis.call('HMGET', key, unpack(names, i, math.min(i + 3999, #names)))
  for k = 1, #got do old[i + k - 1] = got[k] end
end
local put, gone, pubs = {}, {}, {}
local idx = 0
for i = 3, dstart - 1, 2 do
  idx = idx + 1
  if old[idx] ~= ARGV[i + 1] then
    put[#put + 1] = ARGV[i]; put[#put + 1] = ARGV[i + 1]
    pubs[#pubs + 1] = ARGV[i]; pubs[#pubs + 1] = ARGV[i + 1]
  end
end
for i = dstart, #ARGV do
  idx = idx + 1
  if old[idx] then
    gone[#gone + 1] = ARGV[i]
    pubs[#pubs + 1] = ARGV[i]; pubs[#pubs + 1] = 'null'
  end
end
chunked('HSET', key, put)
chunked('HDEL', key, gone)
for i = 1, #pubs, 2 do redis.call('PUBLISH', base .. pubs[i], pubs[i + 1]) end
return #pubs / 2
"""

# Full replace. ARGV: channel base, then the whole new content as (name, json) pairs.
_SYNC_FIELDS = _LUA_HELPERS + """
local key, base = KEYS[1], ARGV[1]
own_hash(key)
local old = {}
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do old[flat[i]] = flat[i + 1] end
local put, gone, pubs = {}, {}, {}
for i = 2, #ARGV, 2 do
  local name, value = ARGV[i], ARGV[i + 1]
  if old[name] ~= value then
    put[#put + 1] = name; put[#put + 1] = value
    pubs[#pubs + 1] = name; pubs[#pubs + 1] = value
  end
  old[name] = nil
end
for name in pairs(old) do
  gone[#gone + 1] = name
  pubs[#pubs + 1] = name; pubs[#pubs + 1] = 'null'
end
chunked('HSET', key, put)
chunked('HDEL', key, gone)
for i = 1, #pubs, 2 do redis.call('PUBLISH', base .. pubs[i], pubs[i + 1]) end
return #pubs / 2
"""

# Atomic index rewrite. ARGV: channel, message, then the whole new content as pairs.
# Publishes once, and only when the content really changed.
_SYNC_INDEX = _LUA_HELPERS + """
local key = KEYS[1]
own_hash(key)
local old = {}
local flat = redis.call('HGETALL', key)
for i = 1, #flat, 2 do old[flat[i]] = flat[i + 1] end
local put, gone = {}, {}
for i = 3, #ARGV, 2 do
  if old[ARGV[i]] ~= ARGV[i + 1] then
    put[#put + 1] = ARGV[i]; put[#put + 1] = ARGV[i + 1]
  end
  old[ARGV[i]] = nil
end
for name in pairs(old) do gone[#gone + 1] = name end
if #put == 0 and #gone == 0 then return 0 end
chunked('HSET', key, put)
chunked('HDEL', key, gone)
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

_SCRIPTS = {"update": _UPDATE_FIELDS, "sync": _SYNC_FIELDS, "index": _SYNC_INDEX}

# What a dead, stalled or refusing Redis raises: an outage, not a bug.
_EXPECTED_ERRORS = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# Error replies that mean "the cluster cannot take this now" (retry later), not "refused".
_UNAVAILABLE = (ClusterError, AskError, TryAgainError)

_PIPELINE_ARGS = 20_000  # args per pipeline round trip: bounds buffers and per-read latency


class _ResyncNeeded(Exception):
    """The session lost something it cannot repair in place (e.g. SCRIPT FLUSH)."""


@dataclass
class _Work:
    """Everything taken out of the pending state for one batch (restored on failure)."""

    status: dict[tuple[str, str], float] = field(default_factory=dict)
    full: dict[str, float] = field(default_factory=dict)  # devices to replace wholesale
    drops: dict[str, float] = field(default_factory=dict)  # devices to delete
    systems: dict[str, float] = field(default_factory=dict)
    interfaces: dict[str, float] = field(default_factory=dict)

    def empty(self) -> bool:
        return not (self.status or self.full or self.drops or self.systems or self.interfaces)

    def oldest(self) -> float | None:
        """Time of the oldest change in this batch (dicts hold first-seen times, oldest first)."""
        firsts = [next(iter(d.values())) for d in
                  (self.status, self.full, self.drops, self.systems, self.interfaces) if d]
        return min(firsts) if firsts else None


class _Session:
    """One connection to a single Redis: pipelined raw commands, raw byte replies."""

    def __init__(self, conn: AbstractConnection) -> None:
        self.conn = conn
        self.shas: dict[str, bytes] = {}
        self.client_id: int | None = None
        self.client_addr: str | None = None

    async def open(self, stale: list[tuple[int, str]]) -> None:
        """Connect, learn who we are (for a later CLIENT KILL), kill stale clients, load scripts."""
        await self.conn.connect()
        names = list(_SCRIPTS)
        commands: list[tuple[Any, ...]] = [("CLIENT", "INFO")]
        # Commands of a timed-out connection may still sit in a stalled server; kill
        # that client so none of them can land after our resync. ID AND ADDR: a
        # restarted server reuses ids. Errors (e.g. ACL) only lose this safety net.
        commands += [("CLIENT", "KILL", "ID", cid, "ADDR", addr) for cid, addr in stale]
        commands += [("SCRIPT", "LOAD", _SCRIPTS[n]) for n in names]
        replies = await self.execute(commands)
        info = replies[0]
        if isinstance(info, bytes):
            fields = dict(p.split("=", 1) for p in info.decode().split() if "=" in p)
            if "id" in fields and fields.get("addr"):
                self.client_id, self.client_addr = int(fields["id"]), fields["addr"]
        for name, sha in zip(names, replies[-len(names):]):
            if isinstance(sha, Exception):
                raise sha
            self.shas[name] = sha

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        """Send all commands in one write, read all replies; error replies come back as values."""
        conn = self.conn
        await conn.send_packed_command(conn.pack_commands(commands), check_health=False)
        replies: list[Any] = []
        for _ in commands:
            try:
                replies.append(await conn.read_response(disable_decoding=True))
            except ResponseError as exc:
                replies.append(exc)
        return replies

    async def ping(self) -> None:
        await self.execute([("PING",)])

    async def close(self) -> None:
        await self.conn.disconnect(nowait=True)

    def script(self, name: str, key: str, args: list[Any]) -> tuple[Any, ...]:
        return ("EVALSHA", self.shas[name], 1, key, *args)


class _ClusterSession(_Session):
    """A Redis Cluster client: each command goes to the node owning its one key.

    No CLIENT KILL safety net here (clients live on many nodes); everything else,
    including the single-key scripts, is the same as for one server.
    """

    def __init__(self, client: RedisCluster) -> None:  # noqa: D107 (no single conn)
        self.client = client
        self.shas = {}
        self.client_id = None
        self.client_addr = None

    async def open(self, stale: list[tuple[int, str]]) -> None:
        await self.client.initialize()
        for name, text in _SCRIPTS.items():
            self.shas[name] = await self.client.script_load(text)  # on every primary

    async def execute(self, commands: list[tuple[Any, ...]]) -> list[Any]:
        pipe = self.client.pipeline()
        for cmd in commands:
            pipe.execute_command(*cmd)
        return await pipe.execute(raise_on_error=False)

    async def ping(self) -> None:
        await self.client.ping(target_nodes=RedisCluster.ALL_NODES)

    async def close(self) -> None:
        await self.client.aclose()


def _redact(url: str) -> str:
    """The URL without its password, for log lines."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if parts.port:
            host = f"{host}:{parts.port}"
        user = f"{parts.username}:***@" if parts.username else "***@"
        return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))
    except ValueError:
        return "<unparsable redis url>"


class RedisMirror:
    """Keeps Redis equal to a StatusStore (plus system indexes and interface strings)."""

    def __init__(
        self,
        status: StatusStore,
        url: str,
        prefix: str = "",
        *,
        socket_timeout: float = 2.0,
        connect_timeout: float = 2.0,
        logger: logging.Logger | None = None,
        coalesce_window: float = 0.05,
        max_backoff: float = 1.0,
        health_interval: float = 1.0,
        batch_size: int = 2000,
        cluster: bool = False,
        refused_retry: float = 5.0,
    ) -> None:
        self._status = status
        self._url = url
        self.keys = Keys(prefix)
        self._log = logger or _DEFAULT_LOGGER
        self._socket_timeout = socket_timeout
        self._window = coalesce_window
        self._max_backoff = max_backoff
        self._health_interval = health_interval
        self._batch_size = batch_size
        self._cluster = cluster
        self._conn_kw: dict[str, Any] = {
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "health_check_interval": 0,
            "client_name": "hubhost-mirror",
            **_POOL_EXTRA,
        }
        # Parses (and so validates) the URL now: a bad URL is a config error at start.
        # No retries inside redis-py: a failure must reach us to be counted and resynced.
        self._pool = ConnectionPool.from_url(url, retry=Retry(NoBackoff(), 0), **self._conn_kw)

        # Shared with driver threads: guarded by _plock.
        self._plock = threading.Lock()
        self._pending: dict[tuple[str, str], float] = {}
        self._hits = 0
        self._idle = False  # True only while the writer waits with nothing to do
        self._full: dict[str, float] = {}
        self._drops: dict[str, float] = {}
        self._dirty_systems: dict[str, float] = {}
        self._dirty_interfaces: dict[str, float] = {}
        self._owned: set[str] | None = None
        self._removed: set[str] = set()
        self._released: set[str] = set()   # fleet mode: moved to another hub (not deleted)
        self._forgotten: set[str] = set()  # fleet mode: systems another hub builds now
        self._systems: dict[str, dict[str, str]] = {}
        self._interfaces: dict[str, str] = {}
        self._inflight: _Work | None = None
        self._connected = False
        self._outages = 0
        self._last_error: str | None = None
        self._outage_since: float | None = None

        # Loop-side state.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._synced: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._unsubscribe: Any = None
        self._stopping = False
        self._stale: list[tuple[int, str]] = []  # (client id, addr) of dead sessions
        self._session: _Session | None = None
        self._last_send = 0.0
        self._error_seen: set[str] = set()
        self._refused: dict[tuple[str, str], float] = {}  # writes Redis refused, to redo
        self._retry_scheduled = False
        self._refused_retry = refused_retry

    # ------------------------------------------------------------------ public API

    async def start(self) -> None:
        """Start mirroring; returns at once and never raises if Redis is down."""
        if self._task is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        self._synced = asyncio.Event()
        self._stopping = False
        with self._plock:
            self._idle = False  # the writer is not waiting yet: no wake-ups needed
        self._unsubscribe = self._status.add_listener(self._on_change)
        self._task = asyncio.create_task(self._run(), name="hubhost-redis-mirror")

    async def stop(self, timeout: float | None = None) -> None:
        """Stop: one last best-effort flush if connected, bounded by `timeout` seconds."""
        if self._task is None:
            return
        if timeout is None:
            timeout = min(self._socket_timeout, 2.0)
        if self._unsubscribe is not None:
            self._unsubscribe()
            self._unsubscribe = None
        self._stopping = True
        assert self._wake is not None
        self._wake.set()
        task, self._task = self._task, None
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout)
        except (asyncio.TimeoutError, TimeoutError):
            task.cancel()
        except Exception:  # the writer never raises, but stop must not either
            self._log.exception("Redis mirror: writer failed while stopping")
        if not task.done():
            try:
                await task
            except BaseException:
                pass
        with self._plock:
            self._connected = False

    def set_devices(self, device_ids: Iterable[str]) -> None:
        """Declare the devices this hub owns: new ones are replaced by memory, absent ones deleted."""
        new = set(device_ids)
        now = time.monotonic()
        with self._plock:
            old = self._owned or set()
            for device_id in old - new:
                self._forget_device_locked(device_id, now)
            for device_id in new - old:
                self._removed.discard(device_id)
                self._released.discard(device_id)
                self._drops.pop(device_id, None)
                self._full.setdefault(device_id, now)
            self._owned = new
            wake = self._wake_locked()
        self._signal(wake)

    def release_device(self, device_id: str) -> None:
        """Stop writing a device that another hub drives now (fleet mode): its keys stay as
        they are, for the new owner to write; nothing of it that is still queued here is sent."""
        with self._plock:
            if self._owned is not None:
                self._owned.discard(device_id)
            self._released.add(device_id)
            self._full.pop(device_id, None)
            self._drops.pop(device_id, None)
            self._interfaces.pop(device_id, None)
            self._dirty_interfaces.pop(device_id, None)

    def remove_device(self, device_id: str) -> None:
        """Delete a device's `status/` and `interface/` keys and its index entries."""
        with self._plock:
            if self._owned is not None:
                self._owned.discard(device_id)
            self._forget_device_locked(device_id, time.monotonic())
            wake = self._wake_locked()
        self._signal(wake)

    def set_system_index(self, system_id: str, mapping: dict[str, str]) -> None:
        """Rewrite `system/<id>` ("<Module>/<index>" -> device id) atomically, then PUBLISH lookup-change."""
        clean: dict[str, str] = {}
        for k, v in mapping.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise TypeError(
                    f"system {system_id!r} index: entry {k!r} -> {v!r} rejected,"
                    " keys and device ids must be strings"
                )
            clean[k] = v
        with self._plock:
            self._forgotten.discard(system_id)
            self._systems[system_id] = clean
            self._dirty_systems.setdefault(system_id, time.monotonic())
            wake = self._wake_locked()
        self._signal(wake)

    def forget_system(self, system_id: str) -> None:
        """Stop writing `system/<id>` without deleting it (fleet mode: another hub builds it now)."""
        with self._plock:
            self._systems.pop(system_id, None)
            self._dirty_systems.pop(system_id, None)
            self._forgotten.add(system_id)

    def remove_system(self, system_id: str) -> None:
        """Delete `system/<id>` (and PUBLISH lookup-change if it existed)."""
        with self._plock:
            self._systems.pop(system_id, None)
            self._dirty_systems.setdefault(system_id, time.monotonic())
            wake = self._wake_locked()
        self._signal(wake)

    def set_interface(self, device_id: str, json_text: str) -> None:
        """Set `interface/<id>` to the driver's metadata JSON."""
        if not isinstance(json_text, str):
            raise TypeError(
                f"interface of {device_id!r} rejected: must be JSON text (str),"
                f" not {type(json_text).__name__}"
            )
        with self._plock:
            self._interfaces[device_id] = json_text
            self._dirty_interfaces.setdefault(device_id, time.monotonic())
            wake = self._wake_locked()
        self._signal(wake)

    def state(self) -> dict[str, Any]:
        """Connected, pending distinct fields, lag (age of the oldest unsent change), outages, last error."""
        with self._plock:
            now = time.monotonic()
            times = []
            if self._pending:
                times.append(next(iter(self._pending.values())))
            for d in (self._full, self._drops, self._dirty_systems, self._dirty_interfaces,
                      self._refused):
                if d:
                    times.append(min(d.values()))
            pending = len(self._pending)
            if self._inflight is not None:
                pending += len(self._inflight.status)
                oldest = self._inflight.oldest()
                if oldest is not None:
                    times.append(oldest)
            return {
                "connected": self._connected,
                "pending": pending,
                "lag_seconds": max(0.0, now - min(times)) if times else 0.0,
                "outages": self._outages,
                "last_error": self._last_error,
            }

    async def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until connected with nothing left to send; False on timeout."""
        assert self._synced is not None, "start() first"

        async def _wait() -> None:
            while True:
                await self._synced.wait()  # type: ignore[union-attr]
                with self._plock:
                    if self._connected and self._idle and not self._has_work_locked():
                        return
                await asyncio.sleep(0.001)

        try:
            await asyncio.wait_for(_wait(), timeout)
            return True
        except (asyncio.TimeoutError, TimeoutError):
            return False

    # ------------------------------------------------------------------ driver-thread side

    def _on_change(self, device_id: str, name: str, value: str | None) -> None:
        # Runs on a driver thread under the store lock: a dict write and maybe one wake.
        key = (device_id, name)
        with self._plock:
            pending = self._pending
            if key in pending:
                self._hits += 1
                return
            pending[key] = time.monotonic()
            if self._idle:
                self._idle = False
            elif len(pending) != self._batch_size:
                return
        self._signal(True)

    def _wake_locked(self) -> bool:
        if self._idle:
            self._idle = False
            return True
        return False

    def _signal(self, wake: bool) -> None:
        loop = self._loop
        if wake and loop is not None and self._wake is not None:
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # loop closed: nothing left to wake
                pass

    def _forget_device_locked(self, device_id: str, now: float) -> None:
        self._removed.add(device_id)
        self._full.pop(device_id, None)
        self._drops.setdefault(device_id, now)
        self._interfaces.pop(device_id, None)
        self._dirty_interfaces.pop(device_id, None)
        for system_id, mapping in self._systems.items():
            stale = [k for k, v in mapping.items() if v == device_id]
            if stale:
                for k in stale:
                    del mapping[k]
                self._dirty_systems.setdefault(system_id, now)

    def _has_work_locked(self) -> bool:
        return bool(
            self._pending or self._full or self._drops or self._dirty_systems
            or self._dirty_interfaces
        )

    def _take(self) -> _Work:
        with self._plock:
            work = _Work(self._pending, self._full, self._drops, self._dirty_systems,
                         self._dirty_interfaces)
            self._pending, self._full, self._drops = {}, {}, {}
            self._dirty_systems, self._dirty_interfaces = {}, {}
            self._hits = 0
            self._inflight = work
        return work

    def _restore(self, work: _Work) -> None:
        """Put a failed batch back; its entries are older than anything pending now."""

        def merge(old: dict[Any, float], new: dict[Any, float]) -> dict[Any, float]:
            out = dict(old)
            for k, t in new.items():
                out.setdefault(k, t)
            return out

        with self._plock:
            self._pending = merge(work.status, self._pending)
            self._full = merge(work.full, self._full)
            self._drops = merge(
                {d: t for d, t in work.drops.items() if d in self._removed}, self._drops
            )
            self._dirty_systems = merge(work.systems, self._dirty_systems)
            self._dirty_interfaces = merge(work.interfaces, self._dirty_interfaces)
            self._inflight = None

    # ------------------------------------------------------------------ loop side

    async def _run(self) -> None:
        backoff = 0.05
        while not self._stopping:
            self._session = None
            delay = 0.0
            try:
                session = await self._open()
                await self._resync(session)
                self._mark_connected()
                backoff = 0.05
                await self._serve(session)
            except asyncio.CancelledError:
                raise
            except _ResyncNeeded as exc:
                self._log.info("Redis mirror: %s; reconnecting to resync", exc)
                delay = 0.05
            except _EXPECTED_ERRORS as exc:
                self._mark_down(exc)
                delay = random.uniform(backoff / 2, backoff)
                backoff = min(backoff * 2, self._max_backoff)
            except Exception as exc:  # a bug must not end mirroring for good
                self._log.exception("Redis mirror: unexpected error")
                self._mark_down(exc)
                delay = self._max_backoff
            finally:
                await self._close_session()
            if self._stopping or not delay:
                continue
            assert self._wake is not None
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), delay)
            except (asyncio.TimeoutError, TimeoutError):
                pass
        with self._plock:
            self._connected = False

    async def _open(self) -> _Session:
        if self._cluster:
            session: _Session = _ClusterSession(RedisCluster.from_url(self._url, **self._conn_kw))
        else:
            session = _Session(self._pool.make_connection())
        self._session = session  # so _run can close it even if open() fails half way
        await session.open(self._stale)
        self._stale.clear()
        return session

    async def _close_session(self) -> None:
        session, self._session = self._session, None
        if session is None:
            return
        if session.client_id is not None and session.client_addr:
            self._stale.append((session.client_id, session.client_addr))
            del self._stale[:-8]
        try:
            await session.close()
        except Exception:  # closing a broken connection may fail; it is gone either way
            pass

    def _mark_connected(self) -> None:
        with self._plock:
            self._connected = True
            since = self._outage_since
            self._outage_since = None
        self._error_seen.clear()
        if since is not None:
            self._log.info(
                "Redis mirror recovered: connected to %s after %.1f s down; resynced",
                _redact(self._url), time.monotonic() - since,
            )
        else:
            self._log.info("Redis mirror connected to %s", _redact(self._url))

    def _mark_down(self, exc: BaseException) -> None:
        text = f"{type(exc).__name__}: {exc}"
        with self._plock:
            self._connected = False
            self._idle = False
            self._last_error = text
            first = self._outage_since is None
            if first:
                self._outage_since = time.monotonic()
                self._outages += 1
        if self._synced is not None:
            self._synced.clear()
        if first:
            self._log.warning(
                "Redis mirror: lost %s (%s); status stays in memory, retrying with backoff",
                _redact(self._url), text,
            )
        else:
            self._log.debug("Redis mirror: still down (%s)", text)

    async def _serve(self, session: _Session) -> None:
        assert self._wake is not None and self._synced is not None and self._loop is not None
        wake, loop = self._wake, self._loop
        while True:
            with self._plock:
                has_work = self._has_work_locked()
                hits, n = self._hits, len(self._pending)
                if not has_work:
                    self._idle = True
            if not has_work:
                if self._stopping:
                    return
                wake.clear()
                self._synced.set()
                try:
                    await asyncio.wait_for(wake.wait(), self._health_interval)
                except (asyncio.TimeoutError, TimeoutError):
                    with self._plock:
                        quiet = self._idle
                    if quiet:
                        await session.ping()
                continue
            self._synced.clear()
            if hits and n < self._batch_size and not self._stopping:
                delay = self._last_send + self._window - loop.time()
                if delay > 0:
                    wake.clear()
                    try:
                        await asyncio.wait_for(wake.wait(), delay)
                    except (asyncio.TimeoutError, TimeoutError):
                        pass
            self._last_send = loop.time()
            work = self._take()
            try:
                await self._send(session, work, full=False)
            except BaseException:
                self._restore(work)
                raise
            with self._plock:
                self._inflight = None

    async def _resync(self, session: _Session) -> None:
        """Make every owned key equal memory, publishing each difference."""
        with self._plock:
            self._refused.clear()  # a resync rewrites all of it anyway
        work = self._take()
        try:
            await self._send(session, work, full=True)
        except BaseException:
            self._restore(work)
            raise
        with self._plock:
            self._inflight = None

    async def _send(self, session: _Session, work: _Work, *, full: bool) -> None:
        keys = self.keys
        with self._plock:
            removed = set(self._removed)
            released = set(self._released)
            owned = set(self._owned) if self._owned is not None else set()
            systems = {s: dict(self._systems[s]) for s in
                       (self._systems if full else work.systems) if s in self._systems}
            dead_systems = [s for s in work.systems
                            if s not in self._systems and s not in self._forgotten]
            interfaces = dict(self._interfaces) if full else {
                d: self._interfaces[d] for d in work.interfaces if d in self._interfaces}
            dead_interfaces = [d for d in work.interfaces if d not in self._interfaces]
            drops = [d for d in work.drops if d in removed]

        # Each command is tagged with what to redo if Redis refuses it.
        commands: list[tuple[tuple[str, str], tuple[Any, ...]]] = []
        for device_id in drops:
            commands.append((("drop", device_id), session.script(
                "sync", keys.status(device_id), [keys.status_channel_base(device_id)])))
            commands.append((("drop", device_id), ("DEL", keys.interface(device_id))))
        for system_id in dead_systems:
            commands.append((("system", system_id), session.script(
                "index", keys.system(system_id), [keys.lookup_change(), system_id])))
        for system_id, mapping in systems.items():
            args: list[Any] = [keys.lookup_change(), system_id]
            for k, v in mapping.items():
                args += (k, v)
            commands.append((("system", system_id),
                             session.script("index", keys.system(system_id), args)))
        for device_id in dead_interfaces:
            commands.append((("interface", device_id), ("DEL", keys.interface(device_id))))
        for device_id, text in interfaces.items():
            if device_id not in removed and device_id not in released:
                commands.append((("interface", device_id),
                                 ("SET", keys.interface(device_id), text)))

        # Devices replaced wholesale: all of them on a resync, else new owners.
        whole = set(work.full)
        if full:
            whole |= owned | set(self._status.device_ids())
        whole -= removed | released
        for device_id in whole:
            args = [keys.status_channel_base(device_id)]
            for name, value in self._status.device(device_id).items():
                args += (name, value)
            commands.append((("status", device_id),
                             session.script("sync", keys.status(device_id), args)))

        # Field updates (taken from memory now, so coalesced to the latest value).
        if work.status:
            wanted = [k for k in work.status if k[0] not in whole and k[0] not in removed
                      and k[0] not in released]
            values = self._status.snapshot(wanted)
            per_device: dict[str, tuple[list[str], list[str]]] = {}
            for (device_id, name), value in zip(wanted, values):
                sets, dels = per_device.get(device_id) or per_device.setdefault(
                    device_id, ([], []))
                if value is None:
                    dels.append(name)
                else:
                    sets += (name, value)
            for device_id, (sets, dels) in per_device.items():
                args = [keys.status_channel_base(device_id), len(sets) // 2]
                args += sets
                args += dels
                commands.append((("status", device_id),
                                 session.script("update", keys.status(device_id), args)))

        await self._execute_chunked(session, commands)

    async def _execute_chunked(
        self, session: _Session, commands: list[tuple[tuple[str, str], tuple[Any, ...]]]
    ) -> None:
        start, size = 0, 0
        for i, (_, cmd) in enumerate(commands):
            size += len(cmd)
            if size >= _PIPELINE_ARGS:
                await self._execute(session, commands[start:i + 1])
                start, size = i + 1, 0
        if start < len(commands):
            await self._execute(session, commands[start:])

    async def _execute(
        self, session: _Session, commands: list[tuple[tuple[str, str], tuple[Any, ...]]]
    ) -> None:
        replies = await session.execute([cmd for _, cmd in commands])
        for (what, cmd), reply in zip(commands, replies):
            if not isinstance(reply, Exception):
                continue
            if isinstance(reply, NoScriptError):
                raise _ResyncNeeded("Redis lost our scripts (SCRIPT FLUSH or failover?)")
            if isinstance(reply, ResponseError) and not isinstance(reply, _UNAVAILABLE):
                self._command_failed(what, cmd, reply)
                continue
            # A cluster pipeline hands back connection errors as values: still an outage.
            raise reply

    def _command_failed(self, what: tuple[str, str], cmd: tuple[Any, ...],
                        exc: ResponseError) -> None:
        """Redis refused a write (OOM, ACL, read-only...): log once per kind, redo it later."""
        key = cmd[3] if cmd[0] == "EVALSHA" else cmd[1]
        text = f"{type(exc).__name__}: {exc}"
        with self._plock:
            self._last_error = f"{key}: {text}"
            self._refused.setdefault(what, time.monotonic())
        kind = type(exc).__name__ + str(exc).split(" ", 1)[0]
        if kind not in self._error_seen:
            self._error_seen.add(kind)
            self._log.error(
                "Redis mirror: Redis refused the write of %s: %s (retrying every %.0f s)",
                key, text, self._refused_retry,
            )
        if not self._retry_scheduled and self._loop is not None:
            self._retry_scheduled = True
            self._loop.call_later(self._refused_retry, self._retry_refused)

    def _retry_refused(self) -> None:
        """Loop callback: queue the refused writes again (whole device / index / string)."""
        self._retry_scheduled = False
        with self._plock:
            refused, self._refused = self._refused, {}
            for (kind, ident), since in refused.items():
                if kind == "drop":
                    if ident in self._removed:
                        self._drops.setdefault(ident, since)
                elif kind == "status":
                    if ident not in self._removed:
                        self._full.setdefault(ident, since)
                elif kind == "system":
                    self._dirty_systems.setdefault(ident, since)
                else:
                    self._dirty_interfaces.setdefault(ident, since)
            wake = self._wake_locked()
        if wake and self._wake is not None:
            self._wake.set()
