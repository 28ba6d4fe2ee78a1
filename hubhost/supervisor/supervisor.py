"""The asyncio supervisor: starts every driver in its own thread, routes timers and waits,
isolates faults, restarts crashed drivers with backoff, and shuts down cleanly.

Life of a driver slot: start → running; an error in the entry chunk or an `init`/`added`
handler, repeated limit faults, or a handler stuck past its limit → crash → restart after
1 s, 2 s, 4 s ... 60 s. A handler error alone is logged and the driver goes on.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from hubhost.state import atomicfile

from hubhost import paths
from hubhost.worker.actor import Actor
from hubhost.config import DriverConfig, HubConfig
from hubhost.sandbox.runtime import DeviceInfo, DriverLoadError, DriverRuntime
from hubhost.status.store import StatusStore

log = logging.getLogger("hubhost.supervisor.supervisor")

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
FAULT_WINDOW = 30.0      # seconds in which FAULT_LIMIT limit faults restart a driver
FAULT_LIMIT = 5
SHUTDOWN_HANDLERS_BUDGET = 5.0
STUCK_GRACE = 0.5        # seconds past the CPU limit before a handler counts as stuck


class DriverSlot:
    """One configured driver instance and its current runtime (the Port of that runtime)."""

    def __init__(self, sup: "Supervisor", cfg: DriverConfig) -> None:
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

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.sup.loop

    # -- Port: called on the driver's thread ---------------------------------------------
    def timer_start(self, rt: DriverRuntime, timer_id: int, seconds: float, periodic: bool) -> None:
        self.loop.call_soon_threadsafe(self._timer_start, rt, timer_id, seconds, periodic)

    def timer_cancel(self, rt: DriverRuntime, timer_id: int) -> None:
        self.loop.call_soon_threadsafe(self._timer_cancel, rt, timer_id)

    def wait_timer(self, rt: DriverRuntime, token: int, seconds: float) -> None:
        self.loop.call_soon_threadsafe(self._wait_start, rt, token, seconds)

    def wait_host(self, rt: DriverRuntime, token: int, what: str, arg: Any) -> None:
        handler = self.sup.wait_handlers.get(what)
        if handler is None:
            rt.resume(token, None, f"unknown host wait {what!r}".encode())
            return
        handler(self, rt, token, arg)

    def handler_failed(self, rt: DriverRuntime, label: str, kind: str, message: str) -> None:
        self.loop.call_soon_threadsafe(self._handler_failed, rt, label, kind, message)

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
        self.actor = Actor(self.id)
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
        if self.state == "starting":
            self.failed_boot = False
            self.state = "running"
            log.info("[%s] running (%s, %d device%s)", self.id, self.rt.driver_name() if self.rt else "?",
                     len(self.cfg.devices), "" if len(self.cfg.devices) == 1 else "s")
            return True
        return False

    def _boot(self) -> None:
        """On the driver's thread: build the runtime, load the entry chunk, start devices."""
        self.state_dir.mkdir(parents=True, exist_ok=True)
        rt = DriverRuntime(self.id, self.cfg.path, self, max_memory=self.cfg.max_memory,
                           cpu_limit=self.cfg.cpu_limit, state_dir=self.state_dir,
                           status=self.sup.status)
        self.rt = rt
        for hook in self.sup.runtime_hooks:
            hook(self, rt)
        rt.load()
        known = self._known_devices()
        configured = {d.id for d in self.cfg.devices}
        for dev_id, info in known.items():
            if dev_id not in configured:
                rt.remove_device(DeviceInfo(id=dev_id, label=info.get("label", dev_id),
                                            config=info.get("config", {})))
        for dev in self.cfg.devices:
            rt.start_device(dev, dev.id not in known)
        try:
            self._save_known_devices(known)
        except OSError as e:   # the devices run; the list is written again at the next start
            log.error("[%s] could not record the known devices: %s", self.id, e)

    def _known_devices(self) -> dict[str, dict[str, Any]]:
        f = self.state_dir / "devices.json"
        try:
            raw = atomicfile.read_regular(f)   # never blocks on a FIFO, never follows a link
            if raw is None:
                return {}
            data = orjson.loads(raw)
            return data if isinstance(data, dict) else {}
        except (orjson.JSONDecodeError, OSError) as e:
            log.error("[%s] %s is unreadable (%s); treating every device as new", self.id, f, e)
            return {}

    def _save_known_devices(self, known: dict[str, Any]) -> None:
        data = {d.id: {"label": d.label, "config": d.config} for d in self.cfg.devices}
        if data == known:
            return
        atomicfile.write_atomic(self.state_dir / "devices.json",
                                orjson.dumps(data, option=orjson.OPT_SORT_KEYS))

    def _cancel_all(self) -> None:
        for h in list(self.timers.values()) + list(self.waits.values()):
            h.cancel()
        self.timers.clear()
        self.waits.clear()

    def crash(self, reason: str, *, stuck: bool = False) -> None:
        """Stop this runtime and schedule a restart with exponential backoff."""
        if self.state in ("restarting", "stopped"):
            return
        log.error("[%s] driver crashed: %s; restarting in %g s", self.id, reason,
                  0.0 if stuck else self.backoff)
        self.last_error = reason
        self._cancel_all()
        rt, actor = self.rt, self.actor
        if actor is not None:
            if stuck:
                actor.abandoned = True  # cannot be interrupted; let it finish on its own
            else:
                if rt is not None:
                    self.sup.on_crash(self, rt, actor)
                actor.stop()
        self.rt, self.actor = None, None
        self.state = "restarting"
        now = time.monotonic()
        if now - self.last_crash > max(120.0, 2 * self.backoff):
            self.backoff = BACKOFF_START
        if stuck:
            delay = 0.0   # the stuck thread is given up, not the driver: back at once
        else:
            delay = self.backoff
            self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        self.last_crash = now
        self.restarts += 1
        self.faults.clear()
        self.restart_handle = self.loop.call_later(delay, self._restart)

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
        if actor is not None and self.state == "starting":
            # still in its entry chunk or init: no handler finished, so nothing of it needs
            # flushing, and its busy thread would only hold the shutdown up
            log.warning("[%s] stopped while still starting; its start-up is abandoned", self.id)
            actor.abandoned = True
            actor.stop()
            self.state = "stopped"
            return
        if rt is not None and actor is not None and self.state == "running":
            self.state = "stopping"
            try:
                await asyncio.wait_for(actor.call(self.loop, rt.shutdown),
                                       max(0.1, deadline - self.loop.time()))
            except asyncio.TimeoutError:
                log.error("[%s] shutdown handler still running at the deadline", self.id)
            await self.sup.on_stop(self, rt, actor)
            actor.stop()
        self.state = "stopped"


