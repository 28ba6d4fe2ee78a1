"""The host side of the datastore (DESIGN section 4): loading, flushing, crash safety.

The store itself lives in Lua (lua/datastore.lua): the guard, the nodes, the JSON encoder
and decoder. This module owns the file:

- `StoreFile`: one driver's `datastore.json`. Loads it (a corrupt, empty, truncated or
  wrong-type file is moved aside as `datastore.json.corrupt-<UTC time>` and the `.bak` is
  used), writes generations atomically and in order (an older snapshot never overwrites a
  newer one, and a runtime that was replaced can no longer write), and keeps the failure
  streak (log once, retry with backoff).
- `DatastoreBinding`: attaches one DriverRuntime's Lua store to its StoreFile. Usable
  without the supervisor (the test kit): `flush_now()` writes synchronously.
- `DatastoreService` / `install(sup)`: the supervisor wiring: periodic flush of dirty
  stores, `ds:save()` from handlers (the handler yields; the write runs on a writer thread),
  flush after handler faults and crashes, and on shutdown.

Snapshots are encoded in Lua on the driver's thread (fast, JIT-compiled) and written on a
writer thread, so a handler never waits for the disk unless it called `save()`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import logging
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson

from hubhost.state import atomicfile
from hubhost.sandbox.sandbox import LuaError, LuaMemoryError

if TYPE_CHECKING:  # pragma: no cover
    from hubhost.worker.actor import Actor
    from hubhost.sandbox.runtime import DriverRuntime
    from hubhost.supervisor.supervisor import DriverSlot, Supervisor

log = logging.getLogger("hubhost.state.datastore")

FILE_NAME = "datastore.json"
RETRY_START = 1.0          # seconds before the first retry of a failed write
RETRY_MAX = 60.0
ATTACH_TIMEOUT = 10.0      # how long a new runtime waits for its predecessor's last write
TICK = 0.25                # flusher resolution (seconds)


class StaleWriter(RuntimeError):
    """A write from a runtime that has since been replaced (its data is not current)."""


class StoreRefused(OSError):
    """The store cannot be used as it is (not a regular file, too big for the driver's
    memory, unreadable folder). Nothing was changed on disk; the driver does not start."""


class StoreTooLarge(StoreRefused):
    """A valid store that does not fit the driver's max_memory (load or snapshot)."""


# A store needs about this many times its file size in Lua memory: the text while it is
# decoded, the decoded nodes, the cached text of each top-level entry, and a snapshot's
# buffer and result. Checked before the text ever enters Lua (a failed allocation outside
# a protected call aborts the whole process).
LOAD_FACTOR = 4


def _mib(n: int) -> str:
    return f"{n / (1024 * 1024):.1f} MiB"


def check_fits(driver_id: str, path: Path, size: int, memory_limit: int, memory_used: int = 0) -> None:
    """Raise StoreTooLarge if a store file of `size` bytes cannot be loaded and flushed in
    a runtime limited to `memory_limit` bytes of which `memory_used` are taken."""
    if size * LOAD_FACTOR <= memory_limit - memory_used:
        return
    raise StoreTooLarge(
        f"[{driver_id}] {path} is {size} bytes ({_mib(size)}), too big for the driver's "
        f"max_memory of {_mib(memory_limit)} (a store needs about {LOAD_FACTOR}x its file size); "
        "the file is left as it is and the driver does not start: raise max_memory or shrink the store")


class StoreUnreadable(FileNotFoundError):
    """Neither datastore.json nor its .bak holds a usable store (`hubhost datastore`)."""


def check_text(raw: bytes) -> str | None:
    """None if `raw` is a usable store file, else what is wrong with it."""
    if not raw.strip():
        return "it is empty"
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        return f"it is not valid JSON ({e})"
    if not isinstance(data, dict):
        return f"its top level is a JSON {type(data).__name__}, not an object"
    return None


def _out_of_memory(e: BaseException) -> bool:
    """A Lua error that is the memory limit (LuaMemoryError, or the message re-raised)."""
    return isinstance(e, LuaMemoryError) or "not enough memory" in str(e)


def _utc_stamp() -> str:
    return datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%SZ")


