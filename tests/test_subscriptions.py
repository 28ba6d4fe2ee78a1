"""Indirect subscriptions (seeds/001): by (system, module, index, status), re-resolved when
the system index changes, with nothing lost or duplicated around a switch."""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path
from typing import Any

import orjson

from hubhost.status.store import StatusStore
from hubhost.status.subscriptions import Subscriptions
from hubutil import run, running_hub, write_config, write_driver

INDEX_AB = {"s1": {"Display/1": "a", "Display/2": "b"}}
INDEX_BA = {"s1": {"Display/1": "b", "Display/2": "a"}}


def test_subscribe_current_value_changes_unsubscribe_terminate() -> None:
    async def main() -> None:
        store = StatusStore()
        subs = Subscriptions(store)
        subs.start()
        subs.set_index(INDEX_AB)
        store.set("a", "power", "true")
        got: list[tuple[int, str]] = []
        client = subs.subscriber()
        ref = client.subscribe("s1", "Display", 1, "power", lambda r, v: got.append((r, v)))
        assert got == [(ref, "true")]            # the current value at once
        # a field that is not set yet: nothing on subscribe, then its first value
        ref2 = client.subscribe("s1", "Display", 2, "input", lambda r, v: got.append((r, v)))
        assert len(got) == 1
        store.set("a", "power", "false")
        store.set("b", "input", '"hdmi"')
        store.set("a", "other", "1")              # not watched
        await asyncio.sleep(0.01)
        assert got[1:] == [(ref, "false"), (ref2, '"hdmi"')]
        store.set("a", "power", None)             # deletion arrives as JSON null
        await asyncio.sleep(0.01)
        assert got[-1] == (ref, "null")
        assert subs.count() == 2
        assert client.unsubscribe(ref) is True
        assert client.unsubscribe(ref) is False
        before = len(got)
        store.set("a", "power", "true")
        await asyncio.sleep(0.01)
        assert len(got) == before
        # a place nobody maps yet resolves once the index has it
        ref3 = client.subscribe("s1", "Camera", 1, "zoom", lambda r, v: got.append((r, v)))
        store.set("c", "zoom", "3")
        subs.set_index({"s1": {**INDEX_AB["s1"], "Camera/1": "c"}})
        assert got[-1] == (ref3, "3")
        assert client.terminate() == 2
        assert subs.count() == 0 and len(client) == 0
        subs.stop()

    run(main())


def test_index_change_switches_to_the_other_device() -> None:
    async def main() -> None:
        store = StatusStore()
        subs = Subscriptions(store)
        subs.start()
        subs.set_index(INDEX_AB)
        store.set("a", "power", '"a1"')
        store.set("b", "power", '"b1"')
        got: list[str] = []
        subs.subscriber().subscribe("s1", "Display", 1, "power", lambda r, v: got.append(v))
        store.set("a", "power", '"a1b"')   # still queued when the index changes: delivered first
        subs.set_index(INDEX_BA)
        assert got == ['"a1"', '"a1b"', '"b1"']
        store.set("a", "power", '"a2"')           # a is Display/2 now: not delivered
        store.set("b", "power", '"b2"')
        await asyncio.sleep(0.01)
        assert got == ['"a1"', '"a1b"', '"b1"', '"b2"']
        # the place disappears from the index: the subscriber hears null, then nothing
        subs.set_index({"s1": {"Display/2": "a"}})
        store.set("b", "power", '"b3"')
        await asyncio.sleep(0.01)
        assert got[-1] == "null"
        # a lookup-change of one system puts it back
        subs.set_system("s1", {"Display/1": "b"})
        assert got[-1] == '"b3"'
        subs.stop()

    run(main())


