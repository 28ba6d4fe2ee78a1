"""Exec across hubs and the `hubhost.fleet` interface (issue 15, DESIGN section 8), on a real
redis-server and on a real 3-primary Redis Cluster.

The hubs here are real ExecServers whose `run` is a Python function that counts its calls
(by a call number in the arguments), so "no call ran twice" is checked, not assumed; the
ownership records are written as the membership code writes them.
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
import redis
import redis.asyncio as aioredis
from hypothesis import given, settings
from hypothesis import strategies as st

import hubhost.fleet as fleet_api
from hubhost.fleet.execs import RUNNING, ExecClient, ExecServer
from hubhost.fleet.keys import DONE_TTL_MS, EXEC_GROUP, FleetKeys, lease_value
from hubhost.functions import ExecError, SystemRef
from tests.hypo import examples

PREFIX = "t:"
KEYS = FleetKeys(PREFIX, "F")
EXPLICIT = {"timeout", "moved", "unknown_device"}


# -- the two backends ------------------------------------------------------------------------

class Backend:
    def __init__(self, kind: str, nodes: Any) -> None:
        self.kind = kind
        self.nodes = nodes           # RedisServer or RedisClusterNodes
        self.cluster = kind == "cluster"
        self.url = nodes.url

    def aclient(self, socket_timeout: float = 5.0) -> Any:
        if self.cluster:
            from redis.asyncio.cluster import RedisCluster
            return RedisCluster.from_url(self.url, decode_responses=True, socket_timeout=socket_timeout,
                                         socket_connect_timeout=2)
        return aioredis.Redis.from_url(self.url, decode_responses=True, socket_timeout=socket_timeout,
                                       socket_connect_timeout=2)

    def client(self) -> Any:
        if self.cluster:
            from redis.cluster import RedisCluster
            return RedisCluster.from_url(self.url, decode_responses=True, socket_timeout=5)
        return redis.Redis.from_url(self.url, decode_responses=True, socket_timeout=5)

    def subscriber(self) -> redis.Redis:
        """A plain connection for SUBSCRIBE: a cluster delivers PUBLISH to every node."""
        port = self.nodes.nodes[0].port if self.cluster else self.nodes.port
        return redis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)


@pytest.fixture(params=["single", "cluster"])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    name = "redis_server" if request.param == "single" else "redis_cluster"
    yield Backend(request.param, request.getfixturevalue(name))


# -- ownership records, as the membership code writes them -----------------------------------

def register(r: Any, hub: str, ttl_ms: int = 60_000) -> None:
    rec = {"id": hub, "weight": 1, "tags": [], "ready": True, "epoch": 1, "config": "x",
           "started": time.time(), "token": "tok-" + hub}
    r.set(KEYS.hub(hub), orjson.dumps(rec), px=ttl_ms)
    r.sadd(KEYS.hubs, hub)


def unregister(r: Any, hub: str) -> None:
    """What an expired registration looks like."""
    r.delete(KEYS.hub(hub))


def put_device(r: Any, dev: str, *, pinned: str | None = None, lease: str | None = None) -> None:
    r.hset(KEYS.devices, dev, orjson.dumps({"driver": "drv", "hub": pinned, "needs": []}))
    if lease is not None:
        r.set(KEYS.lease(dev), lease_value(lease, "tok-" + lease), px=60_000)
    else:
        r.delete(KEYS.lease(dev))


class Hub:
    """A hub as exec sees it: an ExecServer whose run records every call it starts."""

    def __init__(self, backend: Backend, hub_id: str, owned: set[str], ran: collections.Counter,
                 delay: float = 0.0, fail: Callable[[str, Any], None] | None = None) -> None:
        self.id = hub_id
        self.owned = owned
        self.ran = ran
        self.delay = delay
        self.fail = fail
        self.redis = backend.aclient()
        self.server = ExecServer(self.redis, KEYS, hub_id, self.run, lambda d: d in self.owned,
                                 block_ms=200)
        self.task: asyncio.Task | None = None

    async def run(self, device: str, function: str, args: Any, level: str, timeout: float) -> str:
        n = args.get("n") if isinstance(args, dict) else None
        self.ran[n] += 1
        if self.fail is not None:
            self.fail(function, args)
        if self.delay:
            await asyncio.sleep(self.delay)
        return orjson.dumps({"n": n, "hub": self.id, "device": device, "level": level}).decode()

    def start(self) -> Hub:
        self.task = self.server.start()
        return self

    async def crash(self) -> None:
        """As kill -9: stop reading, drop the calls being run unanswered, close the sockets."""
        await self.server.abort()
        assert self.task.done(), "the server still reads after abort()"
        await self.redis.aclose()

    async def stop(self) -> None:
        await self.server.stop(grace=2)
        await self.redis.aclose()


async def wait_for(cond: Callable[[], Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while True:
        got = cond()
        if asyncio.iscoroutine(got):
            got = await got
        if got:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.01)


# -- basics ----------------------------------------------------------------------------------

def test_exec_round_trip_and_error_codes(backend: Backend) -> None:
    r = backend.client()
    register(r, "A")
    put_device(r, "d1", lease="A")
    put_device(r, "p1", pinned="A")
    r.hset(KEYS.system("S1"), mapping={"Display/1": "d1", "Display/2": "p1"})

    def fail(function: str, args: Any) -> None:
        if function == "boom":
            raise ExecError("driver_error", "the projector said no")
        if function == "nope":
            raise ExecError("unknown_function", "device 'd1' has no function 'nope'")

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        hub = Hub(backend, "A", {"d1", "p1"}, ran, fail=fail).start()
        ac = backend.aclient()
        client = ExecClient(ac, KEYS, "caller")
        try:
            got = await client.exec("d1", "power", {"n": 1, "state": True}, level="support", timeout=5)
            assert got == {"n": 1, "hub": "A", "device": "d1", "level": "support"}
            got = await client.exec(("S1", "Display_2"), "power", {"n": 2})
            assert got["device"] == "p1" and got["level"] == "administrator"
            assert (await client.exec(SystemRef("S1", "Display", 1), "power", {"n": 3}))["device"] == "d1"
            text = await client.exec_text("d1", "power", {"n": 4})
            assert orjson.loads(text)["n"] == 4
            with pytest.raises(ExecError) as e:
                await client.exec("d1", "boom", {"n": 5})
            assert (e.value.code, e.value.message) == ("driver_error", "the projector said no")
            with pytest.raises(ExecError) as e:
                await client.exec("d1", "nope", {"n": 6})
            assert e.value.code == "unknown_function"
            with pytest.raises(ExecError) as e:
                await client.exec("ghost", "power", {"n": 7})
            assert e.value.code == "unknown_device" and "'ghost'" in e.value.message
            with pytest.raises(ExecError) as e:
                await client.exec(("S1", "Switcher_1"), "power", {"n": 8})
            assert e.value.code == "unknown_device" and "Display/1, Display/2" in e.value.message
            with pytest.raises(ExecError) as e:
                await client.exec(("S9", "Display_1"), "power", {"n": 9})
            assert e.value.code == "unknown_device" and "'S9'" in e.value.message
            assert ran == collections.Counter({1: 1, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1})
            # answered, acknowledged and deleted: the stream stays empty, nothing pending
            await wait_for(lambda: r.xlen(KEYS.exec_stream("A")) == 0, 5, "the stream to be trimmed")
            assert r.xpending(KEYS.exec_stream("A"), EXEC_GROUP)["pending"] == 0
            assert orjson.loads(r.get(KEYS.done("A", _any_done_id(r))))  # results are cached
        finally:
            await hub.stop()
            await ac.aclose()

    asyncio.run(main())


def _any_done_id(r: Any) -> str:
    """The request id of one cached result (a single node is enough to find one)."""
    pattern = f"{PREFIX}{{hub:A}}:done:*"
    if hasattr(r, "get_nodes"):
        node = r.get_node_from_key(KEYS.done("A", "x"))
        keys = r.keys(pattern, target_nodes=node)
    else:
        keys = r.keys(pattern)
    assert keys, "no cached result"
    return keys[0].rsplit(":", 1)[1]


# -- the owner's side, entry by entry --------------------------------------------------------

def _entry(rid: str, reply: str, *, deadline_ms: int | None = None, n: int = 0, device: str = "d1") -> dict:
    return {"id": rid, "device": device, "function": "power", "args": orjson.dumps({"n": n}).decode(),
            "level": "support", "deadline": deadline_ms or int(time.time() * 1000) + 30_000,
            "reply": reply}


def _deliver_to(r: Any, hub: str) -> None:
    """Read the stream as `hub`'s consumer (as a hub does just before it dies)."""
    stream = KEYS.exec_stream(hub)
    r.xreadgroup(EXEC_GROUP, hub, {stream: ">"}, count=100)


