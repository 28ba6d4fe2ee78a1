"""A worker process: the drivers of one worker (one instance, or one `group`).

Forked from the zygote (zygote.py) with one end of a socketpair to the supervisor. The first
message is `init` (the worker's drivers, their known devices, the status they had, the log
level; pickled, since it comes from the trusted side). Then the worker runs its drivers on
its own event loop: timers, transports, framing and every Lua handler stay here.

What crosses to the supervisor (all framed by channel.py, batched per loop iteration):
  status      [[device, name, json|null], ...]   the changes of one loop iteration
  log         level, logger, text                one record (escaped again upstream)
  state       driver, state, restarts, last_error, failed_boot, name
  iface       driver, interface json, timeouts   after the entry chunk built the driver
  known       driver, {device: {label, config}}  devices.json is the supervisor's to write
  ds_load / ds_write / ds_quarantine             the datastore file (blob = JSON snapshot)
  call / sub / unsub                             the driver calls or watches another device
  exec_done, answer                              replies
  fenced      driver, [device]                   fleet: movable devices it stopped at the fence
  hb          overdue, loop_lag                  from the heartbeat thread, every 0.1 s
  mem         {driver: lua bytes}, {driver: [handler histograms, faults]}
                                                 once a second (stats only of drivers whose
                                                 numbers moved; hubhost/metrics.py)
and from it: exec, call_done, deliver, stop, crash, query (`devices`: fleet moves add and
release devices of a running driver), fence (fleet mode: until when the worker may drive its
movable devices; see set_fence), and replies to ds_*.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import ctypes
import itertools
import logging
import os
import pickle
import socket
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any

import orjson

from hubhost.functions import ExecError, FunctionHost, Interface
from hubhost.sandbox.runtime import DeviceInfo, DriverRuntime
from hubhost.state.datastore import DatastoreService, StaleWriter
from hubhost.status.store import StatusStore
from hubhost.status.subscriptions import Subscriptions
from hubhost.worker.channel import FENCE_EXIT, SyncChannel, pack
from hubhost.worker.host import DriverSlot, WorkerHost

log = logging.getLogger("hubhost.worker")

MAX_STATUS_BATCH = 1 << 20  # bytes of status JSON per status message (a bigger batch is split)
HEARTBEAT = 0.1          # seconds between looks at the handler deadlines (no message)
BEAT_EVERY = 10          # a heartbeat message every 10 looks (1 s), at once when overdue
TICK = 0.5               # seconds between the loop's liveness stamps
REQUEST_TIMEOUT = 60.0   # a blocking request to the supervisor (datastore load or write)


class Upstream:
    """The worker's sending side: batches what the loop thread sends, one write per loop
    iteration; other threads (heartbeat, datastore writers) send at once."""

    def __init__(self, ch: SyncChannel, loop: asyncio.AbstractEventLoop) -> None:
        self.ch = ch
        self.loop = loop
        self.loop_thread = threading.get_ident()
        self._out: list[bytes] = []
        self._status: list[list[Any]] = []
        self._status_bytes = 0
        self._scheduled = False
        self._ids = itertools.count(1)
        self._waiting: dict[int, concurrent.futures.Future] = {}
        self._wlock = threading.Lock()
        self.incoming: Any = None    # Worker.incoming(msg, blob, deferred)

    def send(self, msg: list[Any], blob: bytes = b"") -> None:
        if threading.get_ident() != self.loop_thread:
            self.loop.call_soon_threadsafe(self.send, msg, blob)
            return
        self._pack_status()
        self._out.append(pack(msg, blob))
        self._schedule()

    def status(self, device_id: str, name: str, value: str | None) -> None:
        """StatusStore listener (loop thread): one batch per loop iteration, split into
        messages of about MAX_STATUS_BATCH bytes (a frame stays far below the caps)."""
        self._status.append([device_id, name, value])
        self._status_bytes += len(value or "") + len(name) + len(device_id) + 16
        if self._status_bytes > MAX_STATUS_BATCH:
            self._pack_status()
        self._schedule()

    def _pack_status(self) -> None:
        """The status changes so far become one message, in order with what follows."""
        if self._status:
            self._out.append(pack(["status", self._status]))
            self._status, self._status_bytes = [], 0

    def _schedule(self) -> None:
        if not self._scheduled:
            self._scheduled = True
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        self._scheduled = False
        self._pack_status()
        if self._out:
            data, self._out = b"".join(self._out), []
            try:
                self.ch.send_raw(data)
            except OSError:
                os._exit(0)   # the supervisor is gone: nothing of ours can be saved any more

    def request(self, msg: list[Any], blob: bytes = b"") -> Any:
        """Send a request and block for its reply (any thread; never waits forever). On the
        loop thread it reads the channel itself until the reply is there: other messages
        that arrive meanwhile are dispatched afterwards, in order."""
        rid = next(self._ids)
        fut: concurrent.futures.Future = concurrent.futures.Future()
        self._waiting[rid] = fut
        on_loop = threading.get_ident() == self.loop_thread
        if on_loop:
            self.flush()   # keep order with what the loop already sent
        try:
            self.ch.send([msg[0], rid, *msg[1:]], blob)
        except OSError:
            os._exit(0)
        try:
            if on_loop:
                deadline = time.monotonic() + REQUEST_TIMEOUT
                while not fut.done():
                    left = deadline - time.monotonic()
                    if left <= 0:
                        raise TimeoutError(f"the supervisor did not answer {msg[0]} within {REQUEST_TIMEOUT:g} s")
                    for m, b in self.ch.read_wait(min(left, 1.0)):
                        self.incoming(m, b, True)
                    if self.ch.eof:
                        os._exit(0)
            return fut.result(REQUEST_TIMEOUT)
        finally:
            self._waiting.pop(rid, None)

    def reply(self, rid: Any, value: Any) -> bool:
        """(loop thread) A reply to request(); False if it is not one."""
        fut = self._waiting.get(rid) if isinstance(rid, int) else None
        if fut is None:
            return False
        fut.set_result(value)
        return True

    # -- what the worker host reports ---------------------------------------------------
    def driver_state(self, slot: DriverSlot) -> None:
        name = None
        if slot.rt is not None:
            try:
                name = slot.rt.driver_name()
            except Exception:  # noqa: BLE001 - a name the driver made unreadable
                name = None
        self.send(["state", slot.id, slot.state, slot.restarts, slot.last_error, slot.failed_boot, name])

    def known_devices(self, driver_id: str, data: dict[str, Any]) -> None:
        self.send(["known", driver_id, data])


class RemoteStoreFile:
    """A driver's datastore file as the worker sees it: the supervisor owns the file (load,
    quarantine, ordered atomic writes); this forwards and keeps the retry backoff."""

    def __init__(self, up: Upstream, driver_id: str, folder: Path) -> None:
        self.up = up
        self.driver_id = driver_id
        self.folder = folder
        self.path = folder / "datastore.json"
        self.failing = False
        self.retry_delay = 1.0
        self.next_retry = 0.0
        self._raw: bytes | None = None

    def announce(self) -> None: ...
    def release(self) -> None: ...

    def attach(self, timeout: float = 0.0) -> int:
        return int(self.up.request(["ds_attach", self.driver_id]))

    def load(self, memory_limit: int | None = None, memory_used: int = 0) -> bytes | None:
        """The file's text (the supervisor recovers, quarantines and checks it fits)."""
        from hubhost.state.datastore import StoreRefused, StoreTooLarge

        kind, message, raw = self.up.request(["ds_load", self.driver_id, memory_limit or 0, memory_used])
        if kind == "too_large":
            raise StoreTooLarge(message)
        if kind is not None:
            raise StoreRefused(message)
        return raw

    def _quarantine(self) -> Path:
        return Path(self.up.request(["ds_quarantine", self.driver_id]))

    def write(self, epoch: int, seq: int, data: bytes) -> bool:
        ok, err = self.up.request(["ds_write", self.driver_id, epoch, seq], bytes(data))
        if ok is None:
            if err.startswith("stale:"):
                raise StaleWriter(err[6:])
            self._failed()
            raise OSError(err)
        self.failing = False
        self.retry_delay = 1.0
        return bool(ok)

    def _failed(self) -> None:
        if self.failing:
            self.retry_delay = min(self.retry_delay * 2, 60.0)
        self.failing = True
        self.next_retry = time.monotonic() + self.retry_delay

    def retry_due(self, now: float | None = None) -> bool:
        return not self.failing or (now if now is not None else time.monotonic()) >= self.next_retry


