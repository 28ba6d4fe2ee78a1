"""The driver test kit: a driver under test, driven from a Lua spec (`require "hubhost.test"`).

Why it exists: driver authors test in Lua, and their tests must exercise the same code the
hub runs. So the kit loads the driver into a real `DriverRuntime` (its own sandboxed LuaJIT
state, the real driver_helper, datastore, device links and function glue) and plays the
part of the supervisor itself, with three differences that make specs deterministic:

* a VIRTUAL clock: timers, sleeps and request timeouts wait on `VirtualClock`; nothing
  happens until the spec calls `advance_time(s)` (or an `exec` that waits), and then every
  due event runs in (due time, arrival) order on the calling thread;
* MOCK transports: each device of a serial/TCP/UDP driver gets a `_MockLink` instead of a
  socket or a pty, behind the same Lua glue (hubhost/devicelink.lua), framer and request
  queue as the hub's `DeviceLink`; the spec feeds bytes and reads what the driver sent;
* a throw-away state dir: the datastore file and the known-devices list live in a temp
  folder, and `restart()` really writes, drops the runtime and loads a new one from disk.

Everything the spec gets back is copied as plain data (JSON-like) into the spec's runtime:
no table of one Lua state ever reaches the other.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import math
import re
import shutil
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import lupa.luajit21 as lupa
import orjson

from hubhost.state import atomicfile

from hubhost import paths
from hubhost.state.datastore import DatastoreBinding, StaleWriter, StoreFile, read_store_file
from hubhost.devices.devicelink import check_framing, framing_spec, request_options
from hubhost.devices.framing import FramingError, TokenizerError, make_framer
from hubhost.functions import LEVELS, ExecError, Interface, check_call, check_device
from hubhost.devices.requests import RequestQueue
from hubhost.sandbox.runtime import DeviceInfo, DriverLoadError, DriverRuntime
from hubhost.sandbox.sandbox import LuaError, Sandbox, from_lua, to_lua
from hubhost.testing.specrun import driver_root
from hubhost.status.store import StatusStore

__all__ = ["KitError", "VirtualClock", "KitDriver", "KitHost", "install"]

DEFAULT_EXEC_TIMEOUT = 10.0     # seconds of virtual time an exec waits (as the API's default)
DEFAULT_FLUSH_INTERVAL = 10.0   # the hub's default: dirty stores are written this often
MAX_EVENTS = 500_000            # events one kit call may run before it gives up (a runaway loop)
TRANSPORT_KINDS = ("serial", "tcp", "udp")
_LEVEL_NAMES = {5: "trace", logging.DEBUG: "debug", logging.INFO: "info",
                logging.WARNING: "warn", logging.ERROR: "error", logging.CRITICAL: "error"}
_PREFIX = re.compile(r"^\[([^/\]]*)(?:/([^\]]*))?\] ?(.*)$", re.S)


class KitError(Exception):
    """A refused kit call or a failure the spec should see. `located` errors name the spec
    line that made the call; the others (exec's "code: message") are raised as they are, so
    `assert.has_error(fn, "bad_args: ...")` can compare them exactly."""

    def __init__(self, message: str, *, located: bool = True) -> None:
        super().__init__(message)
        self.message = message
        self.located = located


# -- virtual time -----------------------------------------------------------------------------

class _Handle:
    """A scheduled callback; `cancel()` drops it (the asyncio TimerHandle interface)."""

    __slots__ = ("cancelled",)

    def __init__(self) -> None:
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class _Future:
    """The part of asyncio.Future that RequestQueue uses; callbacks run as clock events."""

    def __init__(self, clock: "VirtualClock") -> None:
        self._clock = clock
        self._state = "pending"
        self._result: Any = None
        self._callbacks: list[Callable[[Any], None]] = []

    def done(self) -> bool:
        return self._state != "pending"

    def cancelled(self) -> bool:
        return self._state == "cancelled"

    def result(self) -> Any:
        if self._state == "cancelled":
            raise RuntimeError("the request was cancelled")
        if self._state == "pending":
            raise RuntimeError("the request is still pending")
        return self._result

    def set_result(self, value: Any) -> None:
        if self.done():
            raise RuntimeError("result already set")
        self._state, self._result = "done", value
        self._schedule()

    def cancel(self) -> bool:
        if self.done():
            return False
        self._state = "cancelled"
        self._schedule()
        return True

    def add_done_callback(self, fn: Callable[[Any], None]) -> None:
        if self.done():
            self._clock.post(fn, self)
        else:
            self._callbacks.append(fn)

    def _schedule(self) -> None:
        callbacks, self._callbacks = self._callbacks, []
        for fn in callbacks:
            self._clock.post(fn, self)


class VirtualClock:
    """Time that moves only when asked to. Events run in (due time, arrival) order, one at
    a time, on the caller's thread; `now` is the due time of the event that is running.
    Also the "loop" a RequestQueue needs (create_future, call_later)."""

    def __init__(self, start: float = 0.0) -> None:
        self.now = float(start)
        self._heap: list[tuple[float, int, _Handle, Callable[..., Any], tuple[Any, ...]]] = []
        self._seq = itertools.count()
        self._running = False

    def time(self) -> float:
        return self.now

    def call_at(self, when: float, fn: Callable[..., Any], *args: Any) -> _Handle:
        h = _Handle()
        heapq.heappush(self._heap, (max(float(when), self.now), next(self._seq), h, fn, args))
        return h

    def call_later(self, delay: float, fn: Callable[..., Any], *args: Any) -> _Handle:
        return self.call_at(self.now + max(0.0, float(delay)), fn, *args)

    def post(self, fn: Callable[..., Any], *args: Any) -> _Handle:
        """Run fn soon: after what is already due now (an actor post / call_soon)."""
        return self.call_at(self.now, fn, *args)

    def create_future(self) -> _Future:
        return _Future(self)

    def pending(self) -> int:
        return sum(1 for e in self._heap if not e[2].cancelled)

    def next_due(self) -> float | None:
        while self._heap and self._heap[0][2].cancelled:
            heapq.heappop(self._heap)
        return self._heap[0][0] if self._heap else None

    def run_until(self, until: float, stop: Callable[[], bool] | None = None) -> bool:
        """Run every event due at or before `until`, then set the time to `until`. With
        `stop`, return True as soon as it says so (time stays at that event's due time)."""
        if self._running:           # an event asked for more time: the outer run goes on
            return bool(stop and stop())
        self._running = True
        count = 0
        try:
            while self._heap and self._heap[0][0] <= until:
                due, _, h, fn, args = heapq.heappop(self._heap)
                if h.cancelled:
                    continue
                self.now = max(self.now, due)
                count += 1
                if count > MAX_EVENTS:
                    raise KitError(f"more than {MAX_EVENTS} events ran in one kit call (virtual time "
                                   f"{self.now:g} s): a timer or sleep loop that never waits?")
                fn(*args)
                if stop is not None and stop():
                    return True
            self.now = max(self.now, until)
            return bool(stop and stop())
        finally:
            self._running = False

    def settle(self) -> None:
        """Run what is due now (posts and zero-length waits), without moving time."""
        self.run_until(self.now)


# -- devices and mock transports --------------------------------------------------------------

@dataclass
class KitDevice:
    """A device as a spec describes it (`{ id =, label =, config =, transport =, connected = }`)."""

    id: str
    label: str
    config: dict[str, Any] = field(default_factory=dict)
    transport: str | bool | None = None     # None: the driver's kind; False: no transport
    autoconnect: bool = True

    def info(self) -> DeviceInfo:
        return DeviceInfo(id=self.id, label=self.label, config=self.config)


@dataclass
class _Wire:
    """The device end of a mock transport, which outlives runtimes (a hub restart does not
    change the device): what the driver sent, and the spec's responder."""

    up: bool = True                 # the line is up: a link opened on it connects
    sent: bytearray = field(default_factory=bytearray)
    responder: Any = None
    delay: float = 0.0


class _MockLink:
    """One device's mock transport: the hub's framer and request queue, with the wire
    replaced by the spec (feed / sent / connect / disconnect / respond)."""

    def __init__(self, drv: "KitDriver", dev: KitDevice, kind: str, spec: dict[str, Any], pattern: Any) -> None:
        self.drv = drv
        self.id = dev.id
        self.id_b = dev.id.encode()
        self.kind = kind
        self.describe = f"the test kit's mock {kind} transport"
        self.closed = False
        self.connected = False
        self.wire = drv.wires.setdefault(dev.id, _Wire(up=dev.autoconnect))
        self._waiting: dict[_Future, tuple[DriverRuntime, int]] = {}   # request -> Lua wait
        self._no_handler_logged = False
        tokenizer = None
        if pattern is not None:
            label = f"framing pattern [{dev.id}]".encode()

            def tokenizer(buf: bytes) -> tuple[bytes | None, bytes]:
                r = drv.glue.tokenize(pattern, buf, label)
                if not r[0]:
                    raise FramingError(_text(r[1]))
                return r[1], r[2]

        self.framer = make_framer(spec, tokenizer=tokenizer, on_overflow=self._overflow)
        self.queue = RequestQueue(self._write, logger=drv.logger, loop=drv.clock)  # type: ignore[arg-type]

    def _overflow(self, nbytes: int) -> None:
        self.drv.logger.warning("[%s/%s] dropped an oversized frame (%d bytes or more, max_frame %d)",
                                self.drv.id, self.id, nbytes, self.framer.max_frame)

    # -- the wire --------------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        """Bytes leave the hub (device:send or a request): record them, wake the responder."""
        if not self.connected or self.closed:
            raise ConnectionError(f"{self.describe}: not connected")
        self.wire.sent += data
        if self.wire.responder is not None:
            self.drv.clock.post(self._respond, bytes(data))

    def _respond(self, data: bytes) -> None:
        if self.closed or not self.connected:
            return
        r = self.wire.responder
        if r is None:
            return
        if isinstance(r, dict):
            replies = r.get(data)
        else:
            replies = r(data)
        if replies is None or replies is False:
            return
        if isinstance(replies, (bytes, str)):
            replies = [replies]
        elif lupa.lua_type(replies) == "table":
            replies = [replies[i] for i in range(1, len(replies) + 1)]
        for reply in replies:
            if isinstance(reply, str):
                reply = reply.encode()
            if not isinstance(reply, bytes):
                raise KitError(f"respond: the responder of {self.id!r} must return bytes (a string), a list "
                               f"of strings or nil, got {lupa.lua_type(reply) or type(reply).__name__}",
                               located=False)
            self.drv.clock.call_later(self.wire.delay, self.receive, reply)

    def receive(self, chunk: bytes) -> None:
        """Bytes arrive from the device: frame them, answer requests, the rest to on_receive."""
        if self.closed or not self.connected:
            return
        try:
            frames = self.framer.feed(chunk)
        except TokenizerError as e:
            frames = e.frames
            self.drv.logger.error("[%s/%s] %s; buffered bytes dropped", self.drv.id, self.id, e)
        queue = self.queue
        kept: list[bytes] = []
        for frame in frames:      # in arrival order: frames, answers, frames (as DeviceLink)
            if queue.in_flight and queue.on_frame(frame):
                if kept:
                    self.drv.clock.post(self._deliver, kept)
                    kept = []
                self._resume_answered()
            else:
                kept.append(frame)
        if kept:
            self.drv.clock.post(self._deliver, kept)

    def _deliver(self, frames: list[bytes]) -> None:
        drv = self.drv
        if self.closed or drv.rt is None:
            return
        i = 0
        while i < len(frames):
            result = drv.rt.guarded("on_receive", drv.glue.receive, self.id_b, *frames[i:i + 256])
            if result is None:
                return
            done, has_handler = result
            if not has_handler:
                if not self._no_handler_logged:
                    self._no_handler_logged = True
                    drv.logger.warning("[%s/%s] the driver has no on_receive; received frames are "
                                       "dropped", drv.id, self.id)
                return
            i += int(done)

    # -- connection ------------------------------------------------------------------------
    def connect(self) -> None:
        if self.closed or self.connected:
            return
        self.connected = self.wire.up = True
        self.drv.clock.post(self.drv._connection, self, True, None)

    def disconnect(self, reason: str) -> None:
        if self.closed or not self.connected:
            return
        self.connected = self.wire.up = False
        self.framer.reset()
        self.drv.clock.post(self.drv._connection, self, False, reason.encode())
        self.queue.fail_all("disconnected")

    def close(self) -> None:
        self.closed = True
        self.connected = False
        self.queue.fail_all("disconnected")

    # -- from the driver (inside Lua) ------------------------------------------------------
    def send_from_driver(self, data: bytes) -> tuple[bool | None, bytes | None]:
        if not self.connected:
            return None, (f"{self.id} is not connected ({self.describe}); wait for the connected "
                          "handler, or use device:request, which returns nil, \"disconnected\"").encode()
        self._write(bytes(data))
        return True, None

    def submit(self, rt: DriverRuntime, token: int, data: bytes, options: dict[str, Any]) -> None:
        drv = self.drv
        if self.closed:
            drv._resume(rt, token, None, b"disconnected")
            return
        try:
            fut = self.queue.submit(data, **options)
        except (TypeError, ValueError) as e:
            drv._resume(rt, token, None, str(e).encode())
            return
        self._waiting[fut] = (rt, token)
        fut.add_done_callback(self._request_done)

    def answer(self, frame: bytes) -> None:
        """device:answer from on_receive: the request in flight (if any) gets `frame`."""
        if self.queue.answer(frame):
            self._resume_answered()

    def _request_done(self, fut: _Future) -> None:
        entry = self._waiting.pop(fut, None)
        if entry is not None:
            self._resume(fut, *entry)

    def _resume_answered(self) -> None:
        """Requesters answered just now resume before the frames that follow the answer."""
        for fut in [f for f in self._waiting if f.done()]:
            self._resume(fut, *self._waiting.pop(fut))

    def _resume(self, fut: _Future, rt: DriverRuntime, token: int) -> None:
        frame, reason = fut.result() if not fut.cancelled() else (None, "cancelled")
        self.drv.clock.post(self.drv._resume, rt, token, frame, reason.encode() if reason else None)


# -- one driver under test --------------------------------------------------------------------

class _Capture(logging.Handler):
    """Keeps the driver's log lines for `logs()`."""

    def __init__(self) -> None:
        super().__init__(level=1)
        self.records: list[dict[str, Any]] = []

    def emit(self, record: logging.LogRecord) -> None:
        try:
            text = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format must not break the driver
            text = str(record.msg)
        m = _PREFIX.match(text)
        device, message = (m.group(2), m.group(3)) if m else (None, text)
        level = _LEVEL_NAMES.get(record.levelno) or record.levelname.lower()
        entry = {"level": level, "message": message, "text": f"{level} {text}"}
        if device:
            entry["device"] = device
        self.records.append(entry)


class KitDriver:
    """A driver under test: one runtime at a time (a new one after each restart), driven
    synchronously on the virtual clock. Implements the runtime's Port."""

    def __init__(self, driver_dir: Path, state_root: Path, *, driver_id: str, devices: list[KitDevice],
                 cpu_limit: float = 1.0, max_memory: int = 64 * 1024 * 1024,
                 flush_interval: float = DEFAULT_FLUSH_INTERVAL, strict: bool = True,
                 datastore: Any = None) -> None:
        self.dir = driver_dir
        self.id = driver_id
        self.devices = {d.id: d for d in devices}
        self.cpu_limit = cpu_limit
        self.max_memory = max_memory
        self.flush_interval = flush_interval
        self.strict = strict
        self.state_dir = paths.driver_state_dir(state_root, driver_id)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.store = StoreFile(self.state_dir, driver_id)
        self.capture = _Capture()
        self.logger = logging.Logger(f"hubhost.test.{driver_id}", level=1)
        self.logger.parent = logging.getLogger("hubhost.test")
        self.logger.addHandler(self.capture)
        self.store.log = self.logger
        self.clock = VirtualClock()
        self.status = StatusStore()
        self.rt: DriverRuntime | None = None
        self.binding: DatastoreBinding | None = None
        self.glue: Any = None
        self.links: dict[str, _MockLink] = {}
        self.wires: dict[str, _Wire] = {}
        self._next_request: tuple[Any, ...] | None = None
        self.interface: Interface | None = None
        self.failures: list[dict[str, str]] = []
        self._raised = 0                 # failures already reported by a strict call
        self.calls: dict[int, tuple[bool, bytes] | None] = {}
        self._timeouts: dict[int, tuple[float, str]] = {}   # call id -> (limit, "fn on 'dev'")
        self._call_ids = itertools.count(1)
        self.state = "stopped"
        self.call_handler: Any = None
        self.subscriptions: dict[int, tuple[str, str, int, str]] = {}
        self._sub_ids = itertools.count(1)
        self._api: Any = None            # lua/driver_functions.lua's host entry points
        self._timers: dict[int, _Handle] = {}
        if datastore is not None:
            atomicfile.write_atomic(self.store.path, orjson.dumps(datastore))
        self._boot()

    # -- Port (called by the runtime, often from inside Lua) ------------------------------
    def timer_start(self, rt: DriverRuntime, timer_id: int, seconds: float, periodic: bool) -> None:
        start = self.clock.now

        def fire(n: int) -> None:
            if rt is not self.rt:
                return
            if periodic:   # fixed rate, as the hub: the n-th firing is due at start + n * seconds
                self._timers[timer_id] = self.clock.call_at(start + (n + 1) * seconds, fire, n + 1)
            else:
                self._timers.pop(timer_id, None)
            rt.fire_timer(timer_id)

        self._timers[timer_id] = self.clock.call_at(start + seconds, fire, 1)

    def timer_cancel(self, rt: DriverRuntime, timer_id: int) -> None:
        h = self._timers.pop(timer_id, None)
        if h is not None:
            h.cancel()

    def wait_timer(self, rt: DriverRuntime, token: int, seconds: float) -> None:
        self.clock.call_later(seconds, self._resume, rt, token)

    def wait_host(self, rt: DriverRuntime, token: int, what: str, arg: Any) -> None:
        if what == "request":
            self._wait_request(rt, token, arg)
        elif what == "save":
            self._wait_save(rt, token, int(arg[1]), bytes(arg[2]))
        elif what == "call":
            self.clock.post(self._answer_call, rt, token, bytes(arg))
        else:
            self.clock.post(self._resume, rt, token, None, f"unknown host wait {what!r}".encode())

    def handler_failed(self, rt: DriverRuntime, label: str, kind: str, message: str) -> None:
        if rt is self.rt:
            self.failures.append({"label": label, "kind": kind, "message": message})

    def _resume(self, rt: DriverRuntime, token: int, *values: Any) -> None:
        if rt is self.rt:
            rt.resume(token, *values)

    # -- boot and teardown -----------------------------------------------------------------
    def _boot(self) -> None:
        """What the supervisor does for a slot: runtime, datastore, links, functions, the
        entry chunk, then removed/added/init per device against the known-devices list."""
        self._timers = {}
        rt = DriverRuntime(self.id, self.dir, self, max_memory=self.max_memory, cpu_limit=self.cpu_limit,
                           state_dir=self.state_dir, logger=self.logger, status=self.status)
        self.rt = rt
        self.state = "starting"
        first_failure = len(self.failures)
        self.binding = DatastoreBinding(rt, self.store)
        rt.sandbox.expose(
            link_open=self._link_open, link_close=self._link_close, link_send=self._link_send,
            link_answer=self._link_answer, link_request=self._link_request,
            link_check_framing=check_framing,
            fn_done=self._fn_done, fn_subscribe=self._fn_subscribe, fn_unsubscribe=self._fn_unsubscribe,
        )
        self.glue = rt.sandbox.run_private("devicelink.lua", rt.R, rt.R.caps, rt.sandbox.host,
                                           rt.sandbox.sb, rt.cpu_limit)
        try:
            rt.load()
        except DriverLoadError as e:
            self._teardown()
            self.state = "failed"
            raise KitError(f"the driver at {self.dir} did not load: {e}", located=False) from None
        self._read_interface(rt)
        known = self._known_devices()
        for dev_id, info in known.items():
            if dev_id not in self.devices:
                rt.remove_device(DeviceInfo(id=dev_id, label=info.get("label", dev_id),
                                            config=info.get("config", {})))
        for dev in self.devices.values():
            rt.start_device(dev.info(), dev.id not in known)
        self._save_known_devices(known)
        self.clock.call_later(self.flush_interval, self._flush_tick, rt)
        self.clock.settle()
        for f in self.failures[first_failure:]:
            if f["label"].startswith(("init ", "added ")):
                self._teardown()
                self.state = "failed"
                self._raised = len(self.failures)
                raise KitError(f"the driver crashed while starting: handler {f['label']} failed: "
                               f"{f['message']}", located=False)
        self.state = "running"
        self._check_strict()

    def _teardown(self) -> None:
        """Forget the runtime: its links close, its timers and waits are dropped."""
        for link in self.links.values():
            link.close()
        self.links.clear()
        self.rt = None
        self.binding = None
        self.glue = None
        self.interface = None
        self.clock = VirtualClock(self.clock.now)   # the old runtime's events die with it
        self.calls.clear()
        self.subscriptions.clear()

    def _known_devices(self) -> dict[str, Any]:
        try:
            data = orjson.loads((self.state_dir / "devices.json").read_bytes())
            return data if isinstance(data, dict) else {}
        except (FileNotFoundError, orjson.JSONDecodeError):
            return {}

    def _save_known_devices(self, known: dict[str, Any]) -> None:
        data = {d.id: {"label": d.label, "config": d.config} for d in self.devices.values()}
        if data != known:
            atomicfile.write_atomic(self.state_dir / "devices.json", orjson.dumps(data, option=orjson.OPT_SORT_KEYS))

    def _flush_tick(self, rt: DriverRuntime) -> None:
        """The hub's periodic flusher, on virtual time."""
        if rt is not self.rt:
            return
        self._flush("periodic flush")
        self.clock.call_later(self.flush_interval, self._flush_tick, rt)

    def _flush(self, why: str) -> None:
        if self.binding is None:
            return
        try:
            self.binding.flush_now()
        except (OSError, StaleWriter) as e:
            self.logger.error("[%s] datastore not written (%s): %s", self.id, why, e)

    def _read_interface(self, rt: DriverRuntime) -> None:
        api = rt.R.caps.functions_api
        driver = rt.R.driver()
        if api is None or driver is None:
            return
        text, timeouts = api.metadata_json(driver)
        self.interface = Interface(text.decode(), orjson.loads(timeouts))
        self._api = api

    # -- checks ----------------------------------------------------------------------------
    def running(self) -> DriverRuntime:
        if self.rt is None or self.state != "running":
            why = {"stopped": "it was stopped", "failed": "its last start failed"}.get(self.state, self.state)
            raise KitError(f"driver {self.id!r} is not running ({why})")
        return self.rt

    def _check_strict(self) -> None:
        """Strict mode: a handler that failed during a kit call fails that call."""
        new = self.failures[self._raised:]
        self._raised = len(self.failures)
        if self.strict and new:
            f = new[0]
            more = f" (and {len(new) - 1} more failure{'s' if len(new) > 2 else ''})" if len(new) > 1 else ""
            raise KitError(f"handler {f['label']} failed: {f['message']}{more}", located=False)

    def device(self, device_id: str) -> KitDevice:
        dev = self.devices.get(device_id)
        if dev is None:
            known = ", ".join(sorted(self.devices)) or "none"
            raise KitError(f"no device {device_id!r} in this driver (devices: {known})")
        return dev

    def link(self, device_id: str) -> _MockLink:
        self.running()
        self.device(device_id)
        link = self.links.get(device_id)
        if link is None:
            raise KitError(f"device {device_id!r} has no transport: its driver was built with "
                           "driver_helper.init, or the spec gave it transport = false")
        return link

    # -- host functions for the Lua glue (inside Lua) -------------------------------------
    def _link_open(self, device_id: bytes, driver_kind: Any) -> bool:
        dev = self.devices.get(device_id.decode())
        rt = self.rt
        if dev is None or rt is None or dev.transport is False:
            return False
        kind = dev.transport if isinstance(dev.transport, str) else (driver_kind.decode() if driver_kind else None)
        if kind is None:
            return False
        if not driver_kind:
            self.logger.warning("[%s/%s] has %s transport settings, but its driver was built with "
                                "driver_helper.init (no transport): not opened", self.id, dev.id, kind)
            return False
        old = self.links.pop(dev.id, None)
        if old is not None:
            old.close()
        try:
            spec, pattern = framing_spec(rt.framing())
            link = _MockLink(self, dev, kind, spec, pattern)
        except (FramingError, ValueError) as e:
            self.logger.error("[%s/%s] cannot set up its %s transport: %s", self.id, dev.id, kind, e)
            return False
        self.links[dev.id] = link
        if link.wire.up:
            self.clock.post(link.connect)
        return True

    def _link_close(self, device_id: bytes) -> None:
        link = self.links.pop(device_id.decode(), None)
        if link is not None:
            link.close()

    def _link_send(self, device_id: bytes, data: bytes) -> tuple[bool | None, bytes | None]:
        link = self.links.get(device_id.decode())
        if link is None:
            return None, device_id + b" has no transport (the spec gave it transport = false)"
        return link.send_from_driver(data)

    def _link_answer(self, device_id: bytes, frame: Any) -> None:
        link = self.links.get(device_id.decode())
        if link is not None:
            self.clock.post(link.answer, bytes(frame) if frame else b"")

    def _link_request(self, device_id: bytes, data: bytes, timeout: float, retries: float,
                      priority: float, name: Any, match: Any) -> None:
        """The request the handler is about to wait for (already checked by the Lua glue)."""
        self._next_request = (device_id, data, timeout, retries, priority, name, match)

    def _wait_request(self, rt: DriverRuntime, token: int, arg: Any) -> None:
        spec, self._next_request = self._next_request, None   # set by link_request just before
        if spec is None:
            self.clock.post(self._resume, rt, token, None, b"request: nothing to send")
            return
        device_id, data, timeout, retries, priority, name, match = spec
        link = self.links.get(device_id.decode())
        if link is None:
            self.clock.post(self._resume, rt, token, None, b"disconnected")
            return
        self.clock.post(link.submit, rt, token, bytes(data),
                        request_options(timeout, retries, priority, name, match))

    def _wait_save(self, rt: DriverRuntime, token: int, seq: int, data: bytes) -> None:
        b = self.binding
        try:
            if b is None:
                raise OSError("no datastore file is attached to this runtime")
            self.store.write(b.epoch, seq, data)
        except (OSError, StaleWriter) as e:
            self.clock.post(self._resume, rt, token, None, f"datastore not saved: {e}".encode())
            return
        self.clock.post(self._resume, rt, token, True)

    def _connection(self, link: _MockLink, up: bool, reason: bytes | None) -> None:
        rt = self.rt
        if rt is not None and not link.closed:
            rt.guarded("connection", self.glue.connection, link.id_b, up, reason)

    # -- functions -------------------------------------------------------------------------
    def _fn_done(self, cid: int, ok: bool, payload: bytes) -> None:
        if cid in self.calls and self.calls[cid] is None:
            self.calls[cid] = (bool(ok), bytes(payload))

    def prepare(self, device_id: str, function: str, args: Any, level: str) -> tuple[str, Any, dict]:
        """The API's checks, in its order and with its codes: the same code (hubhost/functions.py)."""
        check_device(device_id, self.devices)
        if self.rt is None or self.state != "running" or self.interface is None:
            raise ExecError("driver_error", f"driver {self.id!r} of device {device_id!r} is not running")
        fn, bound = check_call(self.interface, device_id, function, args, level)
        return fn.name, fn, bound

    def exec_start(self, device_id: str, function: str, args: Any, level: str) -> int:
        """Start a validated call (ExecError if refused); returns its id."""
        name, fn, bound = self.prepare(device_id, function, args, level)
        rt = self.running()
        cid = next(self._call_ids)
        self.calls[cid] = None
        self._timeouts[cid] = (fn.timeout or DEFAULT_EXEC_TIMEOUT, f"{name} on {device_id!r}")
        lua_args = to_lua(rt.lua, bound)
        self.clock.post(self._start_call, rt, cid, device_id, name, lua_args)
        self.clock.settle()
        return cid

    def _start_call(self, rt: DriverRuntime, cid: int, device_id: str, name: str, lua_args: Any) -> None:
        if rt is not self.rt:
            return
        rt.call(f"function {name} [{device_id}]", self._api.invoke, rt.R.driver(), device_id.encode(),
                name.encode(), lua_args, cid)

    def call_outcome(self, cid: int) -> Any:
        """The result of a finished call as plain data; ExecError("driver_error") if it failed."""
        done = self.calls.get(cid)
        _, what = self._timeouts.get(cid, (0, "call"))
        if done is None:
            raise KitError(f"{what} is still running (advance_time to let it finish)")
        ok, payload = done
        if not ok:
            raise ExecError("driver_error", f"{what}: {payload.decode('utf-8', 'replace')}")
        return orjson.loads(payload)

    def wait_call(self, cid: int) -> Any:
        """Let virtual time pass until the call finishes or its timeout is up (as the API waits)."""
        limit, what = self._timeouts[cid]
        if self.calls.get(cid) is None:
            self.clock.run_until(self.clock.now + limit, stop=lambda: self.calls.get(cid) is not None)
        if self.calls.get(cid) is None:
            self.calls.pop(cid, None)
            raise ExecError("timeout", f"{what} did not finish within {limit:g} s (virtual time)")
        return self.call_outcome(cid)

    # -- calls to other drivers and subscriptions ------------------------------------------
    def _answer_call(self, rt: DriverRuntime, token: int, request: bytes) -> None:
        if rt is not self.rt:
            return
        req = orjson.loads(request)
        if self.call_handler is None:
            rt.resume(token, False, (f"unknown_device: the test kit has no other drivers; give the "
                                     f"spec's answer with h:on_call(fn) (call to {req['module']}/"
                                     f"{req['index']} in {req['system']})").encode())
            return
        try:
            value = self.call_handler(req)
        except LuaError as e:
            rt.resume(token, False, _text(e.args[0] if e.args else e).encode())
            return
        rt.resume(token, True, to_lua(rt.lua, value))

    def _fn_subscribe(self, system: bytes, module: bytes, index: Any, status: bytes) -> int:
        ref = next(self._sub_ids)
        self.subscriptions[ref] = (system.decode(), module.decode(), int(index), status.decode())
        return ref

    def _fn_unsubscribe(self, ref: int) -> None:
        self.subscriptions.pop(int(ref), None)

    def publish(self, system: str, module: str, index: int, status: str, value: Any) -> int:
        """Deliver a status value to the driver's subscriptions of that place; returns how many."""
        rt = self.running()
        place = (system, module, index, status)
        refs = [ref for ref, p in self.subscriptions.items() if p == place]
        for ref in refs:
            self.clock.post(self._deliver_value, rt, ref, value)
        self.clock.settle()
        return len(refs)

    def _deliver_value(self, rt: DriverRuntime, ref: int, value: Any) -> None:
        if rt is self.rt and ref in self.subscriptions:
            rt.call(f"subscription {ref}", self._api.deliver, rt.R.driver(), ref, to_lua(rt.lua, value))

    # -- life cycle ------------------------------------------------------------------------
    def restart(self, *, crash: bool = False, power_loss: bool = False,
                devices: list[KitDevice] | None = None) -> None:
        """A hub restart: (shutdown handler,) flush, drop the runtime, load from disk."""
        if self.rt is not None and self.state == "running":
            if not crash and not power_loss:
                self.rt.shutdown()
                self.clock.settle()
            if not power_loss:
                self._flush("restart")
        self._teardown()
        self.status = StatusStore()     # memory is gone; only the disk survives
        if devices is not None:
            self.devices = {d.id: d for d in devices}
        self._boot()

    def stop(self) -> None:
        """The hub stops: shutdown handler, final flush, links closed."""
        rt = self.rt
        if rt is None or self.state != "running":
            return
        rt.shutdown()
        self.clock.settle()
        self._flush("stop")
        self._teardown()
        self.state = "stopped"


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


# -- the spec side ----------------------------------------------------------------------------

_DEVICE_KEYS = {"id", "label", "config", "transport", "connected"}
_LOAD_KEYS = {"devices", "config", "datastore", "strict"}
_CONFIG_KEYS = {"id", "cpu_limit", "max_memory", "flush_interval"}
_RESTART_KEYS = {"crash", "power_loss", "devices"}
_ID = re.compile(r"^[A-Za-z0-9_.:-]{1,128}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2,
          "GB": 1000**3, "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}


def _table(value: Any, what: str) -> dict[str, Any]:
    """A Lua options table as a dict (an empty table counts as an empty dict)."""
    if value is None:
        return {}
    data = from_lua(value)
    if data == []:
        return {}
    if not isinstance(data, dict):
        raise KitError(f"{what} must be a table of named options, got {_kind(value)}")
    return data


def _list(value: Any, what: str) -> list[Any]:
    data = from_lua(value)
    if data == {}:
        return []
    if not isinstance(data, list):
        raise KitError(f"{what} must be a list, got {_kind(value)}")
    return data


def _kind(value: Any) -> str:
    return lupa.lua_type(value) or ("nil" if value is None else {bool: "boolean", bytes: "string"}.get(
        type(value), "number" if isinstance(value, (int, float)) else type(value).__name__))


def _unknown(data: dict[str, Any], allowed: set[str], what: str) -> None:
    for k in data:
        if k not in allowed:
            raise KitError(f"{what}: unknown option {k!r} (allowed: {', '.join(sorted(allowed))})")


def _number(data: dict[str, Any], key: str, what: str, default: float) -> float:
    v = data.get(key, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (math.isfinite(v) and v > 0):
        raise KitError(f"{what}.{key} must be a positive number, got {v!r}")
    return float(v)


def parse_devices(value: Any, what: str) -> list[KitDevice]:
    """`{ { id =, label =, config =, transport =, connected = }, ... }` checked entry by entry."""
    out: list[KitDevice] = []
    for i, d in enumerate(_list(value, what), 1):
        where = f"{what}[{i}]"
        if d == []:
            d = {}
        if not isinstance(d, dict):
            raise KitError(f"{where} must be a table like {{ id = \"dev1\" }}, got {d!r}")
        _unknown(d, _DEVICE_KEYS, where)
        dev_id = d.get("id")
        if not isinstance(dev_id, str) or not _ID.match(dev_id):
            raise KitError(f"{where}.id must be an id of letters, digits and _.:- (max 128), got {dev_id!r}")
        if any(x.id == dev_id for x in out):
            raise KitError(f"{where}.id: duplicate device id {dev_id!r}")
        label = d.get("label", dev_id)
        if not isinstance(label, str):
            raise KitError(f"{where}.label must be a string, got {label!r}")
        config = d.get("config", {})
        if config == []:
            config = {}
        if not isinstance(config, dict):
            raise KitError(f"{where}.config must be a table of named settings, got {config!r}")
        transport = d.get("transport")
        if transport is not None and transport is not False and transport not in TRANSPORT_KINDS:
            raise KitError(f"{where}.transport must be false or one of {', '.join(TRANSPORT_KINDS)} "
                           f"(default: the driver's own kind), got {transport!r}")
        connected = d.get("connected", True)
        if not isinstance(connected, bool):
            raise KitError(f"{where}.connected must be true or false, got {connected!r}")
        out.append(KitDevice(dev_id, label, config, transport, connected))
    return out


def _size(data: dict[str, Any], key: str, what: str, default: int) -> int:
    v = data.get(key, default)
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        n = int(v)
    elif isinstance(v, str) and (m := _SIZE.match(v)):
        n = int(float(m.group(1)) * _UNITS[m.group(2)])
    else:
        raise KitError(f"{what}.{key} must be a size in bytes or like \"64MiB\", got {v!r}")
    if n < 1024 * 1024:
        raise KitError(f"{what}.{key} must be at least 1MiB, got {v!r}")
    return n


class KitHost:
    """The kit's side of one spec runtime: loads drivers for it and serves its calls.

    `lua/hubhost/test.lua` reaches it through the spec runtime's library caps
    (`caps.testkit.load` / `caps.testkit.op`). Results go back as plain Lua data; an
    expected failure comes back as (false, message, located) so the Lua side can raise it
    at the spec's line (or as is, for exec's "code: message")."""

    def __init__(self, sb: Sandbox, spec_path: Path) -> None:
        self.sb = sb
        self.lua = sb.lua
        self.spec_dir = Path(spec_path).resolve().parent
        self.driver_root = driver_root(Path(spec_path).resolve())
        self.handles: dict[int, KitDriver] = {}
        self._ids = itertools.count(1)
        self._root: Path | None = None
        sb.expose(testkit_load=self.load, testkit_op=self.op)
        caps = self.lua.table()
        caps[b"testkit"] = self.lua.table_from({b"load": sb.host[b"testkit_load"], b"op": sb.host[b"testkit_op"]})
        sb.sb.set_library_caps(caps)

    def state_root(self) -> Path:
        """A temp folder for this spec run's state dirs, removed when the run is gone."""
        if self._root is None:
            self._root = Path(tempfile.mkdtemp(prefix="hubhost-spec-"))
            weakref.finalize(self, shutil.rmtree, str(self._root), True)
        return self._root

    def _out(self, value: Any) -> Any:
        return to_lua(self.lua, value)

    def _guarded(self, fn: Callable[[], Any], h: KitDriver | None = None) -> tuple[Any, ...]:
        try:
            value = fn()
            if h is not None:
                h._check_strict()
            return True, self._out(value)
        except ExecError as e:
            if h is not None:
                h._raised = len(h.failures)
            return False, f"{e.code}: {e.message}".encode(), False
        except KitError as e:
            return False, e.message.encode(), e.located
        except LuaError as e:   # a responder or handler of the spec failed
            return False, _text(e.args[0] if e.args else e).encode(), False

    # -- load_driver ---------------------------------------------------------------------
    def load(self, path: Any, opts: Any) -> tuple[Any, ...]:
        return self._guarded(lambda: self._load(path, opts))

    def _load(self, path: Any, opts: Any) -> int:
        if path is None:
            folder = self.driver_root
        elif isinstance(path, bytes):
            rel = path.decode("utf-8", "replace")
            if rel.startswith("/"):
                raise KitError(f"load_driver: path {rel!r} must be relative to the spec's folder "
                               f"({self.spec_dir})")
            folder = (self.spec_dir / rel).resolve()
        else:
            raise KitError(f"load_driver: path must be a string (relative to the spec's folder) or nil, "
                           f"got {_kind(path)}")
        if not (folder / "init.lua").is_file():
            raise KitError(f"load_driver: {folder} is not a driver folder (no init.lua)")
        o = _table(opts, "load_driver options")
        _unknown(o, _LOAD_KEYS, "load_driver options")
        devices = parse_devices(o.get("devices", []), "devices")
        cfg = o.get("config", {})
        if cfg == []:
            cfg = {}
        if not isinstance(cfg, dict):
            raise KitError(f"load_driver: config must be the driver's settings table "
                           f"({{ id =, cpu_limit =, max_memory =, flush_interval = }}), got {cfg!r}")
        _unknown(cfg, _CONFIG_KEYS, "config")
        driver_id = cfg.get("id", re.sub(r"[^A-Za-z0-9_.:-]", "_", folder.name)[:128] or "driver")
        if not isinstance(driver_id, str) or not _ID.match(driver_id):
            raise KitError(f"config.id must be an id of letters, digits and _.:- (max 128), got {driver_id!r}")
        strict = o.get("strict", True)
        if not isinstance(strict, bool):
            raise KitError(f"load_driver: strict must be true or false, got {strict!r}")
        store = o.get("datastore")
        if store is not None and not isinstance(store, dict) and store != []:
            raise KitError(f"load_driver: datastore must be a table (the store's initial contents), got {store!r}")
        if store is not None:
            try:
                orjson.dumps(store)
            except TypeError as e:
                raise KitError(f"load_driver: datastore must hold only JSON-like data: {e}") from None
        hid = next(self._ids)
        root = self.state_root() / str(hid)
        h = KitDriver(folder, root, driver_id=driver_id, devices=devices,
                      cpu_limit=_number(cfg, "cpu_limit", "config", 1.0),
                      max_memory=_size(cfg, "max_memory", "config", 64 * 1024 * 1024),
                      flush_interval=_number(cfg, "flush_interval", "config", DEFAULT_FLUSH_INTERVAL),
                      strict=strict, datastore={} if store == [] else store)
        self.handles[hid] = h
        return hid

    # -- handle operations ---------------------------------------------------------------
    def op(self, hid: Any, name: bytes, *args: Any) -> tuple[Any, ...]:
        h = self.handles.get(hid)
        method = getattr(self, "op_" + name.decode(), None) if isinstance(name, bytes) else None
        if h is None or method is None:
            return False, f"test kit: unknown handle or operation {name!r}".encode(), True
        return self._guarded(lambda: method(h, *args), h)

    @staticmethod
    def _id(value: Any, what: str = "device id") -> str:
        if not isinstance(value, bytes):
            raise KitError(f"{what} must be a string, got {_kind(value)}")
        return value.decode("utf-8", "replace")

    def op_exec(self, h: KitDriver, dev: Any, fn: Any, args: Any = None, level: Any = None) -> Any:
        cid = self._exec_start(h, dev, fn, args, level)
        return h.wait_call(cid)

    def op_exec_async(self, h: KitDriver, dev: Any, fn: Any, args: Any = None, level: Any = None) -> int:
        return self._exec_start(h, dev, fn, args, level)

    def _exec_start(self, h: KitDriver, dev: Any, fn: Any, args: Any, level: Any) -> int:
        device_id = self._id(dev)
        name = self._id(fn, "function name")
        lvl = "administrator" if level is None else self._id(level, "level")
        if lvl not in LEVELS:   # a mistake in the spec, reported at its line (the API would say forbidden)
            raise KitError(f"exec: unknown security level {lvl!r} (none, support, administrator)")
        if args is not None and lupa.lua_type(args) != "table":
            raise KitError(f"exec: args must be a table of named (or positional) arguments, got {_kind(args)}")
        return h.exec_start(device_id, name, from_lua(args) if args is not None else None, lvl)

    def op_call_done(self, h: KitDriver, cid: Any) -> bool:
        return h.calls.get(cid) is not None

    def op_call_result(self, h: KitDriver, cid: Any) -> Any:
        return h.call_outcome(cid)

    def op_status(self, h: KitDriver, dev: Any, name: Any = None) -> Any:
        device_id = self._id(dev)     # any id: a removed device's old status stays readable
        fields = h.status.device(device_id)
        if name is not None:
            text = fields.get(self._id(name, "status name"))
            return None if text is None else orjson.loads(text)
        return {k: orjson.loads(v) for k, v in fields.items()}

    def op_datastore(self, h: KitDriver) -> Any:
        h.running()
        assert h.binding is not None
        return h.binding.data()

    def op_device_store(self, h: KitDriver, dev: Any) -> Any:
        device_id = self._id(dev)
        return self.op_datastore(h).get("__" + device_id)

    def op_stored(self, h: KitDriver) -> Any:
        try:
            return read_store_file(h.state_dir)
        except FileNotFoundError:
            return None

    def op_feed(self, h: KitDriver, dev: Any, data: Any) -> None:
        link = h.link(self._id(dev))
        if not isinstance(data, bytes):
            raise KitError(f"feed: data must be a string of bytes, got {_kind(data)}")
        if not link.connected:
            raise KitError(f"feed: device {link.id!r} is not connected (connect it with h:connect(id) first)")
        link.receive(data)
        h.clock.settle()

    def op_sent(self, h: KitDriver, dev: Any) -> bytes:
        link = h.link(self._id(dev))
        h.clock.settle()
        out = bytes(link.wire.sent)
        link.wire.sent.clear()
        return out

    def op_connect(self, h: KitDriver, dev: Any) -> None:
        h.link(self._id(dev)).connect()
        h.clock.settle()

    def op_disconnect(self, h: KitDriver, dev: Any, reason: Any = None) -> None:
        link = h.link(self._id(dev))
        link.disconnect("closed by the test" if reason is None else self._id(reason, "reason"))
        h.clock.settle()

    def op_connected(self, h: KitDriver, dev: Any) -> bool:
        return h.link(self._id(dev)).connected

    def op_respond(self, h: KitDriver, dev: Any, responder: Any, delay: Any = None) -> None:
        link = h.link(self._id(dev))
        if delay is not None and (isinstance(delay, bool) or not isinstance(delay, (int, float))
                                  or not math.isfinite(delay) or delay < 0):
            raise KitError(f"respond: delay must be a number of seconds >= 0, got {delay!r}")
        kind = lupa.lua_type(responder)
        if responder is None or kind == "function":
            chosen = responder
        elif kind == "table":
            chosen = {}
            for k, v in responder.items():
                replies = [v] if isinstance(v, bytes) else (
                    [v[i] for i in range(1, len(v) + 1)] if lupa.lua_type(v) == "table" else None)
                if not isinstance(k, bytes) or replies is None or not all(isinstance(r, bytes) for r in replies):
                    raise KitError("respond: a table responder maps sent bytes to a reply string "
                                   f"(or a list of them), got {_kind(k)} -> {_kind(v)}")
                chosen[k] = replies
        else:
            raise KitError(f"respond: responder must be a function(sent) -> reply, a table "
                           f"{{ [sent] = reply }} or nil, got {kind or _kind(responder)}")
        link.wire.responder = chosen
        link.wire.delay = float(delay or 0.0)

    def op_advance_time(self, h: KitDriver, seconds: Any) -> float:
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not (
                math.isfinite(seconds) and seconds >= 0):
            raise KitError(f"advance_time: seconds must be a finite number >= 0, got {seconds!r}")
        h.running()
        h.clock.run_until(h.clock.now + seconds)
        return h.clock.now

    def op_now(self, h: KitDriver) -> float:
        return h.clock.now

    def op_logs(self, h: KitDriver) -> list[dict[str, Any]]:
        return list(h.capture.records)

    def op_errors(self, h: KitDriver) -> list[dict[str, str]]:
        return list(h.failures)

    def op_interface(self, h: KitDriver) -> Any:
        h.running()
        return h.interface.doc if h.interface is not None else None

    def op_timers(self, h: KitDriver) -> int:
        return int(h.running().R.timer_count())

    def op_restart(self, h: KitDriver, opts: Any = None) -> None:
        o = _table(opts, "restart options")
        _unknown(o, _RESTART_KEYS, "restart options")
        for k in ("crash", "power_loss"):
            if not isinstance(o.get(k, False), bool):
                raise KitError(f"restart: {k} must be true or false, got {o[k]!r}")
        devices = parse_devices(o["devices"], "devices") if "devices" in o else None
        h.restart(crash=o.get("crash", False), power_loss=o.get("power_loss", False), devices=devices)

    def op_stop(self, h: KitDriver) -> None:
        h.stop()

    def op_on_call(self, h: KitDriver, fn: Any) -> None:
        if fn is None:
            h.call_handler = None
            return
        if lupa.lua_type(fn) != "function":
            raise KitError(f"on_call: expected a function(call) -> result, got {_kind(fn)}")
        lua = self.lua
        h.call_handler = lambda req: from_lua(fn(to_lua(lua, req)))

    def op_publish(self, h: KitDriver, system: Any, module: Any, index: Any, status: Any, value: Any = None) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, float)) or index < 1 or int(index) != index:
            raise KitError(f"publish: index must be a positive integer, got {index!r}")
        return h.publish(self._id(system, "system"), self._id(module, "module"), int(index),
                         self._id(status, "status name"), from_lua(value))


def install(sb: Sandbox, spec_path: Path) -> KitHost:
    """Give a spec runtime the kit (called by specrun for every spec pass)."""
    return KitHost(sb, spec_path)