def test_redelivered_requests_answered_from_cache_never_run_again(backend: Backend) -> None:
    """A hub that died after caching (or while running) gets its pending entries again at
    restart: the cached reply is pushed again; a running marker gets an explicit `timeout`;
    a deadline that passed gets `timeout`; neither runs."""
    r = backend.client()
    stream = KEYS.exec_stream("A")
    r.xgroup_create(stream, EXEC_GROUP, id="0", mkstream=True)
    rep = {name: KEYS.reply("caller", name) for name in ("cached", "running", "late", "fresh")}
    r.xadd(stream, _entry("cached", rep["cached"], n=1))
    r.xadd(stream, _entry("running", rep["running"], n=2))
    _deliver_to(r, "A")                     # both delivered to A, which then "died"
    r.set(KEYS.done("A", "cached"), '{"ok":{"n":1,"from":"cache"}}', px=DONE_TTL_MS)
    r.set(KEYS.done("A", "running"), RUNNING, px=DONE_TTL_MS)
    r.xadd(stream, _entry("late", rep["late"], n=3, deadline_ms=int(time.time() * 1000) - 1))
    r.xadd(stream, _entry("fresh", rep["fresh"], n=4))

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        hub = Hub(backend, "A", {"d1"}, ran).start()
        try:
            await wait_for(lambda: all(r.llen(k) for k in rep.values()), 5, "four replies")
            assert orjson.loads(r.lpop(rep["cached"])) == {"ok": {"n": 1, "from": "cache"}}
            got = orjson.loads(r.lpop(rep["running"]))
            assert got["error"] == "timeout" and "may have run" in got["message"]
            got = orjson.loads(r.lpop(rep["late"]))
            assert got["error"] == "timeout" and "deadline passed" in got["message"]
            assert orjson.loads(r.lpop(rep["fresh"]))["ok"]["n"] == 4
            assert ran == collections.Counter({4: 1}), "only the fresh call may run"
            assert r.ttl(rep["fresh"]) in (-2, *range(1, 61))
            assert r.xpending(stream, EXEC_GROUP)["pending"] == 0
            await wait_for(lambda: r.xlen(stream) == 0, 5, "the stream to be emptied")
            # the same request id again (a caller that re-sent it): answered, not run
            r.xadd(stream, _entry("fresh", rep["fresh"], n=4))
            await wait_for(lambda: r.llen(rep["fresh"]), 5, "the repeated reply")
            assert orjson.loads(r.lpop(rep["fresh"]))["ok"]["n"] == 4
            assert ran[4] == 1
        finally:
            await hub.stop()

    asyncio.run(main())


