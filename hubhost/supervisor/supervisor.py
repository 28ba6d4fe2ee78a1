"""The supervisor: runs every driver in a worker process and keeps what must outlive one.

The supervisor runs no driver Lua. It forks workers from the zygote (one per driver
instance, or one per `group`), and owns the datastore files, the status truth, the Redis
mirror, the API and readiness. Everything a worker sends is checked (workers.py and
`WorkerHandle.handle`): status only for that worker's devices within size caps, snapshots
parsed before they replace a file, log records escaped to one line.

A worker that dies (segfault, SIGKILL, OOM kill), whose handler overruns its CPU limit by
more than STUCK_GRACE (a C call no hook interrupts), that stops sending heartbeats, or whose
private memory passes its allowance is killed; its drivers restart from their saved state
after 1 s, 2 s, 4 s ... 60 s, like any crash. Crashes inside a worker (a failing entry chunk
or init handler, repeated limit faults) restart that driver inside its worker with the
same backoff (hubhost/worker/host.py).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import pickle
import re
import signal
import time
from pathlib import Path
from typing import Any, Callable

import orjson

from hubhost import metrics, paths
from hubhost.config import DriverConfig, HubConfig
from hubhost.state import atomicfile
from hubhost.text import CONTROL, one_line
from hubhost.state.datastore import StaleWriter, StoreFile
from hubhost.status.store import StatusStore
from hubhost.supervisor import codehash, logring, workers
from hubhost.worker.channel import FENCE_EXIT, AsyncChannel, ProtocolError

log = logging.getLogger("hubhost.supervisor")

BACKOFF_START = 1.0
BACKOFF_MAX = 60.0
SHUTDOWN_HANDLERS_BUDGET = 5.0
STUCK_GRACE = 0.5          # seconds past a handler's CPU deadline before its worker is killed
HEARTBEAT_TIMEOUT = 2.0    # seconds without a heartbeat (beyond the CPU limit) = not answering
LOOP_STALL_LIMIT = 5.0     # seconds (beyond the CPU limit) a worker's event loop may be blocked
                           # outside any handler (host code on a driver's value) before it dies
MAX_STATUS_NAME = 256
MAX_LOG_LINE = 8 << 10        # characters per log record (longer ones are cut, with a marker)
MAX_RESULT = 16 << 20         # bytes of JSON text per function result

def worker_log_level() -> int:
    """The lowest level any of the supervisor's loggers for worker records would write: the
    worker does not send what would be dropped here anyway."""
    names = ("hubhost", "hubhost.driver", "hubhost.device", "hubhost.worker", "hubhost.functions")
    return min(logging.getLogger(n).getEffectiveLevel() for n in names)


class DriverSlot:
    """One configured driver instance, as the supervisor knows it (its runtime lives in a
    worker; state, restarts and errors are reported by the worker or set on its death)."""

    def __init__(self, sup: "Supervisor", cfg: DriverConfig) -> None:
        self.sup = sup
        self.cfg = cfg
        self.id = cfg.id
        self.state = "stopped"        # starting | running | restarting | failed | stopped
        self.restarts = 0
        self.last_error: str | None = None
        self.failed_boot = False
        self.name: str | None = None
        self.memory = 0               # Lua bytes, as the worker last reported
        self.generation = 0           # bumped whenever a new runtime of this driver starts
        self.worker: "WorkerHandle | None" = None
        self.state_dir = paths.driver_state_dir(sup.state_dir, cfg.id)
        self._worker_restarts = 0     # restarts counted by worker deaths
        self._inner_restarts = 0      # restarts the worker reported
        self.code: dict[str, str] = {}   # hashes of the Lua files its worker was started with
        self.log_level: int | None = _level(cfg.log_level)   # its own level (config or API)
        # handler histograms and faults (hubhost/metrics.py): the current worker's totals,
        # and those of its earlier workers, so the counters never go back
        self.handler_stats: tuple[dict, dict] = ({}, {})
        self.handler_base: tuple[dict, dict] = ({}, {})

    def crash(self, reason: str) -> None:
        """Crash this driver inside its worker (tests and operators): it restarts with backoff."""
        if self.worker is not None:
            self.worker.send(["crash", self.id, reason])


class WorkerHandle:
    """One worker process: its drivers, channel, heartbeat, and restart backoff."""

    def __init__(self, sup: "Supervisor", name: str, slots: list[DriverSlot]) -> None:
        self.sup = sup
        self.name = name
        self.slots = {s.id: s for s in slots}
        self.devices = {d.id: s.id for s in slots for d in s.cfg.devices}
        self.cpu_limit = max(s.cfg.cpu_limit for s in slots)
        self.overhead = sup.config.worker_overhead
        self.allowance = sum(s.cfg.max_memory for s in slots) + self.overhead
        self.backoff = BACKOFF_START
        self.last_start = 0.0
        self.incarnation = 0
        self.pid: int | None = None
        self.pidfd: int | None = None
        self.ch: AsyncChannel | None = None
        self.alive = False
        self.started: asyncio.Future | None = None
        self.stopped: asyncio.Future | None = None
        self.death_reason: str | None = None
        self.exit_code: asyncio.Future | None = None
        self.last_hb = 0.0
        self.overdue = -1.0
        self.loop_lag = 0.0
        self.restart_handle: asyncio.TimerHandle | None = None
        self.stopping = False
        self.reader: asyncio.Task | None = None
        self._queries: dict[int, asyncio.Future] = {}
        self._qid = 0
        self._refused: dict[str, float] = {}

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        return self.sup.loop

    def send(self, msg: list[Any], blob: bytes = b"") -> None:
        if self.ch is not None and self.alive:
            self.ch.send(msg, blob)

    def backlog(self) -> int:
        """Bytes written to the worker that it has not read yet (beyond the socket buffer)."""
        if self.ch is None or self.ch.writer.transport is None:
            return 0
        return self.ch.writer.transport.get_write_buffer_size()

    # -- life cycle ----------------------------------------------------------------------
    async def start(self) -> None:
        """Fork the worker, hand it its drivers, wait until they all started (or failed)."""
        self.restart_handle = None
        self.incarnation += 1
        self.death_reason = None
        self.last_start = time.monotonic()
        for s in self.slots.values():
            s.state = "starting"
            s.worker = self
            if s.handler_stats[0] or s.handler_stats[1]:   # a new worker counts from zero
                metrics.add_into(s.handler_base, s.handler_stats)
                s.handler_stats = ({}, {})
        for s in self.slots.values():   # before the fork: a later edit shows as a change
            s.code = await asyncio.to_thread(codehash.code_hashes, s.cfg.path)
        if self.stopping or self.sup.stopping:   # stopped (a reload, the hub) meanwhile
            for s in self.slots.values():
                s.state = "stopped"
            return
        try:
            pid, sock = await self.sup.zygote.fork()
        except Exception as e:  # noqa: BLE001 - the zygote failed: retry like a crash
            self._died(f"could not start a worker: {type(e).__name__}: {e}" if str(e)
                       else f"could not start a worker: {type(e).__name__}")
            return
        self.pid, self.pidfd = pid, workers.open_pidfd(pid)
        self.exit_code = self.loop.create_future()
        self.sup.by_pid[pid] = self
        self.ch = await AsyncChannel.open(sock)
        self.alive = True
        self.last_hb = time.monotonic()
        self.overdue = -1.0
        self.started = self.loop.create_future()
        self.stopped = self.loop.create_future()
        self.ch.send(["init"], pickle.dumps(self.sup.worker_spec(self)))
        self.reader = self.loop.create_task(self._read())
        await asyncio.wait({self.started}, return_when=asyncio.FIRST_COMPLETED)

    async def _read(self) -> None:
        assert self.ch is not None
        violation = await workers.read_messages(self.ch, self.handle)
        if violation is not None:
            log.error("[%s] worker sent %s; killing it", self.name, violation)
            self.kill(f"protocol violation: {violation}")
        await self._reap()

    def kill(self, reason: str) -> None:
        if self.death_reason is None:
            self.death_reason = reason
        workers.kill(self.pid, self.pidfd)

    async def _reap(self) -> None:
        """The channel ended: the worker is gone (or going). Wait for its exit status."""
        self.alive = False
        if self.ch is not None:
            self.ch.close()
        workers.kill(self.pid, self.pidfd)   # a worker that closed its channel is done anyway
        code = None
        if self.exit_code is not None:
            try:
                code = await asyncio.wait_for(asyncio.shield(self.exit_code), 2.0)
            except asyncio.TimeoutError:
                code = None
        if self.pidfd is not None:
            os.close(self.pidfd)
            self.pidfd = None
        self.sup.by_pid.pop(self.pid or 0, None)
        for fut in self._queries.values():   # nobody will answer them now
            if not fut.done():
                fut.set_exception(asyncio.TimeoutError("the worker exited"))
        if self.stopping:
            if self.stopped is not None and not self.stopped.done():
                self.stopped.set_result([])
            for s in self.slots.values():
                s.state = "stopped"
            self.sup.worker_gone(self, "stopped")
            return
        if code == FENCE_EXIT and self.death_reason is None:
            self._fenced()
            return
        reason = self.death_reason or f"the worker {workers.describe_exit(code)}"
        self._died(reason)

    def _fenced(self) -> None:
        """The worker stopped itself because this hub's fleet leases ran out (fleet mode):
        not a crash, and not restarted here; the fleet part starts its devices again once
        it holds their leases (hubhost/fleet/node.py)."""
        for s in self.slots.values():
            s.state = "fenced"
            log.warning("[%s] stopped: this hub could not renew its fleet leases in time, so its "
                        "movable devices may be starting on another hub", s.id)
        if self.started is not None and not self.started.done():
            self.started.set_result(False)
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result([])
        self.sup.worker_gone(self, "fenced")

    def _died(self, reason: str) -> None:
        self.alive = False
        self.sup.worker_gone(self, "crashed")
        now = time.monotonic()
        if now - self.last_start > max(120.0, 2 * self.backoff):
            self.backoff = BACKOFF_START
        delay = self.backoff
        self.backoff = min(self.backoff * 2, BACKOFF_MAX)
        for s in self.slots.values():
            s.state = "restarting"
            s.failed_boot = s.failed_boot or not (self.started and self.started.done())
            s.restarts += 1
            s._worker_restarts += 1
            s.last_error = reason
            log.error("[%s] driver crashed: %s; restarting in %g s", s.id, reason, delay)
        if self.started is not None and not self.started.done():
            self.started.set_result(False)
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result([])
        if not self.sup.stopping:
            self.restart_handle = self.loop.call_later(delay, self._restart)

    def _restart(self) -> None:
        if self.sup.stopping or self.stopping:
            return
        self.sup.spawn(self.start())

    async def stop(self, deadline: float) -> list[str]:
        """Ask the worker to run shutdown handlers and flush; kill it if it does not finish."""
        self.stopping = True
        if self.restart_handle is not None:
            self.restart_handle.cancel()
        if not self.alive or self.stopped is None:
            for s in self.slots.values():
                s.state = "stopped"
            return []
        if self.started is not None and not self.started.done():
            # still starting (e.g. a slow entry chunk): nothing of it has run yet, so there is
            # nothing to flush; abandon the start instead of waiting for it
            log.warning("[%s] stopping during start-up: %s abandoned before running", self.name,
                        ", ".join(self.slots))
            self.kill("stopped during start-up")
            await self._ended()
            return []
        budget = max(0.1, deadline - self.loop.time())
        self.send(["stop", budget])
        try:
            unflushed = await asyncio.wait_for(asyncio.shield(self.stopped), budget + 3.0)
        except asyncio.TimeoutError:
            log.error("[%s] worker did not stop in time; killing it (unsaved changes are lost)", self.name)
            unflushed = list(self.slots)
            for d in unflushed:
                self.sup.unflushed_reasons.setdefault(d, "its worker did not stop in time")
            self.kill("did not stop in time")
        await self._ended()
        return list(unflushed or [])

    async def _ended(self) -> None:
        """After a stop: let the reader see the channel end (bounded), then the slots are stopped."""
        if self.reader is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.reader), 5.0)
            except asyncio.TimeoutError:
                pass
        for s in self.slots.values():
            s.state = "stopped"

    # -- watching --------------------------------------------------------------------------
    def check(self, now: float) -> None:
        """Called every 0.1 s: kill a worker that overran its budget or stopped answering."""
        if not self.alive or self.death_reason is not None:
            return
        if self.overdue > STUCK_GRACE:
            self._give_up(f"a handler ran {self.overdue + self.cpu_limit:.1f} s, past its CPU limit of "
                          f"{self.cpu_limit:g} s, in code the CPU hook cannot interrupt", "the worker")
        elif self.loop_lag > self.cpu_limit + LOOP_STALL_LIMIT:
            self._give_up(f"the worker's event loop was blocked for {self.loop_lag:.1f} s outside any handler")
        elif now - self.last_hb > self.cpu_limit + STUCK_GRACE + HEARTBEAT_TIMEOUT:
            self._give_up(f"the worker stopped answering for {now - self.last_hb:.1f} s")

    def check_memory(self) -> None:
        if not self.alive or self.pid is None or self.death_reason is not None:
            return
        used = workers.anon_memory(self.pid)
        if used is None:
            return
        if used > self.allowance:
            self._give_up(f"the worker holds {used >> 20} MiB, over its allowance of "
                          f"{self.allowance >> 20} MiB (max_memory + worker_overhead {self.overhead >> 20} MiB)")

    def _give_up(self, reason: str, what: str = "it") -> None:
        """Kill the worker for `reason` and say so (its drivers restart with backoff)."""
        self.kill(reason)
        log.error("[%s] %s; killing %s", self.name, self.death_reason, what)

    async def query(self, what: str, *args: Any, timeout: float = 5.0) -> Any:
        self._qid += 1
        qid = self._qid
        fut = self.loop.create_future()
        self._queries[qid] = fut
        self.send(["query", qid, what, *args])
        try:
            return await asyncio.wait_for(fut, timeout)
        finally:
            self._queries.pop(qid, None)

    # -- what the worker sends -----------------------------------------------------------
    def handle(self, msg: list[Any], blob: bytes) -> None:
        kind = msg[0]
        h = _HANDLERS.get(kind)
        if h is None:
            raise ProtocolError(f"an unknown message kind {str(kind)[:40]!r}")
        h(self, msg, blob)

    def _slot(self, driver_id: Any) -> DriverSlot:
        s = self.slots.get(driver_id) if isinstance(driver_id, str) else None
        if s is None:
            raise ProtocolError(f"a message about driver {str(driver_id)[:80]!r}, which is not this worker's")
        return s

    def _h_hb(self, msg: list[Any], blob: bytes) -> None:
        self.last_hb = time.monotonic()
        self.overdue = float(msg[1])
        self.loop_lag = float(msg[2])

    def _h_status(self, msg: list[Any], blob: bytes) -> None:
        st, changes = self.sup.status, self.sup.status_changes
        for dev, name, value in msg[1]:
            problem = self._status_problem(dev, name, value)
            if problem is not None:
                self._refuse(dev, name, problem)
                continue
            if st.set(dev, name, value):
                changes[dev] = changes.get(dev, 0) + 1

    def _status_problem(self, dev: Any, name: Any, value: Any) -> str | None:
        if not isinstance(dev, str) or dev not in self.devices:
            return f"device {str(dev)[:80]!r} is not one of this worker's devices"
        if not isinstance(name, str) or not name or len(name) > MAX_STATUS_NAME or CONTROL.search(name) \
                or "\t" in name:
            return f"a status name must be 1 to {MAX_STATUS_NAME} characters with no control characters"
        if value is None:
            return None
        if not isinstance(value, str):
            return "a status value must be JSON text"
        cfg = self.slots[self.devices[dev]].cfg
        cap = cfg.max_status_value
        if len(value) > cap:
            return f"the value is {len(value)} bytes of JSON, over the limit of {cap} (max_status_value)"
        try:
            orjson.loads(value)
        except orjson.JSONDecodeError:
            return "the value is not valid JSON text"
        st = self.sup.status
        fields = cfg.max_status_fields
        if st.get(dev, name) is None and st.field_count(dev) >= fields:
            return f"the device already has {fields} status fields (max_status_fields)"
        return None

    def _refuse(self, dev: Any, name: Any, problem: str) -> None:
        key = f"{str(dev)[:80]}/{str(name)[:80]}"
        now = time.monotonic()
        if now - self._refused.get(key, 0.0) > 60.0:
            self._refused[key] = now
            if len(self._refused) > 1000:
                self._refused.clear()
            log.warning("[%s] status %s refused: %s", self.name, one_line(key, 200), problem)

    def _h_log(self, msg: list[Any], blob: bytes) -> None:
        level, name, text = int(msg[1]), str(msg[2]), str(msg[3])
        level = min(max(level, logging.DEBUG - 5), logging.CRITICAL)
        if not name.startswith("hubhost.") or len(name) > 80:
            name = "hubhost.worker"
        text = one_line(text, MAX_LOG_LINE)
        driver = device = None
        if text.startswith("["):
            # a driver's line starts with its own [driver] or [driver/device]: only this
            # worker's drivers may be named there
            driver, device = logring.split_head(text)
            if driver not in self.slots:
                text = f"[{self.name}] {text}"
                driver = device = None
        logger = logging.getLogger(name)
        slot = self.slots.get(driver) if driver is not None else None
        if slot is not None and slot.log_level is not None:
            if level < slot.log_level:
                return            # a group sibling's level let it through the worker
        elif not logger.isEnabledFor(level):
            return
        if slot is not None:
            self.sup.logs.add(level, slot.id, device, text)
        # handle(), not log(): a driver's own level may be below the hub's
        logger.handle(logger.makeRecord(name, level, "(worker)", 0, "%s", (text,), None,
                                        extra={"hubhost_driver": driver, "hubhost_device": device}))

    def _h_state(self, msg: list[Any], blob: bytes) -> None:
        s = self._slot(msg[1])
        state = msg[2] if msg[2] in ("starting", "running", "restarting", "stopping", "stopped") else "failed"
        restarts = int(msg[3])
        if state == "starting" and s.state != "starting":
            s.generation += 1
        elif state == "starting" and restarts != s._inner_restarts:
            s.generation += 1
        if state == "starting" and restarts != s._inner_restarts:
            self.sup.spawn(_rehash(s))    # an in-worker restart reads the files again
        s.state = state
        s._inner_restarts = restarts
        s.restarts = s._worker_restarts + restarts
        s.last_error = one_line(str(msg[4]), 2000) if msg[4] is not None else s.last_error
        s.failed_boot = bool(msg[5])
        s.name = one_line(str(msg[6]), 200) if msg[6] is not None else s.name

    def _h_started(self, msg: list[Any], blob: bytes) -> None:
        if self.started is not None and not self.started.done():
            self.started.set_result(True)

    def _h_stopped(self, msg: list[Any], blob: bytes) -> None:
        reasons = {d: one_line(str(r), 500) for d, r in dict(msg[1]).items() if d in self.slots}
        self.sup.unflushed_reasons.update(reasons)
        if self.stopped is not None and not self.stopped.done():
            self.stopped.set_result(list(reasons))

    def _h_mem(self, msg: list[Any], blob: bytes) -> None:
        for did, used in msg[1].items():
            self._slot(did).memory = int(used)
        stats = msg[2] if len(msg) > 2 else {}
        if not isinstance(stats, dict):
            raise ProtocolError("handler stats that are not a table")
        for did, entry in stats.items():
            s = self._slot(did)
            try:
                s.handler_stats = metrics.check_snapshot(entry)
            except ValueError as e:
                raise ProtocolError(f"bad handler stats for {s.id}: {e}") from None

    def _h_known(self, msg: list[Any], blob: bytes) -> None:
        self.sup.spawn(self.sup.save_known_devices(self._slot(msg[1])))

    def _h_iface(self, msg: list[Any], blob: bytes) -> None:
        s = self._slot(msg[1])
        text = str(msg[2])
        if len(text) > MAX_RESULT:
            raise ProtocolError("an interface over the size limit")
        timeouts = {str(k): float(v) for k, v in dict(msg[3]).items()}
        fn = self.sup.functions
        if fn is not None:
            fn.set_interface(s, text, timeouts)

    def _h_ds_attach(self, msg: list[Any], blob: bytes) -> None:
        self.sup.datastore_attach(self, msg[1], self._slot(msg[2]))

    def _h_ds_load(self, msg: list[Any], blob: bytes) -> None:
        rid, s = msg[1], self._slot(msg[2])
        self.sup.spawn(self.sup.datastore_load(self, rid, s, int(msg[3]), int(msg[4])))

    def _h_ds_write(self, msg: list[Any], blob: bytes) -> None:
        rid, s, epoch, seq = msg[1], self._slot(msg[2]), int(msg[3]), int(msg[4])
        self.sup.spawn(self.sup.datastore_write(self, rid, s, epoch, seq, blob))

    def _h_ds_quarantine(self, msg: list[Any], blob: bytes) -> None:
        rid, s = msg[1], self._slot(msg[2])
        f = self.sup.store_file(s)
        try:
            moved = str(f._quarantine()) if f.path.exists() else ""
        except OSError as e:
            moved = f"(could not move it: {e})"
        self.send(["reply", rid, moved])

    def _h_call(self, msg: list[Any], blob: bytes) -> None:
        ref, s, text = int(msg[1]), self._slot(msg[2]), str(msg[3])
        if self.sup.functions is not None:
            self.sup.spawn(self.sup.functions.lua_call(self, s, ref, text))

    def _h_sub(self, msg: list[Any], blob: bytes) -> None:
        s, ref = self._slot(msg[1]), int(msg[2])
        place = (str(msg[3]), str(msg[4]), int(msg[5]), str(msg[6]))
        if self.sup.functions is not None:
            self.sup.functions.lua_subscribe(self, s, ref, place)

    def _h_unsub(self, msg: list[Any], blob: bytes) -> None:
        if self.sup.functions is not None:
            self.sup.functions.lua_unsubscribe(self, int(msg[1]))

    def _h_exec_done(self, msg: list[Any], blob: bytes) -> None:
        if self.sup.functions is not None:
            self.sup.functions.exec_done(self, msg)

    def _h_fenced(self, msg: list[Any], blob: bytes) -> None:
        """The worker stopped movable devices itself at the fleet fence (fleet mode)."""
        slot = self._slot(msg[1])
        devs = {d for d in msg[2] if isinstance(d, str)} if isinstance(msg[2], list) else set()
        if self.sup.fleet is None or not devs:
            return
        devs = {d for d in devs if self.sup.fleet.fc.movable(d)}   # pinned ones are not its to stop
        slot.cfg = dataclasses.replace(slot.cfg, devices=[d for d in slot.cfg.devices if d.id not in devs],
                                       elsewhere=tuple(dict.fromkeys((*slot.cfg.elsewhere, *sorted(devs)))))
        self.devices = {dev.id: s.id for s in self.slots.values() for dev in s.cfg.devices}
        self.sup.fleet.devices_fenced(devs)

    def _h_answer(self, msg: list[Any], blob: bytes) -> None:
        fut = self._queries.get(msg[1])
        if fut is not None and not fut.done():
            fut.set_result(msg[2])


_HANDLERS: dict[str, Callable[[WorkerHandle, list[Any], bytes], None]] = {
    name[3:]: fn for name, fn in vars(WorkerHandle).items() if name.startswith("_h_")
}


class Supervisor:
    """Runs a hub: every configured driver in its worker, signals, readiness and shutdown."""

    def __init__(self, config: HubConfig, state_dir: Path) -> None:
        self.config = config
        self.state_dir = Path(state_dir)
        self.slots = {d.id: DriverSlot(self, d) for d in config.drivers}
        self.workers: dict[str, WorkerHandle] = {}
        self.by_pid: dict[int, WorkerHandle] = {}
        self.status = StatusStore()   # device status: the hub's source of truth
        self.mirror: Any = None       # the RedisMirror when [redis] is configured
        self.functions: Any = None    # supervisor.routing.RoutedFunctions (the API part)
        self.fleet: Any = None        # hubhost.fleet.node.FleetNode in fleet mode
        self.zygote = workers.Zygote()
        self.zygote.on_exit = self._worker_exited
        self.store_files: dict[str, StoreFile] = {}
        self.logs = logring.LogRing()  # recent records per driver (`hubhost logs`)
        self.unflushed: list[str] = []
        self.unflushed_reasons: dict[str, str] = {}
        # what /metrics reads (hubhost/api/metrics.py): status changes per device, datastore
        # flush durations (hubhost/metrics.py histogram layout) and failures
        self.status_changes: dict[str, int] = {}
        self.flush_hist = metrics.new_hist(len(metrics.FLUSH_BUCKETS))
        self.flush_failures = 0
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self.stopping = False
        self._stop_event: asyncio.Event | None = None
        self._started: asyncio.Event | None = None
        self._tasks: set[asyncio.Task] = set()
        self._writer = None
        self.ready_hooks: list[Callable[["Supervisor"], None]] = []
        self.pre_start_hooks: list[Callable[[], Any]] = []
        self.stopping_hooks: list[Callable[["Supervisor"], Any]] = []
        self.reload_hooks: list[tuple[Callable[["Supervisor"], Any], Callable[["Supervisor"], Any]]] = []
        self.reloader: Callable[["Supervisor"], Any] | None = None
        self.notifier: Any = None
        self.shutdown_hooks: list[Callable[["Supervisor"], Any]] = []
        self.gone_hooks: list[Callable[[WorkerHandle, str], None]] = []
        self._group_workers()

    def _group_workers(self) -> None:
        groups: dict[str, list[DriverSlot]] = {}
        for s in self.slots.values():
            groups.setdefault(s.cfg.worker_name, []).append(s)
        keep = {}
        for name, slots in groups.items():
            old = self.workers.get(name)
            if old is not None and set(old.slots) == {s.id for s in slots} and all(
                    old.slots[s.id] is s for s in slots):
                keep[name] = old
            else:
                keep[name] = WorkerHandle(self, name, slots)
        self.workers = keep

    def spawn(self, coro: Any) -> asyncio.Task:
        t = self.loop.create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)
        return t

    def counts(self) -> dict[str, int]:
        c = {"running": 0, "failed": 0, "restarting": 0}
        for s in self.slots.values():
            if s.state == "running":
                c["running"] += 1
            elif s.state == "restarting":
                c["failed" if s.failed_boot else "restarting"] += 1
        return c

    def set_driver_level(self, driver_id: str, level: str | int | None) -> int | None:
        """A driver's own log level (None: follow the hub's), applied at once: its worker
        sends what passes, the supervisor writes and keeps it. No restart."""
        slot = self.slots[driver_id]
        slot.log_level = _level(level) if isinstance(level, str) else level
        w = slot.worker
        if w is not None:
            w.send(["log_level", worker_log_level(),
                    {s.id: s.log_level for s in w.slots.values() if s.log_level is not None}])
        return slot.log_level

    async def link_stats(self, driver_id: str, device_id: str) -> dict[str, Any] | None:
        """A device link's buffers, as its worker sees them (diagnostics and tests)."""
        w = self.slots[driver_id].worker
        return await w.query("link", driver_id, device_id) if w is not None else None

    # -- what workers are given ------------------------------------------------------------
    def worker_spec(self, w: WorkerHandle) -> dict[str, Any]:
        api = self.config.api or {}
        return {
            "name": w.name,
            "drivers": [s.cfg for s in w.slots.values()],
            "known": {s.id: self._known_for_worker(s) for s in w.slots.values()},
            "status": {dev: self.status.device(dev) for dev in w.devices},
            "state_dir": str(self.state_dir),
            "log_level": worker_log_level(),
            "driver_levels": {s.id: s.log_level for s in w.slots.values() if s.log_level is not None},
            "api": {k: api.get(k) for k in ("exec_timeout", "driver_level", "driver_levels") if k in api},
            "fence": self.fence_for(w),
            "movable": self.fleet.movable_in(w.devices) if self.fleet is not None else [],
            "fence_grace": self.fleet.fence_grace if self.fleet is not None else 0.25,
        }

    def fence_for(self, w: WorkerHandle) -> float | None:
        """Fleet mode: until when the worker may drive its movable devices (None: it has none,
        or this hub is not in a fleet)."""
        if self.fleet is None:
            return None
        return self.fleet.fence_for(w.devices)

    def _known_for_worker(self, slot: DriverSlot) -> dict[str, Any]:
        known = self._known_devices(slot)
        if self.fleet is not None:   # a device with a store in Redis was seen on another hub
            known = {**self.fleet.known_extra(slot), **known}
        return known

    def _known_devices(self, slot: DriverSlot) -> dict[str, Any]:
        f = slot.state_dir / "devices.json"
        try:
            raw = atomicfile.read_regular(f)
            if raw is None:
                return {}
            data = orjson.loads(raw)
            return data if isinstance(data, dict) else {}
        except (orjson.JSONDecodeError, OSError) as e:
            log.error("[%s] %s is unreadable (%s); treating every device as new", slot.id, f, e)
            return {}

    async def save_known_devices(self, slot: DriverSlot) -> None:
        """devices.json: the devices of the config (never what a worker claims)."""
        data = {d.id: {"label": d.label, "config": d.config} for d in slot.cfg.devices}
        if slot.cfg.elsewhere:    # fleet mode: devices away on other hubs stay known
            old = await asyncio.to_thread(self._known_devices, slot)
            data.update({d: old[d] for d in slot.cfg.elsewhere if d in old})
        target = slot.state_dir / "devices.json"
        try:
            await asyncio.to_thread(atomicfile.write_atomic, target,
                                    orjson.dumps(data, option=orjson.OPT_SORT_KEYS))
        except OSError as e:
            log.error("[%s] could not record the known devices in %s: %s (the driver runs on; a "
                      "device seen now counts as new at the next start)", slot.id, target, e)

    # -- datastore files (the supervisor's; workers send snapshots) -----------------------
    def store_file(self, slot: DriverSlot) -> StoreFile:
        f = self.store_files.get(slot.id)
        if f is None:
            f = self.store_files[slot.id] = StoreFile(slot.state_dir, slot.id)
        return f

    def datastore_attach(self, w: WorkerHandle, rid: Any, slot: DriverSlot) -> None:
        """A new runtime of the driver becomes the only writer of its file."""
        w.send(["reply", rid, self.store_file(slot).attach(timeout=0.0)])

    async def datastore_load(self, w: WorkerHandle, rid: Any, slot: DriverSlot, memory_limit: int,
                             memory_used: int) -> None:
        """The file's text for the worker (recovery from .bak, quarantine and the check that
        it fits the runtime's memory happen here); a refusal goes back as its class and text,
        the file untouched."""
        from hubhost.state.datastore import StoreTooLarge

        f = self.store_file(slot)

        def load() -> bytes | None:
            slot.state_dir.mkdir(parents=True, exist_ok=True)
            return f.load(memory_limit, memory_used)

        try:
            raw = await asyncio.to_thread(load)
        except StoreTooLarge as e:
            w.send(["reply_blob", rid, "too_large", str(e)])
            return
        except OSError as e:
            w.send(["reply_blob", rid, "refused", str(e)])
            return
        if self.fleet is not None:
            raw = self.fleet.merge_stores(slot, raw)
        w.send(["reply_blob", rid, None, None], raw or b"")

    async def datastore_write(self, w: WorkerHandle, rid: Any, slot: DriverSlot, epoch: int, seq: int,
                              blob: bytes) -> None:
        from hubhost.state.datastore import check_text
        f = self.store_file(slot)
        problem = await asyncio.to_thread(check_text, blob)
        if problem is not None:
            log.error("[%s] refused a datastore snapshot from its worker: %s; the file is unchanged",
                      slot.id, problem)
            self.flush_failures += 1
            w.send(["reply", rid, None, f"snapshot refused: {problem}"])
            return
        t0 = time.perf_counter()
        try:
            ok = await self.loop.run_in_executor(self._writer_pool(), f.write, epoch, seq, blob)
        except StaleWriter as e:
            w.send(["reply", rid, None, f"stale:{e}"])
        except OSError as e:
            self.flush_failures += 1
            w.send(["reply", rid, None, str(e)])
        else:
            metrics.observe(self.flush_hist, metrics.FLUSH_BUCKETS, time.perf_counter() - t0)
            w.send(["reply", rid, bool(ok), None])
            if ok and self.fleet is not None:
                self.fleet.store_written(slot, blob)

    def _writer_pool(self) -> Any:
        if self._writer is None:
            import concurrent.futures
            self._writer = concurrent.futures.ThreadPoolExecutor(2, thread_name_prefix="datastore-writer")
        return self._writer

    # -- worker events ---------------------------------------------------------------------
    def _worker_exited(self, pid: int, code: int) -> None:
        w = self.by_pid.get(pid)
        if w is not None and w.exit_code is not None and not w.exit_code.done():
            w.exit_code.set_result(code)

    def worker_gone(self, w: WorkerHandle, why: str) -> None:
        for dev in w.devices:
            if self.status.get(dev, "connected") == "true":
                self.status.set(dev, "connected", "false")
        for h in self.gone_hooks:
            try:
                h(w, why)
            except Exception:
                log.exception("[%s] worker-gone hook failed", w.name)
        if self.functions is not None:
            self.functions.worker_gone(w, why)

    async def _watch(self) -> None:
        n = 0
        last = time.monotonic()
        while not self.stopping:
            await asyncio.sleep(0.1)
            now = time.monotonic()
            if now - last > 0.5:
                # the supervisor itself did not run (stopped, swapped, a long pause): the
                # workers' heartbeats may be waiting unread in their sockets, so judge them
                # only after this loop has had time to read them
                for w in self.workers.values():
                    w.last_hb = max(w.last_hb, now)
            last = now
            n += 1
            for i, w in enumerate(list(self.workers.values())):
                w.check(now)
                if i % 10 == n % 10:      # each worker's memory once a second, spread out
                    w.check_memory()

    # -- start / stop ----------------------------------------------------------------------
    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for hook in self.pre_start_hooks:
            r = hook()
            if asyncio.iscoroutine(r):
                await r
        await self.zygote.start()
        self.spawn(self._watch())
        await asyncio.gather(*(w.start() for w in self.workers.values()))
        running = sum(1 for s in self.slots.values() if s.state == "running")
        log.info("hub %s started: %d of %d drivers running in %d worker%s", self.config.hub_id, running,
                 len(self.slots), len(self.workers), "" if len(self.workers) == 1 else "s")
        for h in self.ready_hooks:
            h(self)
        self._started_event().set()

    def _started_event(self) -> asyncio.Event:
        if self._started is None:
            self._started = asyncio.Event()
        return self._started

    def request_stop(self) -> None:
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        self._stop_event.set()

    async def wait_stopped(self) -> None:
        if self._stop_event is None:
            self._stop_event = asyncio.Event()
        await self._stop_event.wait()

    async def stop(self) -> None:
        if self.stopping:
            return
        self.stopping = True
        for h in self.stopping_hooks:
            h(self)
        deadline = self.loop.time() + SHUTDOWN_HANDLERS_BUDGET
        results = await asyncio.gather(*(w.stop(deadline) for w in self.workers.values()))
        self.unflushed = sorted({d for r in results for d in r})
        for h in self.shutdown_hooks:
            try:
                r = h(self)
                if asyncio.iscoroutine(r):
                    await r
            except Exception:
                log.exception("shutdown hook failed")
        await self.zygote.stop()
        if self._writer is not None:
            await asyncio.to_thread(self._writer.shutdown, True)
        for t in list(self._tasks):
            if t is not asyncio.current_task():
                t.cancel()

    async def reload(self) -> None:
        """SIGHUP: re-read the config (the reload part does the work) with notifications.
        A reload asked for during start-up waits until every worker has started."""
        await self._started_event().wait()
        if self.stopping:
            return
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

    async def apply_config(self, new: HubConfig, only: set[str] | None = None) -> dict[str, Any]:
        """Make the running drivers match `new` (config reload, SIGHUP, `hubhost reload`).

        Restarted: drivers whose settings or devices changed, whose Lua files changed (by
        content hash, hubhost/supervisor/codehash.py), or that are not running (failed or
        waiting out their backoff: retried now), with every driver of their worker when
        grouped. Removed drivers stop, new ones start; a driver whose devices changed only
        in system/module/index keeps running untouched. With `only`, just those drivers are
        looked at (and restarted even when unchanged); the others keep their running config.
        The report lists started/stopped/restarted/kept ids and `reasons` {id: why}."""
        if only is not None:
            wanted_new = {d.id: d for d in new.drivers}
            unknown = sorted(only - set(wanted_new) - set(self.slots))
            if unknown:
                raise KeyError(f"no driver {', '.join(map(repr, unknown))} in the config or on this hub")
            merged = [wanted_new.get(did) if did in only else s.cfg for did, s in self.slots.items()]
            merged += [d for d in new.drivers if d.id in only and d.id not in self.slots]
            new.drivers = [d for d in merged if d is not None]
        reasons: dict[str, str] = {}
        live: dict[str, tuple[list[Any], list[str]]] = {}   # driver -> devices added, released
        wanted = {d.id: d for d in new.drivers}
        for did, slot in self.slots.items():
            if only is not None and did not in only:
                continue
            if did not in wanted:
                reasons[did] = "removed from the config"
                continue
            why = _needs_restart(slot.cfg, wanted[did])
            files = None
            if wanted[did].path == slot.cfg.path and (why is None or why == _DEVICES_CHANGED):
                files = codehash.changed_files(slot.code,
                                               await asyncio.to_thread(codehash.code_hashes, slot.cfg.path))
            if why == _DEVICES_CHANGED and not files and only is None and self.fleet is not None \
                    and slot.state == "running" and slot.worker is not None and slot.worker.alive:
                delta = _device_delta(slot.cfg, wanted[did])
                if delta is not None:      # devices moving between fleet hubs: no restart
                    live[did] = delta
                    continue
            if why is None and files:
                why = codehash.describe_change(files)
            if slot.state != "running" and (slot.state != "starting" or slot.failed_boot):
                why = (why + "; " if why else "") + f"was {self._shown_state(slot)}: retrying"
            if why is None and only is not None and did in only:
                why = "named in the reload"
            if why is not None:
                reasons[did] = why
        changed = set(reasons)
        new_groups: dict[str, set[str]] = {}
        for d in new.drivers:
            new_groups.setdefault(d.worker_name, set()).add(d.id)
        leaving: list[WorkerHandle] = []
        for name, w in self.workers.items():
            if set(w.slots) & changed or new_groups.get(name) != set(w.slots):
                leaving.append(w)
        for w in leaving:
            for did in w.slots:
                if did not in reasons and did in wanted:
                    why = next((reasons[o] for o in w.slots if o in reasons), "its worker changed")
                    reasons[did] = f"shares worker {w.name} with a restarted driver ({why})"
        deadline = self.loop.time() + SHUTDOWN_HANDLERS_BUDGET
        await asyncio.gather(*(w.stop(deadline) for w in leaving))
        leaving_ids = {did for w in leaving for did in w.slots}
        report: dict[str, Any] = {"started": [], "stopped": [], "restarted": [], "kept": []}
        slots: dict[str, DriverSlot] = {}
        for d in new.drivers:
            old = self.slots.get(d.id)
            if old is not None and d.id not in leaving_ids:
                level_changed = d.log_level != old.cfg.log_level
                old.cfg = d          # same devices: only their index entries may differ
                if level_changed:
                    self.set_driver_level(d.id, d.log_level)
                slots[d.id] = old
                report["kept"].append(d.id)
            else:
                slot = slots[d.id] = DriverSlot(self, d)
                if old is not None and d.log_level == old.cfg.log_level:
                    slot.log_level = old.log_level     # a level set through the API stays
                if old is None:
                    report["started"].append(d.id)
                    reasons[d.id] = "new in the config"
                else:
                    report["restarted"].append(d.id)
        report["stopped"] = [did for did in self.slots if did not in wanted]
        self.slots = slots
        self.config = new
        before = set(self.workers.values())
        self._group_workers()
        starting = [w for w in self.workers.values() if w not in before]
        if self.functions is not None:
            self.functions.rebuild()
        await asyncio.gather(*(w.start() for w in starting))
        for did, (added, released) in live.items():
            if did in slots and await self._change_devices(slots[did], added, released):
                reasons[did] = (f"devices changed while running (+{len(added)} -{len(released)})")
            elif did in slots:
                report["kept"].remove(did)
                report["restarted"].append(did)
                reasons[did] = "devices changed (a live change failed; restarted)"
        report["reasons"] = {k: v for k, v in reasons.items() if k not in report["kept"]}
        for did, why in report["reasons"].items():
            log.info("[%s] reload: %s", did, why)
        return report

    async def _change_devices(self, slot: DriverSlot, added: list[Any], released: list[str]) -> bool:
        """Add and release devices of a running driver in its worker (fleet moves); on
        failure the worker restarts with the slot's (new) config. True when done live."""
        w = slot.worker
        assert w is not None
        w.devices = {dev.id: s.id for s in w.slots.values() for dev in s.cfg.devices}
        known = self._known_devices(slot)
        payload = []
        for info in added:
            store = self.fleet.take_store(info.id) if self.fleet is not None else None
            seen = info.id in known or (self.fleet is not None and info.id in self.fleet.store_seen)
            payload.append({"info": dataclasses.asdict(info), "store": store, "new": not seen})
        try:
            fence = self.fleet.fence_deadline if self.fleet is not None and added else None
            why = await w.query("devices", slot.id, payload, released, list(slot.cfg.elsewhere), fence,
                                timeout=SHUTDOWN_HANDLERS_BUDGET + 5.0)
        except asyncio.TimeoutError:
            why = "the worker did not answer in time"
        if why is None:
            log.info("[%s] devices changed while running:%s%s", slot.id,
                     f" started {', '.join(i.id for i in added)}" if added else "",
                     f" released {', '.join(released)}" if released else "")
            return True
        log.warning("[%s] could not change its devices while running (%s); restarting it", slot.id, why)
        await w.stop(self.loop.time() + SHUTDOWN_HANDLERS_BUDGET)
        w.stopping = False
        await w.start()
        return False

    @staticmethod
    def _shown_state(slot: DriverSlot) -> str:
        if slot.state in ("restarting", "starting") and slot.failed_boot:
            return "failed"
        return slot.state