class WorkerDatastore(DatastoreService):
    """The datastore glue of the worker: snapshots are made here, files written upstream."""

    def __init__(self, host: WorkerHost, up: Upstream) -> None:
        self.up = up
        super().__init__(host)  # type: ignore[arg-type]

    def file_for(self, slot: Any) -> Any:
        f = self.files.get(slot.id)
        if f is None:
            f = self.files[slot.id] = RemoteStoreFile(self.up, slot.id, slot.state_dir)
        return f


class WorkerFunctions(FunctionHost):
    """Functions inside the worker: exec of this worker's devices runs here; calls to other
    drivers and subscriptions go to the supervisor, which knows every device and system."""

    def __init__(self, host: WorkerHost, up: Upstream, **kw: Any) -> None:
        super().__init__(host, Subscriptions(host.status), **kw)
        self.up = up
        self._calls: dict[int, tuple[Any, DriverRuntime, int]] = {}
        self._sub_refs: dict[int, tuple[Any, DriverRuntime, str]] = {}
        self._refs = itertools.count(1)

    def _publish_interface(self, slot: Any, iface: Interface) -> None:
        self.up.send(["iface", slot.id, iface.text, iface_timeouts(iface)])

    def _wait_call(self, slot: Any, rt: DriverRuntime, token: int, arg: Any) -> None:
        ref = next(self._refs)
        self._calls[ref] = (slot, rt, token)
        self.up.send(["call", ref, slot.id, bytes(arg).decode("utf-8", "replace")])

    def call_done(self, ref: int, ok: bool, value: Any) -> None:
        entry = self._calls.pop(ref, None)
        if entry is None:
            return
        slot, rt, token = entry
        if slot.rt is rt and slot.actor is not None:
            from hubhost.functions import _resume_lua
            slot.actor.post(_resume_lua, rt, token, bool(ok), value)

    def _fn_subscribe(self, slot: Any, rt: DriverRuntime, system: bytes, module: bytes, index: Any,
                      status: bytes) -> Any:
        cap = slot.cfg.max_subscriptions
        if sum(1 for _s, r, _l in self._sub_refs.values() if r is rt) >= cap:
            return None, (f"subscribe: too many subscriptions: limit of {cap} per driver reached "
                          "(max_subscriptions)").encode()
        ref = next(self._refs)
        place = (system.decode(), module.decode(), int(index), status.decode())
        label = f"subscription {place[1]}/{place[2]}.{place[3]} in {place[0]}"
        self._sub_refs[ref] = (slot, rt, label)
        self.up.send(["sub", slot.id, ref, *place])
        return ref

    def _fn_unsubscribe(self, rt: DriverRuntime, ref: int) -> None:
        if self._sub_refs.pop(ref, None) is not None:
            self.up.send(["unsub", ref])

    def deliver(self, ref: int, text: str) -> None:
        entry = self._sub_refs.get(ref)
        if entry is None:
            return
        slot, rt, label = entry
        if slot.rt is rt and slot.actor is not None:
            slot.actor.post(self._deliver_on_driver, rt, label, ref, text)

    def _forget(self, rt: DriverRuntime, why: str) -> None:
        super()._forget(rt, why)
        for ref, (_slot, r, _label) in list(self._sub_refs.items()):
            if r is rt:
                del self._sub_refs[ref]
                self.up.send(["unsub", ref])
        for ref, (_slot, r, _tok) in list(self._calls.items()):
            if r is rt:
                del self._calls[ref]

    def lua_subscription_count(self) -> int:
        return len(self._sub_refs)