def test_a_request_sent_twice_runs_once(backend: Backend) -> None:
    """A caller that lost its connection sends the same request id again (`resent`): in the
    same batch, in a later one, and after the hub restarted — it runs once; every copy is
    answered."""
    r = backend.client()
    stream = KEYS.exec_stream("A")
    r.xgroup_create(stream, EXEC_GROUP, id="0", mkstream=True)
    reply = KEYS.reply("caller", "twice")
    r.xadd(stream, _entry("twice", reply, n=1))
    r.xadd(stream, {**_entry("twice", reply, n=1), "resent": "1"})

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        hub = Hub(backend, "A", {"d1"}, ran, delay=0.05).start()
        try:
            await wait_for(lambda: r.llen(reply) == 2, 5, "both copies answered")
            assert [orjson.loads(x)["ok"]["n"] for x in r.lrange(reply, 0, -1)] == [1, 1]
            await hub.stop()
            # a new process of hub A (nothing in memory): the cache answers a third copy
            hub = Hub(backend, "A", {"d1"}, ran).start()
            r.xadd(stream, {**_entry("twice", reply, n=1), "resent": "1"})
            await wait_for(lambda: r.llen(reply) == 3, 5, "the third copy answered")
            assert ran == collections.Counter({1: 1})
        finally:
            await hub.stop()

    asyncio.run(main())