def test_switch_under_concurrent_writes_loses_and_duplicates_nothing() -> None:
    """Two writer threads count up on a and b while the index flips back and forth: every
    stretch the subscriber receives from one device is gap-free and repeats nothing, and
    it ends on the current device's last value."""

    async def main() -> None:
        store = StatusStore()
        subs = Subscriptions(store)
        subs.start()
        subs.set_index(INDEX_AB)
        got: list[str] = []
        subs.subscriber().subscribe("s1", "Display", 1, "n", lambda r, v: got.append(orjson.loads(v)))
        stop = threading.Event()

        def writer(dev: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                store.set(dev, "n", f'"{dev}{i}"')
                if i % 50 == 0:
                    time.sleep(0.0005)

        threads = [threading.Thread(target=writer, args=(d,)) for d in "ab"]
        for t in threads:
            t.start()
        flips = 0
        floors: list[tuple[str, int]] = []   # (device left, its value just before the switch)
        for k in range(40):
            await asyncio.sleep(0.005)
            left = "a" if k % 2 == 0 else "b"
            floors.append((left, int(orjson.loads(store.get(left, "n") or '"x0"')[1:])))
            subs.set_index(INDEX_BA if k % 2 == 0 else INDEX_AB)
            flips += 1
        stop.set()
        for t in threads:
            t.join()
        await asyncio.sleep(0.05)
        final_dev = "a" if flips % 2 == 0 else "b"
        assert got[-1] == orjson.loads(store.get(final_dev, "n"))
        # split into stretches per device; within one stretch numbers go up by exactly 1
        stretches: list[list[str]] = []
        for v in got:
            if stretches and stretches[-1][-1][0] == v[0]:
                stretches[-1].append(v)
            else:
                stretches.append([v])
        assert len(stretches) >= 10, "the index should have switched the subscription many times"
        for s in stretches:
            nums = [int(v[1:]) for v in s]
            assert nums == list(range(nums[0], nums[0] + len(nums))), f"gap or repeat in {s[:5]}..."
        # every change made before a switch reached the subscriber before it switched away
        ends = [(s[-1][0], int(s[-1][1:])) for s in stretches[:-1]]
        assert len(ends) == len(floors)
        for (dev, last), (left, floor) in zip(ends, floors):
            assert dev == left and last >= floor, (dev, last, left, floor)
        subs.stop()

    run(main())


def test_changes_queued_before_subscribing_are_not_replayed() -> None:
    """Changes still queued (not yet delivered) when a second client subscribes to the same
    field: it gets the current value once, never the older queued ones after it."""

    async def main() -> None:
        store = StatusStore()
        subs = Subscriptions(store)
        subs.start()
        subs.set_index(INDEX_AB)
        first: list[str] = []
        second: list[str] = []
        subs.subscriber().subscribe("s1", "Display", 1, "power", lambda r, v: first.append(v))
        store.set("a", "power", "1")      # queued: the loop has not run the drain yet
        store.set("a", "power", "2")
        subs.subscriber().subscribe("s1", "Display", 1, "power", lambda r, v: second.append(v))
        assert second == ["2"]
        await asyncio.sleep(0.01)
        assert first == ["1", "2"]
        assert second == ["2"]
        store.set("a", "power", "3")
        await asyncio.sleep(0.01)
        assert first == ["1", "2", "3"] and second == ["2", "3"]
        subs.stop()

    run(main())


WATCHER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local sub
    return driver_helper.init {
      name = "watcher",
      lifecycle = {
        init = function(driver, device)
          sub = driver:system("s1"):get("Display", 1):subscribe("power", function(d, value, s)
            log.info("SEEN", tostring(value), s.target)
            if value == "crash" then error("crash on purpose") end
          end)
        end,
      },
      functions = {
        stop = { handler = function() return sub:unsubscribe() end },
      },
    }
"""

DISPLAY = """
    local driver_helper = require "driver_helper"
    return driver_helper.init {
      name = "display",
      functions = {
        set = { params = { value = { "JSON" } },
                handler = function(d, device, args) device.status.power = args.value end },
      },
    }
"""


def _hub(tmp_path: Path) -> Path:
    write_driver(tmp_path, "watcher", WATCHER)
    write_driver(tmp_path, "display", DISPLAY)
    return write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "watcher"
        path = "watcher"
        [[drivers.devices]]
        id = "w"

        [[drivers]]
        id = "display"
        path = "display"
        [[drivers.devices]]
        id = "a"
        system = "s1"
        module = "Display"
        index = 1
    """)