class StoreFile:
    """One driver's datastore file: load with quarantine, ordered atomic writes, failure
    streaks. Thread-safe: writes come from writer threads and driver threads."""

    def __init__(self, folder: Path, driver_id: str = "", *, logger: logging.Logger | None = None) -> None:
        self.folder = Path(folder)
        self.path = self.folder / FILE_NAME
        self.bak = self.folder / (FILE_NAME + ".bak")
        self.driver_id = driver_id or self.folder.name
        self.log = logger or log
        self._lock = threading.Lock()          # held for the whole of a write
        self._cond = threading.Condition()     # announced writes of a replaced runtime
        self._announced = 0
        self.epoch = 0                          # bumped by each attached runtime
        self.written_seq = 0                    # newest generation of this epoch on disk
        self.failing = False
        self.failures = 0                       # failed writes in the current streak
        self.retry_delay = RETRY_START
        self.next_retry = 0.0                   # monotonic time of the next retry
        self.writes = 0                         # successful writes (tests, stats)
        self.restore_failed = False             # a .bak could not be written back at load

    # -- ownership -----------------------------------------------------------------------
    def announce(self) -> None:
        """A write of the current runtime is coming (a crash flush): attach() waits for it."""
        with self._cond:
            self._announced += 1

    def release(self) -> None:
        with self._cond:
            self._announced -= 1
            self._cond.notify_all()

    def attach(self, timeout: float = ATTACH_TIMEOUT) -> int:
        """Make a new runtime the only writer; returns its epoch. Waits (bounded) for the
        previous runtime's announced last write, so the new one loads the newest data."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._announced == 0, timeout):
                self.log.warning("[%s] the previous runtime's last datastore write did not finish "
                                 "within %g s; loading what is on disk", self.driver_id, timeout)
                self._announced = 0
        with self._lock:
            self.epoch += 1
            self.written_seq = 0
            return self.epoch

    # -- loading -------------------------------------------------------------------------
    def load(self, memory_limit: int | None = None, memory_used: int = 0) -> bytes | None:
        """The JSON text to load (None: start empty).

        Recovery order (each step durable before the next; a crash between any two leaves
        the newest good generation findable by the next start):
        1. a corrupt main file is first *linked* to `datastore.json.corrupt-<UTC>` (nothing
           is moved), then a valid `.bak` is written back over the main name atomically;
        2. a missing main file with a valid `.bak`: the `.bak` is written back and loaded;
        3. a corrupt `.bak` is moved to `datastore.json.bak.corrupt-<UTC>`;
        4. a store that would not fit `memory_limit` raises StoreTooLarge before anything
           is touched; a path that is not a regular file raises StoreRefused.
        Every problem is logged as an error naming the driver and the file."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StoreRefused(f"[{self.driver_id}] cannot use the state folder {self.folder}: "
                               f"{e.strerror or e}") from None
        self._remove_leftovers()
        self.restore_failed = False
        try:
            raw = atomicfile.read_regular(self.path)
            bak = atomicfile.read_regular(self.bak)
        except atomicfile.NotRegularFile as e:
            raise StoreRefused(f"[{self.driver_id}] {e}; the driver does not start") from None
        problem = check_text(raw) if raw is not None else "it does not exist"
        bak_problem = check_text(bak) if bak is not None else "it does not exist"
        chosen = raw if problem is None else bak if bak_problem is None else None
        if chosen is not None and memory_limit is not None:
            check_fits(self.driver_id, self.path if chosen is raw else self.bak, len(chosen),
                       memory_limit, memory_used)
        if chosen is raw and raw is not None:
            if bak is not None and bak_problem is not None:
                moved = self._quarantine(self.bak)
                self.log.error("[%s] %s is unusable: %s; moved it to %s (%s is fine and loaded)",
                               self.driver_id, self.bak, bak_problem, moved.name, self.path.name)
            return raw
        if chosen is bak and bak is not None:
            if raw is None:
                self.log.error("[%s] %s is missing; loading %s and writing it back",
                               self.driver_id, self.path, self.bak.name)
            else:
                kept = self._keep_corrupt()
                self.log.error("[%s] %s is unusable: %s; kept it as %s and loaded %s",
                               self.driver_id, self.path, problem, kept.name, self.bak.name)
            try:  # the good generation back under the main name (the .bak stays as it is)
                atomicfile.write_atomic(self.path, bak, fault_label="recover")
            except OSError as e:
                self.log.error("[%s] could not restore %s from %s: %s", self.driver_id,
                               self.path.name, self.bak.name, e)
                self.restore_failed = True
            return bak
        # nothing usable: keep whatever is there for a human, start empty
        notes = []
        if raw is not None:
            notes.append(f"{self.path.name} is unusable ({problem}), moved to "
                         f"{self._quarantine(self.path).name}")
        if bak is not None:
            notes.append(f"{self.bak.name} is unusable ({bak_problem}), moved to "
                         f"{self._quarantine(self.bak).name}")
        if notes:
            self.log.error("[%s] %s: %s; starting with an empty datastore", self.driver_id,
                           self.folder, "; ".join(notes))
        return None

    def _remove_leftovers(self) -> None:
        """Temp files of writes that a crash interrupted (atomicfile names them .<name>.*-<pid>).
        Only called at load, when no write of this store can be running."""
        for pattern in (f".{FILE_NAME}.tmp-*", f".{FILE_NAME}.bak-*"):
            for leftover in self.folder.glob(pattern):
                try:
                    leftover.unlink()
                except OSError:
                    pass

    def _corrupt_name(self, path: Path) -> Path:
        stamp = _utc_stamp()
        target = self.folder / f"{path.name}.corrupt-{stamp}"
        n = 1
        while target.exists():
            target = self.folder / f"{path.name}.corrupt-{stamp}-{n}"
            n += 1
        return target

    def _keep_corrupt(self) -> Path:
        """A second name for the corrupt main file (a hard link: nothing is moved, so the
        main name never goes missing while the .bak is written back over it)."""
        target = self._corrupt_name(self.path)
        atomicfile.fault_point("recover")
        os.link(self.path, target)
        atomicfile.fault_point("recover")
        atomicfile.fsync_dir(self.folder)
        return target

    def _quarantine(self, path: Path | None = None) -> Path:
        """Move an unusable file aside (only when no good generation depends on its name)."""
        path = self.path if path is None else path
        target = self._corrupt_name(path)
        atomicfile.fault_point("recover")
        os.replace(path, target)
        atomicfile.fault_point("recover")
        atomicfile.fsync_dir(self.folder)
        return target

    # -- writing -------------------------------------------------------------------------
    def write(self, epoch: int, seq: int, data: bytes) -> bool:
        """Write generation `seq` of runtime `epoch` durably. Returns False when a newer
        generation is already on disk (nothing to do). Raises StaleWriter for a replaced
        runtime and OSError (store stays dirty, old file intact) when the disk refuses."""
        with self._lock:
            if epoch != self.epoch:
                raise StaleWriter(f"datastore of {self.driver_id}: this runtime was replaced; "
                                  "its write was dropped")
            if seq <= self.written_seq:
                return False
            try:
                # the main file becomes the .bak only when it is a good generation: after a
                # failed restore it may still be the corrupt one, and rotating it would
                # replace the valid .bak
                atomicfile.write_atomic(self.path, data, backup=not self.restore_failed)
            except OSError as e:
                self._failed(e)
                raise
            self.restore_failed = False
            self.written_seq = seq
            self.writes += 1
            self._succeeded()
            return True

    def _failed(self, e: OSError) -> None:
        now = time.monotonic()
        if not self.failing:
            self.failing = True
            self.retry_delay = RETRY_START
            hint = {errno.ENOSPC: " (disk full)", errno.EFBIG: " (file too large)",
                    errno.EIO: " (I/O error)", errno.EDQUOT: " (quota exceeded)"}.get(e.errno or 0, "")
            self.log.error("[%s] cannot write %s: %s%s; the store stays dirty, the previous file "
                           "is intact; retrying with backoff", self.driver_id, self.path, e, hint)
        else:
            self.retry_delay = min(self.retry_delay * 2, RETRY_MAX)
        self.failures += 1
        self.next_retry = now + self.retry_delay

    def _succeeded(self) -> None:
        if self.failing:
            self.log.warning("[%s] %s written again after %d failed attempt%s", self.driver_id,
                             self.path, self.failures, "" if self.failures == 1 else "s")
        self.failing = False
        self.failures = 0
        self.retry_delay = RETRY_START

    def retry_due(self, now: float | None = None) -> bool:
        return not self.failing or (now if now is not None else time.monotonic()) >= self.next_retry


