"""One hub's part in a fleet (DESIGN section 8): membership, leases, fencing, the leader's
epoch and `ready`, and which movable devices this hub drives.

Life cycle, as the supervisor sees it:

* The supervisor starts with the hub's *local view* of the shared config (`local_view`):
  its pinned devices, which run with no Redis at all, as on a single hub.
* `FleetNode.run` registers the hub (`P{fleet:F}:hub:<id>`, a TTL, renewed with a token of
  this process), reads the other hubs, and for every movable device computes the weighted
  HRW winner among the live hubs that serve. For each device it wins it takes the lease
  (SET NX PX), loads the device's `persistent_store` from Redis and adds the device to the
  running config (`Supervisor.apply_config`); for each device it no longer wins it stops
  the device, writes its store to Redis, and only then releases the lease
  (stop-before-start: the next owner cannot take the lease before that).
* Every tick renews the registration and all held leases in one script (all fleet keys
  share the `{fleet:F}` slot). **Fencing:** the hub may drive its movable devices until
  `FENCE_FRACTION` of the ttl after the start of its last successful renewal; its workers
  hold that deadline themselves (`fence` messages) and exit when it passes, even while
  the supervisor is frozen, so they have stopped at least ttl/3 before the leases can
  expire in Redis and another hub can take them. The hub takes its devices back when it
  holds their leases again.
* The leader (`P{fleet:F}:leader`, SET NX PX, compare-and-renew) increments the epoch on
  every change of the serving hubs, publishes `engine/system` `ready` once per epoch when
  every serving hub reports ready for it, and marks the pinned devices of dead hubs
  `connected = false`.
* A graceful stop stops serving at once, stops the drivers (their stores are flushed and
  written through), releases every lease and deletes the registration, so the other hubs
  take over within a tick.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import logging
import secrets
import time
from typing import Any

import orjson

from hubhost.config import HubConfig
from hubhost.fleet import hrw
from hubhost.fleet.clients import async_client
from hubhost.fleet.keys import FleetKeys, lease_holder, lease_value

log = logging.getLogger("hubhost.fleet")

FENCE_FRACTION = 2.0 / 3.0   # drive movable devices until this much of ttl after a renewal began
SETTLING_TICK = 0.25         # seconds between ticks while something is to be taken or handed over
MAX_TICK = 0.5               # ... and at most this long otherwise (so a dead hub is seen quickly)
ENGINE_CHANNEL = "engine/system"

# KEYS: hub key, hubs set, lease keys...   ARGV: token, record JSON, ttl ms, lease value, hub id
# -> {1, i...} (indexes of the lease keys that were not ours any more) or {0} (the hub id is
# registered by another live process)
_RENEW = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local ok, rec = pcall(cjson.decode, cur)
  if ok and type(rec) == 'table' and rec.token ~= ARGV[1] then return {0} end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('SADD', KEYS[2], ARGV[5])
local out = {1}
for i = 3, #KEYS do
  if redis.call('GET', KEYS[i]) == ARGV[4] then
    redis.call('PEXPIRE', KEYS[i], ARGV[3])
  else
    out[#out + 1] = i - 2
  end
end
return out
"""

# KEYS: one key   ARGV: value  -> 1 when it held the value and was deleted
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# KEYS: leader   ARGV: value, ttl ms  -> 1 when this hub leads
_LEAD = """
local cur = redis.call('GET', KEYS[1])
if cur == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
if not cur then redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) return 1 end
return 0
"""

# KEYS: members, epoch   ARGV: members JSON  -> the epoch (incremented when members changed)
_EPOCH = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1])
  return redis.call('INCR', KEYS[2])
end
return tonumber(redis.call('GET', KEYS[2]) or '0')
"""

# KEYS: state   ARGV: "ready <epoch>", channel  -> 1 when it was set now (and published)
_READY = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return 0 end
redis.call('SET', KEYS[1], ARGV[1])
redis.call('PUBLISH', ARGV[2], 'ready')
return 1
"""

