"""Config reload (SIGHUP, `hubhost reload`, POST /api/v1/reload): re-ordered modules move
subscriptions without losing or repeating a value, and only drivers whose devices changed
restart."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from hubhost.api.client import ApiClient
from hubutil import run, running_hub, write_config, write_driver

COUNTER = """
    local driver_helper = require "driver_helper"
    local timers = {}
    return driver_helper.init {
      name = "counter",
      lifecycle = {
        init = function(driver, device)
          local n = 0
          timers[device.id] = driver:call_on_schedule(0.004, function()
            n = n + 1
            device.status.power = device.id .. "-" .. n
          end, "count " .. device.id)
        end,
      },
      functions = {
        halt = { handler = function(driver)
          for _, t in pairs(timers) do driver:cancel_timer(t) end
          return true
        end },
      },
    }
"""

LUA_WATCHER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init {
      name = "watcher",
      lifecycle = {
        init = function(driver)
          driver:system("room"):get("Display", 1):subscribe("power", function(d, v)
            log.info("LUA-SEEN " .. tostring(v))
          end)
        end,
      },
    }
"""


def displays_config(tmp_path: Path, order: tuple[int, int]) -> Path:
    return write_config(tmp_path / "hub.toml", f"""
        [[drivers]]
        id = "displays"
        path = "counter"
        [[drivers.devices]]
        id = "A"
        system = "room"
        module = "Display"
        index = {order[0]}
        [[drivers.devices]]
        id = "B"
        system = "room"
        module = "Display"
        index = {order[1]}

        [[drivers]]
        id = "watcher"
        path = "watcher"
        [[drivers.devices]]
        id = "w"
    """)


def unix_session(sup: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sup.api.socket_path)))


def stretches(values: list[str]) -> list[tuple[str, list[int]]]:
    out: list[tuple[str, list[int]]] = []
    for v in values:
        dev, n = v.split("-")
        if out and out[-1][0] == dev:
            out[-1][1].append(int(n))
        else:
            out.append((dev, [int(n)]))
    return out


def test_reordered_displays_move_the_watcher_without_loss_or_repeat(tmp_path: Path) -> None:
    write_driver(tmp_path, "counter", COUNTER)
    write_driver(tmp_path, "watcher", LUA_WATCHER)
    cfg = displays_config(tmp_path, (1, 2))

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            slot = sup.slots["displays"]
            gen_before = slot.generation
            got: list[str] = []
            async with unix_session(sup) as s, s.ws_connect("http://hub/api/v1/ws") as ws:
                await ws.send_json({"id": 1, "type": "bind", "sys": "room", "mod": "Display", "index": 1,
                                    "name": "power"})

                async def reader() -> None:
                    async for msg in ws:
                        doc = orjson.loads(msg.data)
                        if doc.get("type") == "notify":
                            got.append(doc["value"])

                task = asyncio.ensure_future(reader())
                while len(got) < 30:
                    await asyncio.sleep(0.01)
                displays_config(tmp_path, (2, 1))            # B is Display/1 now
                a_before = int(orjson.loads(sup.status.get("A", "power")).split("-")[1])
                async with s.post("http://hub/api/v1/reload") as r:
                    assert r.status == 200
                    report = (await r.json())["reloaded"]
                assert report == {"started": [], "stopped": [], "restarted": [], "kept": ["displays", "watcher"]}
                n = len(got)
                while len(got) < n + 30:
                    await asyncio.sleep(0.01)
                assert orjson.loads(await sup.functions.exec("A", "halt")) is True
                final = orjson.loads(sup.status.get("B", "power"))
                deadline = time.monotonic() + 5
                while (not got or got[-1] != final) and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
                task.cancel()
            parts = stretches(got)
            assert [dev for dev, _ in parts] == ["A", "B"], parts
            for dev, nums in parts:
                assert nums == list(range(nums[0], nums[0] + len(nums))), f"{dev}: gap or repeat"
            assert parts[0][1][-1] >= a_before          # everything A said before the reload arrived
            assert got[-1] == final                     # and B's stream reached its last value
            # the driver was not restarted: same runtime, its timers kept counting throughout
            assert slot.generation == gen_before and slot.restarts == 0
            assert len(cap.lines("[displays] running")) == 1
            # the Lua subscriber followed the index too (its value crosses to its worker and
            # its log line back: wait for the final one as for the WebSocket client above)
            await cap.wait_for(f"LUA-SEEN {final}", timeout=5)
            lua_seen = [line.rsplit(" ", 1)[1] for line in cap.lines("LUA-SEEN ")]
            lua_parts = stretches(lua_seen)
            assert [dev for dev, _ in lua_parts] == ["A", "B"]
            assert lua_seen[-1] == final

    run(main())


