"""The Lua side of one driver instance, driven from Python.

`DriverRuntime` owns one Sandbox and the driver built by its entry chunk. It is not
thread-safe: the supervisor calls it only from the driver's own thread (actor.py), the test
kit calls it directly. Everything the driver asks of the outside world (timers, sleeps,
transports, saves) goes to a `Port`, so the same runtime works under the asyncio supervisor
and under the test kit's virtual clock.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from hubhost.sandbox.sandbox import LuaError, Sandbox, chunkname, from_lua, to_lua
from hubhost.status.store import StatusStore

log = logging.getLogger("hubhost.driver")

LEVELS = {
    b"trace": logging.DEBUG - 5,
    b"debug": logging.DEBUG,
    b"info": logging.INFO,
    b"warn": logging.WARNING,
    b"error": logging.ERROR,
}
logging.addLevelName(logging.DEBUG - 5, "TRACE")

GC_PRESSURE = 0.75   # share of max_memory above which the host collects between events


@dataclass
class DeviceInfo:
    """A device as the config describes it."""

    id: str
    label: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    system: str | None = None
    module: str | None = None
    index: int | None = None
    transport: str | None = None
    transport_settings: dict[str, Any] = field(default_factory=dict)


class Port(Protocol):
    """What a runtime needs from its host. Called on the runtime's thread."""

    def timer_start(self, rt: "DriverRuntime", timer_id: int, seconds: float, periodic: bool) -> None: ...
    def timer_cancel(self, rt: "DriverRuntime", timer_id: int) -> None: ...
    def wait_timer(self, rt: "DriverRuntime", token: int, seconds: float) -> None: ...
    def wait_host(self, rt: "DriverRuntime", token: int, what: str, arg: Any) -> None: ...
    def handler_failed(self, rt: "DriverRuntime", label: str, kind: str, message: str) -> None: ...


class DriverLoadError(Exception):
    """The entry chunk failed or did not build a driver."""