def test_expired_deadline_never_runs_through_the_client(backend: Backend) -> None:
    """A call that waits in the stream past its deadline (its owner busy) is answered
    `timeout` and never run."""
    r = backend.client()
    register(r, "A")
    put_device(r, "d1", lease="A")

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        hub = Hub(backend, "A", {"d1"}, ran, delay=0.5)
        hub.server = ExecServer(hub.redis, KEYS, "A", hub.run, lambda d: True, concurrency=1, block_ms=200)
        hub.start()
        ac = backend.aclient()
        client = ExecClient(ac, KEYS, "caller")
        try:
            slow = asyncio.ensure_future(client.exec("d1", "power", {"n": 1}, timeout=5))
            await wait_for(lambda: ran[1] == 1, 5, "the first call to start")
            with pytest.raises(ExecError) as e:
                await client.exec("d1", "power", {"n": 2}, timeout=0.2)
            assert e.value.code == "timeout"
            assert (await slow)["n"] == 1
            # the expired one was answered by the hub too (not left in the stream), unrun
            await wait_for(lambda: hub.server.answered >= 2, 5, "the expired entry's answer")
            assert ran == collections.Counter({1: 1})
        finally:
            await hub.stop()
            await ac.aclose()

    asyncio.run(main())


def test_moved_is_retried_once_at_the_new_owner(backend: Backend) -> None:
    r = backend.client()
    register(r, "A")
    register(r, "B")
    put_device(r, "d1", lease="A")

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        a = Hub(backend, "A", set(), ran).start()      # A lost d1: it answers `moved`
        b = Hub(backend, "B", {"d1"}, ran).start()
        ac = backend.aclient()
        client = ExecClient(ac, KEYS, "caller")
        try:
            assert (await client.owner("d1")).hub == "A"       # cached: A
            put_device(r, "d1", lease="B")                     # the move, after the lookup
            got = await client.exec("d1", "power", {"n": 1})
            assert got["hub"] == "B" and ran == collections.Counter({1: 1})
            # moved twice (B loses it too, to A which does not have it): `moved`, nothing ran
            b.owned.clear()
            put_device(r, "d1", lease="A")
            client._owners["d1"] = (await client.owner("d1", fresh=True))
            put_device(r, "d1", lease="B")
            with pytest.raises(ExecError) as e:
                await client.exec("d1", "power", {"n": 2})
            assert e.value.code == "moved" and "'d1'" in e.value.message
            assert ran[2] == 0
        finally:
            await a.stop()
            await b.stop()
            await ac.aclose()

    asyncio.run(main())


def test_unread_request_of_a_dead_owner_goes_to_the_new_owner(backend: Backend) -> None:
    """Owner A's registration vanishes while the call sits unread in its stream: the caller
    takes it back (atomically, only if A never read it) and the new owner B runs it once.
    One A did read is waited for until the deadline: `timeout`, saying it may have run."""
    r = backend.client()
    register(r, "A")
    register(r, "B")
    put_device(r, "d1", lease="A")
    r.xgroup_create(KEYS.exec_stream("A"), EXEC_GROUP, id="0", mkstream=True)

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        b = Hub(backend, "B", {"d1"}, ran).start()
        ac = backend.aclient()
        client = ExecClient(ac, KEYS, "caller", slice_s=0.05)
        try:
            call = asyncio.ensure_future(client.exec("d1", "power", {"n": 1}, timeout=10))
            await wait_for(lambda: r.xlen(KEYS.exec_stream("A")) == 1, 5, "the call in A's stream")
            unregister(r, "A")
            put_device(r, "d1", lease="B")
            got = await asyncio.wait_for(call, 5)
            assert got["hub"] == "B" and ran == collections.Counter({1: 1})
            assert r.xlen(KEYS.exec_stream("A")) == 0, "the unread request stays nowhere"

            register(r, "A")
            put_device(r, "d1", lease="A")
            client = ExecClient(ac, KEYS, "caller2", slice_s=0.05)     # nothing cached
            call = asyncio.ensure_future(client.exec("d1", "power", {"n": 2}, timeout=1.0))
            await wait_for(lambda: r.xlen(KEYS.exec_stream("A")) == 1, 5, "the second call in A's stream")
            _deliver_to(r, "A")                  # A read it, then died
            unregister(r, "A")
            put_device(r, "d1", lease="B")
            with pytest.raises(ExecError) as e:
                await asyncio.wait_for(call, 5)
            assert e.value.code == "timeout" and "may have run" in e.value.message
            assert ran[2] == 0, "a delivered request is never sent to a second owner"
        finally:
            await b.stop()
            await ac.aclose()

    asyncio.run(main())


