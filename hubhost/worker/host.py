"""Inside a worker process: the drivers of one worker, their timers, waits and restarts.

This is the part of the old in-process supervisor that every event needs, moved behind the
process boundary: a timer tick or a frame never leaves the worker. What must outlive the
worker (files, the status truth, Redis, the API) is the supervisor's; `WorkerHost` reaches
it only through `self.upstream` (hubhost/worker/main.py), which frames and batches.

Life of a driver slot: start → running; an error in the entry chunk or an `init`/`added`
handler, or repeated limit faults → crash → restart in this worker after 1 s, 2 s, 4 s ...
60 s. A handler error alone is logged and the driver goes on. A handler stuck in C, a
segfault or runaway memory is the supervisor's to see: it kills the whole worker.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from hubhost.state import atomicfile

from hubhost import paths
from hubhost.worker.actor import Actor
from hubhost.config import DriverConfig
from hubhost.sandbox.runtime import DeviceInfo, DriverLoadError, DriverRuntime
from hubhost.status.store import StatusStore
from hubhost.loops import soon
from hubhost.metrics import HandlerStats

log = logging.getLogger("hubhost.worker")

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
FAULT_WINDOW = 30.0      # seconds in which FAULT_LIMIT limit faults restart a driver
FAULT_LIMIT = 5
SHUTDOWN_HANDLERS_BUDGET = 5.0


class DriverSlot:
    """One configured driver instance and its current runtime (the Port of that runtime)."""

    def __init__(self, sup: "WorkerHost", cfg: DriverConfig, known: dict[str, Any]) -> None:
        self.sup = sup
        self.cfg = cfg
        self.id = cfg.id
        self.state = "stopped"        # starting | running | restarting | failed | stopped
        self.rt: DriverRuntime | None = None
        self.actor: Actor | None = None
        self.timers: dict[int, asyncio.TimerHandle] = {}
        self.waits: dict[int, asyncio.TimerHandle] = {}
        self.backoff = BACKOFF_START
        self.restarts = 0
        self.last_crash = 0.0
        self.faults: list[float] = []
        self.restart_handle: asyncio.TimerHandle | None = None
        self.last_error: str | None = None
        self.state_dir = paths.driver_state_dir(sup.state_dir, cfg.id)
        self.failed_boot = False      # the last start attempt failed (entry chunk / init)
        self.known = known            # devices seen before (the supervisor's devices.json)
        self.stats = HandlerStats()   # handler durations and faults, across runtime restarts

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.sup.loop

    # -- Port: called on the driver's thread ---------------------------------------------
    def timer_start(self, rt: DriverRuntime, timer_id: int, seconds: float, periodic: bool) -> None:
        soon(self.loop, self._timer_start, rt, timer_id, seconds, periodic)

    def timer_cancel(self, rt: DriverRuntime, timer_id: int) -> None:
        soon(self.loop, self._timer_cancel, rt, timer_id)

    def wait_timer(self, rt: DriverRuntime, token: int, seconds: float) -> None:
        soon(self.loop, self._wait_start, rt, token, seconds)

    def wait_host(self, rt: DriverRuntime, token: int, what: str, arg: Any) -> None:
        handler = self.sup.wait_handlers.get(what)
        if handler is None:   # answered from the run queue: a resume never nests in Lua
            self.actor.post(rt.resume, token, None, f"unknown host wait {what!r}".encode())
            return
        handler(self, rt, token, arg)

    def handler_failed(self, rt: DriverRuntime, label: str, kind: str, message: str) -> None:
        soon(self.loop, self._handler_failed, rt, label, kind, message)

    # -- loop side -----------------------------------------------------------------------
    def _current(self, rt: DriverRuntime) -> bool:
        return rt is self.rt and self.state in ("starting", "running")

    def _timer_start(self, rt: DriverRuntime, timer_id: int, seconds: float, periodic: bool) -> None:
        if not self._current(rt):
            return
        start = self.loop.time()

        def fire(n: int = 1) -> None:
            if not self._current(rt) or self.actor is None:
                return
            self.actor.post(rt.fire_timer, timer_id)
            if periodic:
                # fixed rate: the n-th firing is due at start + n * seconds, no drift
                due = start + (n + 1) * seconds
                now = self.loop.time()
                if due < now:  # the loop fell behind: skip missed beats instead of bursting
                    skipped = int((now - due) // seconds) + 1
                    n += skipped
                    due = start + (n + 1) * seconds
                self.timers[timer_id] = self.loop.call_at(due, fire, n + 1)
            else:
                self.timers.pop(timer_id, None)

        self.timers[timer_id] = self.loop.call_at(start + seconds, fire)

    def _timer_cancel(self, rt: DriverRuntime, timer_id: int) -> None:
        h = self.timers.pop(timer_id, None)
        if h:
            h.cancel()

    def _wait_start(self, rt: DriverRuntime, token: int, seconds: float) -> None:
        if not self._current(rt):
            return

        def wake() -> None:
            self.waits.pop(token, None)
            if self._current(rt) and self.actor:
                self.actor.post(rt.resume, token)

        self.waits[token] = self.loop.call_later(seconds, wake)

    def _handler_failed(self, rt: DriverRuntime, label: str, kind: str, message: str) -> None:
        if rt is not self.rt:
            return
        self.last_error = f"{label}: {message}"
        if label.startswith(("init ", "added ")):
            self.crash(f"{label} handler failed: {message}")
            return
        if kind in ("cpu", "memory"):
            now = time.monotonic()
            self.faults = [t for t in self.faults if now - t < FAULT_WINDOW] + [now]
            if len(self.faults) >= FAULT_LIMIT:
                self.crash(f"{len(self.faults)} {kind} limit faults in {FAULT_WINDOW:g} s")
        self.sup.after_handler_fault(self, rt)

    # -- start / stop --------------------------------------------------------------------
    async def start(self) -> bool:
        """Start the driver; returns True if it is running."""
        self.state = "starting"
        self.restart_handle = None
        self.actor = Actor(self.id, self.loop)
        self.sup.report(self)
        try:
            await self.actor.call(self.loop, self._boot)
        except (DriverLoadError, OSError) as e:
            self.failed_boot = True
            self.crash(str(e))
            return False
        except Exception as e:  # noqa: BLE001 - any failure of a driver is contained
            log.exception("[%s] failed to start", self.id)
            self.failed_boot = True
            self.crash(f"{type(e).__name__}: {e}")
            return False
        if self.state != "starting":
            self.failed_boot = True   # an init handler failed during boot
        self.sup.report(self)
        if self.state == "starting":
            self.failed_boot = False
            self.state = "running"
            log.info("[%s] running (%s, %d device%s)", self.id, self.rt.driver_name() if self.rt else "?",
                     len(self.cfg.devices), "" if len(self.cfg.devices) == 1 else "s")
            self.sup.report(self)
            return True
        return False

    def _boot(self) -> None:
        """On the driver's thread: build the runtime, load the entry chunk, start devices."""
        rt = DriverRuntime(self.id, self.cfg.path, self, max_memory=self.cfg.max_memory,
                           cpu_limit=self.cfg.cpu_limit, state_dir=self.state_dir,
                           status=self.sup.status, **self.cfg.runtime_limits())
        rt.stats = self.stats
        self.rt = rt
        for hook in self.sup.runtime_hooks:
            hook(self, rt)
        rt.load()
        known = self._known_devices()
        # fleet mode: a device another hub drives now is away, not removed (its
        # persistent_store lives on in Redis; `removed` would drop it)
        configured = {d.id for d in self.cfg.devices} | set(self.cfg.elsewhere)
        for dev_id, info in known.items():
            if dev_id not in configured:
                rt.remove_device(DeviceInfo(id=dev_id, label=info.get("label", dev_id),
                                            config=info.get("config", {})))
        for dev in self.cfg.devices:
            rt.start_device(dev, dev.id not in known)
        self._save_known_devices(known)

    async def change_devices(self, add: list[tuple[DeviceInfo, Any, bool]], release: list[str],
                             elsewhere: tuple[str, ...], flush: bool = True) -> str | None:
        """Fleet mode: devices move between hubs without restarting the driver. Released
        devices stop (their links are closed when this returns) and keep their store; added
        ones get the store they bring (from Redis), then `added` (if new) and `init`. The
        store is flushed before this returns (unless `flush` is false: fencing, when the
        supervisor may not answer), so a released device's persistent_store has reached the
        supervisor. Returns None, or why it could not be done (then the
        supervisor restarts the driver instead)."""
        rt = self.rt
        if rt is None or self.actor is None or self.state != "running":
            return f"driver is {self.state}"
        from hubhost.state.datastore import DatastoreBinding

        def run() -> None:
            for dev_id in release:
                rt.release_device(dev_id)
            for info, store, is_new in add:
                if store is not None:
                    rt.put_device_store(info.id, store)
                rt.start_device(info, is_new)
            b = DatastoreBinding.of(rt)
            if flush and b is not None and b.store is not None:
                b.flush_now()

        gone = set(release)
        added = [info for info, _, _ in add]
        self.cfg = dataclasses.replace(self.cfg, devices=[d for d in self.cfg.devices if d.id not in gone]
                                       + added, elsewhere=elsewhere)
        functions = getattr(self.sup, "functions", None)
        if functions is not None:
            functions.rebuild()      # exec checks which slot serves a device
        try:
            await self.actor.call(self.loop, run)
        except Exception as e:  # noqa: BLE001 - reported; the supervisor restarts the driver
            return f"{type(e).__name__}: {e}"
        links = getattr(self.sup, "links", None)
        dl = links.drivers.get(self.id) if links is not None else None
        if dl is not None:
            await dl.closed(release)
        self._save_known_devices(self.known)
        if self.state != "running":
            return f"driver is {self.state}"
        return None

    def _known_devices(self) -> dict[str, dict[str, Any]]:
        return self.known

    def _save_known_devices(self, known: dict[str, Any]) -> None:
        """The supervisor writes devices.json (state files outlive workers)."""
        data = {d.id: {"label": d.label, "config": d.config} for d in self.cfg.devices}
        data.update({d: known[d] for d in self.cfg.elsewhere if d in known})
        if data == known:
            return
        self.known = data
        self.sup.upstream.known_devices(self.id, data)

    def _cancel_all(self) -> None:
        for h in list(self.timers.values()) + list(self.waits.values()):
            h.cancel()
        self.timers.clear()
        self.waits.clear()

    def crash(self, reason: str) -> None:
        """Stop this runtime and schedule a restart with exponential backoff."""
        if self.state in ("restarting", "stopped"):
            return
        self.last_error = reason
        self._cancel_all()
        rt, actor = self.rt, self.actor
        if actor is not None:
            if rt is not None:
                self.sup.on_crash(self, rt, actor)   # e.g. connected = false, before the line below
            actor.stop()
        self.rt, self.actor = None, None
        self.state = "restarting"
        now = time.monotonic()
        if now - self.last_crash > max(120.0, 2 * self.backoff):
            self.backoff = BACKOFF_START
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.last_crash = now
        self.restarts += 1
        self.faults.clear()
        log.error("[%s] driver crashed: %s; restarting in %g s", self.id, reason, delay)
        self.restart_handle = self.loop.call_later(delay, self._restart)
        self.sup.report(self)

    def _restart(self) -> None:
        if self.state != "restarting" or self.sup.stopping:
            return
        self.sup.spawn(self.start())

    async def stop(self, deadline: float) -> None:
        """Run the shutdown handler (bounded), let hooks flush, stop the thread."""
        if self.restart_handle:
            self.restart_handle.cancel()
        rt, actor = self.rt, self.actor
        self._cancel_all()
        if rt is not None and actor is not None and self.state in ("running", "starting"):
            self.state = "stopping"
            try:
                await asyncio.wait_for(actor.call(self.loop, rt.shutdown),
                                       max(0.1, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                log.error("[%s] shutdown handler still running at the deadline", self.id)
            await self.sup.on_stop(self, rt, actor)
            actor.stop()
        self.state = "stopped"
        self.sup.report(self)


class WorkerHost:
    """The drivers of one worker: their slots, the hooks the parts plug into, start/stop.

    `upstream` is the worker's side of the channel to the supervisor (main.Upstream).
    """

    def __init__(self, drivers: list[DriverConfig], known: dict[str, dict[str, Any]],
                 state_dir: Path, status: StatusStore, upstream: Any,
                 loop: asyncio.AbstractEventLoop) -> None:
        self.state_dir = Path(state_dir)
        self.loop = loop
        self.status = status
        self.upstream = upstream
        self.slots = {d.id: DriverSlot(self, d, known.get(d.id, {})) for d in drivers}
        self.stopping = False
        self._tasks: set[asyncio.Task] = set()
        # extension points for the parts of the worker (datastore, device links, functions)
        self.runtime_hooks: list[Callable[[DriverSlot, DriverRuntime], None]] = []
        self.wait_handlers: dict[str, Callable[[DriverSlot, DriverRuntime, int, Any], None]] = {}
        self.crash_hooks: list[Callable[[DriverSlot, DriverRuntime, Actor], None]] = []
        self.stop_hooks: list[Callable[[DriverSlot, DriverRuntime, Actor], Any]] = []
        self.fault_hooks: list[Callable[[DriverSlot, DriverRuntime], None]] = []
        self.ready_hooks: list[Callable[["WorkerHost"], None]] = []
        self.shutdown_hooks: list[Callable[["WorkerHost"], Any]] = []

    def spawn(self, coro: Any) -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def report(self, slot: DriverSlot) -> None:
        self.upstream.driver_state(slot)

    # hook fan-out
    def on_crash(self, slot: DriverSlot, rt: DriverRuntime, actor: Actor) -> None:
        for h in self.crash_hooks:
            try:
                h(slot, rt, actor)
            except Exception:
                log.exception("[%s] crash hook failed", slot.id)

    async def on_stop(self, slot: DriverSlot, rt: DriverRuntime, actor: Actor) -> None:
        for h in self.stop_hooks:
            try:
                r = h(slot, rt, actor)
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("[%s] stop hook failed", slot.id)

    def after_handler_fault(self, slot: DriverSlot, rt: DriverRuntime) -> None:
        for h in self.fault_hooks:
            h(slot, rt)

    async def start(self) -> list[bool]:
        results = [await s.start() for s in self.slots.values()]
        for h in self.ready_hooks:
            h(self)
        return results

    async def stop(self, budget: float = SHUTDOWN_HANDLERS_BUDGET) -> None:
        if self.stopping:
            return
        self.stopping = True
        deadline = self.loop.time() + budget
        await asyncio.gather(*(s.stop(deadline) for s in self.slots.values()))
        for h in self.shutdown_hooks:
            try:
                r = h(self)
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("shutdown hook failed")
        for t in list(self._tasks):
            t.cancel()


__all__ = ["WorkerHost", "DriverSlot"]