_DEVICES_CHANGED = "config changed (devices)"


def _device_delta(old: DriverConfig, new: DriverConfig) -> tuple[list[Any], list[str]] | None:
    """(added devices, released ids) when the change is only devices arriving or moving away
    to another hub (`elsewhere`), with the others unchanged; None when it needs a restart
    (a device changed or was removed from the config: `removed` must run)."""
    def entry(d: Any) -> tuple[Any, ...]:
        return (d.label, d.config, d.transport, d.transport_settings)
    before = {d.id: d for d in old.devices}
    after = {d.id: d for d in new.devices}
    if any(entry(before[i]) != entry(after[i]) for i in before.keys() & after.keys()):
        return None
    gone = [i for i in before if i not in after]
    if not set(gone) <= set(new.elsewhere):
        return None
    return [after[i] for i in after if i not in before], gone


def _needs_restart(old: DriverConfig, new: DriverConfig) -> str | None:
    """Why the config change needs a restart: anything but a device's system/module/index
    (or the order of devices, or the driver's log_level, applied live) changed."""
    def devices(c: DriverConfig) -> dict[str, Any]:
        return {d.id: (d.label, d.config, d.transport, d.transport_settings) for d in c.devices}
    keys = ("path", "flush_interval", "max_memory", "cpu_limit", "group")
    diff = [k for k in keys if getattr(old, k) != getattr(new, k)]
    if devices(old) != devices(new):
        diff.append("devices")
    return f"config changed ({', '.join(diff)})" if diff else None