def test_lua_subscriber_gets_values_and_unsubscribes(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(_hub(tmp_path), tmp_path / "state") as (sup, cap):
            await sup.functions.exec("a", "set", {"value": True})
            await cap.wait_for("SEEN true s1/Display/1")
            await sup.functions.exec("a", "set", {"value": {"x": [1, 2]}})
            await cap.wait_for("SEEN table:")
            assert sup.subscriptions.count() == 1
            assert await sup.functions.exec("w", "stop") == "true"
            await asyncio.sleep(0.05)
            assert sup.subscriptions.count() == 0
            await sup.functions.exec("a", "set", {"value": 5})
            await asyncio.sleep(0.1)
            assert cap.lines("SEEN 5") == []

    run(main())


def test_lua_subscriptions_die_with_their_runtime(tmp_path: Path) -> None:
    """A driver that crashes and restarts re-subscribes from `init`; the dead runtime's
    subscription is gone (exactly one remains)."""

    async def crash_cycle() -> None:
        async with running_hub(_hub(tmp_path), tmp_path / "state") as (sup, cap):
            assert sup.subscriptions.count() == 1
            slot = sup.slots["watcher"]
            old_gen = slot.generation
            slot.crash("test: simulated crash")
            deadline = time.monotonic() + 2
            while sup.subscriptions.count() != 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert sup.subscriptions.count() == 0
            deadline = time.monotonic() + 5
            while (slot.state != "running" or slot.generation == old_gen) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert slot.state == "running"
            await asyncio.sleep(0.05)
            assert sup.subscriptions.count() == 1
            await sup.functions.exec("a", "set", {"value": "after"})
            await cap.wait_for("SEEN after")
            assert len(cap.lines("SEEN after")) == 1

    run(crash_cycle())


def test_lookup_change_from_redis_re_resolves(tmp_path: Path, redis_server: Any) -> None:
    """A system index someone else keeps in Redis: `lookup-change <id>` makes the hub re-read
    it and move subscriptions; systems the hub's own config defines are not overridden."""
    cfg = _hub(tmp_path)
    cfg.write_text(cfg.read_text() + f"""
[[drivers.devices]]
id = "b"
system = "s1"
module = "Display"
index = 2

[redis]
url = "{redis_server.url}"
prefix = "p:"
""")

    async def main() -> None:
        r = redis_server.client()
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            deadline = time.monotonic() + 10
            while r.pubsub_numsub("p:lookup-change")[0][1] < 1:
                assert time.monotonic() < deadline, "the hub never subscribed to lookup-change"
                await asyncio.sleep(0.02)
            await sup.functions.exec("a", "set", {"value": "from-a"})
            await sup.functions.exec("b", "set", {"value": "from-b"})
            got: list[str] = []
            sup.subscriptions.subscriber().subscribe("remote", "Panel", 1, "power", lambda ref, v: got.append(v))
            assert got == []
            r.hset("p:system/remote", mapping={"Panel/1": "a"})
            r.publish("p:lookup-change", "remote")
            deadline = time.monotonic() + 5
            while got != ['"from-a"'] and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert got == ['"from-a"']
            r.hset("p:system/remote", mapping={"Panel/1": "b"})
            r.publish("p:lookup-change", "remote")
            while got[-1] != '"from-b"' and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert got == ['"from-a"', '"from-b"']
            # s1 belongs to the config: a foreign rewrite is ignored
            r.hset("p:system/s1", mapping={"Display/1": "b"})
            r.publish("p:lookup-change", "s1")
            await asyncio.sleep(0.3)
            assert sup.subscriptions.resolve("s1", "Display", 1) == "a"
            r.delete("p:system/remote")
            r.publish("p:lookup-change", "remote")
            while got[-1] != "null" and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert got[-1] == "null" and "remote" not in sup.subscriptions.index

    run(main())