def iface_timeouts(iface: Interface) -> dict[str, float]:
    return {name: fn.timeout for name, fn in iface.functions.items() if fn.timeout}


class UpstreamLogHandler(logging.Handler):
    """Every log record of the worker goes to the supervisor, which escapes and writes it."""

    def __init__(self, up: Upstream) -> None:
        super().__init__(logging.NOTSET)
        self.up = up
        self.hub_level = logging.INFO
        self.driver_levels: dict[str, int] = {}   # drivers with a level of their own

    def set_levels(self, hub_level: int, driver_levels: dict[str, int]) -> None:
        """The root logger lets through the lowest of them; emit() drops the rest."""
        self.hub_level = int(hub_level)
        self.driver_levels = {str(k): int(v) for k, v in (driver_levels or {}).items()}
        logging.getLogger().setLevel(min([self.hub_level, *self.driver_levels.values()]))

    def _threshold(self, msg: str) -> int:
        if self.driver_levels and msg.startswith("["):
            end = msg.find("]")
            head = msg[1:end].split("/", 1)[0] if end > 0 else ""
            return self.driver_levels.get(head, self.hub_level)
        return self.hub_level

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage()
            if record.levelno < self._threshold(msg):
                return
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            self.up.send(["log", record.levelno, record.name, msg])
            if threading.get_ident() == self.up.loop_thread:
                self.up.flush()   # at once: the last line before a hang or a crash is not lost
        except Exception:  # noqa: BLE001 - logging must never raise into a handler
            pass


