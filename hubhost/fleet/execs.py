"""Exec across hubs (DESIGN section 8): a call for a device owned by another hub goes to that
hub's stream `P{hub:<id>}:exec`, and the answer comes back on the caller's reply list.

Why it is built this way:

* **At-least-once delivery, at-most-once execution.** The owner reads its stream with a
  consumer group, so an entry it read but did not acknowledge is delivered again after a
  restart; the result is cached under `P{hub:<id>}:done:<request id>` (5 min) before the
  entry is acknowledged. A redelivered entry whose result is cached is answered from the
  cache; one with no result was read (and may have run) when the hub stopped: it is
  answered `timeout` ("it may have run"), never run again, and that answer is cached.
  A request sent once is run as soon as it is first read: its pending entry is its running
  marker, so no Redis round trip comes before it (that round trip cost a third of a
  cross-hub call). A request its caller had to send again (`resent`, after a Redis error)
  may have run under the same id already: it is looked up first and, when runnable, the
  "running" marker is set (SET NX, one script for the batch) before it runs. The hub also
  keeps recent results and the calls it is running in memory, so a duplicate is never
  run twice while the hub lives, even when a restarted Redis lost the cache.
* **Nothing silently lost.** Every call ends with a result or an explicit error. A caller
  whose owner's registration vanished removes its entry from the dead owner's stream if the
  owner never read it (XPENDING check + XDEL in one script, one slot) and sends it to the
  new owner; if the owner did read it, the caller waits for the reply until the deadline.
* **Deadlines** are unix milliseconds, so a call that waited in a stream longer than its
  caller waits is answered `timeout` and never run (hubs' clocks must agree to well under a
  call's timeout, as NTP gives).
* **Redis Cluster:** every command and script touches keys of one slot (`{hub:<id>}` for the
  stream and the cache, `{reply:<caller>}` for the reply list, `{fleet:F}` for ownership).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import orjson
from redis.exceptions import NoScriptError, RedisError, ResponseError

from hubhost.fleet.keys import DONE_TTL_MS, EXEC_GROUP, FleetKeys, lease_holder
from hubhost.functions import CODES, ExecError, SystemRef

__all__ = ["ExecClient", "ExecServer", "RunFn", "OwnsFn", "parse_target", "REPLY_TTL_S",
           "RUNNING", "STREAM_MAXLEN"]

log = logging.getLogger("hubhost.fleet")

RUNNING = "running"            # the done key while a call runs (the result replaces it)
REPLY_TTL_S = 60               # a reply list nobody read expires
STREAM_MAXLEN = 10_000         # approximate cap of an exec stream (entries are XDELed when done)
DEFAULT_TIMEOUT = 10.0         # as FunctionHost.default_timeout
REMOTE_CODES = CODES + ("moved",)

RunFn = Callable[[str, str, Any, str, float], Awaitable[str]]
OwnsFn = Callable[[str], bool]

# The errors of a dead, restarting or failing-over Redis (or cluster node): an outage.
try:
    from redis.exceptions import RedisClusterException
    _OUTAGE: tuple[type[BaseException], ...] = (RedisError, RedisClusterException, OSError,
                                                asyncio.TimeoutError)
except ImportError:  # pragma: no cover - every supported redis-py has it
    _OUTAGE = (RedisError, OSError, asyncio.TimeoutError)


def _s(v: Any) -> str | None:
    """str of a reply from a client with or without decode_responses."""
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v).decode()
    return str(v)


def _now_ms() -> int:
    return int(time.time() * 1000)


class _Script:
    """A Lua script run by EVALSHA (EVAL once a node does not know it): the cluster client
    routes it by its first key, so each script takes keys of one slot only."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.sha = hashlib.sha1(text.encode()).hexdigest()

    async def __call__(self, r: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return await r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return await r.eval(self.text, len(keys), *keys, *args)

    def sync(self, r: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return r.evalsha(self.sha, len(keys), *keys, *args)
        except NoScriptError:
            return r.eval(self.text, len(keys), *keys, *args)


# KEYS: done keys of a batch (one slot: {hub:<id>}). ARGV: marker, ttl ms, then one flag per
# key ("1": this hub may run it). -> per key: the cached value, or false (the marker is now
# set: run it), or "" (not cached and not runnable).
_CLAIM = _Script("""
local out = {}
for i = 1, #KEYS do
  local v = redis.call('GET', KEYS[i])
  if v then out[i] = v
  elseif ARGV[i + 2] == '1' then
    redis.call('SET', KEYS[i], ARGV[1], 'PX', ARGV[2]); out[i] = false
  else out[i] = '' end
end
return out
""")

# KEYS: an exec stream. ARGV: group, entry id. -> 1: removed before anyone read it;
# 0: it was delivered (pending) or is gone (answered and deleted).
_WITHDRAW = _Script("""
local ok, p = pcall(redis.call, 'XPENDING', KEYS[1], ARGV[1], ARGV[2], ARGV[2], 1)
if ok and #p > 0 then return 0 end
return redis.call('XDEL', KEYS[1], ARGV[2])
""")


def _reply_ok(result_text: str) -> str:
    return '{"ok":' + result_text + "}"


def _reply_error(code: str, message: str) -> str:
    return orjson.dumps({"error": code, "message": message}).decode()


class _OutageLog:
    """Log a lost Redis once per outage, and its recovery once. Errors within FLAP seconds of
    a recovery (pooled connections that broke with the old server fail once each) belong to
    the same outage: logged at debug level only."""

    FLAP = 2.0

    def __init__(self, what: str) -> None:
        self.what = what
        self.since: float | None = None
        self.up_at = -1e9

    def down(self, exc: BaseException) -> None:
        now = time.monotonic()
        if self.since is None and now - self.up_at > self.FLAP:
            self.since = now
            log.warning("%s: Redis unreachable (%s: %s); retrying", self.what, type(exc).__name__, exc)
        else:
            log.debug("%s: Redis still unreachable (%s)", self.what, exc)

    def up(self) -> None:
        if self.since is not None:
            self.up_at = time.monotonic()
            log.info("%s: Redis back after %.1f s", self.what, self.up_at - self.since)
            self.since = None


# ---------------------------------------------------------------------------------------------
# The owner's side

class ExecServer:
    """Runs the calls that other hubs and clients put on this hub's exec stream.

    `run(device, function, args, level, timeout)` is the hub's local exec (result JSON text,
    or ExecError); `owns(device)` says whether this hub drives the device now.
    """

    def __init__(self, redis: Any, keys: FleetKeys, hub_id: str, run: RunFn, owns: OwnsFn, *,
                 concurrency: int = 64, batch: int = 64, block_ms: int = 1000,
                 remember: int = 10_000) -> None:
        self.redis = redis
        self.keys = keys
        self.hub_id = hub_id
        self.run = run
        self.owns = owns
        self.stream = keys.exec_stream(hub_id)
        self.batch = batch
        self.block_ms = block_ms
        self._slots = asyncio.Semaphore(concurrency)
        self._running: dict[str, asyncio.Future] = {}        # request id -> its reply text
        self._recent: OrderedDict[str, tuple[float, str]] = OrderedDict()   # id -> (t, reply)
        self._remember = remember
        self._tasks: set[asyncio.Task] = set()
        self._outage = _OutageLog(f"fleet exec server {hub_id}")
        self._task: asyncio.Task | None = None
        self._stopping = False
        self.answered = 0           # entries answered (any outcome), for tests and metrics
        self.ran = 0                # calls actually run

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> asyncio.Task:
        self._task = asyncio.get_running_loop().create_task(self.serve(), name=f"exec-server-{self.hub_id}")
        return self._task

    async def stop(self, grace: float = 5.0) -> None:
        """Stop reading; let calls being run finish (up to `grace` s) so they are answered."""
        await self._stop_reading()
        if self._tasks:
            await asyncio.wait(list(self._tasks), timeout=grace)
        for t in list(self._tasks):
            t.cancel()

    async def abort(self) -> None:
        """Stop at once, as a crash would: calls being run are dropped unanswered (their
        entries stay pending, their running markers stay)."""
        await self._stop_reading()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _stop_reading(self) -> None:
        # The flag, not only the cancellation: a cancelled read inside redis-py has been seen
        # to carry on (Python 3.11), so the loop also checks the flag after every read.
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.wait([self._task], timeout=self.block_ms / 1000.0 + 2.0)

    # -- reading the stream ------------------------------------------------------------------
    async def serve(self) -> None:
        """Read and answer entries until stopped, through Redis outages and failovers."""
        backoff = 0.05
        while not self._stopping:
            try:
                await self._ensure_group()
                await self._read("0")      # our own pending entries first: redelivery
                self._outage.up()
                backoff = 0.05
                while not self._stopping:
                    await self._read(">")
            except asyncio.CancelledError:
                raise
            except ResponseError as e:
                if "NOGROUP" in str(e):      # the stream vanished (Redis restarted, flushed)
                    continue
                self._outage.down(e)
            except _OUTAGE as e:
                self._outage.down(e)
            except Exception:  # noqa: BLE001 - a bug must not end serving for good
                log.exception("fleet exec server %s: unexpected error", self.hub_id)
            if self._stopping:
                return
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 1.0)

    async def _ensure_group(self) -> None:
        try:
            await self.redis.xgroup_create(self.stream, EXEC_GROUP, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def _read(self, start: str) -> int:
        """One XREADGROUP (all of our pending entries when `start` is "0"); returns the number
        of entries taken."""
        total = 0
        last = start
        while True:
            await self._slots.acquire()     # wait for room before reading more
            self._slots.release()
            resp = await self.redis.xreadgroup(EXEC_GROUP, self.hub_id, {self.stream: last},
                                               count=self.batch,
                                               block=None if start == "0" else self.block_ms)
            entries = _entries(resp)
            if not entries or self._stopping:
                return total
            total += len(entries)
            await self._take(entries, pending=start == "0")
            await asyncio.sleep(0)     # the calls just started send their replies before we read on
            if start != "0":
                return total
            last = entries[-1][0]

    async def _take(self, entries: list[tuple[str, dict[str, str] | None]], pending: bool) -> None:
        """Answer or run a batch. A first delivery of a request sent once is run at once (no
        Redis round trip before it: its pending entry is its running marker). A request its
        caller sent again, and every entry redelivered from our pending list (`pending`),
        is looked up in the result cache first (one script for the batch); a redelivered
        one with no result may have run before the hub restarted: answered `timeout`, and
        that answer cached, so a copy of it sent again gets the same answer."""
        now = _now_ms()
        todo: list[tuple[str, dict[str, str]]] = []
        dead: list[str] = []
        for eid, f in entries:
            if not f or not f.get("id") or not f.get("reply"):
                dead.append(eid)                   # deleted, or not ours to read: drop it
            elif f["id"] in self._running:         # a duplicate of a call running here:
                self._running[f["id"]].add_done_callback(partial(self._answer_later, eid, f))
            elif (cached := self._remembered(f["id"])) is not None:
                self._spawn(self._answer(eid, f, cached, cache=False))
            else:
                todo.append((eid, f))
        if dead:
            await self._ack(dead)
        if not todo:
            return
        runnable = {eid: _deadline(f) > now and self.owns(f.get("device", "")) for eid, f in todo}
        looked = [(eid, f) for eid, f in todo if pending or f.get("resent")]
        got: dict[str, Any] = {}
        if looked:
            flags = ["1" if runnable[eid] and not pending else "0" for eid, _f in looked]
            values = await _CLAIM(self.redis, [self.keys.done(self.hub_id, f["id"]) for _e, f in looked],
                                  [RUNNING, DONE_TTL_MS, *flags])
            got = {eid: v for (eid, _f), v in zip(looked, values)}
        answers = []
        for eid, f in todo:
            if f["id"] in self._running:         # two copies of one request in this batch
                self._running[f["id"]].add_done_callback(partial(self._answer_later, eid, f))
                continue
            v = got.get(eid)
            v = _s(v) if v not in (False, None, 0) else None
            cache = False
            if v and v != RUNNING:               # a cached result: answer it again
                reply = v
            elif pending or v == RUNNING:
                reply = _reply_error("timeout", f"{_what(f)}: hub {self.hub_id} had read it when it "
                                     "stopped; it may have run (not run again)")
                cache = True
            elif runnable[eid]:                  # ours to run
                fut = asyncio.get_running_loop().create_future()
                self._running[f["id"]] = fut
                await self._slots.acquire()
                self._spawn(self._run_one(eid, f, fut))
                continue
            elif _deadline(f) <= now:
                reply = _reply_error("timeout", f"{_what(f)}: its deadline passed before hub "
                                     f"{self.hub_id} read it (not run)")
            else:
                reply = _reply_error("moved", f"hub {self.hub_id} does not drive device "
                                     f"{f.get('device')!r} now")
            if pending:
                answers.append(self._answer(eid, f, reply, cache=cache))
            else:
                self._spawn(self._answer(eid, f, reply, cache=cache))
        if answers:        # cached before anything new is read
            await asyncio.gather(*answers)

    def _spawn(self, coro: Awaitable[None]) -> None:
        t = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(t)
        t.add_done_callback(self._tasks.discard)

    def _answer_later(self, eid: str, f: dict[str, str], fut: asyncio.Future) -> None:
        """A duplicate entry of a call that was running here gets the same reply."""
        if not fut.cancelled():
            self._spawn(self._answer(eid, f, fut.result(), cache=False))

    # -- running one call --------------------------------------------------------------------
    async def _run_one(self, eid: str, f: dict[str, str], fut: asyncio.Future) -> None:
        try:
            remaining = (_deadline(f) - _now_ms()) / 1000.0
            try:
                if remaining <= 0:
                    raise ExecError("timeout", f"{_what(f)}: its deadline passed before it started (not run)")
                args = orjson.loads(f.get("args") or "null")
                self.ran += 1
                text = await self.run(f["device"], f["function"], args, f.get("level") or "none", remaining)
                reply = _reply_ok(text)
            except ExecError as e:
                reply = _reply_error(e.code if e.code in REMOTE_CODES else "driver_error", e.message)
            except orjson.JSONDecodeError as e:
                reply = _reply_error("bad_args", f"{_what(f)}: args is not JSON text ({e})")
            except Exception as e:  # noqa: BLE001 - the caller hears of it, the hub stays up
                log.exception("fleet exec server %s: %s failed", self.hub_id, _what(f))
                reply = _reply_error("driver_error", f"{_what(f)}: {type(e).__name__}: {e}")
            self._keep(f["id"], reply)
            fut.set_result(reply)
            await self._answer(eid, f, reply, cache=True)
        finally:
            self._slots.release()
            self._running.pop(f["id"], None)
            if not fut.done():
                fut.cancel()

    async def _answer(self, eid: str, f: dict[str, str], reply: str, *, cache: bool) -> None:
        """Reply first (the caller waits for nothing else), then cache the result (when it
        ran), give the reply list its TTL (for a caller that never reads it; a read one is
        gone already) and acknowledge and delete the entry, the cache before the XACK (one
        node, in order). A hub that dies between the reply and the cache left its running
        marker: a redelivery answers `timeout` to a caller that has its reply already,
        and nothing runs twice. A failure leaves the entry pending: read again after the
        reconnect, it is answered from the cache (or from this hub's memory)."""
        done = self.keys.done(self.hub_id, f["id"])
        give_up = max(_deadline(f) / 1000.0, time.time()) + 5.0
        delay = 0.02
        replied = False
        while True:
            try:
                if not replied:
                    await self.redis.lpush(f["reply"], reply)
                    replied = True
                pipe = self.redis.pipeline(transaction=False)
                if cache:
                    pipe.set(done, reply, px=DONE_TTL_MS)
                pipe.expire(f["reply"], REPLY_TTL_S)
                pipe.xack(self.stream, EXEC_GROUP, eid)
                pipe.xdel(self.stream, eid)
                await pipe.execute()
                self.answered += 1
                return
            except _OUTAGE as e:
                self._outage.down(e)
                if time.time() > give_up:
                    return       # still pending: answered from the cache when read again
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)

    async def _ack(self, eids: list[str]) -> None:
        pipe = self.redis.pipeline(transaction=False)
        pipe.xack(self.stream, EXEC_GROUP, *eids)
        pipe.xdel(self.stream, *eids)
        await pipe.execute()

    # -- memory of recent results ------------------------------------------------------------
    def _keep(self, rid: str, reply: str) -> None:
        self._recent[rid] = (time.monotonic(), reply)
        while len(self._recent) > self._remember:
            self._recent.popitem(last=False)

    def _remembered(self, rid: str) -> str | None:
        got = self._recent.get(rid)
        if got is None:
            return None
        if time.monotonic() - got[0] > DONE_TTL_MS / 1000.0:
            del self._recent[rid]
            return None
        return got[1]


def _entries(resp: Any) -> list[tuple[str, dict[str, str] | None]]:
    """XREADGROUP's answer (RESP2 list or RESP3 dict) as [(entry id, fields or None)]."""
    if not resp:
        return []
    streams = resp.items() if isinstance(resp, dict) else resp
    out: list[tuple[str, dict[str, str] | None]] = []
    for _name, items in streams:
        if isinstance(resp, dict) and items and isinstance(items[0], list) \
                and items[0] and isinstance(items[0][0], (list, tuple)):
            items = items[0]           # RESP3: {stream: [[entries]]}
        for eid, fields in items:
            out.append((_s(eid), {_s(k): _s(v) for k, v in fields.items()} if fields else None))
    return out


def _deadline(f: dict[str, str]) -> int:
    try:
        return int(f.get("deadline") or 0)
    except ValueError:
        return 0


def _what(f: dict[str, str]) -> str:
    return f"{f.get('function')} on {f.get('device')!r}"


# ---------------------------------------------------------------------------------------------
# The caller's side

def parse_target(target: Any, name: str | None = None) -> str | SystemRef:
    """A device id, or (system, "Display_1") / (system, "Display", 1) / SystemRef."""
    if isinstance(target, SystemRef):
        return target
    if isinstance(target, tuple):
        return parse_target(*target)
    if not isinstance(target, str) or not target:
        raise ExecError("unknown_device", f"a target is a device id or (system, module name), got {target!r}")
    if name is None:
        return target
    module, sep, index = name.rpartition("_")
    if sep and index.isdigit():
        return SystemRef(target, module, int(index))
    return SystemRef(target, name, 1)


@dataclass
class _Owner:
    hub: str | None       # the owning hub, or None (no lease yet: mid-failover)
    alive: bool           # its registration exists
    at: float             # monotonic time read


class ExecClient:
    """Sends calls to the hub that owns the device; used by a hub for the devices it does not
    drive, and by scripts. `caller_id` names the reply lists (a hub's id, or a unique id)."""

    def __init__(self, redis: Any, keys: FleetKeys, caller_id: str | None = None, *,
                 default_timeout: float = DEFAULT_TIMEOUT, slice_s: float = 0.25,
                 cache_s: float = 5.0) -> None:
        self.redis = redis
        self.keys = keys
        self.caller_id = caller_id or f"client-{uuid.uuid4().hex[:12]}"
        self.default_timeout = default_timeout
        self.slice_s = slice_s
        self.cache_s = cache_s
        self._owners: dict[str, _Owner] = {}
        self._outage = _OutageLog(f"fleet exec client {self.caller_id}")

    # -- resolution --------------------------------------------------------------------------
    async def resolve(self, target: str | SystemRef) -> str:
        """Device id of a target: a system reference is read from `system/<id>`."""
        if not isinstance(target, SystemRef):
            return target
        field = f"{target.module}/{target.index}"
        dev = _s(await self.redis.hget(self.keys.system(target.system), field))
        if dev is not None:
            return dev
        have = sorted(_s(k) for k in await self.redis.hkeys(self.keys.system(target.system)))
        if not have:
            raise ExecError("unknown_device", f"no system {target.system!r} in the fleet")
        raise ExecError("unknown_device", f"system {target.system!r} has no {field} "
                        f"(it has: {', '.join(have)})")

    async def owner(self, device_id: str, *, fresh: bool = False) -> _Owner:
        """Who drives a device: its pinned hub, else its lease holder (None mid-failover)."""
        got = self._owners.get(device_id)
        if got is not None and not fresh and time.monotonic() - got.at < self.cache_s:
            return got
        k = self.keys
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(k.devices, device_id)
        pipe.get(k.lease(device_id))
        rec, lease = await pipe.execute()
        if rec is None:
            self._owners.pop(device_id, None)
            raise ExecError("unknown_device", f"no device {device_id!r} in fleet {k.fleet}")
        try:
            pinned = orjson.loads(rec).get("hub")
        except (orjson.JSONDecodeError, AttributeError):
            raise ExecError("unknown_device", f"device {device_id!r}: its record in {k.devices} "
                            "is not a JSON object") from None
        hub = pinned or lease_holder(lease)
        alive = bool(hub) and bool(await self.redis.exists(k.hub(hub)))
        got = _Owner(hub, alive, time.monotonic())
        if hub and alive:
            self._owners[device_id] = got
            if len(self._owners) > 100_000:
                self._owners.clear()
        else:
            self._owners.pop(device_id, None)
        return got

    async def _live_owner(self, device_id: str, deadline: float, fresh: bool) -> str:
        """The live owner, waiting (with backoff) while there is none, until the deadline."""
        delay = 0.02
        while True:
            o = await self.owner(device_id, fresh=fresh)
            if o.hub and o.alive:
                return o.hub
            fresh = True
            left = deadline - time.time()
            if left <= 0:
                why = (f"its hub {o.hub!r} is not running (no registration)" if o.hub
                       else "no hub holds its lease (failover in progress?)")
                raise ExecError("timeout", f"device {device_id!r}: {why}; gave up at the deadline")
            await asyncio.sleep(min(delay, left))
            delay = min(delay * 2, 0.5)

    # -- calls -------------------------------------------------------------------------------
    async def exec(self, target: Any, function: str, args: Any = None, *, level: str = "administrator",
                   timeout: float | None = None) -> Any:
        """Run a function on the device's owner; returns the result (decoded JSON)."""
        return orjson.loads(await self.exec_text(target, function, args, level=level, timeout=timeout))

    async def exec_text(self, target: Any, function: str, args: Any = None, *,
                        level: str = "administrator", timeout: float | None = None) -> str:
        """As `exec`, but returns the result as JSON text (as the hub's local exec does)."""
        limit = self.default_timeout if timeout is None else max(0.001, float(timeout))
        deadline = time.time() + limit
        target = parse_target(target) if not isinstance(target, (str, SystemRef)) else target
        try:
            args_text = orjson.dumps(args).decode()
        except TypeError as e:
            raise ExecError("bad_args", f"{function}: arguments are not JSON ({e})") from None
        rid = uuid.uuid4().hex
        fresh = False
        moved = 0
        while True:
            device = await self._retrying(lambda: self.resolve(target), deadline, function)
            hub = await self._retrying(lambda: self._live_owner(device, deadline, fresh), deadline, function)
            reply = await self._call(hub, rid, device, function, args_text, level, deadline)
            if reply is None:            # withdrawn from a dead owner's stream: try the new owner
                fresh = True
                continue
            if reply.startswith('{"ok":') and reply.endswith("}"):
                return reply[6:-1]
            try:
                doc = orjson.loads(reply)
            except orjson.JSONDecodeError:
                raise ExecError("driver_error", f"{function} on {device!r}: hub {hub} answered "
                                "something that is not JSON") from None
            if "ok" in doc:
                return orjson.dumps(doc["ok"]).decode()
            code = doc.get("error")
            message = str(doc.get("message", ""))
            if code == "moved" and moved == 0:
                moved += 1
                fresh = True
                rid = uuid.uuid4().hex     # a new request: the old one was answered
                self._owners.pop(device, None)
                continue
            raise ExecError(code if code in REMOTE_CODES else "driver_error", message)

    async def _retrying(self, step: Callable[[], Awaitable[Any]], deadline: float, function: str) -> Any:
        """A step that reads Redis, retried through an outage until the deadline."""
        delay = 0.02
        while True:
            try:
                out = await step()
                self._outage.up()
                return out
            except ExecError:
                raise
            except _OUTAGE as e:
                self._outage.down(e)
                left = deadline - time.time()
                if left <= 0:
                    raise ExecError("timeout", f"{function}: Redis unreachable until the deadline "
                                    f"({type(e).__name__}: {e})") from None
                await asyncio.sleep(min(delay, left))
                delay = min(delay * 2, 0.5)

    async def _call(self, hub: str, rid: str, device: str, function: str, args_text: str,
                    level: str, deadline: float) -> str | None:
        """Put one request on `hub`'s stream and wait for its reply. None: it was withdrawn
        unread because the hub died (the caller sends it elsewhere)."""
        k = self.keys
        stream = k.exec_stream(hub)
        reply_key = k.reply(self.caller_id, rid)
        fields = {"id": rid, "device": device, "function": function, "args": args_text,
                  "level": level, "deadline": int(deadline * 1000), "reply": reply_key}
        eid = await self._send(stream, fields, deadline, f"{function} on {device!r}")
        grace = 1.0       # the owner answers `timeout` itself at the deadline; allow for that
        delivered = False
        lost = False      # Redis failed while we waited: the reply may be gone with it
        while True:
            left = deadline + grace - time.time()
            if left <= 0:
                raise ExecError("timeout", f"{function} on {device!r}: no answer from hub {hub} "
                                "by the deadline" + (" (it read the call, so it may have run)" if delivered else ""))
            try:
                got = await self.redis.blpop([reply_key], timeout=max(0.01, min(self.slice_s, left)))
                self._outage.up()
                if got:
                    return _s(got[1])
                if lost:
                    # after a Redis restart the entry, the cache and the reply list may all be
                    # gone: take a cached result, or send the request again (same id: the
                    # owner, which remembers what it ran, never runs it twice)
                    lost = False
                    cached = _s(await self.redis.get(k.done(hub, rid)))
                    if cached and cached != RUNNING:
                        return cached
                    if cached is None and not await self.redis.xrange(stream, eid, eid):
                        fields["resent"] = "1"
                        eid = await self._send(stream, fields, deadline, f"{function} on {device!r}")
                        delivered = False
                    continue
            except _OUTAGE as e:
                self._outage.down(e)
                lost = True
                await asyncio.sleep(min(0.05, max(0.0, left)))
                continue
            if delivered:
                continue
            try:
                if await self.redis.exists(k.hub(hub)):
                    continue
                # the owner's registration is gone: take the request back unless it was read
                if await _WITHDRAW(self.redis, [stream], [EXEC_GROUP, eid]):
                    self._owners.pop(device, None)
                    return None
                delivered = True
            except _OUTAGE as e:
                self._outage.down(e)

    async def _send(self, stream: str, fields: dict[str, Any], deadline: float, what: str) -> str:
        """XADD, retried through an outage until the deadline; returns the entry id."""
        delay = 0.02
        while True:
            try:
                eid = _s(await self.redis.xadd(stream, fields, maxlen=STREAM_MAXLEN, approximate=True))
                self._outage.up()
                return eid
            except _OUTAGE as e:
                # it may have landed: sending it again is safe (the hub runs one request id
                # once; `resent` makes it look the id up in its result cache first)
                fields["resent"] = "1"
                self._outage.down(e)
                if time.time() >= deadline:
                    raise ExecError("timeout", f"{what}: could not send it before the deadline "
                                    f"(Redis: {type(e).__name__}: {e})") from None
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
