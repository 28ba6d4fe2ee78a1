"""In-memory device status: the hub's source of truth (DESIGN section 5).

Drivers set status from their own threads (`device.status.x = v` arrives here as
`StatusStore.set(device_id, name, json_text)`), so the store is thread-safe and
cheap: a set costs one lock round trip and a dict write, never I/O. Values are
JSON text already validated by the Lua side; "changed" means the text differs.

Listeners (the Redis mirror, subscriptions) are told about every change
synchronously, on the setting thread, while the store lock is held. Holding the
lock keeps listener calls in the same order as the changes they report, even
when two threads race on one field; the price is that listeners must be cheap
and must never block (record the change and hand real work to another thread).
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterable

__all__ = ["Listener", "StatusStore"]

Listener = Callable[[str, str, "str | None"], None]

_log = logging.getLogger("hubhost.status.store")


class StatusStore:
    """Thread-safe map device id -> {status name -> JSON text}."""

    __slots__ = ("_lock", "_devices", "_listeners")

    def __init__(self) -> None:
        # RLock: a listener may read the store (or even set) from inside a callback.
        self._lock = threading.RLock()
        self._devices: dict[str, dict[str, str]] = {}
        # Copy-on-write tuple: iterating never races with (un)subscribing.
        self._listeners: tuple[Listener, ...] = ()

    def set(self, device_id: str, name: str, value_json: str | None) -> bool:
        """Set (or with None, delete) one field; True iff the JSON text changed."""
        with self._lock:
            fields = self._devices.get(device_id)
            if value_json is None:
                if fields is None or name not in fields:
                    return False
                del fields[name]
            else:
                if type(value_json) is not str:
                    raise TypeError(
                        f"status {device_id}.{name}: value must be JSON text (str) or None,"
                        f" not {type(value_json).__name__}"
                    )
                if fields is None:
                    fields = self._devices[device_id] = {}
                elif fields.get(name) == value_json:
                    return False
                fields[name] = value_json
            for listener in self._listeners:
                self._notify(listener, device_id, name, value_json)
            return True

    def get(self, device_id: str, name: str) -> str | None:
        """The JSON text of one field, or None when it is not set."""
        fields = self._devices.get(device_id)
        if fields is None:
            return None
        return fields.get(name)

    def field_count(self, device_id: str) -> int:
        """How many fields one device has (the supervisor caps distinct fields per device)."""
        fields = self._devices.get(device_id)
        return len(fields) if fields else 0

    def device(self, device_id: str) -> dict[str, str]:
        """A copy of one device's fields (empty when the device has none)."""
        with self._lock:
            fields = self._devices.get(device_id)
            return dict(fields) if fields else {}

    def device_ids(self) -> list[str]:
        """Devices that have been set since they were last cleared."""
        with self._lock:
            return list(self._devices)

    def snapshot(self, keys: Iterable[tuple[str, str]]) -> list[str | None]:
        """Current values of many (device, name) pairs under one lock hold (for the mirror)."""
        with self._lock:
            devices = self._devices
            out: list[str | None] = []
            for device_id, name in keys:
                fields = devices.get(device_id)
                out.append(None if fields is None else fields.get(name))
            return out

    def clear_device(self, device_id: str) -> None:
        """Forget a device: listeners hear a deletion (None) for each field it had."""
        with self._lock:
            fields = self._devices.pop(device_id, None)
            if not fields:
                return
            for name in fields:
                for listener in self._listeners:
                    self._notify(listener, device_id, name, None)

    def add_listener(self, fn: Listener) -> Callable[[], None]:
        """Call fn(device_id, name, json_or_None) after each change; returns unsubscribe."""
        with self._lock:
            self._listeners = self._listeners + (fn,)

        def unsubscribe() -> None:
            with self._lock:
                self._listeners = tuple(x for x in self._listeners if x is not fn)

        return unsubscribe

    @staticmethod
    def _notify(listener: Listener, device_id: str, name: str, value: str | None) -> None:
        # A broken listener must not turn a driver's status assignment into an error.
        try:
            listener(device_id, name, value)
        except Exception:
            _log.exception("status listener %r failed for %s.%s", listener, device_id, name)