class Supervisor:
    """Runs a hub: every configured driver, their timers, signals and shutdown."""

    def __init__(self, config: HubConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.slots = {d.id: DriverSlot(self, d) for d in config.drivers}
        self.status = StatusStore()   # device status: the hub's source of truth
        self.mirror: Any = None       # the RedisMirror when [redis] is configured
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.stopping = False
        self._stop_event: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        # extension points for the other parts of the hub (datastore, status, transports)
        self.runtime_hooks: list[Callable[[DriverSlot, DriverRuntime], None]] = []
        self.wait_handlers: dict[str, Callable[[DriverSlot, DriverRuntime, int, Any], None]] = {}
        self.crash_hooks: list[Callable[[DriverSlot, DriverRuntime, Actor], None]] = []
        self.stop_hooks: list[Callable[[DriverSlot, DriverRuntime, Actor], Any]] = []
        self.fault_hooks: list[Callable[[DriverSlot, DriverRuntime], None]] = []
        self.ready_hooks: list[Callable[["Supervisor"], None]] = []
        self.pre_start_hooks: list[Callable[[], Any]] = []
        self.stopping_hooks: list[Callable[["Supervisor"], Any]] = []
        # (before, after) pairs run around a config reload (SIGHUP)
        self.reload_hooks: list[tuple[Callable[["Supervisor"], Any], Callable[["Supervisor"], Any]]] = []
        self.reloader: Callable[["Supervisor"], Any] | None = None  # set by the reload part
        self.notifier: Any = None
        self.shutdown_hooks: list[Callable[["Supervisor"], Any]] = []

    def spawn(self, coro: Any) -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

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

    def counts(self) -> dict[str, int]:
        c = {"running": 0, "failed": 0, "restarting": 0}
        for s in self.slots.values():
            if s.state == "running":
                c["running"] += 1
            elif s.state == "restarting":
                c["failed" if s.failed_boot else "restarting"] += 1
        return c

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for hook in self.pre_start_hooks:
            r = hook()
            if asyncio.iscoroutine(r):
                await r
        results = await asyncio.gather(*(s.start() for s in self.slots.values()))
        log.info("hub %s started: %d of %d drivers running", self.config.hub_id, sum(results), len(results))
        for h in self.ready_hooks:
            h(self)
        self.spawn(self._watch_stuck())

    async def _watch_stuck(self) -> None:
        """A handler that runs past its CPU limit plus grace is stuck in code no hook can
        interrupt: give up on that thread and bring the driver back from its saved state."""
        while not self.stopping:
            await asyncio.sleep(0.1)
            for s in self.slots.values():
                a = s.actor
                if a is not None and s.state == "running" and a.busy_for() > s.cfg.cpu_limit + STUCK_GRACE:
                    log.error("[%s] handler stuck for %.1f s (limit %g s) in code the CPU hook cannot "
                              "interrupt; abandoning its thread and restarting from saved state",
                              s.id, a.busy_for(), s.cfg.cpu_limit)
                    s.crash("stuck handler", stuck=True)

    def request_stop(self) -> None:
        if self._stop_event is not None:
            self._stop_event.set()

    async def wait_stopped(self) -> None:
        assert self._stop_event is not None
        await self._stop_event.wait()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for h in self.stopping_hooks:
            h(self)
        deadline = self.loop.time() + SHUTDOWN_HANDLERS_BUDGET
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


    async def reload(self) -> None:
        """SIGHUP: re-read the config (the reload part does the work) with notifications."""
        for before, _ in self.reload_hooks:
            before(self)
        try:
            if self.reloader is not None:
                r = self.reloader(self)
                if asyncio.iscoroutine(r):
                    await r
            else:
                log.warning("reload requested, but this hub has no config reload support")
        except Exception:
            log.exception("config reload failed; keeping the running config")
        finally:
            for _, after in self.reload_hooks:
                after(self)


    async def apply_config(self, new: HubConfig) -> dict[str, list[str]]:
        """Make the running drivers match `new` (config reload). Removed drivers stop, new
        ones start, drivers whose settings or devices changed restart; a driver whose
        devices changed only in system/module/index keeps running untouched."""
        report: dict[str, list[str]] = {"started": [], "stopped": [], "restarted": [], "kept": []}
        wanted = {d.id: d for d in new.drivers}
        leaving = []
        for did, slot in self.slots.items():
            nd = wanted.get(did)
            if nd is None or _needs_restart(slot.cfg, nd):
                leaving.append(slot)
                report["stopped" if nd is None else "restarted"].append(did)
        deadline = self.loop.time() + SHUTDOWN_HANDLERS_BUDGET
        await asyncio.gather(*(s.stop(deadline) for s in leaving))
        slots: dict[str, DriverSlot] = {}
        starting: list[DriverSlot] = []
        for d in new.drivers:
            old = self.slots.get(d.id)
            if old is not None and d.id not in report["restarted"]:
                old.cfg = d          # same devices: only their index entries may differ
                slots[d.id] = old
                report["kept"].append(d.id)
            else:
                slots[d.id] = DriverSlot(self, d)
                starting.append(slots[d.id])
                if old is None:
                    report["started"].append(d.id)
        self.slots = slots
        self.config = new
        await asyncio.gather(*(s.start() for s in starting))
        return report


def _needs_restart(old: DriverConfig, new: DriverConfig) -> bool:
    """Anything but a device's system/module/index (or the order of devices) changed."""
    def devices(c: DriverConfig) -> dict[str, Any]:
        return {d.id: (d.label, d.config, d.transport, d.transport_settings) for d in c.devices}
    return ((old.path, old.flush_interval, old.max_memory, old.cpu_limit, devices(old))
            != (new.path, new.flush_interval, new.max_memory, new.cpu_limit, devices(new)))


def _debug_stall(sup: Supervisor) -> None:
    """HUBHOST_DEBUG_STALL=1 only: SIGUSR2 blocks the event loop for 3 s, so tests can show
    that a stalled loop stops the systemd watchdog pings."""
    log.warning("debug: stalling the event loop for 3 s (SIGUSR2)")
    time.sleep(3.0)


async def run_hub(config: HubConfig, state_dir: Path, *, setup: Callable[[Supervisor], Any] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    sup = Supervisor(config, state_dir)
    sup._stop_event = asyncio.Event()   # a signal during setup or start-up is not lost
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, sup.request_stop)
    loop.add_signal_handler(signal.SIGHUP, lambda: sup.spawn(sup.reload()))
    if os.environ.get("HUBHOST_DEBUG_STALL") == "1":
        loop.add_signal_handler(signal.SIGUSR2, _debug_stall, sup)
    if setup is not None:
        r = setup(sup)
        if asyncio.iscoroutine(r):
            await r
    # a stop request is honoured while drivers are still starting (a slow entry chunk, a
    # state file that takes long to read): start-up is abandoned, not waited for
    starting = asyncio.ensure_future(sup.start())
    stopped = asyncio.ensure_future(sup.wait_stopped())
    await asyncio.wait({starting, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stop requested during start-up; abandoning the drivers still starting")
        starting.cancel()
        try:
            await starting
        except BaseException:  # noqa: BLE001 - cancelled, or a start-up error: we stop anyway
            pass
    elif starting.exception() is not None:
        stopped.cancel()
        raise starting.exception()  # type: ignore[misc]
    await stopped
    log.info("stopping (signal received)")
    code = 0
    try:
        await asyncio.wait_for(sup.stop(), 9.0)
    except asyncio.TimeoutError:
        log.error("shutdown did not finish within 9 s; exiting anyway")
        code = 1
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    lost = dict(getattr(getattr(sup, "datastore", None), "unflushed", None) or {})
    if lost:
        log.error("stopped; changes of %d driver%s were NOT written to disk: %s", len(lost),
                  "" if len(lost) == 1 else "s", "; ".join(f"{k} ({v})" for k, v in sorted(lost.items())))
        return 1
    log.info("stopped")
    return code


__all__ = ["Supervisor", "DriverSlot", "run_hub"]