class DatastoreBinding:
    """One runtime's Lua datastore bound to its file. Methods marked (driver thread) touch
    the Lua state and must run on the runtime's own thread."""

    def __init__(self, rt: "DriverRuntime", store: StoreFile | Path | None = None) -> None:
        """(driver thread) Load the file into the runtime's store. Call before rt.load()."""
        self.rt = rt
        if isinstance(store, (str, Path)):
            store = StoreFile(Path(store), rt.driver_id)
        self.store = store
        rt.sandbox.new_env().require(b"datastore")
        self.H = rt.R.caps.datastore_host
        self.epoch = 0
        self.inflight = False          # an async write of this binding is running
        self.again = False             # a flush was asked for while one was running
        if store is not None:
            self.epoch = store.attach()
            rt.sandbox.expose(datastore_write=self._write_sync)
            self._load(store.load(rt.max_memory, rt.memory_used()))
        rt.extensions.append(self)

    @classmethod
    def of(cls, rt: "DriverRuntime") -> "DatastoreBinding | None":
        for ext in rt.extensions:
            if isinstance(ext, cls):
                return ext
        return None

    def after_load(self, rt: "DriverRuntime") -> None:
        """DriverRuntime extension hook (nothing to do: the store was loaded before)."""

    def _too_large(self, size: int) -> StoreTooLarge:
        return StoreTooLarge(
            f"[{self.rt.driver_id}] {self.store.path} is {size} bytes ({_mib(size)}) and does not "  # type: ignore[union-attr]
            f"fit the driver's max_memory of {_mib(self.rt.max_memory)} once loaded; the file is "
            "left as it is and the driver does not start: raise max_memory or shrink the store")

    def _reset(self) -> None:
        """Empty the Lua store and give its memory back (after a refused load)."""
        try:
            self.H.load(b"{}")
        except LuaError:
            pass
        self.rt._collect()

    def _load(self, raw: bytes | None) -> None:
        """(driver thread) Decode `raw` into the store and prove it can be snapshot again;
        a store that does not fit raises StoreTooLarge with the file untouched."""
        if raw is None:
            return
        try:
            dropped, note = self.H.load(raw)
            self.H.encode()   # the first flush must fit too: try it now, not at shutdown
        except LuaError as e:
            self._reset()
            if _out_of_memory(e):
                raise self._too_large(len(raw)) from None
            # valid JSON our decoder cannot read: leave it for a human
            raise StoreRefused(f"[{self.rt.driver_id}] {self.store.path} could not be loaded ({e}); "  # type: ignore[union-attr]
                               "the file is left as it is and the driver does not start") from None
        self.rt._collect()
        if dropped:
            self.rt.log.error("[%s] %s: %d value%s the datastore cannot hold were dropped while "
                              "loading (the first: %s)", self.rt.driver_id, self.store.path, dropped,  # type: ignore[union-attr]
                              "" if dropped == 1 else "s", note.decode("utf-8", "replace"))

    # -- driver thread -------------------------------------------------------------------
    def is_dirty(self) -> bool:
        return bool(self.H.is_dirty())

    def snapshot(self) -> tuple[int, bytes] | None:
        """(seq, JSON) of the store now, or None when it is not dirty. Raises StoreTooLarge
        (an OSError: every flush path handles it) when encoding hits the memory limit."""
        try:
            r = self.H.snapshot()
        except LuaError as e:
            if not _out_of_memory(e):
                raise
            self.rt._collect()
            size = 0
            if self.store is not None:
                try:
                    size = os.stat(self.store.path).st_size
                except OSError:
                    pass
            raise StoreTooLarge(
                f"[{self.rt.driver_id}] the datastore could not be encoded: the driver's max_memory "
                f"of {_mib(self.rt.max_memory)} was reached (the file on disk is {size} bytes); "
                "the store stays dirty and the file is left as it is") from None
        if r is None:
            return None
        data, seq = r
        return int(seq), data

    def mark_written(self, seq: int) -> None:
        self.H.written(seq)

    def data(self) -> Any:
        """The store as plain Python data (tests, tools)."""
        return orjson.loads(self.H.encode())

    def flush_now(self) -> bool:
        """Write the store to disk now, synchronously, if it is dirty. Returns True if a
        write happened; raises OSError if the disk refused (the store stays dirty)."""
        if self.store is None:
            raise RuntimeError("this datastore has no file attached")
        snap = self.snapshot()
        if snap is None:
            return False
        seq, data = snap
        self.store.write(self.epoch, seq, data)
        self.mark_written(seq)
        return True

    def _write_sync(self, seq: int, data: bytes) -> tuple[Any, Any]:
        """ds:save() outside a handler (e.g. the entry chunk): write now."""
        try:
            self.store.write(self.epoch, int(seq), data)  # type: ignore[union-attr]
        except (OSError, StaleWriter) as e:
            return None, f"datastore not saved: {e}".encode()
        return True, None


