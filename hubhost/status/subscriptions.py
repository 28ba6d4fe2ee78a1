"""Indirect status subscriptions (seeds/001): by (system, module, index, status name).

A subscriber names a place in a system ("Display/1 of system s1, field power"), not a
device. The system index (`system/<id>`: "<Module>/<index>" -> device id) resolves it; when
the index changes (config reload, `lookup-change`) every subscription is re-resolved and
its callback hears the new device's value, without the subscriber doing anything.

Threads: status changes arrive on driver threads, inside StatusStore's lock (so in the
order they happened). The listener only appends (field, version, json) to a deque for
fields someone watches and wakes the event loop once per burst; everything else (the
index, the subscription tables, callbacks) lives on the loop thread.

No message lost or duplicated around a re-resolution: each watched field has a version
counter bumped by the listener. A subscriber that starts watching a field reads its value
and the version current at that moment (re-reading until the version is stable); queued
changes at or below that version are skipped, and the one change that may have been in
flight during the read is recognised because it repeats the value just delivered (a
field's consecutive values always differ: the store only reports changes).
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections import deque
from collections.abc import Callable
from typing import Any

from hubhost.status.store import StatusStore

__all__ = ["Subscriptions", "Subscriber", "Callback", "LookupWatcher"]

log = logging.getLogger("hubhost.status.subscriptions")

# callback(ref, json_text): called on the loop thread; must not block
Callback = Callable[[int, str], None]
Field = tuple[str, str]                    # (device id, status name)
Place = tuple[str, str, int, str]          # (system, module, index, status name)


class _Sub:
    __slots__ = ("ref", "place", "field", "callback", "ver", "last", "owner")

    def __init__(self, ref: int, place: Place, callback: Callback, owner: "Subscriber") -> None:
        self.ref = ref
        self.place = place
        self.field: Field | None = None
        self.callback = callback
        self.ver = 0                       # version of `field` already covered
        self.last: str | None = None       # JSON text last delivered (None: nothing yet)
        self.owner = owner


class Subscriptions:
    """All indirect subscriptions of one hub. Use from the event loop thread only, except
    `new_ref` (any thread)."""

    def __init__(self, store: StatusStore) -> None:
        self._store = store
        self._index: dict[str, dict[str, str]] = {}
        self._by_place: dict[Place, dict[int, _Sub]] = {}
        self._by_field: dict[Field, dict[int, _Sub]] = {}
        self._ver: dict[Field, int] = {}
        self._queue: deque[tuple[Field, int, str | None]] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._unlisten: Callable[[], None] | None = None
        self._refs = itertools.count(1)
        self._count = 0

    # -- life --------------------------------------------------------------------------
    def start(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        """Start listening to the store (call on the loop thread)."""
        if self._unlisten is None:
            self._loop = loop or asyncio.get_running_loop()
            self._unlisten = self._store.add_listener(self._on_change)

    def stop(self) -> None:
        if self._unlisten is not None:
            self._unlisten()
            self._unlisten = None

    def new_ref(self) -> int:
        """A fresh subscription reference (thread-safe: itertools.count is atomic)."""
        return next(self._refs)

    def subscriber(self) -> "Subscriber":
        """A proxy for one client (a WebSocket, a driver): terminate() drops all of its own."""
        return Subscriber(self)

    def count(self) -> int:
        """How many subscriptions exist (all clients)."""
        return self._count

    # -- the system index ----------------------------------------------------------------
    @property
    def index(self) -> dict[str, dict[str, str]]:
        return self._index

    def resolve(self, system: str, module: str, index: int) -> str | None:
        """The device id at "<module>/<index>" of `system`, or None."""
        m = self._index.get(system)
        return m.get(f"{module}/{index}") if m else None

    def set_index(self, systems: dict[str, dict[str, str]]) -> None:
        """Replace the whole index (config load or reload) and re-resolve subscriptions."""
        self._index = {k: dict(v) for k, v in systems.items()}
        self._reresolve(None)

    def set_system(self, system: str, mapping: dict[str, str] | None) -> None:
        """Replace one system's entries (a `lookup-change`); None removes the system."""
        if mapping:
            self._index[system] = dict(mapping)
        else:
            self._index.pop(system, None)
        self._reresolve(system)

    def _reresolve(self, system: str | None) -> None:
        self._drain()   # changes already made are delivered against the old resolution
        for place, subs in list(self._by_place.items()):
            if system is not None and place[0] != system:
                continue
            target = self.resolve(place[0], place[1], place[2])
            field = (target, place[3]) if target is not None else None
            for sub in list(subs.values()):
                if sub.field != field:
                    self._retarget(sub, field, initial=False)

    # -- subscribing ---------------------------------------------------------------------
    def _add(self, sub: _Sub) -> None:
        self._by_place.setdefault(sub.place, {})[sub.ref] = sub
        self._count += 1
        system, module, index, _ = sub.place
        target = self.resolve(system, module, index)
        self._retarget(sub, (target, sub.place[3]) if target is not None else None, initial=True)

    def _remove(self, sub: _Sub) -> None:
        subs = self._by_place.get(sub.place)
        if subs is None or subs.pop(sub.ref, None) is None:
            return
        if not subs:
            del self._by_place[sub.place]
        self._count -= 1
        self._unwatch(sub)

    def _unwatch(self, sub: _Sub) -> None:
        if sub.field is None:
            return
        watchers = self._by_field.get(sub.field)
        if watchers is not None:
            watchers.pop(sub.ref, None)
            if not watchers:
                del self._by_field[sub.field]
        sub.field = None

    def _read(self, field: Field) -> tuple[int, str | None]:
        """(version, value) of a watched field, consistent with the queue position."""
        ver = self._ver
        get = self._store.get
        for _ in range(1000):
            v1 = ver.get(field, 0)
            value = get(*field)
            if ver.get(field, 0) == v1:
                return v1, value
        return ver.get(field, 0), get(*field)  # pragma: no cover - a field rewritten non-stop

    def _retarget(self, sub: _Sub, field: Field | None, *, initial: bool) -> None:
        self._unwatch(sub)
        sub.field = field
        if field is None:
            value = None
        else:
            # watched before reading, so no change can slip between the read and the queue
            self._by_field.setdefault(field, {})[sub.ref] = sub
            sub.ver, value = self._read(field)
        if initial and value is None:
            return
        if value != sub.last:
            sub.last = value
            self._call(sub, "null" if value is None else value)

    # -- changes -------------------------------------------------------------------------
    def _on_change(self, device_id: str, name: str, value: str | None) -> None:
        """StatusStore listener: driver thread, store lock held. Cheap and never blocking."""
        field = (device_id, name)
        if field not in self._by_field:
            return
        v = self._ver.get(field, 0) + 1
        self._ver[field] = v
        self._queue.append((field, v, value))
        if not self._scheduled:
            self._scheduled = True
            loop = self._loop
            if loop is not None:
                try:
                    loop.call_soon_threadsafe(self._drain)
                except RuntimeError:  # loop closed while the hub stops
                    pass

    def _drain(self) -> None:
        self._scheduled = False
        queue, by_field = self._queue, self._by_field
        while queue:
            field, v, value = queue.popleft()
            subs = by_field.get(field)
            if not subs:
                continue
            for sub in list(subs.values()):
                if v <= sub.ver:
                    continue
                sub.ver = v
                if value == sub.last:
                    continue   # the change that was in flight while this sub read the field
                sub.last = value
                self._call(sub, "null" if value is None else value)

    @staticmethod
    def _call(sub: _Sub, text: str) -> None:
        try:
            sub.callback(sub.ref, text)
        except Exception:
            log.exception("subscription %d (%s) callback failed", sub.ref, "/".join(map(str, sub.place)))


