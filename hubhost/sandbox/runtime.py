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

from time import perf_counter

from hubhost.text import CONTROL, escape_controls
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

# Per-driver caps (DESIGN section 2; README "Limits"): DriverRuntime kwargs and `[[drivers]]`
# keys of the same names. Each refusal is a Lua error naming the limit.
DEFAULT_LIMITS: dict[str, int] = {
    "max_timers": 10000,              # pending timers (call_with_delay / call_on_schedule)
    "max_pending_requests": 1000,     # device:request calls waiting for an answer
    "max_send_backlog": 1 << 20,      # bytes of device:send not yet handed to the transport
    "max_status_value": 64 * 1024,    # bytes of JSON text per status value
    "max_status_fields": 256,         # distinct status names per device
}

MAX_STATUS_NAME = 256                 # characters of one status name
MAX_LOG_TEXT = 8 * 1024               # characters of one log record from a driver
def log_text(value: Any, limit: int = MAX_LOG_TEXT) -> str:
    """Driver-made text as one log line: control characters (newlines, ANSI escapes, NUL,
    C1 controls, Unicode line separators and bidi overrides) escaped as \\n, \\e, \\x00...,
    and at most `limit` characters, with a marker naming the full length."""
    if isinstance(value, bytes):
        text = value.decode("utf-8", "replace")
    else:
        text = str(value)
    total = len(text)
    if total > limit:
        text = text[:limit]
    text = escape_controls(text)
    if len(text) > limit:
        text = text[:limit]
    if total > limit:
        text += f" ... [truncated: {total} characters in all]"
    return text


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
        max_timers: int = DEFAULT_LIMITS["max_timers"],
        max_pending_requests: int = DEFAULT_LIMITS["max_pending_requests"],
        max_send_backlog: int = DEFAULT_LIMITS["max_send_backlog"],
        max_status_value: int = DEFAULT_LIMITS["max_status_value"],
        max_status_fields: int = DEFAULT_LIMITS["max_status_fields"],
    ) -> None:
        self.driver_id = driver_id
        self.driver_dir = Path(driver_dir).resolve()
        self.port = port
        self.cpu_limit = cpu_limit
        self.max_memory = max_memory
        self.state_dir = state_dir
        self.log = logger or log
        self.failures: list[tuple[str, str, str]] = []  # (label, kind, message), recent
        self.failure_count = 0                          # every failure since the runtime began
        self.status = status if status is not None else StatusStore()
        self.max_timers = int(max_timers)
        self.max_pending_requests = int(max_pending_requests)
        self.max_send_backlog = int(max_send_backlog)
        self.max_status_value = int(max_status_value)
        self.max_status_fields = int(max_status_fields)
        self.owned_devices: set[str] = set()          # ids started in this runtime
        self._status_fields: dict[str, set[str]] = {}  # device id -> names this runtime set
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
        self.R.set_limit(b"max_timers", self.max_timers)
        self.R.set_limit(b"max_pending_requests", self.max_pending_requests)
        self._memory_fault = False
        self._gc = self.sandbox.lua.eval(b"function() collectgarbage() end")
        # for the privileged glue: a full collection after a caught out-of-memory error,
        # before it crosses into Python again (lua/driver_functions.lua)
        self.R.caps.collect_garbage = self._gc
        self.R.caps.function_fault = self._function_fault
        self._gc_mark = int(max_memory * GC_PRESSURE)   # collect when the heap grows past this
        self.lua = self.sandbox.lua
        self.extensions: list[Any] = []  # hooks added by other parts (datastore, status, ...)
        # handler durations and faults (hubhost.metrics.HandlerStats), set by the worker host
        self.stats: Any = None

    # -- logging -------------------------------------------------------------------------
    def _prefix(self, device_id: Any = None) -> str:
        if device_id:
            return f"[{self.driver_id}/{log_text(device_id, 200)}]"
        return f"[{self.driver_id}]"

    def _lua_log(self, level: bytes, device_id: Any, msg: bytes) -> None:
        """log.* from the driver: one line each (escaped, capped; see log_text)."""
        self.log.log(LEVELS.get(level, logging.INFO), "%s %s", self._prefix(device_id or None),
                     log_text(msg))

    def _status_set(self, device_id: bytes, name: bytes, text: bytes | None) -> tuple[Any, Any]:
        """device.status.<name> = value: store (and so mirror) the JSON text that
        lua/json.lua made and checked in the driver's runtime; None deletes. Only for devices
        this runtime started, values up to max_status_value bytes, at most
        max_status_fields names per device."""
        try:
            dev = device_id.decode()
            key = name.decode()
        except (UnicodeDecodeError, AttributeError):
            return None, b"device.status: device ids and status names must be valid UTF-8 text"
        if dev not in self.owned_devices:
            return None, (f"device.status: device {log_text(dev, 200)!r} is not a device of "
                          f"driver {self.driver_id}").encode()
        if not 1 <= len(key) <= MAX_STATUS_NAME or CONTROL.search(key) or "\t" in key:
            return None, (f"device.status: status name {log_text(key, 60)!r} refused: a status name "
                          f"is 1 to {MAX_STATUS_NAME} characters with no control characters").encode()
        fields = self._status_fields.setdefault(dev, set())
        if text is None:
            changed = self.status.set(dev, key, None)
            fields.discard(key)
            return changed, None
        if len(text) > self.max_status_value:
            return None, (f"device.status.{log_text(key, 200)}: value too large: {len(text)} bytes "
                          f"of JSON, limit of {self.max_status_value} bytes per status value "
                          "(max_status_value)").encode()
        if key not in fields and len(fields) >= self.max_status_fields:
            return None, (f"device.status.{log_text(key, 200)}: too many status fields: limit of "
                          f"{self.max_status_fields} distinct status names per device reached "
                          "(max_status_fields)").encode()
        try:
            changed = self.status.set(dev, key, text.decode())
        except UnicodeDecodeError:
            return None, b"device.status: values must be valid UTF-8 JSON text"
        fields.add(key)
        return changed, None

    def _print(self, text: str) -> None:
        self.log.info("%s %s", self._prefix(), log_text(text))

    def _handler_failed(self, label: bytes, err: bytes, tb: bytes) -> None:
        label_s = log_text(label, 512)
        msg = log_text(err)
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
                           log_text(tb) if tb else msg)
        self.failures.append((label_s, kind, msg))
        self.failure_count += 1
        del self.failures[:-50]
        if self.stats is not None:
            self.stats.fault(label_s, kind)
        self.port.handler_failed(self, label_s, kind, msg)

    def _function_fault(self, err: Any) -> None:
        """A function handler raised (caught by lua/driver_functions.lua, which answers the
        caller and logs it): counted like any handler fault, nothing else."""
        if self.stats is not None:
            msg = err.decode("utf-8", "replace") if isinstance(err, bytes) else str(err)
            self.stats.fault("function", "memory" if "not enough memory" in msg else "error")

    # -- guarded calls into Lua ----------------------------------------------------------
    def guarded(self, label: str, fn: Any, *args: Any) -> Any:
        """Call into the Lua glue; a Lua error escaping the glue (e.g. out of memory while
        formatting a traceback) counts as a failed handler, never as a host crash."""
        self._memory_fault = False
        self._relieve()
        t0 = perf_counter()
        try:
            return fn(*args)
        except LuaError as e:
            self._handler_failed(label.encode(), str(e).encode(), b"")
            return None
        finally:
            if self.stats is not None:
                self.stats.observe(label, perf_counter() - t0)
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
        self.owned_devices.add(info.id)
        self.guarded(f"init [{info.id}]", self.R.start_device, self.device_table(info), is_new)

    def release_device(self, device_id: str) -> None:
        """Fleet mode: stop driving a device that moves to another hub (no `removed`, its
        persistent_store kept)."""
        self.guarded(f"release [{device_id}]", self.R.release_device, device_id.encode())
        self.owned_devices.discard(device_id)
        self._status_fields.pop(device_id, None)

    def put_device_store(self, device_id: str, data: Any) -> None:
        """Fleet mode: a device taken over from another hub brings its persistent_store
        (from Redis): it replaces this hub's copy before the device's init runs."""
        if not isinstance(data, dict):
            data = {}
        # through a Lua function, so the guard's checks run in protected mode (a refusal is
        # a LuaError here, never an unprotected error in the host)
        assign = self.lua.eval("function(t, k, v) t[k] = v end")
        assign(self.R.caps.datastore(), ("__" + device_id).encode(), to_lua(self.lua, data))

    def remove_device(self, info: DeviceInfo) -> None:
        self.guarded(f"removed [{info.id}]", self.R.remove_device, self.device_table(info))
        self.owned_devices.discard(info.id)
        self._status_fields.pop(info.id, None)

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
        stats, text = self.stats, label.decode("utf-8", "replace")
        for item in items:
            self._relieve()
            t0 = perf_counter()
            try:
                call(label, fn, driver, item)
            except LuaError as e:
                self._handler_failed(label, str(e).encode(), b"")
            if stats is not None:
                stats.observe(text, perf_counter() - t0)
            if self._memory_fault:
                self._collect()

    def metadata(self) -> dict[str, Any] | None:
        md = self.R.metadata()
        return from_lua(md) if md is not None else None

    def driver_name(self) -> str | None:
        """The template's name, taken when the driver was built (never read from the
        driver table, whose metamethods are the driver's)."""
        name = self.R.driver_name()
        return name.decode("utf-8", "replace") if name else None

    def framing(self) -> Any:
        """The driver's `framing` table, read raw (for devicelink.framing_spec)."""
        return self.R.framing()

    def lua_device(self, device_id: str) -> Any:
        return self.R.device(device_id.encode())

    def memory_used(self) -> int:
        return self.sandbox.memory_used()