class DatastoreService:
    """The supervisor wiring: one StoreFile per driver slot (kept across restarts), one
    binding per runtime, writer threads, the periodic flusher."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.files: dict[str, StoreFile] = {}
        self.bindings: dict[str, DatastoreBinding] = {}
        self.due: dict[str, float] = {}
        self.unflushed: dict[str, str] = {}   # driver id -> why its changes were lost at shutdown
        self.executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=2, thread_name_prefix="datastore-writer")
        sup.runtime_hooks.append(self._on_runtime)
        sup.wait_handlers["save"] = self._on_save
        sup.crash_hooks.append(self._on_crash)
        sup.fault_hooks.append(self._on_fault)
        sup.stop_hooks.append(self._on_stop)
        sup.ready_hooks.append(self._on_ready)
        sup.shutdown_hooks.append(self._on_shutdown)
        sup.datastore = self  # type: ignore[attr-defined]

    def file_for(self, slot: "DriverSlot") -> StoreFile:
        f = self.files.get(slot.id)
        if f is None:
            f = self.files[slot.id] = StoreFile(slot.state_dir, slot.id)
        return f

    def _current(self, slot: "DriverSlot", rt: "DriverRuntime") -> DatastoreBinding | None:
        b = self.bindings.get(slot.id)
        return b if b is not None and b.rt is rt else None

    # -- driver thread -------------------------------------------------------------------
    def _on_runtime(self, slot: "DriverSlot", rt: "DriverRuntime") -> None:
        self.bindings[slot.id] = DatastoreBinding(rt, self.file_for(slot))

    def _on_save(self, slot: "DriverSlot", rt: "DriverRuntime", token: int, arg: Any) -> None:
        """ds:save() in a handler: write on a writer thread, then resume the handler."""
        b = self._current(slot, rt)
        actor = slot.actor
        if b is None or actor is None:
            if actor is not None:   # from the run queue: a resume never nests in Lua
                actor.post(rt.resume, token, None, b"datastore: no datastore file is attached to this runtime")
            return
        seq, data = int(arg[1]), arg[2]

        def done(fut: concurrent.futures.Future) -> None:
            exc = fut.exception()
            if exc is None:
                actor.post(rt.resume, token, True)
            else:
                actor.post(rt.resume, token, None, f"datastore not saved: {exc}".encode())

        self.executor.submit(b.store.write, b.epoch, seq, data).add_done_callback(done)

    def _flush_async(self, slot: "DriverSlot", b: DatastoreBinding, force: bool = False) -> None:
        """Snapshot a dirty store and write it on a writer thread (never blocks handlers)."""
        if b.inflight:
            b.again = True
            return
        if not force and not b.store.retry_due():
            return
        try:
            snap = b.snapshot()
        except Exception as e:  # noqa: BLE001 - e.g. the Lua state is out of memory
            log.error("[%s] could not encode the datastore: %s", slot.id, e)
            return
        if snap is None:
            return
        seq, data = snap
        b.inflight = True
        actor = slot.actor

        def done(fut: concurrent.futures.Future) -> None:
            exc = fut.exception()
            if actor is None:
                return
            if exc is None:
                actor.post(self._written, slot, b, seq)
            else:
                actor.post(self._write_failed, slot, b)

        self.executor.submit(b.store.write, b.epoch, seq, data).add_done_callback(done)

    def _written(self, slot: "DriverSlot", b: DatastoreBinding, seq: int) -> None:
        b.inflight = False
        b.mark_written(seq)
        if b.again:
            b.again = False
            self._flush_async(slot, b)

    def _write_failed(self, slot: "DriverSlot", b: DatastoreBinding) -> None:
        b.inflight = False
        b.again = False   # the flusher retries when the backoff says so

    def _final_flush(self, slot: "DriverSlot", b: DatastoreBinding) -> None:
        """After a crash, on the dying runtime's thread: write synchronously."""
        try:
            b.flush_now()
        except (OSError, StaleWriter) as e:
            log.error("[%s] datastore not flushed after the crash: %s", slot.id, e)
        except Exception:  # noqa: BLE001
            log.exception("[%s] datastore not flushed after the crash", slot.id)
        finally:
            b.store.release()

    # -- loop thread ---------------------------------------------------------------------
    def _on_crash(self, slot: "DriverSlot", rt: "DriverRuntime", actor: "Actor") -> None:
        b = self._current(slot, rt)
        if b is None or b.store is None:
            return
        b.store.announce()
        actor.post(self._final_flush, slot, b)

    def _on_fault(self, slot: "DriverSlot", rt: "DriverRuntime") -> None:
        b = self._current(slot, rt)
        if b is not None and slot.actor is not None:
            slot.actor.post(self._flush_async, slot, b)

    async def _on_stop(self, slot: "DriverSlot", rt: "DriverRuntime", actor: "Actor") -> None:
        b = self._current(slot, rt)
        if b is None:
            return
        loop = asyncio.get_running_loop()
        try:
            await asyncio.wait_for(actor.call(loop, b.flush_now), 8.0)
        except asyncio.TimeoutError:
            self.unflushed[slot.id] = "the driver thread was busy"
            log.error("[%s] the driver thread is busy: datastore not flushed at shutdown", slot.id)
        except (OSError, StaleWriter) as e:
            self.unflushed[slot.id] = str(e)
            log.error("[%s] datastore not flushed at shutdown: %s", slot.id, e)
        else:
            self.unflushed.pop(slot.id, None)

    def _on_ready(self, sup: "Supervisor") -> None:
        sup.spawn(self._flusher())

    async def _flusher(self) -> None:
        """Flush dirty stores every flush_interval (per driver); retry failures sooner."""
        loop = asyncio.get_running_loop()
        while not self.sup.stopping:
            now = loop.time()
            mono = time.monotonic()
            for slot in list(self.sup.slots.values()):
                b = self.bindings.get(slot.id)
                actor = slot.actor
                if b is None or actor is None or b.rt is not slot.rt or slot.state != "running":
                    continue
                due = self.due.get(slot.id)
                if due is None:
                    self.due[slot.id] = now + slot.cfg.flush_interval
                    continue
                retry = b.store.failing and b.store.retry_due(mono)
                if now >= due or retry:
                    self.due[slot.id] = now + slot.cfg.flush_interval
                    actor.post(self._flush_async, slot, b)
            await asyncio.sleep(TICK)

    async def _on_shutdown(self, sup: "Supervisor") -> None:
        await asyncio.to_thread(self.executor.shutdown, True)


