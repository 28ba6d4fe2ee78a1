"""Functions as the supervisor runs them: exec from the API (and from drivers calling other
drivers) is checked here against the interface each worker published, then crosses to the
device's worker once and its answer crosses back once. Subscriptions of driver code are
held here, where every device's status is, and delivered to the subscriber's worker.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from typing import Any

import orjson

from hubhost.functions import CODES, MAX_TIMEOUT, ExecError, FunctionHost, Interface, SystemRef
from hubhost.status.subscriptions import Subscriber, Subscriptions

log = logging.getLogger("hubhost.functions")

EMPTY_INTERFACE = '{"functions":{},"implements":[],"requirements":{},"security":{}}'


class RoutedFunctions(FunctionHost):
    """FunctionHost of the supervisor: the checks are the same code as everywhere; the
    handler runs in the device's worker."""

    def __init__(self, sup: Any, subs: Subscriptions, **kw: Any) -> None:
        super().__init__(sup, subs, **kw)
        self._calls: dict[int, tuple[asyncio.Future, Any, str]] = {}
        self._cids = itertools.count(1)
        self._subscribers: dict[Any, Subscriber] = {}        # worker -> its subscriptions
        self._places: dict[tuple[Any, tuple], _Place] = {}   # (worker, place) -> shared one
        self._ref_place: dict[tuple[Any, int], tuple] = {}   # (worker, worker's ref) -> place
        self.exec_counts: dict[str, int] = {}                # "ok" or an error code -> calls
        self.remote: Any = None   # fleet mode: an ExecClient for devices on other hubs (fleet/wiring.py)

    def attach(self) -> None:
        self.rebuild()

    # -- interfaces ----------------------------------------------------------------------
    def set_interface(self, slot: Any, text: str, timeouts: dict[str, float]) -> None:
        try:
            iface = Interface(text, timeouts)
        except Exception as e:  # noqa: BLE001 - a worker's document is not trusted
            log.error("[%s] the driver's interface is unusable (%s); publishing none", slot.id, e)
            iface = Interface(EMPTY_INTERFACE)
        self.interfaces[slot.id] = iface
        self._publish_interface(slot, iface)

    # -- exec ------------------------------------------------------------------------------
    async def exec(self, target: str | SystemRef, function: str, args: Any = None, *,
                   level: str = "administrator", timeout: float | None = None, route: bool = True) -> str:
        """Run a function in its device's worker; counts each call by outcome (/metrics).
        In fleet mode a device not on this hub is called on its owner (`route=False`: never,
        for calls that reached this hub as the owner)."""
        counts = self.exec_counts
        try:
            try:
                result = await self._exec(target, function, args, level, timeout)
            except ExecError as e:
                if e.code != "unknown_device" or not route or self.remote is None:
                    raise
                result = await self.remote.exec_text(target, function, args, level=level, timeout=timeout)
        except ExecError as e:
            code = e.code if e.code in CODES else "driver_error"
            counts[code] = counts.get(code, 0) + 1
            raise
        counts["ok"] = counts.get("ok", 0) + 1
        return result

    async def _exec(self, target: str | SystemRef, function: str, args: Any, level: str,
                    timeout: float | None) -> str:
        slot, device_id, fn, bound = self.prepare(target, function, args, level)
        what = f"{fn.name} on {device_id!r}"
        w = slot.worker
        if w is None or not w.alive or slot.state != "running":
            raise ExecError("driver_error", f"{what}: driver {slot.id!r} is not running ({slot.state})")
        limit = timeout if timeout is not None else (fn.timeout or self.default_timeout)
        limit = min(max(limit, 0.001), MAX_TIMEOUT)
        fut = self.sup.loop.create_future()
        cid = next(self._cids)
        self._calls[cid] = (fut, w, what)
        # the worker times the call (and cancels its handler at the limit, so the caller's
        # `timeout` and the cancellation agree); this wait is a backstop for a stalled worker
        w.send(["exec", cid, device_id, fn.name, bound, level, limit])
        try:
            ok, payload = await asyncio.wait_for(fut, limit + 1.0)
        except asyncio.TimeoutError:
            raise ExecError("timeout", f"{what} did not finish within {limit:g} s (its worker did not answer)") from None
        finally:
            self._calls.pop(cid, None)
        if ok:
            return payload
        code, message = payload
        raise ExecError(code, message)

    def exec_done(self, w: Any, msg: list[Any]) -> None:
        entry = self._calls.get(int(msg[1]))
        if entry is None or entry[1] is not w:
            return
        fut, _w, what = entry
        if fut.done():
            return
        if msg[2] is True:
            text = msg[3]
            if not isinstance(text, str) or len(text) > 16 << 20 or not _is_json(text):
                fut.set_result((False, ("driver_error", f"{what}: the worker returned a result that is not JSON text")))
            else:
                fut.set_result((True, text))
        else:
            code = msg[3] if msg[3] in CODES else "driver_error"
            fut.set_result((False, (code, str(msg[4])[:4000])))

    def worker_gone(self, w: Any, why: str) -> None:
        for cid, (fut, cw, what) in list(self._calls.items()):
            if cw is w and not fut.done():
                fut.set_exception(ExecError("driver_error", f"{what}: the driver {why} before it finished"))
        sub = self._subscribers.pop(w, None)
        if sub is not None:
            sub.terminate()
        for key in [k for k in self._ref_place if k[0] is w]:
            del self._ref_place[key]
        for key in [k for k in self._places if k[0] is w]:
            del self._places[key]

    # -- driver code calling and watching other devices ----------------------------------
    async def lua_call(self, w: Any, slot: Any, ref: int, text: str) -> None:
        try:
            req = orjson.loads(text)
            target = SystemRef(str(req["system"]), str(req["module"]), int(req["index"]))
            result = await self.exec(target, str(req["function"]), req["args"],
                                     level=self.level_of_driver(slot.id))
            ok, value = True, orjson.loads(result)
        except ExecError as e:
            ok, value = False, f"{e.code}: {e.message}"
        except (ValueError, KeyError, TypeError) as e:
            ok, value = False, f"bad_args: malformed call request ({e})"
        w.send(["call_done", ref, ok, value])

    def lua_subscribe(self, w: Any, slot: Any, ref: int, place: tuple[str, str, int, str]) -> None:
        """One subscription of driver code. Subscriptions of one worker to the same place
        share one subscription here and one message per change (carrying every ref), so a
        driver cannot multiply the supervisor's work by subscribing many times."""
        cap = sum(s.cfg.max_subscriptions for s in w.slots.values())
        if len(self._ref_place) >= cap and sum(1 for k in self._ref_place if k[0] is w) >= cap:
            w.kill(f"protocol violation: more than {cap} subscriptions (max_subscriptions)")
            return
        key = (w, place)
        self._ref_place[(w, ref)] = place
        entry = self._places.get(key)
        if entry is not None:
            entry.refs.add(ref)
            if entry.last is not None:
                w.send(["deliver_many", [ref], entry.last])
            return
        sub = self._subscribers.get(w)
        if sub is None:
            sub = self._subscribers[w] = self.subs.subscriber()
        entry = self._places[key] = _Place(self.subs.new_ref(), {ref})

        def deliver(_ours: int, text: str) -> None:
            entry.last = text
            if w.backlog() > MAX_TO_WORKER:
                w.kill(f"it does not read what it subscribed to ({w.backlog() >> 20} MiB queued for it)")
                return
            w.send(["deliver_many", sorted(entry.refs), text])

        sub.subscribe(*place, deliver, ref=entry.ours)

    def lua_unsubscribe(self, w: Any, ref: int) -> None:
        place = self._ref_place.pop((w, ref), None)
        if place is None:
            return
        entry = self._places.get((w, place))
        if entry is None:
            return
        entry.refs.discard(ref)
        if not entry.refs:
            del self._places[(w, place)]
            sub = self._subscribers.get(w)
            if sub is not None:
                sub.unsubscribe(entry.ours)

    def lua_subscription_count(self) -> int:
        return len(self._ref_place)


class _Place:
    __slots__ = ("ours", "refs", "last")

    def __init__(self, ours: int, refs: set[int]) -> None:
        self.ours = ours
        self.refs = refs
        self.last: str | None = None


MAX_TO_WORKER = 64 << 20   # bytes queued for one worker before it counts as not reading


def _is_json(text: str) -> bool:
    try:
        orjson.loads(text)
    except orjson.JSONDecodeError:
        return False
    return True


__all__ = ["RoutedFunctions"]
