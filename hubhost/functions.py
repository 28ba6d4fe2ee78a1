"""Driver functions called from outside the driver: metadata, validated exec, security.

`exec(target, function, args, level)` checks, in this order and each with its own code:
the device exists (`unknown_device`), the function exists (`unknown_function`), the
caller's level allows it (`forbidden`), the arguments fit the parameters (`bad_args`,
naming the parameter and the expected type; defaults filled in). Only then does the call
cross to the driver's thread, where lua/driver_functions.lua runs the handler as a
coroutine and reports its JSON result or its error (`driver_error`) back; a call that
does not finish in time fails with `timeout`. Drivers call other drivers the same way
through `driver:system(id):get(Module, i):call(fn, args)` (a host wait named "call"), and
subscribe through the hub's Subscriptions.

Validation happens here, in Python, against the interface the driver published when it
loaded: it is the one place both callers (the API and Lua) pass through before anything
is sent to the target driver.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
from collections.abc import Container
from dataclasses import dataclass, field
from functools import partial
from typing import Any, NamedTuple

import orjson

from hubhost.sandbox.runtime import DriverRuntime
from hubhost.sandbox.sandbox import LuaError, to_lua
from hubhost.status.subscriptions import Subscriber, Subscriptions
from hubhost.loops import soon

__all__ = ["ExecError", "FunctionHost", "Interface", "LEVELS", "SystemRef", "bind_args", "check_call",
           "check_device"]

log = logging.getLogger("hubhost.functions")

LEVELS = {"none": 0, "support": 1, "administrator": 2}
CODES = ("unknown_device", "unknown_function", "forbidden", "bad_args", "driver_error", "timeout")
TYPES = ("Bool", "Int32", "Int64", "Float64", "String", "Array", "Object", "JSON")
MAX_TIMEOUT = 3600.0


class ExecError(Exception):
    """A refused or failed call; `code` is one of CODES."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message

    def to_json(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


class SystemRef(NamedTuple):
    """An indirect target: "<module>/<index>" in a system's index."""

    system: str
    module: str
    index: int

    def __str__(self) -> str:
        return f"{self.system}/{self.module}/{self.index}"


# -- interface and arguments ----------------------------------------------------------------

@dataclass(frozen=True)
class Param:
    name: str
    type: str                 # as written, e.g. "String|Int32"
    alts: tuple[str, ...]
    has_default: bool = False
    default: Any = None


@dataclass(frozen=True)
class Function:
    name: str
    params: tuple[Param, ...]
    level: str = "none"
    timeout: float | None = None
    by_name: dict[str, Param] = field(default_factory=dict, compare=False)

    def signature(self) -> str:
        return ", ".join(p.name for p in self.params) or "no parameters"


class Interface:
    """A driver's published interface (the `interface/<device_id>` document)."""

    def __init__(self, text: str, timeouts: dict[str, float] | None = None) -> None:
        self.text = text
        doc = orjson.loads(text)
        levels: dict[str, str] = {}
        for level, names in (doc.get("security") or {}).items():
            for n in names:
                levels[n] = level
        timeouts = timeouts or {}
        self.functions: dict[str, Function] = {}
        for name, params in (doc.get("functions") or {}).items():
            ps = []
            for pname, spec in params.items():
                alts = tuple(a.strip() for a in spec[0].split("|"))
                ps.append(Param(pname, spec[0], alts, len(spec) > 1, spec[1] if len(spec) > 1 else None))
            fn = Function(name, tuple(ps), levels.get(name, "none"), timeouts.get(name))
            fn.by_name.update((p.name, p) for p in ps)
            self.functions[name] = fn
        self.doc = doc


_NO = object()


def _json_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    if isinstance(v, str):
        return "string"
    if isinstance(v, list):
        return "array"
    if isinstance(v, dict):
        return "object"
    return type(v).__name__


def _shown(v: Any) -> str:
    kind = _json_type(v)
    if isinstance(v, (dict, list)):
        return f"{kind} of {len(v)} item{'s' if len(v) != 1 else ''}"
    if v is None:
        return "null"
    text = orjson.dumps(v).decode() if isinstance(v, (str, int, float)) else repr(v)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{kind} {text}"


def _integer(v: Any, lo: int, hi: int) -> Any:
    if isinstance(v, bool):
        return _NO
    if isinstance(v, float):
        if not v.is_integer():
            return _NO
        v = int(v)
    if isinstance(v, int) and lo <= v <= hi:
        return v
    return _NO


def _check_one(kind: str, v: Any) -> Any:
    """The value as the handler should get it, or _NO."""
    if kind == "JSON":
        return v
    if kind == "Bool":
        return v if isinstance(v, bool) else _NO
    if kind == "Int32":
        return _integer(v, -2**31, 2**31 - 1)
    if kind == "Int64":
        return _integer(v, -2**63, 2**63 - 1)
    if kind == "Float64":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            return _NO
        if isinstance(v, int) and not -2**63 <= v < 2**63:
            v = float(v)   # too big for Lua's integer path; a double is what Float64 means
        return v if math.isfinite(v) else _NO
    if kind == "String":
        return v if isinstance(v, str) else _NO
    # An empty Lua table is both an empty array and an empty object.
    if kind == "Array":
        return v if isinstance(v, list) or v == {} else _NO
    if kind == "Object":
        return v if isinstance(v, dict) or v == [] else _NO
    return _NO


_RANGES = {"Int32": " (-2147483648..2147483647)", "Int64": " (-2^63..2^63-1)"}


_I64 = 2**63


def _fits_lua(v: Any, depth: int = 0) -> bool:
    """Lua numbers come from C int64 or double: bigger integers cannot cross (lupa)."""
    if isinstance(v, int):
        return -_I64 <= v < _I64
    if depth > 64:
        return False
    if isinstance(v, list):
        return all(_fits_lua(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(_fits_lua(x, depth + 1) for x in v.values())
    return True


def _check(fn: Function, p: Param, v: Any) -> Any:
    for kind in p.alts:
        r = _check_one(kind, v)
        if r is not _NO:
            if not _fits_lua(r):
                raise ExecError("bad_args", f"{fn.name}: argument '{p.name}' holds an integer outside "
                                "-2^63..2^63-1 or is nested deeper than 64 levels")
            return r
    hint = _RANGES.get(p.type, "")
    raise ExecError("bad_args", f"{fn.name}: argument '{p.name}' must be {p.type}{hint}, got {_shown(v)}")


def bind_args(fn: Function, args: Any) -> dict[str, Any]:
    """Named (object) or positional (array) arguments -> {param: value}, checked and with
    defaults filled in. Raises ExecError("bad_args")."""
    if args is None:
        args = {}
    if isinstance(args, list):
        if len(args) > len(fn.params):
            raise ExecError("bad_args", f"{fn.name} takes {len(fn.params)} argument"
                            f"{'s' if len(fn.params) != 1 else ''} ({fn.signature()}), got {len(args)}")
        args = {p.name: v for p, v in zip(fn.params, args)}
    elif isinstance(args, dict):
        for name in args:
            if name not in fn.by_name:
                raise ExecError("bad_args", f"{fn.name} has no parameter {name!r} (parameters: {fn.signature()})")
    else:
        raise ExecError("bad_args", "args must be an object of named arguments or an array of "
                        f"positional arguments, got {_shown(args)}")
    out: dict[str, Any] = {}
    for p in fn.params:
        v = args.get(p.name, _NO)
        if v is _NO or (v is None and p.has_default):
            if not p.has_default:
                raise ExecError("bad_args", f"{fn.name}: missing argument '{p.name}' ({p.type})")
            if p.default is not None:
                out[p.name] = p.default
            continue
        out[p.name] = _check(fn, p, v)
    return out


def check_level(level: str) -> str:
    if level not in LEVELS:
        raise ValueError(f"unknown security level {level!r} (none, support, administrator)")
    return level


def check_device(device_id: str, devices: Container[str]) -> str:
    """`device_id` if it is one of `devices`, else ExecError("unknown_device")."""
    if device_id not in devices:
        raise ExecError("unknown_device", f"no device {device_id!r} on this hub")
    return device_id


def check_call(iface: Interface, device_id: str, function: Any, args: Any, level: str) -> tuple[Function, dict]:
    """The checks after the device is known and its driver loaded, in the documented order:
    `unknown_function`, `forbidden`, `bad_args`. Returns the function and its bound
    arguments (defaults filled in). Pure, so FunctionHost and the test kit share it."""
    fn = iface.functions.get(function) if isinstance(function, str) else None
    if fn is None:
        names = ", ".join(iface.functions) or "none"
        raise ExecError("unknown_function", f"device {device_id!r} has no function {function!r} "
                        f"(functions: {names})")
    if LEVELS.get(level, -1) < LEVELS[fn.level]:
        raise ExecError("forbidden", f"{fn.name} on {device_id!r} needs the {fn.level} level; "
                        f"the caller has {level}")
    return fn, bind_args(fn, args)


# -- the host side --------------------------------------------------------------------------

@dataclass
class _LuaSide:
    api: Any        # the driver_functions module table
    invoke: Any
    deliver: Any
    driver: Any


@dataclass
class _Pending:
    future: asyncio.Future
    rt: DriverRuntime
    what: str


class FunctionHost:
    """Exec, interfaces and Lua-side calls/subscriptions for one Supervisor."""

    def __init__(self, sup: Any, subs: Subscriptions, *, default_timeout: float = 10.0,
                 driver_level: str = "support", driver_levels: dict[str, str] | None = None) -> None:
        self.sup = sup
        self.subs = subs
        self.default_timeout = default_timeout
        self.driver_level = check_level(driver_level)
        self.driver_levels = {k: check_level(v) for k, v in (driver_levels or {}).items()}
        self.interfaces: dict[str, Interface] = {}     # driver id -> interface
        self._devices: dict[str, Any] = {}             # device id -> DriverSlot
        self._lua: dict[DriverRuntime, _LuaSide] = {}
        self._current: dict[str, DriverRuntime] = {}   # driver id -> newest runtime
        self._lua_subs: dict[DriverRuntime, Subscriber] = {}
        self._pending: dict[int, _Pending] = {}
        self._ids = itertools.count(1)

    # -- wiring --------------------------------------------------------------------------
    def attach(self) -> None:
        sup = self.sup
        sup.runtime_hooks.append(self._on_runtime)
        sup.wait_handlers["call"] = self._wait_call
        sup.crash_hooks.append(lambda slot, rt, actor: self._forget(rt, "crashed"))
        sup.stop_hooks.append(lambda slot, rt, actor: self._forget(rt, "stopped"))
        self.rebuild()

    def rebuild(self) -> None:
        """Re-read which slot serves which device (at start and after a reload)."""
        self._devices = {dev.id: slot for slot in self.sup.slots.values() for dev in slot.cfg.devices}
        for driver_id in list(self.interfaces):
            if driver_id not in self.sup.slots:
                del self.interfaces[driver_id]

    def device_slot(self, device_id: str) -> Any:
        return self._devices.get(device_id)

    def interface_of(self, device_id: str) -> Interface | None:
        slot = self._devices.get(device_id)
        return self.interfaces.get(slot.id) if slot is not None else None

    def level_of_driver(self, driver_id: str) -> str:
        return self.driver_levels.get(driver_id, self.driver_level)

    # -- runtime hooks (driver thread) -----------------------------------------------------
    def _on_runtime(self, slot: Any, rt: DriverRuntime) -> None:
        old = self._current.get(slot.id)
        self._current[slot.id] = rt
        if old is not None and old is not rt:
            # an abandoned (stuck) runtime gets no crash hook: clean up after it here
            soon(self.sup.loop, self._forget, old, "restarted")
        rt.sandbox.expose(
            fn_done=partial(self._fn_done, rt),
            fn_subscribe=partial(self._fn_subscribe, slot, rt),
            fn_unsubscribe=partial(self._fn_unsubscribe, rt),
        )
        rt.extensions.append(_AfterLoad(self, slot))

    def _loaded(self, slot: Any, rt: DriverRuntime) -> None:
        """After the entry chunk ran (driver thread): read the interface, keep the entry points."""
        api = rt.R.caps.functions_api
        driver = rt.R.driver()
        if api is None or driver is None:
            return
        try:
            text, timeouts = api.metadata_json(driver)
            iface = Interface(text.decode(), orjson.loads(timeouts))
        except (LuaError, ValueError) as e:
            log.error("[%s] cannot build the driver's interface: %s", slot.id, e)
            iface = Interface('{"functions":{},"implements":[],"requirements":{},"security":{}}')
        self._lua[rt] = _LuaSide(api, api.invoke, api.deliver, driver)
        self.interfaces[slot.id] = iface
        soon(self.sup.loop, self._publish_interface, slot, iface)

    def _publish_interface(self, slot: Any, iface: Interface) -> None:
        mirror = getattr(self.sup, "mirror", None)
        if mirror is not None:
            for dev in slot.cfg.devices:
                mirror.set_interface(dev.id, iface.text)

    def _forget(self, rt: DriverRuntime, why: str) -> None:
        """A runtime is gone (loop thread): fail its calls, drop its subscriptions."""
        self._lua.pop(rt, None)
        sub = self._lua_subs.pop(rt, None)
        if sub is not None:
            sub.terminate()
        for cid, p in list(self._pending.items()):
            if p.rt is rt and not p.future.done():
                p.future.set_exception(ExecError("driver_error", f"{p.what}: the driver {why} before it finished"))

    # -- exec ----------------------------------------------------------------------------
    def resolve(self, target: str | SystemRef) -> str:
        """Device id for a target, or ExecError("unknown_device")."""
        if isinstance(target, SystemRef):
            if target.system not in self.subs.index:
                raise ExecError("unknown_device", f"no system {target.system!r} on this hub")
            dev = self.subs.resolve(target.system, target.module, target.index)
            if dev is None:
                known = ", ".join(sorted(self.subs.index[target.system])) or "none"
                raise ExecError("unknown_device", f"system {target.system!r} has no "
                                f"{target.module}/{target.index} (it has: {known})")
            target = dev
        return check_device(target, self._devices)

    def prepare(self, target: str | SystemRef, function: str, args: Any, level: str) -> tuple[Any, str, Function, dict]:
        """Every check before sending, in the documented order."""
        device_id = self.resolve(target)
        slot = self._devices[device_id]
        iface = self.interfaces.get(slot.id)
        if iface is None:
            raise ExecError("driver_error", f"driver {slot.id!r} of device {device_id!r} has not loaded"
                            f"{': ' + slot.last_error if slot.last_error else ''}")
        fn, bound = check_call(iface, device_id, function, args, level)
        return slot, device_id, fn, bound

    async def exec(self, target: str | SystemRef, function: str, args: Any = None, *,
                   level: str = "administrator", timeout: float | None = None) -> str:
        """Run a function; returns its result as JSON text or raises ExecError."""
        slot, device_id, fn, bound = self.prepare(target, function, args, level)
        rt, actor = slot.rt, slot.actor
        what = f"{fn.name} on {device_id!r}"
        if rt is None or actor is None or slot.state != "running" or rt not in self._lua:
            raise ExecError("driver_error", f"{what}: driver {slot.id!r} is not running ({slot.state})")
        limit = timeout if timeout is not None else (fn.timeout or self.default_timeout)
        limit = min(max(limit, 0.001), MAX_TIMEOUT)
        loop = self.sup.loop
        fut = loop.create_future()
        cid = next(self._ids)
        self._pending[cid] = _Pending(fut, rt, what)
        timer = loop.call_later(limit, _expire, fut, what, limit)
        actor.post(self._start, rt, cid, device_id, fn.name, bound)   # last: the loop idles sooner
        try:
            ok, payload = await fut
        except ExecError as e:
            if e.code == "timeout":
                # the caller got `timeout`: the handler is cancelled in the driver (never
                # resumed again; the driver logs a warning naming the call)
                actor.post(self._cancel, rt, cid, limit)
            raise
        finally:
            timer.cancel()
            self._pending.pop(cid, None)
        if not ok:
            raise ExecError("driver_error", f"{what}: {payload.decode('utf-8', 'replace')}")
        try:
            return payload.decode()
        except UnicodeDecodeError:
            raise ExecError("driver_error", f"{what}: the result holds a string that is not UTF-8") from None

    def _start(self, rt: DriverRuntime, cid: int, device_id: str, name: str, bound: dict) -> None:
        """Driver thread: run the handler as a coroutine of this driver."""
        side = self._lua.get(rt)
        if side is None:
            self._fn_done(rt, cid, False, b"the driver is not loaded")
            return
        try:
            lua_args = to_lua(rt.lua, bound)
        except (OverflowError, TypeError, LuaError) as e:   # validation should have caught it
            self._fn_done(rt, cid, False, f"arguments could not be passed to Lua: {e}".encode())
            return
        # A handler that finishes without waiting leaves its outcome in the Lua module
        # (api.sync_*) instead of calling back into Python from inside the call: fewer GIL
        # round trips while the loop thread is busy, and one wake-up of the loop at the end.
        api = side.api
        api.sync_id = cid
        label = f"function {name} [{device_id}]"
        faults = getattr(rt, "failure_count", 0)
        try:
            rt.call(label, side.invoke, side.driver, device_id.encode(), name.encode(), lua_args, cid)
        finally:
            ok, payload = api.sync_ok, api.sync_payload
            api.sync_id = api.sync_ok = api.sync_payload = None
        if ok is None and getattr(rt, "failure_count", 0) > faults and rt.failures \
                and rt.failures[-1][0] == label:
            # aborted after the handler returned (e.g. its result over a limit while being
            # encoded): no report came from Lua, so the caller hears it now, not at its timeout
            ok, payload = False, rt.failures[-1][2].encode("utf-8", "replace")
        if ok is not None:
            soon(self.sup.loop, self._finish, cid, bool(ok), payload)

    def _cancel(self, rt: DriverRuntime, cid: int, limit: float) -> None:
        """Driver thread: drop a timed-out call's handler (lua/driver_functions.lua M.cancel)."""
        side = self._lua.get(rt)
        if side is None:
            return
        try:
            side.api.cancel(cid, limit)
        except LuaError as e:
            log.error("[%s] could not cancel a timed-out call: %s", rt.driver_id, e)

    def _fn_done(self, rt: DriverRuntime, cid: int, ok: bool, payload: bytes) -> None:
        """host.fn_done from lua/driver_functions.lua (driver thread): a call that waited."""
        soon(self.sup.loop, self._finish, cid, bool(ok), payload)

    def _finish(self, cid: int, ok: bool, payload: bytes) -> None:
        p = self._pending.get(cid)
        if p is not None and not p.future.done():
            p.future.set_result((ok, payload))

    # -- calls from Lua ------------------------------------------------------------------
    def _wait_call(self, slot: Any, rt: DriverRuntime, token: int, arg: Any) -> None:
        """host wait "call" (driver thread, inside Lua): answer later, from the loop."""
        soon(self.sup.loop, self._spawn_lua_call, slot, rt, token, arg)

    def _spawn_lua_call(self, slot: Any, rt: DriverRuntime, token: int, arg: Any) -> None:
        self.sup.spawn(self._lua_call(slot, rt, token, arg))

    async def _lua_call(self, slot: Any, rt: DriverRuntime, token: int, arg: Any) -> None:
        try:
            req = orjson.loads(arg)
            target = SystemRef(req["system"], req["module"], int(req["index"]))
            text = await self.exec(target, req["function"], req["args"], level=self.level_of_driver(slot.id))
            ok, value = True, orjson.loads(text)
        except ExecError as e:
            ok, value = False, f"{e.code}: {e.message}"
        except (ValueError, KeyError, TypeError) as e:
            ok, value = False, f"bad_args: malformed call request ({e})"
        if slot.rt is rt and slot.actor is not None:
            slot.actor.post(_resume_lua, rt, token, ok, value)

    def _fn_subscribe(self, slot: Any, rt: DriverRuntime, system: bytes, module: bytes, index: Any,
                      status: bytes) -> int:
        """host.fn_subscribe (driver thread): the reference now, the subscription on the loop."""
        ref = self.subs.new_ref()
        place = (system.decode(), module.decode(), int(index), status.decode())
        soon(self.sup.loop, self._lua_subscribe, slot, rt, ref, place)
        return ref

    def _lua_subscribe(self, slot: Any, rt: DriverRuntime, ref: int, place: tuple) -> None:
        if slot.rt is not rt:
            return
        sub = self._lua_subs.get(rt)
        if sub is None:
            sub = self._lua_subs[rt] = self.subs.subscriber()
        label = f"subscription {place[1]}/{place[2]}.{place[3]} in {place[0]}"
        sub.subscribe(*place, partial(self._lua_deliver, slot, rt, label), ref=ref)

    def _lua_deliver(self, slot: Any, rt: DriverRuntime, label: str, ref: int, text: str) -> None:
        if slot.rt is rt and slot.actor is not None:
            slot.actor.post(self._deliver_on_driver, rt, label, ref, text)

    def _deliver_on_driver(self, rt: DriverRuntime, label: str, ref: int, text: str) -> None:
        side = self._lua.get(rt)
        if side is not None:
            rt.call(label, side.deliver, side.driver, ref, to_lua(rt.lua, orjson.loads(text)))

    def _fn_unsubscribe(self, rt: DriverRuntime, ref: int) -> None:
        def drop() -> None:
            sub = self._lua_subs.get(rt)
            if sub is not None:
                sub.unsubscribe(ref)
        soon(self.sup.loop, drop)

    def lua_subscription_count(self) -> int:
        return sum(len(s) for s in self._lua_subs.values())


class _AfterLoad:
    """DriverRuntime extension: runs once the entry chunk has built the driver."""

    def __init__(self, host: FunctionHost, slot: Any) -> None:
        self.host = host
        self.slot = slot

    def after_load(self, rt: DriverRuntime) -> None:
        self.host._loaded(self.slot, rt)


def _expire(fut: asyncio.Future, what: str, limit: float) -> None:
    if not fut.done():
        fut.set_exception(ExecError("timeout", f"{what} did not finish within {limit:g} s; "
                                    "its handler was cancelled in the driver (not resumed again)"))


def _resume_lua(rt: DriverRuntime, token: int, ok: bool, value: Any) -> None:
    if ok:
        rt.resume(token, True, to_lua(rt.lua, value))
    else:
        rt.resume(token, False, value.encode())