async def _rehash(slot: DriverSlot) -> None:
    slot.code = await asyncio.to_thread(codehash.code_hashes, slot.cfg.path)


def _level(name: str | None) -> int | None:
    if name is None:
        return None
    from hubhost.logs import level_of
    return level_of(name)


def _debug_stall(sup: Supervisor) -> None:
    """HUBHOST_DEBUG_STALL=1 only: SIGUSR2 blocks the event loop for 3 s, so tests can show
    that a stalled loop stops the systemd watchdog pings."""
    log.warning("debug: stalling the event loop for 3 s (SIGUSR2)")
    time.sleep(3.0)


async def run_hub(config: HubConfig, state_dir: Path, *, setup: Callable[[Supervisor], Any] | None = None) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code (1 when a shutdown could not save
    every driver's datastore)."""
    sup = Supervisor(config, state_dir)
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
    sup.loop = loop
    starting = loop.create_task(sup.start())
    stop_wait = loop.create_task(sup.wait_stopped())
    await asyncio.wait({starting, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
    if not starting.done():
        log.info("stop requested during start-up: drivers that have not started are abandoned")
    else:
        exc = starting.exception()
        if exc is not None:
            stop_wait.cancel()
            raise exc
        await stop_wait
        log.info("stopping (signal received)")
    timed_out = False
    try:
        await asyncio.wait_for(sup.stop(), 9.0)
    except asyncio.TimeoutError:
        timed_out = True
        log.error("shutdown did not finish within 9 s; exiting anyway")
    if not starting.done():
        starting.cancel()
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        loop.remove_signal_handler(sig)
    if sup.unflushed or timed_out:
        names = sup.unflushed or sorted(sup.unflushed_reasons)
        lost = "; ".join(f"{d} ({sup.unflushed_reasons.get(d, 'not saved')})" for d in names)
        sup.unflushed = list(names)
        log.error("stopped; changes of %d driver%s were NOT written to disk: %s", len(sup.unflushed),
                  "" if len(sup.unflushed) == 1 else "s", lost or "(the shutdown timed out)")
        return 1
    log.info("stopped")
    return 0


__all__ = ["Supervisor", "DriverSlot", "WorkerHandle", "run_hub"]