class Subscriber:
    """One client's subscriptions (seed 001's Proxy::Subscriptions). Loop thread only."""

    def __init__(self, registry: Subscriptions) -> None:
        self._registry = registry
        self._subs: dict[int, _Sub] = {}

    def subscribe(self, system: str, module: str, index: int, status: str, callback: Callback,
                  *, ref: int | None = None) -> int:
        """Watch `status` of "<module>/<index>" in `system`; callback(ref, json_text) gets the
        current value (if any) at once and every change after. Returns the reference."""
        if ref is None:
            ref = self._registry.new_ref()
        sub = _Sub(ref, (system, module, int(index), status), callback, self)
        self._subs[ref] = sub
        self._registry._add(sub)
        return ref

    def unsubscribe(self, ref: int) -> bool:
        sub = self._subs.pop(ref, None)
        if sub is None:
            return False
        self._registry._remove(sub)
        return True

    def terminate(self) -> int:
        """Drop every subscription of this client; returns how many there were."""
        subs, self._subs = self._subs, {}
        for sub in subs.values():
            self._registry._remove(sub)
        return len(subs)

    def __len__(self) -> int:
        return len(self._subs)

    def refs(self) -> list[int]:
        return list(self._subs)


class LookupWatcher:
    """Follows `PUBLISH lookup-change <system_id>` on Redis: the system's index is re-read
    from `system/<id>` and subscriptions re-resolve. Systems this hub's config defines are
    left alone (the config is their source, and the hub's own rewrites echo here); the
    watcher is for indexes others maintain. Reconnects with backoff; never raises."""

    def __init__(self, subs: Subscriptions, url: str, keys: Any, owned: Callable[[], set[str]]) -> None:
        self._subs = subs
        self._url = url
        self._keys = keys
        self._owned = owned
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="hubhost-lookup-change")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - cancelled on purpose
                pass

    async def _run(self) -> None:
        import redis.asyncio as aioredis
        from redis.exceptions import RedisError

        delay = 0.1
        while True:
            client = aioredis.Redis.from_url(self._url, socket_timeout=None, socket_connect_timeout=2)
            try:
                pubsub = client.pubsub()
                await pubsub.subscribe(self._keys.lookup_change())
                delay = 0.1
                async for msg in pubsub.listen():
                    if msg.get("type") != "message":
                        continue
                    data = msg["data"]
                    system = data.decode("utf-8", "replace") if isinstance(data, bytes) else str(data)
                    if system in self._owned():
                        continue
                    raw = await client.hgetall(self._keys.system(system))
                    mapping = {k.decode(): v.decode() for k, v in raw.items()}
                    self._subs.set_system(system, mapping or None)
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, UnicodeDecodeError) as e:
                log.debug("lookup-change watcher: %s; retrying in %.1f s", e, delay)
            finally:
                try:
                    await client.aclose()
                except Exception:  # noqa: BLE001 - closing a broken connection
                    pass
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)