def install(sup: "Supervisor") -> DatastoreService:
    """Plug the datastore into a supervisor (hub.install_parts calls this)."""
    return DatastoreService(sup)


def read_store_file(driver_state_dir: Path) -> Any:
    """The persisted store of one driver as plain data (`hubhost datastore`). Read-only,
    safe while the hub runs (files are replaced atomically). Falls back to the .bak."""
    folder = Path(driver_state_dir)
    main, bak = folder / FILE_NAME, folder / (FILE_NAME + ".bak")
    problems = []
    for f in (main, bak):
        try:
            raw = atomicfile.read_regular(f)   # a FIFO must not hang `hubhost datastore`
        except OSError as e:
            problems.append(str(e))
            continue
        if raw is None:
            problems.append(f"{f} does not exist")
            continue
        problem = check_text(raw)
        if problem is None:
            if f is bak:
                log.warning("%s is unusable (%s); showing %s", main, problems[-1], bak.name)
            return orjson.loads(raw)
        problems.append(f"{f}: {problem}")
    if not main.exists() and not bak.exists():
        raise StoreUnreadable(f"no datastore for this driver: {main} does not exist")
    raise StoreUnreadable("; ".join(problems))


__all__ = ["DatastoreBinding", "DatastoreService", "StoreFile", "StaleWriter", "install",
           "read_store_file", "check_text", "FILE_NAME"]