# KEYS: devices   ARGV: field, value, ...  -> replaces the hash with exactly these fields
_TABLE = """
local want = {}
for i = 1, #ARGV, 2 do want[ARGV[i]] = ARGV[i + 1] end
for _, f in ipairs(redis.call('HKEYS', KEYS[1])) do
  if want[f] == nil then redis.call('HDEL', KEYS[1], f) end
end
for f, v in pairs(want) do redis.call('HSET', KEYS[1], f, v) end
return 1
"""

# KEYS: store, fence   ARGV: fence number, payload  -> 1 written, 0 refused (a newer owner)
_STORE = """
if tonumber(redis.call('GET', KEYS[2]) or '0') > tonumber(ARGV[1]) then return 0 end
redis.call('SET', KEYS[1], ARGV[2])
return 1
"""


def local_view(full: HubConfig, hub_id: str, running: set[str]) -> HubConfig:
    """The drivers and devices this hub runs: its pinned devices and the movable ones it
    holds the lease of. A driver none of whose devices is here does not run here; a driver
    with no devices at all runs on every hub. Devices of a driver that run elsewhere are
    listed as `elsewhere` (away, not removed)."""
    fc = full.fleet
    assert fc is not None
    cfg = copy.copy(full)
    cfg.hub_id = hub_id
    cfg.drivers = []
    for d in full.drivers:
        mine = [dev for dev in d.devices
                if (p := fc.placement.get(dev.id)) is not None and p.hub == hub_id
                or fc.movable(dev.id) and dev.id in running]
        if d.devices and not mine:
            continue
        away = tuple(dev.id for dev in d.devices if dev not in mine)
        cfg.drivers.append(dataclasses.replace(d, devices=mine, elsewhere=away))
    return cfg