class Worker:
    def __init__(self, ch: SyncChannel, spec: dict[str, Any]) -> None:
        self.ch = ch
        self.spec = spec
        self.loop = asyncio.get_running_loop()
        self.up = Upstream(ch, self.loop)
        self.status = StatusStore()
        for dev, fields in spec.get("status", {}).items():
            for name, text in fields.items():
                self.status.set(dev, name, text)
        self.status.add_listener(self.up.status)
        self.host = WorkerHost(spec["drivers"], spec.get("known", {}), Path(spec["state_dir"]),
                               self.status, self.up, self.loop)
        self.cells: dict[str, tuple[ctypes.c_double, DriverRuntime]] = {}
        # fleet mode, a worker that drives movable devices: the monotonic time until which
        # it may (the supervisor extends it after each lease renewal); past it, it exits
        self.fence: float | None = spec.get("fence")
        self.fence_grace: float = float(spec.get("fence_grace", 0.25))
        self.movable: set[str] = set(spec.get("movable", ()))
        self.fenced_at: float | None = None    # the deadline whose fencing has completed
        self._fence_timer: asyncio.TimerHandle | None = None
        self.tick = time.monotonic()
        self.done = asyncio.Event()
        self._queries = {"link": self._q_link}
        self.log_handler: UpstreamLogHandler | None = None

    def install(self) -> None:
        host = self.host
        host.runtime_hooks.append(self._watch_runtime)
        self.datastore = WorkerDatastore(host, self.up)
        from hubhost.devices import devicelink
        devicelink._tuned_limits()   # the zygote imported it before this worker's environment
        self.links = devicelink.install(host)  # type: ignore[arg-type]
        host.links = self.links  # type: ignore[attr-defined]
        api = self.spec.get("api", {})
        self.functions = WorkerFunctions(host, self.up, default_timeout=api.get("exec_timeout", 10.0),
                                         driver_level=api.get("driver_level", "support"),
                                         driver_levels=api.get("driver_levels") or {})
        self.functions.attach()
        host.functions = self.functions  # type: ignore[attr-defined]

    def _watch_runtime(self, slot: DriverSlot, rt: DriverRuntime) -> None:
        addr = int(rt.sandbox.sb.busy_address or 0)
        if addr:
            self.cells[slot.id] = (ctypes.c_double.from_address(addr), rt)

    # -- heartbeat (own thread) ----------------------------------------------------------
    def heartbeat(self) -> None:
        """Look at every runtime's handler deadline ten times a second; tell the supervisor
        once a second that all is well, and at once (then every look) when a handler is
        past its deadline, so a stuck C call is seen within 0.1 s of the grace running out.
        An idle hub of 200 workers then costs the supervisor 200 messages a second."""
        n = 0
        while not self.done.is_set():
            now = time.monotonic()
            f = self.fence
            if f is not None and now > f + self.fence_grace and self.fenced_at != f and self._drives_movable():
                fenced_exit()   # the loop did not stop the movable devices in time
            overdue = -1.0
            for cell, _rt in list(self.cells.values()):
                d = cell.value
                if d > 0:
                    overdue = max(overdue, now - d)
            lag = max(0.0, now - self.tick - TICK)
            if overdue > 0 or lag > 1.0 or n % BEAT_EVERY == 0:
                try:
                    self.ch.send(["hb", round(overdue, 4), round(lag, 4)])
                except OSError:
                    os._exit(0)
            n += 1
            time.sleep(HEARTBEAT)

    async def _ticker(self) -> None:
        n = 0
        while True:
            self.tick = time.monotonic()
            await asyncio.sleep(TICK)
            n += 1
            if n % 2 == 0:
                mem, stats = {}, {}
                for sid, slot in self.host.slots.items():
                    if slot.rt is not None:
                        mem[sid] = slot.rt.memory_used()
                    if slot.stats.dirty:
                        stats[sid] = slot.stats.snapshot()
                self.up.send(["mem", mem, stats])

    # -- reading (on the loop: a reader callback, or inside a blocking request) ----------
    def readable(self) -> None:
        try:
            got = self.ch.read_ready()
        except Exception:  # noqa: BLE001 - a broken frame: the supervisor is not to be trusted
            os._exit(0)
        for msg, blob in got:
            self.incoming(msg, blob, False)
        if self.ch.eof:
            os._exit(0)   # the supervisor is gone: nothing of ours can be saved any more

    def incoming(self, msg: list[Any], blob: bytes, deferred: bool) -> None:
        kind = msg[0]
        if kind == "reply" and self.up.reply(msg[1], msg[2:] if len(msg) > 3 else msg[2]):
            return
        if kind == "reply_blob" and self.up.reply(msg[1], (msg[2], msg[3], blob or None)):
            return
        if deferred:
            self.loop.call_soon(self.dispatch, msg)
        else:
            self.dispatch(msg)

    def dispatch(self, msg: list[Any]) -> None:
        kind = msg[0]
        if kind == "exec":
            self.host.spawn(self._exec(*msg[1:]))
        elif kind == "call_done":
            self.functions.call_done(msg[1], msg[2], msg[3])
        elif kind == "deliver":
            self.functions.deliver(msg[1], msg[2])
        elif kind == "deliver_many":
            for ref in msg[1]:
                self.functions.deliver(ref, msg[2])
        elif kind == "stop":
            self.host.spawn(self._stop(float(msg[1])))
        elif kind == "crash":
            slot = self.host.slots.get(msg[1])
            if slot is not None:
                slot.crash(msg[2])
        elif kind == "query" and msg[2] == "devices":
            self.host.spawn(self._q_devices(msg[1], *msg[3:]))
        elif kind == "query" and msg[2] == "dispatch":
            self._q_dispatch(msg[1], *msg[3:])
        elif kind == "query":
            fn = self._queries.get(msg[2])
            try:
                result = fn(*msg[3:]) if fn else None
            except Exception as e:  # noqa: BLE001
                result = {"error": str(e)}
            self.up.send(["answer", msg[1], result])
        elif kind == "fence":
            self.set_fence(float(msg[1]) if msg[1] is not None else None, msg[2] if len(msg) > 2 else None)
        elif kind == "log_level":
            if self.log_handler is not None:
                self.log_handler.set_levels(int(msg[1]), msg[2] if len(msg) > 2 else {})
            else:
                logging.getLogger().setLevel(int(msg[1]))

    def _q_link(self, driver_id: str, device_id: str) -> dict[str, Any] | None:
        link = self.links.link(driver_id, device_id)
        if link is None:
            return None
        return {"buffered": link.framer.buffered, "backlog": link.backlog,
                "dropped_frames": link.framer.dropped_frames, "paused": bool(link._paused),
                "pauses": link.pauses}

    def _q_dispatch(self, qid: int, driver_id: str, handler: str, n: int) -> None:
        """Benchmark probe (bench/runtime.py): run n events into a handler of the driver the
        way the device links do (batches through its run queue); answers when done."""
        slot = self.host.slots[driver_id]
        rt, actor = slot.rt, slot.actor
        fn = rt.R.driver()[handler.encode()]
        t0 = time.perf_counter()
        batch = 256
        for start in range(0, n, batch):
            actor.post(rt.dispatch_batch, b"bench", fn, min(batch, n - start))
        actor.post(lambda: self.up.send(["answer", qid, time.perf_counter() - t0]))

    async def _exec(self, cid: int, device: str, function: str, args: Any, level: str,
                    timeout: float) -> None:
        try:
            text = await self.functions.exec(device, function, args, level=level, timeout=timeout)
        except ExecError as e:
            self.up.send(["exec_done", cid, False, e.code, e.message])
        except Exception as e:  # noqa: BLE001 - reported, never fatal to the worker
            self.up.send(["exec_done", cid, False, "driver_error", f"{type(e).__name__}: {e}"])
        else:
            self.up.send(["exec_done", cid, True, text])

    # -- fleet fencing --------------------------------------------------------------------
    def _drives_movable(self) -> bool:
        movable = self.movable
        return any(d.id in movable for slot in list(self.host.slots.values()) for d in list(slot.cfg.devices))

    def set_fence(self, deadline: float | None, movable: list[str] | None = None) -> None:
        """Until `deadline` (monotonic) this worker may drive its movable devices; past it,
        it stops them itself (the pinned ones run on), and if its loop cannot do that within
        `fence_grace`, the heartbeat thread ends the process."""
        self.fence = deadline
        if movable is not None:
            self.movable = set(movable)
        if self._fence_timer is not None:
            self._fence_timer.cancel()
            self._fence_timer = None
        if deadline is not None:
            self._fence_timer = self.loop.call_at(deadline, self._enforce_fence)

    def _enforce_fence(self) -> None:
        self._fence_timer = None
        deadline = self.fence
        if deadline is None or time.monotonic() < deadline:
            return
        self.host.spawn(self._fence_devices(deadline))

    async def _fence_devices(self, deadline: float) -> None:
        jobs = []
        for slot in self.host.slots.values():
            devs = [d.id for d in slot.cfg.devices if d.id in self.movable]
            if devs:
                log.warning("[%s] stopping %s: this hub could not renew its fleet leases in time",
                            slot.id, ", ".join(devs))
                jobs.append(self._fence_slot(slot, devs))
        if jobs:
            await asyncio.gather(*jobs)
        if self.fence == deadline:
            self.fenced_at = deadline

    async def _fence_slot(self, slot: DriverSlot, devs: list[str]) -> None:
        await slot.change_devices([], devs, tuple(slot.cfg.elsewhere) + tuple(devs), flush=False)
        self.up.send(["fenced", slot.id, devs])

    async def _q_devices(self, qid: int, driver_id: str, add: list[dict[str, Any]], release: list[str],
                         elsewhere: list[str], fence: float | None = None) -> None:
        slot = self.host.slots.get(driver_id)
        if slot is None:
            self.up.send(["answer", qid, f"no driver {driver_id!r} in this worker"])
            return
        infos = [(DeviceInfo(**a["info"]), a.get("store"), bool(a.get("new"))) for a in add]
        if infos:
            # devices that arrive carry their fence: none may run without one
            if fence is None or time.monotonic() >= fence:
                self.up.send(["answer", qid, "the fleet lease of these devices has no time left"])
                return
            self.movable |= {info.id for info, _, _ in infos}
            if self.fence is None or fence > self.fence:
                self.set_fence(fence)
        why = await slot.change_devices(infos, list(release), tuple(elsewhere))
        self.up.send(["answer", qid, why])

    async def _stop(self, budget: float) -> None:
        try:
            await self.host.stop(budget)
        finally:
            self.up.send(["stopped", dict(self.datastore.unflushed)])
            self.up.flush()
            self.done.set()

    async def main(self) -> int:
        self.install()
        self.up.incoming = self.incoming
        self.loop.add_reader(self.ch.sock.fileno(), self.readable)
        threading.Thread(target=self.heartbeat, name="worker-heartbeat", daemon=True).start()
        ticker = self.loop.create_task(self._ticker())
        if self.fence is not None:
            self.set_fence(self.fence)
        await self.host.start()
        self.up.send(["started"])
        await self.done.wait()
        ticker.cancel()
        return 0