SIMPLE = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init {
      name = "simple",
      lifecycle = {
        added = function(driver, device) log.info("EV added " .. device.id) end,
        removed = function(driver, device) log.info("EV removed " .. device.id) end,
        shutdown = function(driver) log.info("EV shutdown " .. driver.name) end,
      },
      functions = { id = { handler = function(d, device) return device.id end } },
    }
"""


def drivers_config(tmp_path: Path, drivers: dict[str, list[str]]) -> Path:
    text = ""
    for did, devices in drivers.items():
        text += f'\n[[drivers]]\nid = "{did}"\npath = "simple"\n'
        for i, dev in enumerate(devices, 1):
            text += f'[[drivers.devices]]\nid = "{dev}"\nsystem = "sys"\nmodule = "{did.upper()}"\nindex = {i}\n'
    return write_config(tmp_path / "hub.toml", text)


def test_added_removed_changed_drivers_and_devices(tmp_path: Path) -> None:
    write_driver(tmp_path, "simple", SIMPLE)
    cfg = drivers_config(tmp_path, {"x": ["x1"], "y": ["y1"], "z": ["z1"]})

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            gen_x, w_x = sup.slots["x"].generation, sup.slots["x"].worker
            slot_y = sup.slots["y"]
            drivers_config(tmp_path, {"x": ["x1"], "y": ["y1", "y2"], "w": ["w1"]})
            await sup.reload()
            assert sup.slots["x"].generation == gen_x and sup.slots["x"].worker is w_x   # untouched
            assert sup.slots["y"] is not slot_y and sup.slots["y"].state == "running"
            assert "z" not in sup.slots and sup.slots["w"].state == "running"
            assert cap.lines("EV added y2") and cap.lines("EV added w1")
            assert cap.lines("EV shutdown") and not cap.lines("EV removed")
            f = sup.functions
            assert await f.exec("y2", "id") == '"y2"'
            assert await f.exec("w1", "id") == '"w1"'
            with pytest.raises(Exception) as e:
                await f.exec("z1", "id")
            assert getattr(e.value, "code", None) == "unknown_device"
            assert sup.subscriptions.index == {"sys": {"X/1": "x1", "Y/1": "y1", "Y/2": "y2", "W/1": "w1"}}
            # a device leaving a driver that stays: that driver restarts and hears `removed`
            drivers_config(tmp_path, {"x": ["x1"], "y": ["y2"], "w": ["w1"]})
            await sup.reload()
            await cap.wait_for("EV removed y1")
            assert sup.slots["x"].generation == gen_x and sup.slots["x"].worker is w_x
            async with unix_session(sup) as s:
                async with s.get("http://hub/api/v1/devices") as r:
                    assert [d["id"] for d in await r.json()] == ["x1", "y2", "w1"]

    run(main())


def test_bad_config_on_reload_keeps_the_running_one(tmp_path: Path) -> None:
    write_driver(tmp_path, "simple", SIMPLE)
    cfg = drivers_config(tmp_path, {"x": ["x1"]})

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            gen, w = sup.slots["x"].generation, sup.slots["x"].worker
            cfg.write_text(cfg.read_text() + "\n[[drivers]]\nid = \"x\"\npath = \"simple\"\n")
            async with unix_session(sup) as s:
                async with s.post("http://hub/api/v1/reload") as r:
                    doc = await r.json()
                    assert r.status == 400 and doc["error"]["code"] == "bad_config"
                    assert "drivers[1].id: duplicate driver id 'x'" in doc["error"]["message"]
            await sup.reload()      # the SIGHUP path logs it and carries on
            assert cap.lines("config reload refused, keeping the running config")
            assert not cap.lines("config reload failed")   # one clear line, no traceback
            assert (sup.slots["x"].generation, sup.slots["x"].worker) == (gen, w) and await sup.functions.exec("x1", "id") == '"x1"'

    run(main())


def test_sighup_and_hubhost_reload_in_a_real_hub(tmp_path: Path) -> None:
    write_driver(tmp_path, "simple", SIMPLE)
    cfg = drivers_config(tmp_path, {"x": ["x1"], "y": ["y1"]})
    state = tmp_path / "state"
    env = {**os.environ}
    env.pop("RUNTIME_DIRECTORY", None)
    env.pop("NOTIFY_SOCKET", None)
    proc = subprocess.Popen([sys.executable, "-m", "hubhost", "run", "--config", str(cfg), "--state-dir", str(state)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)

    async def systems() -> dict[str, Any]:
        async with ApiClient(state / "hubhost.sock") as c:
            return await c.get("/api/v1/systems")

    async def wait_for(pred: Any) -> dict[str, Any]:
        deadline = time.monotonic() + 20
        last: Any = None
        while time.monotonic() < deadline:
            try:
                last = await systems()
                if pred(last):
                    return last
            except (OSError, aiohttp.ClientError):
                pass
            await asyncio.sleep(0.05)
        raise AssertionError(f"hub did not reach the expected index; last: {last}")

    async def main() -> None:
        await wait_for(lambda s: s == {"sys": {"X/1": "x1", "Y/1": "y1"}})
        drivers_config(tmp_path, {"x": ["x1", "x2"]})
        proc.send_signal(signal.SIGHUP)
        await wait_for(lambda s: s == {"sys": {"X/1": "x1", "X/2": "x2"}})
        drivers_config(tmp_path, {"y": ["y9"]})
        out = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "hubhost", "reload", "--state-dir",
                                                       str(state)], capture_output=True, text=True, env=env)
        assert out.returncode == 0 and out.stdout.startswith("reloaded (started: y; stopped: x)"), out
        assert await systems() == {"sys": {"Y/1": "y9"}}

    try:
        run(main())
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err.decode()[-2000:]


def test_reload_rewrites_the_index_in_redis(tmp_path: Path, redis_server: Any) -> None:
    write_driver(tmp_path, "counter", COUNTER)
    write_driver(tmp_path, "watcher", LUA_WATCHER)
    cfg = displays_config(tmp_path, (1, 2))
    redis_section = f'\n[redis]\nurl = "{redis_server.url}"\n'
    cfg.write_text(cfg.read_text() + redis_section)

    async def main() -> None:
        r = redis_server.client()
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            async def index_is(want: dict[bytes, bytes]) -> None:
                for _ in range(100):
                    if r.hgetall("system/room") == want:
                        return
                    await asyncio.sleep(0.05)
                assert r.hgetall("system/room") == want

            await index_is({b"Display/1": b"A", b"Display/2": b"B"})
            pubsub = r.pubsub()
            pubsub.subscribe("lookup-change")
            displays_config(tmp_path, (2, 1))
            cfg.write_text(cfg.read_text() + redis_section)
            await sup.reload()
            await index_is({b"Display/1": b"B", b"Display/2": b"A"})
            messages = []
            for _ in range(50):
                m = pubsub.get_message(timeout=0.1)
                if m and m["type"] == "message":
                    messages.append(m["data"])
                    break
            assert messages == [b"room"]
            pubsub.close()

    run(main())