class FleetNode:
    """This hub in its fleet; owned by the supervisor (`sup.fleet`)."""

    def __init__(self, sup: Any, full: HubConfig, hub_id: str) -> None:
        assert full.fleet is not None and full.redis is not None
        self.sup = sup
        self.full = full
        self.fc = full.fleet
        self.hub_id = hub_id
        self.keys = FleetKeys(full.redis.prefix, self.fc.id)
        self.token = secrets.token_hex(8)
        self.lease_val = lease_value(hub_id, self.token)
        self.ttl = self.fc.ttl
        self.ttl_ms = int(self.ttl * 1000)
        self.me = self.fc.hub(hub_id)
        self.redis = async_client(full.redis.url, full.redis.cluster, max(0.2, self.ttl / 6))
        self.held: set[str] = set()       # movable devices whose lease is ours
        self.suspect: set[str] = set()    # leases we had when we fenced: ours again if still there
        self.releasing: set[str] = set()  # being handed over: their last store still goes out
        self.running: set[str] = set()    # movable devices in the running config
        self.fence_deadline = 0.0         # monotonic; workers with movable devices exit past it
        self.serving = False              # takes movable devices (started, not stopping)
        self.ready = False
        self.epoch = 0
        self.leader: str | None = None
        self.is_leader = False
        self.hubs: dict[str, dict[str, Any]] = {}   # live hubs' records, as last read
        self.stores: dict[str, Any] = {}            # device -> store data to merge at its start
        self.store_seen: set[str] = set()           # devices with a store in Redis (not "added")
        self.store_text: dict[str, bytes] = {}      # last store text written per device
        self.fence_no: dict[str, int] = {}          # fencing number of our lease per device
        self.version: dict[str, int] = {}
        self.writes: dict[str, asyncio.Task] = {}   # store write-through in flight per device
        self.marked_down: set[str] = set()          # pinned devices the leader marked down
        self.duplicate_logged = False
        self.outage_logged = False
        self.started = time.time()
        self.apply_lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._renew_now = asyncio.Event()
        self.registered = False
        self.devices_published = False
        self.renewals = 0
        # per other hub: (seq, when this hub saw it change, token, devices it drove)
        self.seen: dict[str, tuple[Any, float, Any, set[str]]] = {}
        self.left: set[str] = set()        # hubs whose last word was a graceful leave
        self._task: asyncio.Task | None = None
        self._renew_task: asyncio.Task | None = None
        self.feed: Any = None           # fleet/feed.py: status of devices driven elsewhere
        self.exec: Any = None           # fleet/wiring.py: this hub's exec stream and client
        self.exec_redis: Any = None
        self._stopping = False
        self.systems = _systems(full)
        self.driver_of = _drivers_of(full)
        self.built_systems: set[str] = set()

    # -- what the supervisor asks ----------------------------------------------------------
    def fence_for(self, devices: Any) -> float | None:
        """The fence deadline for a worker driving `devices` (None: none of them movable)."""
        return self.fence_deadline if self.movable_in(devices) else None

    def devices_fenced(self, devs: set[str]) -> None:
        """A worker stopped these devices at the fence: they are not running any more."""
        self.running -= devs
        self.ready = False
        self._wake.set()

    def movable_in(self, devices: Any) -> list[str]:
        return [d for d in devices if self.fc.movable(d)]

    @property
    def fence_grace(self) -> float:
        """How long a worker's loop has to stop its movable devices at the fence before its
        heartbeat thread ends the process instead."""
        return min(0.25, self.ttl / 12)

    def known_extra(self, slot: Any) -> dict[str, Any]:
        """Devices of a driver that have a store in Redis count as seen before (no `added`)."""
        return {d.id: {"label": d.label, "config": d.config} for d in slot.cfg.devices
                if d.id in self.store_seen}

    def merge_stores(self, slot: Any, raw: bytes | None) -> bytes | None:
        """The datastore text for a worker, with the shared persistent_store of each
        movable device this hub just took over put in place of the local copy."""
        take = {d.id: self.take_store(d.id) for d in slot.cfg.devices if d.id in self.stores}
        if not take:
            return raw
        data = orjson.loads(raw) if raw and raw.strip() else {}
        if not isinstance(data, dict):
            return raw
        for dev_id, store in take.items():
            data["__" + dev_id] = store
        return orjson.dumps(data)

    def take_store(self, dev_id: str) -> Any:
        """The store loaded from Redis for a device about to start here (once), or None."""
        if dev_id not in self.stores:
            return None
        store = self.stores.pop(dev_id)
        self.store_text[dev_id] = orjson.dumps(store)
        return store

    def store_written(self, slot: Any, blob: bytes) -> None:
        """A driver's datastore reached disk: write the persistent_store of each movable
        device it drives through to `P{dev:<id>}:store` (only when it changed)."""
        mine = self.held | self.releasing
        devs = [d for d in mine if self.driver_of.get(d) == slot.id]
        if not devs:
            return
        try:
            data = orjson.loads(blob)
        except orjson.JSONDecodeError:
            return
        if not isinstance(data, dict):
            return
        for dev_id in devs:
            text = orjson.dumps(data.get("__" + dev_id, {}))
            if text == self.store_text.get(dev_id):
                continue
            self.store_text[dev_id] = text
            prev = self.writes.get(dev_id)
            self.writes[dev_id] = self.sup.spawn(self._write_store(dev_id, text, prev))

    async def _write_store(self, dev_id: str, text: bytes, prev: asyncio.Task | None) -> None:
        if prev is not None:
            await asyncio.wait({prev})
        fence = self.fence_no.get(dev_id)
        if fence is None:
            return
        v = self.version.get(dev_id, 0) + 1
        payload = b'{"v":%d,"fence":%d,"hub":%s,"data":%s}' % (v, fence, orjson.dumps(self.hub_id), text)
        k = self.keys
        for attempt in range(3):
            try:
                ok = await self.redis.eval(_STORE, 2, k.store(dev_id), k.fence(dev_id), fence, payload)
            except Exception as e:  # noqa: BLE001 - Redis down: the next flush writes it again
                if attempt == 2:
                    self.store_text.pop(dev_id, None)
                    log.warning("[%s] could not write its persistent_store to Redis (%s); the next "
                                "flush tries again", dev_id, e)
                    return
                await asyncio.sleep(0.1)
                continue
            if ok:
                self.version[dev_id] = v
            else:
                log.warning("[%s] persistent_store not written to Redis: another hub has taken the "
                            "device over", dev_id)
            return

    def reloaded(self, new: HubConfig) -> HubConfig:
        """A config reload: the new file becomes the fleet's config (placement and the
        hubs' weights and tags included; the fleet id and ttl need a restart); returns this
        hub's view of it. Movable devices this hub holds stay; the next tick moves what
        the new config moves."""
        if new.fleet is None:
            log.warning("config reload: the [fleet] section is gone; fleet mode ends at the next start")
            new.fleet = self.fc
        else:
            if (new.fleet.id, new.fleet.ttl) != (self.fc.id, self.fc.ttl):
                log.warning("config reload: fleet.id or fleet.ttl changed; that takes effect at the "
                            "next start")
                new.fleet.id, new.fleet.ttl = self.fc.id, self.fc.ttl
        self.full = new
        self.fc = new.fleet
        self.me = self.fc.hub(self.hub_id)
        self.systems = _systems(new)
        self.driver_of = _drivers_of(new)
        self.built_systems.clear()
        self.devices_published = False     # the leader writes the new device table
        movable = set(self._movable())
        self.running &= movable
        self._wake.set()
        return local_view(new, self.hub_id, self.running)

    def status(self) -> dict[str, Any]:
        """What `hubhost fleet status`, the API and the console show of this hub's view."""
        return {"fleet": self.fc.id, "hub": self.hub_id, "leader": self.leader, "epoch": self.epoch,
                "serving": self.serving, "ready": self.ready, "fenced": self._fenced(),
                "held": sorted(self.held), "hubs": self.hubs}

    # -- life cycle ------------------------------------------------------------------------
    async def start(self) -> None:
        from hubhost.fleet.feed import RemoteStatus
        self.feed = RemoteStatus(self)
        self.feed.start()
        if getattr(self.sup, "functions", None) is not None:
            from hubhost.fleet.wiring import attach_exec
            # its own client: the exec stream's reads block for 1 s, past the renewals' timeout
            self.exec_redis = async_client(self.full.redis.url, self.full.redis.cluster, 5.0)
            self.exec = attach_exec(self.sup, self.exec_redis, self.keys, self.hub_id,
                                    lambda dev: self.sup.functions.device_slot(dev) is not None)
        self._task = asyncio.get_running_loop().create_task(self.run(), name="hubhost-fleet")

    def stopping(self, sup: Any = None) -> None:
        """The hub is stopping: take and hand over nothing more (the supervisor stops every
        driver now); the registration and the leases stay renewed until the final flush."""
        self._stopping = True
        self.serving = False
        self.ready = False
        if self._task is not None:
            self._task.cancel()
        self._renew_now.set()     # tell the fleet at once that this hub is leaving

    async def shutdown(self, sup: Any = None) -> None:
        """After the drivers stopped and flushed: the stores are in Redis, so let go of the
        leases; the registration becomes a short tombstone saying the hub left (so nobody
        waits for it to fence); the other hubs take over at their next tick."""
        for t in (self._task, self._renew_task):
            if t is not None:
                t.cancel()
                try:
                    await t
                except BaseException:  # noqa: BLE001 - cancelled
                    pass
        if self.feed is not None:
            await self.feed.stop()
        if self.exec is not None:
            await self.exec.stop(1.0)     # calls in flight finish; their drivers have stopped
            try:
                await self.exec_redis.aclose()
            except Exception:  # noqa: BLE001
                pass
        pending = [t for t in self.writes.values() if not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=2.0)
        k = self.keys
        try:
            cur = await self.redis.get(k.hub(self.hub_id))
            if cur and _record(cur).get("token") == self.token:
                self.running = set()
                rec = {**orjson.loads(self._record_json()), "left": True}
                await self.redis.set(k.hub(self.hub_id), orjson.dumps(rec), px=self.ttl_ms)
            for dev_id in sorted(self.held):
                await self.redis.eval(_RELEASE, 1, k.lease(dev_id), self.lease_val)
            await self.redis.eval(_RELEASE, 1, k.leader, self.lease_val)
            log.info("fleet: hub %s left fleet %s (%d lease%s handed over)", self.hub_id, self.fc.id,
                     len(self.held), "" if len(self.held) == 1 else "s")
        except Exception as e:  # noqa: BLE001
            log.warning("fleet: could not hand over at once (%s); the leases expire within %g s",
                        e, self.ttl)
        self.held.clear()
        try:
            await self.redis.aclose()
        except Exception:  # noqa: BLE001
            pass

    async def run(self) -> None:
        """Until the hub stops: renew on one task (never held up by a slow hand-over),
        read the fleet, lead, take and hand over on this one."""
        self._renew_task = asyncio.get_running_loop().create_task(self._renew_loop(),
                                                                  name="hubhost-fleet-renew")
        await self._reconcile_loop()

    async def _renew_loop(self) -> None:
        period = min(self.ttl / 3, MAX_TICK)
        while True:
            t0 = time.monotonic()
            ok = False
            try:
                ok = await self._renew(t0)
                if self.outage_logged:
                    log.info("fleet: Redis reachable again")
                    self.outage_logged = False
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down or failing over: keep trying
                if not self.outage_logged:
                    log.warning("fleet: Redis unreachable (%s: %s); movable devices stop %g s after "
                                "the last renewal", type(e).__name__, e,
                                round(self.ttl * FENCE_FRACTION, 2))
                    self.outage_logged = True
            if time.monotonic() > self.fence_deadline and (self.held or self.running):
                self._fence()
            delay = period if ok else min(period, SETTLING_TICK)
            try:
                await asyncio.wait_for(self._renew_now.wait(), max(0.0, t0 + delay - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self._renew_now.clear()

    async def _reconcile_loop(self) -> None:
        started = self.sup._started_event()
        while not self._stopping:
            if started.is_set() and not self.serving and not self.sup.stopping:
                self.serving = True
            t0 = time.monotonic()
            settled = False
            try:
                settled = await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: the renew loop says so
                log.debug("fleet: tick failed: %s: %s", type(e).__name__, e)
            delay = min(MAX_TICK if settled else SETTLING_TICK, self.ttl / 3)
            try:
                await asyncio.wait_for(self._wake.wait(), max(0.0, t0 + delay - time.monotonic()))
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def _fenced(self) -> bool:
        return bool(self.running) and time.monotonic() > self.fence_deadline

    def _fence(self) -> None:
        """Past the deadline: the workers with movable devices have exited on their own (at
        the same deadline); take the devices out of the running config until this hub holds
        their leases again."""
        if self.held:
            log.error("fleet: hub %s could not renew its leases for %.1f s; it stops its %d movable "
                      "device%s until it holds them again", self.hub_id,
                      time.monotonic() - (self.fence_deadline - self.ttl * FENCE_FRACTION),
                      len(self.held), "" if len(self.held) == 1 else "s")
        self.suspect |= self.held
        self.held.clear()
        self.ready = False
        self._wake.set()

    def _record_json(self) -> str:
        return orjson.dumps({
            "id": self.hub_id, "weight": self.me.weight, "tags": sorted(self.me.tags),
            "ready": self.ready, "epoch": self.epoch, "serving": self.serving,
            "config": self.fc.config_hash, "started": self.started, "token": self.token,
            "devices": sorted(self.running), "seq": self.renewals}).decode()

    async def _renew(self, t0: float) -> bool:
        """Renew the registration and every lease in one script; extend the fence."""
        k = self.keys
        mine = sorted(self.held | self.suspect)
        res = await self.redis.eval(_RENEW, 2 + len(mine), k.hub(self.hub_id), k.hubs,
                                    *[k.lease(d) for d in mine], self.token, self._record_json(),
                                    self.ttl_ms, self.lease_val, self.hub_id)
        if int(res[0]) == 0:
            self.registered = False
            if not self.duplicate_logged:
                log.error("fleet: hub id %r is registered by another live process (or by this "
                          "hub before a restart, until that registration expires within %g s); "
                          "this hub takes no movable devices meanwhile", self.hub_id, self.ttl)
                self.duplicate_logged = True
            return False
        self.duplicate_logged = False
        self.registered = True
        self.renewals += 1
        lost = {mine[int(i) - 1] for i in res[1:]}
        if time.monotonic() > self.fence_deadline and (self.held or self.running):
            self._fence()            # this renewal came too late to count for what ran
        self.fence_deadline = t0 + self.ttl * FENCE_FRACTION
        self._send_fence()
        back = self.suspect - lost
        if back:
            log.info("fleet: hub %s holds the leases of %s again", self.hub_id, ", ".join(sorted(back)))
            self.held |= back
        self.suspect.clear()
        if lost & self.held:
            log.error("fleet: hub %s lost the leases of %s; stopping them", self.hub_id,
                      ", ".join(sorted(lost & self.held)))
            self.held -= lost
        if back or lost:
            self._wake.set()
        return True

    # -- one tick ----------------------------------------------------------------------------
    async def _tick(self) -> bool:
        k = self.keys
        r = self.redis

        # the fleet as it is now
        ids = sorted(await r.smembers(k.hubs))
        raw = await r.mget([k.hub(h) for h in ids]) if ids else []
        recs = {h: _record(v) for h, v in zip(ids, raw) if v}
        self.hubs = {h: rec for h, rec in recs.items() if not rec.get("left")}
        now = time.monotonic()
        for h, rec in recs.items():
            prev = self.seen.get(h)
            if prev is None or prev[0] != rec.get("seq") or prev[2] != rec.get("token"):
                self.seen[h] = (rec.get("seq"), now, rec.get("token"), set(rec.get("devices") or ()))
            if rec.get("left"):
                self.left.add(h)
            else:
                self.left.discard(h)
        self.leader = lease_holder(await r.get(k.leader))
        epoch = int(await r.get(k.epoch) or 0)
        serving = [rec for rec in self.hubs.values() if rec.get("serving")]
        cands = [hrw.Candidate(rec["id"], float(rec.get("weight", 1.0)), frozenset(rec.get("tags", ())))
                 for rec in serving]

        # the leader's part
        was_leader = self.is_leader
        self.is_leader = bool(await r.eval(_LEAD, 1, k.leader, self.lease_val, self.ttl_ms))
        if self.is_leader and (not was_leader or not self.devices_published):
            await self._publish_devices()
        if self.is_leader:
            self.leader = self.hub_id
            members = orjson.dumps(sorted(c.id for c in cands)).decode()
            new_epoch = int(await r.eval(_EPOCH, 2, k.members, k.epoch, members))
            if new_epoch != epoch:
                log.info("fleet: epoch %d: serving hubs %s", new_epoch, members)
                epoch = new_epoch
            if serving and all(rec.get("ready") and rec.get("epoch") == epoch for rec in serving):
                if await r.eval(_READY, 1, k.state, f"ready {epoch}", k.prefix + ENGINE_CHANNEL):
                    log.info("fleet: every hub is ready for epoch %d: published %s ready", epoch,
                             k.prefix + ENGINE_CHANNEL)
            await self._mark_pinned_down()
        if epoch != self.epoch:
            self.epoch = epoch
            self.ready = False

        # which movable devices this hub should drive
        want: set[str] = set()
        if self.serving:
            for dev_id, needs in self._movable().items():
                if hrw.winner(dev_id, cands, needs) == self.hub_id:
                    want.add(dev_id)
        give = self.held - want
        take = want - self.held
        if give:
            await self._hand_over(give)
        got: list[str] = []
        fresh = self.registered and time.monotonic() + SETTLING_TICK < self.fence_deadline
        for dev_id in sorted(take) if fresh else ():
            if self._maybe_driven_elsewhere(dev_id):
                continue
            if await r.set(k.lease(dev_id), self.lease_val, nx=True, px=self.ttl_ms):
                self.fence_no[dev_id] = int(await r.incr(k.fence(dev_id)))
                await self._load_store(dev_id)
                self.held.add(dev_id)
                got.append(dev_id)
        if got:
            log.info("fleet: hub %s took over %s", self.hub_id, ", ".join(got))
        if got or self.running != self.held or self._needs_retry():
            await self._apply()
        self._build_systems(cands)
        settled = self.serving and self.held == want and self.running == self.held
        if settled and not self.ready:
            self.ready = True
            self._renew_now.set()    # tell the fleet at once
        return settled

    async def _publish_devices(self) -> None:
        """The leader's device table `P{fleet:F}:devices` (device -> driver, pinned hub,
        needs), from the shared config, replaced in one script: how any hub, and a script
        with only a Redis URL, finds a device's owner (fleet/execs.py)."""
        fc = self.fc
        table = {}
        for d in self.full.drivers:
            for dev in d.devices:
                p = fc.placement.get(dev.id)
                table[dev.id] = orjson.dumps({"driver": d.id, "hub": p.hub if p else None,
                                              "needs": list(p.needs) if p else []}).decode()
        args: list[Any] = []
        for dev_id, text in table.items():
            args += (dev_id, text)
        await self.redis.eval(_TABLE, 1, self.keys.devices, *args)
        self.devices_published = True

    def _maybe_driven_elsewhere(self, dev_id: str) -> bool:
        """A hub that vanished from the fleet without leaving may still drive devices (the
        list its record publishes lags behind) until its own fence, FENCE_FRACTION of ttl
        after its last renewal: when Redis lost its keys (a restart without persistence, a
        failover that dropped writes), its leases and registration are gone long before
        that. So take a device only once the last renewal this hub saw from every such hub
        is that long ago. A hub that died has been gone for a whole ttl by then (no delay);
        one that left said so (no delay); one that is merely cut off from Redis comes back
        meanwhile, and keeps what HRW gives it."""
        now = time.monotonic()
        for h, (_seq, changed, _token, devices) in self.seen.items():
            if h == self.hub_id or h in self.hubs or h in self.left:
                continue
            if now < changed + self.ttl * FENCE_FRACTION + self.fence_grace + MAX_TICK:
                return True
        return False

    def _movable(self) -> dict[str, tuple[str, ...]]:
        fc = self.fc
        out: dict[str, tuple[str, ...]] = {}
        for d in self.full.drivers:
            for dev in d.devices:
                p = fc.placement.get(dev.id)
                if p is None or p.hub is None:
                    out[dev.id] = p.needs if p is not None else ()
        return out

    async def _load_store(self, dev_id: str) -> None:
        raw = await self.redis.get(self.keys.store(dev_id))
        if raw is None:
            self.stores.pop(dev_id, None)
            return
        try:
            rec = orjson.loads(raw)
            data = rec["data"]
            self.version[dev_id] = int(rec.get("v", 0))
        except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as e:
            log.error("[%s] its persistent_store in Redis (%s) is unreadable (%s); using this "
                      "hub's copy", dev_id, self.keys.store(dev_id), e)
            return
        self.stores[dev_id] = data
        self.store_seen.add(dev_id)

    async def _hand_over(self, devs: set[str]) -> None:
        """Stop-before-start: stop the devices here, write their stores, then release."""
        log.info("fleet: hub %s hands over %s", self.hub_id, ", ".join(sorted(devs)))
        self.held -= devs
        self.releasing |= devs
        try:
            await self._apply()
        finally:
            self.releasing -= devs
        pending = [t for d in devs if (t := self.writes.get(d)) is not None and not t.done()]
        if pending:
            await asyncio.wait(pending, timeout=self.ttl / 3)
        for dev_id in sorted(devs):
            await self.redis.eval(_RELEASE, 1, self.keys.lease(dev_id), self.lease_val)
            self.fence_no.pop(dev_id, None)

    async def _apply(self) -> None:
        """Make the running config match the held leases (only changed drivers restart)."""
        async with self.apply_lock:
            if self.sup.stopping:
                return
            target = set(self.held)
            if target == self.running and not self._needs_retry():
                return
            await self.sup._started_event().wait()
            released = self.running - target
            mirror = self.sup.mirror
            if mirror is not None:
                for d in released:
                    mirror.release_device(d)
            self.running = target
            await self.sup.apply_config(local_view(self.full, self.hub_id, target))
            # a released device's status stays in memory: from now on a replica of what its
            # new owner publishes (fleet/feed.py)
            if mirror is not None:
                mirror.set_devices([dev.id for drv in self.sup.config.drivers for dev in drv.devices])
                publish = getattr(self.sup, "publish_interfaces", None)
                if publish is not None:
                    publish()

    def _needs_retry(self) -> bool:
        """A driver stopped by fencing must start again once its devices are settled."""
        return any(s.state == "fenced" for s in self.sup.slots.values())

    def _send_fence(self) -> None:
        for w in self.sup.workers.values():
            movable = self.movable_in(w.devices)
            if w.alive and movable:
                w.send(["fence", self.fence_deadline, movable])

    async def _mark_pinned_down(self) -> None:
        """The leader: pinned devices of hubs that are gone show `connected = false`."""
        live = set(self.hubs)
        k = self.keys
        for dev_id, p in self.fc.placement.items():
            if p.hub is None:
                continue
            if p.hub in live:
                self.marked_down.discard(dev_id)
                continue
            if dev_id in self.marked_down:
                continue
            await self.redis.hset(k.status(dev_id), "connected", "false")
            await self.redis.publish(f"{k.status(dev_id)}/connected", "false")
            self.marked_down.add(dev_id)
            log.warning("fleet: hub %s is gone; its pinned device %s is marked connected = false",
                        p.hub, dev_id)

    def _build_systems(self, cands: list[hrw.Candidate]) -> None:
        """Each system's index is written by its HRW winner (the mirror writes it as one
        atomic replacement of that one key, then PUBLISH lookup-change)."""
        mirror = self.sup.mirror
        if mirror is None:
            return
        for system_id, mapping in self.systems.items():
            if hrw.winner("system:" + system_id, cands) == self.hub_id:
                if system_id not in self.built_systems:
                    mirror.set_system_index(system_id, mapping)
                    self.built_systems.add(system_id)
            elif system_id in self.built_systems:
                self.built_systems.discard(system_id)
                mirror.forget_system(system_id)


def _systems(cfg: HubConfig) -> dict[str, dict[str, str]]:
    from hubhost.hub import device_systems
    return device_systems(cfg)


def _drivers_of(cfg: HubConfig) -> dict[str, str]:
    return {dev.id: d.id for d in cfg.drivers for dev in d.devices}


def _record(text: str | bytes) -> dict[str, Any]:
    try:
        rec = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {}
    return rec if isinstance(rec, dict) else {}