# -- traffic with failures -------------------------------------------------------------------

async def _traffic(backend: Backend, total: int, clients: int, per_client: int, devices: list[str],
                   timeout: float, outcomes: dict[int, tuple[str, Any]], done: list[int]) -> None:
    """`total` calls from `clients` ExecClients, `per_client` at a time each; every outcome is
    recorded by call number."""
    acs = [backend.aclient() for _ in range(clients)]

    async def one(client: ExecClient, n: int, gate: asyncio.Semaphore) -> None:
        async with gate:
            try:
                got = await client.exec(devices[n % len(devices)], "power", {"n": n}, timeout=timeout)
                assert got["n"] == n, f"call {n} got the answer of call {got['n']}"
                outcomes[n] = ("ok", got["hub"])
            except ExecError as e:
                outcomes[n] = ("error", e.code)
            done.append(n)

    try:
        tasks = []
        for i, ac in enumerate(acs):
            client = ExecClient(ac, KEYS, f"client{i}", slice_s=0.1)
            gate = asyncio.Semaphore(per_client)
            tasks += [one(client, n, gate) for n in range(i, total, clients)]
        await asyncio.gather(*tasks)
    finally:
        for ac in acs:
            await ac.aclose()


def _check_outcomes(outcomes: dict[int, tuple[str, Any]], ran: collections.Counter, total: int,
                    max_errors: int) -> None:
    assert sorted(outcomes) == list(range(total)), "every call returns"
    twice = {n: c for n, c in ran.items() if c > 1}
    assert not twice, f"calls that ran more than once: {twice}"
    errors = collections.Counter(code for kind, code in outcomes.values() if kind == "error")
    assert set(errors) <= EXPLICIT, f"unexpected error codes: {errors}"
    assert sum(errors.values()) <= max_errors, f"too many errors: {errors}"
    for n, (kind, _hub) in outcomes.items():
        if kind == "ok":
            assert ran[n] == 1, f"call {n} answered ok but ran {ran[n]} times"


def test_thousand_calls_with_an_owner_killed_midway(backend: Backend) -> None:
    """1,000 calls from 4 clients to devices on two hubs; hub A is killed (kill -9: its
    calls in flight are dropped unanswered, its registration expires) after 300 answers, and
    hub C takes A's devices. Every call returns a result or an explicit error, no call runs
    twice, and errors are only calls A had already read (at most the calls in flight)."""
    r = backend.client()
    devices = [f"d{i}" for i in range(10)] + ["p0"]
    register(r, "A")
    register(r, "B")
    for i in range(10):
        put_device(r, f"d{i}", lease="A" if i < 5 else "B")
    put_device(r, "p0", pinned="B")
    total, clients, per_client = 1000, 4, 16

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        a = Hub(backend, "A", {f"d{i}" for i in range(5)}, ran, delay=0.002).start()
        b = Hub(backend, "B", {f"d{i}" for i in range(5, 10)} | {"p0"}, ran, delay=0.002).start()
        c: Hub | None = None
        outcomes: dict[int, tuple[str, Any]] = {}
        done: list[int] = []
        traffic = asyncio.ensure_future(_traffic(backend, total, clients, per_client, devices, 3.0,
                                                 outcomes, done))
        try:
            await wait_for(lambda: len(done) >= 300 or traffic.done(), 30, "300 answers")
            await a.crash()
            unregister(r, "A")
            for i in range(5):
                r.delete(KEYS.lease(f"d{i}"))        # expired with A's registration
            stream = KEYS.exec_stream("A")
            # callers take back what A never read (what it read stays, pending, for ever)
            await wait_for(lambda: r.xlen(stream) == r.xpending(stream, EXEC_GROUP)["pending"], 10,
                           "the unread requests to leave the dead hub's stream")
            register(r, "C")
            c = Hub(backend, "C", {f"d{i}" for i in range(5)}, ran, delay=0.002).start()
            for i in range(5):
                put_device(r, f"d{i}", lease="C")
            await asyncio.wait_for(traffic, 60)
        finally:
            if not traffic.done():
                traffic.cancel()
            await b.stop()
            if c is not None:
                await c.stop()
        _check_outcomes(outcomes, ran, total, max_errors=clients * per_client)
        hubs = collections.Counter(h for kind, h in outcomes.values() if kind == "ok")
        assert hubs["A"] >= 100 and hubs["B"] >= 300 and hubs["C"] >= 100, hubs

    asyncio.run(main())