class DriverRuntime:
    """One driver instance: sandbox, entry chunk, devices, lifecycle and timers."""

    def __init__(
        self,
        driver_id: str,
        driver_dir: Path,
        port: Port,
        *,
        max_memory: int = 64 * 1024 * 1024,
        cpu_limit: float = 1.0,
        state_dir: Path | None = None,
        logger: logging.Logger | None = None,
        status: StatusStore | None = None,
    ) -> None:
        self.driver_id = driver_id
        self.driver_dir = Path(driver_dir).resolve()
        self.port = port
        self.cpu_limit = cpu_limit
        self.max_memory = max_memory
        self.state_dir = state_dir
        self.log = logger or log
        self.failures: list[tuple[str, str, str]] = []  # (label, kind, message), recent
        self.status = status if status is not None else StatusStore()
        self.sandbox = Sandbox(self.driver_dir, max_memory=max_memory, on_print=self._print)
        self.sandbox.expose(
            log=self._lua_log,
            handler_failed=self._handler_failed,
            timer_start=lambda i, s, p: port.timer_start(self, i, s, bool(p)),
            timer_cancel=lambda i: port.timer_cancel(self, i),
            wait_timer=lambda t, s: port.wait_timer(self, t, s),
            wait_host=lambda t, w, a: port.wait_host(self, t, w.decode(), a),
            status_set=self._status_set,
        )
        self.R = self.sandbox.run_private("runtime.lua", self.sandbox.sb, self.sandbox.host)
        self.R.set_cpu_limit(cpu_limit)
        self._memory_fault = False
        self._gc = self.sandbox.lua.eval(b"function() collectgarbage() end")
        # for the privileged glue: a full collection after a caught out-of-memory error,
        # before it crosses into Python again (lua/driver_functions.lua)
        self.R.caps.collect_garbage = self._gc
        self._gc_mark = int(max_memory * GC_PRESSURE)   # collect when the heap grows past this
        self.lua = self.sandbox.lua
        self.extensions: list[Any] = []  # hooks added by other parts (datastore, status, ...)

    # -- logging -------------------------------------------------------------------------
    def _prefix(self, device_id: Any = None) -> str:
        if device_id:
            dev = device_id.decode() if isinstance(device_id, bytes) else device_id
            return f"[{self.driver_id}/{dev}]"
        return f"[{self.driver_id}]"

    def _lua_log(self, level: bytes, device_id: Any, msg: bytes) -> None:
        self.log.log(LEVELS.get(level, logging.INFO), "%s %s", self._prefix(device_id or None),
                     msg.decode("utf-8", "replace"))

    def _status_set(self, device_id: bytes, name: bytes, text: bytes | None) -> tuple[Any, Any]:
        """device.status.<name> = value: store (and so mirror) the JSON text that
        lua/json.lua made and checked in the driver's runtime; None deletes."""
        try:
            changed = self.status.set(device_id.decode(), name.decode(),
                                      None if text is None else text.decode())
        except UnicodeDecodeError:
            return None, b"status names must be valid UTF-8"
        return changed, None

    def _print(self, text: str) -> None:
        self.log.info("%s %s", self._prefix(), text)

    def _handler_failed(self, label: bytes, err: bytes, tb: bytes) -> None:
        label_s = label.decode("utf-8", "replace")
        msg = err.decode("utf-8", "replace")
        if "cpu limit" in msg and "exceeded" in msg:
            kind = "cpu"
            self.log.error("%s handler %s aborted: %s (limit %g s of CPU per event)",
                           self._prefix(), label_s, msg, self.cpu_limit)
        elif "not enough memory" in msg or not msg:
            kind = "memory"
            self._memory_fault = True
            self.log.error("%s handler %s aborted: memory limit of %d MiB reached",
                           self._prefix(), label_s, self.max_memory // (1024 * 1024))
        else:
            kind = "error"
            self.log.error("%s handler %s failed: %s", self._prefix(), label_s,
                           tb.decode("utf-8", "replace") or msg)
        self.failures.append((label_s, kind, msg))
        del self.failures[:-50]
        self.port.handler_failed(self, label_s, kind, msg)

    # -- guarded calls into Lua ----------------------------------------------------------
    def guarded(self, label: str, fn: Any, *args: Any) -> Any:
        """Call into the Lua glue; a Lua error escaping the glue (e.g. out of memory while
        formatting a traceback) counts as a failed handler, never as a host crash."""
        self._memory_fault = False
        self._relieve()
        try:
            return fn(*args)
        except LuaError as e:
            self._handler_failed(label.encode(), str(e).encode(), b"")
            return None
        finally:
            if self._memory_fault:
                # LuaJIT does not collect on a failed allocation: free the aborted
                # handler's garbage now, or the driver's next events would fail too
                self._collect()
            else:
                self._relieve()

    def _relieve(self) -> None:
        """Collect when the heap is near the limit, before and after every call into Lua.

        Why: LuaJIT does not collect when an allocation fails, and an out-of-memory error
        is often caught inside the Lua glue (a function handler's pcall), so the aborted
        handler's garbage stays until the next GC step. Then the *next* event fails too,
        and worse, allocations that lupa makes outside driver code (pushing arguments,
        pushing a Python callback's results while it holds the GIL) fail: that corrupts
        the Lua stack (garbage numbers) or leaves the GIL taken (a take_gil deadlock).
        Keeping the heap away from the limit between events prevents both."""
        if self.sandbox.memory_used() > self._gc_mark:
            self._collect()
            after = self.sandbox.memory_used()
            # live data above the mark: collect again only after another eighth of growth
            self._gc_mark = max(int(self.max_memory * GC_PRESSURE), after + self.max_memory // 8)

    # -- life cycle ----------------------------------------------------------------------
    def load(self) -> None:
        """Run the entry chunk (init.lua). Raises DriverLoadError with file:line."""
        entry = self.driver_dir / "init.lua"
        if not entry.is_file():
            raise DriverLoadError(f"{entry}: no such file (a driver folder needs init.lua)")
        try:
            ok, err = self.R.load_driver(entry.read_bytes(), chunkname(entry))
        except LuaError as e:
            raise DriverLoadError(str(e)) from None
        if not ok:
            raise DriverLoadError(err.decode("utf-8", "replace"))
        for ext in self.extensions:
            ext.after_load(self)

    def device_table(self, info: DeviceInfo) -> Any:
        return to_lua(self.lua, {"id": info.id, "label": info.label or info.id, "config": info.config})

    def start_device(self, info: DeviceInfo, is_new: bool) -> None:
        self.guarded(f"init [{info.id}]", self.R.start_device, self.device_table(info), is_new)

    def remove_device(self, info: DeviceInfo) -> None:
        self.guarded(f"removed [{info.id}]", self.R.remove_device, self.device_table(info))

    def shutdown(self) -> None:
        self.guarded("shutdown", self.R.shutdown)

    def fire_timer(self, timer_id: int) -> None:
        self.guarded(f"timer {timer_id}", self.R.fire_timer, timer_id)

    def resume(self, token: int, *values: Any) -> None:
        self.guarded(f"resume {token}", self.R.resume, token, *values)

    def call(self, label: str, fn: Any, *args: Any) -> None:
        """Run a Lua function as a handler coroutine (events, function calls)."""
        self.guarded(label, self.R.call, label.encode(), fn, *args)

    def _collect(self) -> None:
        self._memory_fault = False
        try:
            self._gc()
        except LuaError:
            pass

    def dispatch_batch(self, label: bytes, fn: Any, items: Any) -> None:
        """Run fn(driver, item) as one handler per item, in order (a burst of events)."""
        call, driver = self.R.call, self.R.driver()
        if isinstance(items, int):
            items = range(items)
        for item in items:
            self._relieve()
            try:
                call(label, fn, driver, item)
            except LuaError as e:
                self._handler_failed(label, str(e).encode(), b"")
            if self._memory_fault:
                self._collect()

    def metadata(self) -> dict[str, Any] | None:
        md = self.R.metadata()
        return from_lua(md) if md is not None else None

    def driver_name(self) -> str | None:
        d = self.R.driver()
        return d.name.decode() if d is not None and d.name else None

    def lua_device(self, device_id: str) -> Any:
        return self.R.device(device_id.encode())

    def memory_used(self) -> int:
        return self.sandbox.memory_used()
