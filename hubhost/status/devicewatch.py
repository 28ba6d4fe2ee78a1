"""Watching every status field of a device (the console's live device page, WebSocket
`watch_device`), where subscriptions.py watches one named field at a place in a system.

The store listener is added only while someone watches, and for any other device it is
one dict lookup. Changes are queued on the setting thread (inside the store's lock, so in
order) and delivered on the event loop, once per burst, like subscriptions.py. A watcher
added while changes are in flight may hear a value it already read in its first snapshot
again: values are idempotent for a page, so no version bookkeeping is needed.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import threading
from collections import deque
from collections.abc import Callable

from hubhost.status.store import StatusStore

__all__ = ["DeviceWatches", "FieldCallback"]

log = logging.getLogger("hubhost.status.devicewatch")

# callback(device id, status name, JSON text or None when the field was removed)
FieldCallback = Callable[[str, str, "str | None"], None]


class DeviceWatches:
    """All device watches of one hub. Use from the event loop thread."""

    def __init__(self, store: StatusStore) -> None:
        self._store = store
        self._by_device: dict[str, dict[int, FieldCallback]] = {}
        self._queue: deque[tuple[str, str, str | None]] = deque()
        self._scheduled = False
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._unlisten: Callable[[], None] | None = None
        self._refs = itertools.count(1)

    def watch(self, device_id: str, callback: FieldCallback) -> tuple[int, dict[str, str]]:
        """Start watching; returns (ref for unwatch, the device's fields now). Changes
        after that moment reach `callback`."""
        if self._unlisten is None:
            self._loop = asyncio.get_running_loop()
            self._loop_thread = threading.get_ident()
            self._unlisten = self._store.add_listener(self._on_change)
        ref = next(self._refs)
        self._by_device.setdefault(device_id, {})[ref] = callback
        return ref, self._store.device(device_id)

    def unwatch(self, ref: int) -> bool:
        for device_id, subs in self._by_device.items():
            if subs.pop(ref, None) is not None:
                if not subs:
                    del self._by_device[device_id]
                if not self._by_device and self._unlisten is not None:
                    self._unlisten()
                    self._unlisten = None
                return True
        return False

    def count(self) -> int:
        return sum(len(s) for s in self._by_device.values())

    # -- the store's side (any thread, under the store's lock) ---------------------------
    def _on_change(self, device_id: str, name: str, value: str | None) -> None:
        if device_id not in self._by_device:
            return
        self._queue.append((device_id, name, value))
        if not self._scheduled and self._loop is not None:
            self._scheduled = True
            if threading.get_ident() == self._loop_thread:
                self._loop.call_soon(self._drain)        # the usual case: a worker's batch
            else:
                self._loop.call_soon_threadsafe(self._drain)

    def _drain(self) -> None:
        self._scheduled = False
        q, by_device = self._queue, self._by_device
        while q:
            device_id, name, value = q.popleft()
            for cb in tuple(by_device.get(device_id, {}).values()):
                try:
                    cb(device_id, name, value)
                except Exception:  # noqa: BLE001 - one broken watcher must not stop the rest
                    log.exception("device watch callback failed for %s.%s", device_id, name)