def test_redis_restart_during_traffic(redis_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    """redis-server killed and restarted (empty) while calls are in flight: the server
    recreates its group, callers re-send what Redis lost (the hub remembers what it ran, so
    nothing runs twice), and every call returns; each side logs the outage once."""
    backend = Backend("single", redis_server)
    r = backend.client()
    devices = [f"d{i}" for i in range(4)]

    def records() -> None:
        register(r, "A")
        for d in devices:
            put_device(r, d, lease="A")

    records()
    total = 400

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        a = Hub(backend, "A", set(devices), ran, delay=0.005).start()
        outcomes: dict[int, tuple[str, Any]] = {}
        done: list[int] = []
        traffic = asyncio.ensure_future(_traffic(backend, total, 2, 16, devices, 8.0, outcomes, done))
        try:
            await wait_for(lambda: len(done) >= 100 or traffic.done(), 30, "100 answers")
            assert not traffic.done()
            redis_server.stop()
            await wait_for(lambda: a.server._outage.since is not None, 10, "the hub to notice the outage")
            redis_server.start()
            records()                      # membership writes its records again
            await asyncio.wait_for(traffic, 60)
            # and afterwards a fresh call works at once
            ac = backend.aclient()
            try:
                got = await ExecClient(ac, KEYS, "after").exec("d1", "power", {"n": total}, timeout=5)
                assert got["n"] == total
            finally:
                await ac.aclose()
        finally:
            if not traffic.done():
                traffic.cancel()
            await a.stop()
        _check_outcomes(outcomes, ran, total, max_errors=32)
        lost = [rec for rec in caplog.records
                if rec.name == "hubhost.fleet" and "exec server A: Redis unreachable" in rec.getMessage()]
        assert len(lost) == 1, [rec.getMessage() for rec in lost]

    with caplog.at_level("INFO", logger="hubhost.fleet"):
        asyncio.run(main())


# -- hubhost.fleet: views and the script's face ----------------------------------------------

class Messages:
    """A real subscription; `take(n)` waits for n messages (with a deadline)."""

    def __init__(self, backend: Backend, *patterns: str) -> None:
        self.conn = backend.subscriber()
        self.ps = self.conn.pubsub(ignore_subscribe_messages=True)
        self.ps.psubscribe(*patterns)
        deadline = time.monotonic() + 5
        while self.ps.get_message(timeout=0.05) is not None or not self.ps.subscribed:
            if time.monotonic() > deadline:
                raise AssertionError("subscription not confirmed")

    def take(self, n: int, timeout: float = 5.0) -> list[tuple[str, str]]:
        out: list[tuple[str, str]] = []
        deadline = time.monotonic() + timeout
        while len(out) < n:
            m = self.ps.get_message(timeout=0.05)
            if m is not None and m["type"] == "pmessage":
                out.append((m["channel"], m["data"]))
            if time.monotonic() > deadline:
                raise AssertionError(f"got {out}, wanted {n} messages")
        return out

    def none(self, wait: float = 0.2) -> None:
        """No message now: checked after a PING round trip through the same server."""
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            m = self.ps.get_message(timeout=0.02)
            assert m is None or m["type"] != "pmessage", f"unexpected message {m}"

    def close(self) -> None:
        self.ps.close()
        self.conn.close()


def test_views_round_trip_and_publish_as_the_mirror_does(backend: Backend) -> None:
    fl = fleet_api.connect(backend.url, prefix=PREFIX, fleet="F")
    assert fl.cluster == backend.cluster, "cluster mode is detected from INFO cluster"
    msgs = Messages(backend, f"{PREFIX}status/*", f"{PREFIX}lookup-change")
    try:
        st = fl.status("d1")
        st["power"] = True
        st["input"] = {"name": "HDMI 1", "n": [1, 2.5, None]}
        assert st["power"] is True and st["input"] == {"name": "HDMI 1", "n": [1, 2.5, None]}
        assert msgs.take(2) == [(f"{PREFIX}status/d1/power", "true"),
                                (f"{PREFIX}status/d1/input", '{"name":"HDMI 1","n":[1,2.5,null]}')]
        raw = backend.client()
        assert raw.hget(f"{PREFIX}status/d1", "power") == "true", "JSON text under the prefix"
        st["power"] = True                       # unchanged: not published again
        msgs.none()
        del st["power"]
        assert msgs.take(1) == [(f"{PREFIX}status/d1/power", "null")]
        with pytest.raises(KeyError):
            st["power"]
        with pytest.raises(KeyError):
            del st["power"]
        assert sorted(st) == ["input"] and len(st) == 1 and "input" in st and "power" not in st
        assert dict(st) == st.to_dict() == {"input": {"name": "HDMI 1", "n": [1, 2.5, None]}}

        sy = fl.system("S1")
        sy["Display/1"] = "d1"
        assert msgs.take(1) == [(f"{PREFIX}lookup-change", "S1")]
        assert raw.hget(f"{PREFIX}system/S1", "Display/1") == "d1", "device ids as plain text, as the mirror writes"
        assert sy["Display/1"] == "d1" and dict(sy) == {"Display/1": "d1"}
        sy["Display/1"] = "d1"
        msgs.none()
        del sy["Display/1"]
        assert msgs.take(1) == [(f"{PREFIX}lookup-change", "S1")]
        assert len(sy) == 0
        with pytest.raises(KeyError):
            del sy["Display/1"]
        with pytest.raises(TypeError):
            sy["Display/2"] = 5            # type: ignore[assignment]
        with pytest.raises(TypeError):
            st["x"] = object()
    finally:
        msgs.close()
        fl.close()


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
ops = st.lists(st.tuples(st.sampled_from(["a", "b", "c", "é/x"]), st.none() | json_values), max_size=12)


def test_status_view_behaves_as_a_dict(redis_server: Any) -> None:
    """Property: any sequence of sets and deletes leaves the view equal to a dict doing the
    same (JSON values round trip exactly, floats included)."""
    fl = fleet_api.connect(redis_server.url, prefix=PREFIX, fleet="F", cluster=False)
    counter = iter(range(10**9))

    @settings(max_examples=examples(60))
    @given(ops)
    def check(steps: list[tuple[str, Any]]) -> None:
        view = fl.status(f"dev{next(counter)}")
        model: dict[str, Any] = {}
        for name, value in steps:
            if value is None and name in model:
                del view[name]
                del model[name]
            elif value is not None:
                view[name] = value
                model[name] = value
        assert dict(view) == model
        assert len(view) == len(model)

    try:
        check()
    finally:
        fl.close()


def test_connect_exec_hubs_and_owner(backend: Backend) -> None:
    """The script's face: `exec(system, "Display_1", fn, **args)` and `exec(device, fn)`
    through a real ExecServer, plus hubs() and owner()."""
    r = backend.client()
    register(r, "A")
    put_device(r, "d1", lease="A")
    put_device(r, "p1", pinned="A")
    put_device(r, "m1")                                  # mid-failover: no lease
    r.hset(KEYS.system("S1"), "Display/1", "d1")

    async def main() -> None:
        ran: collections.Counter = collections.Counter()
        hub = Hub(backend, "A", {"d1", "p1"}, ran).start()
        fl = await asyncio.to_thread(fleet_api.connect, backend.url, prefix=PREFIX, fleet="F")
        try:
            got = await asyncio.to_thread(fl.exec, "S1", "Display_1", "power", n=1, state=True)
            assert got["device"] == "d1" and got["n"] == 1
            got = await asyncio.to_thread(fl.exec, "p1", "power", args={"n": 2})
            assert got["device"] == "p1"
            with pytest.raises(ExecError) as e:
                await asyncio.to_thread(fl.exec, "m1", "power", n=3, timeout=0.3)
            assert e.value.code == "timeout" and "no hub holds its lease" in e.value.message
            assert ran == collections.Counter({1: 1, 2: 1})
            hubs = await asyncio.to_thread(fl.hubs)
            assert list(hubs) == ["A"] and hubs["A"]["ready"] is True
            assert fl.owner("d1") == "A" and fl.owner("p1") == "A" and fl.owner("m1") is None
            with pytest.raises(KeyError):
                fl.owner("nope")
        finally:
            await asyncio.to_thread(fl.close)
            await hub.stop()

    asyncio.run(main())