def fenced_exit() -> None:
    """Fleet fencing: the hub could not renew its leases in time, so another hub may start
    this worker's movable devices any moment now. Stop driving them at once, from any
    thread, even while the supervisor is frozen: exit (the kernel closes every connection).
    The supervisor sees FENCE_EXIT and starts the devices again only once it holds their
    leases again."""
    os._exit(FENCE_EXIT)


def run_worker(fd: int) -> int:
    """The child side of a zygote fork: read `init`, run the drivers until `stop`."""
    sock = socket.socket(fileno=fd)
    ch = SyncChannel(sock)
    first = ch.recv()
    if first is None or first[0][0] != "init":
        return 2
    spec = pickle.loads(first[1])
    os.environ.pop("NOTIFY_SOCKET", None)   # readiness is the supervisor's to report
    try:
        os.setpgid(0, 0)   # a Ctrl-C on the terminal reaches the supervisor only
    except OSError:
        pass
    name = spec.get("name", "worker")
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("hh-" + name.split(":", 1)[-1][:12])   # ps/top show which worker is which
    except OSError:
        pass

    fence = spec.get("fence")
    if fence is not None and spec.get("movable") and time.monotonic() > fence:
        fenced_exit()   # its leases may be someone else's already: drive nothing

    async def amain() -> int:
        w = Worker(ch, spec)
        root = logging.getLogger()
        for h in list(root.handlers):
            root.removeHandler(h)
        w.log_handler = UpstreamLogHandler(w.up)
        root.addHandler(w.log_handler)
        w.log_handler.set_levels(int(spec.get("log_level", logging.INFO)), spec.get("driver_levels") or {})
        return await w.main()

    return asyncio.run(amain())


__all__ = ["run_worker", "Worker", "Upstream", "RemoteStoreFile"]
