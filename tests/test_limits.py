"""CPU and memory limits per driver, measured on real hubs with real threads."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path

from hubutil import run, running_hub, write_config, write_driver

TICKER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local d = driver_helper.init { name = "ticker" }
    d:call_on_schedule(0.1, function() log.info("tick") end, "tick")
    return d
"""


def _two_drivers(tmp_path: Path, spinner_src: str, cpu_limit: float = 1.0, max_memory: str = "64MiB") -> Path:
    write_driver(tmp_path, "spinner", spinner_src)
    write_driver(tmp_path, "ticker", TICKER)
    return write_config(tmp_path / "hub.toml", f"""
        [[drivers]]
        id = "spinner"
        path = "spinner"
        cpu_limit = {cpu_limit}
        max_memory = "{max_memory}"

        [[drivers]]
        id = "ticker"
        path = "ticker"
    """)


def _max_gap(times: list[float], start: float, end: float) -> float:
    inside = [t for t in times if start <= t <= end]
    points = [start] + inside + [end]
    return max(b - a for a, b in zip(points, points[1:]))


def test_infinite_loop_is_aborted_and_other_drivers_keep_ticking(tmp_path: Path) -> None:
    cfg = _two_drivers(tmp_path, """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init { name = "spinner" }
        d:call_with_delay(0.3, function()
          log.info("spin start")
          while true do end
        end, "spin")
        d:call_with_delay(0.4, function() log.info("later event ran") end, "later")
        -- pcall cannot swallow the abort
        d:call_with_delay(2.0, function()
          log.info("pcall spin start")
          while true do pcall(function() while true do end end) end
        end, "pcall-spin")
        d:call_with_delay(2.2, function() log.info("still alive") end, "alive")
        return d
    """)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for(" aborted: ", timeout=4, count=1)
            start = cap.times("spin start")[0]
            aborted = [r.created for r in cap.records if " aborted: " in r.getMessage()][0]
            assert aborted - start <= 1.0 + 0.5, aborted - start
            msg = cap.lines(" aborted: ")[0]
            assert "[spinner]" in msg and "timer spin" in msg and "cpu limit" in msg
            await cap.wait_for("later event ran", timeout=2)
            # the other driver's 100 ms timer kept firing while the spinner spun
            assert _max_gap(cap.times("tick"), start + 0.05, aborted) < 0.35
            await cap.wait_for("still alive", timeout=4)
            assert len(cap.lines(" aborted: ")) >= 2
            assert sup.slots["spinner"].state == "running"

    run(main())


def _cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def test_c_call_stall_does_not_stop_others_and_cpu_returns_to_idle(tmp_path: Path) -> None:
    cfg = _two_drivers(tmp_path, """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init { name = "spinner" }
        d:call_with_delay(0.3, function()
          log.info("stall start")
          local r = ("a"):rep(5000):find(".-.-.-.-b")
          log.info("stall returned", tostring(r))
        end, "stall")
        d:call_on_schedule(0.2, function() log.info("spinner beat") end, "beat")
        return d
    """, cpu_limit=1.0)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("stall start", timeout=3)
            start = cap.times("stall start")[0]
            # the stalled driver is back (serving its own timer again) within twice its limit
            deadline = start + 2 * 1.0
            while time.time() < deadline and not [t for t in cap.times("spinner beat") if t > start + 0.3]:
                await asyncio.sleep(0.02)
            back = [t for t in cap.times("spinner beat") if t > start + 0.3]
            assert back and back[0] - start <= 2.0, "stalled driver not back within 2x its limit"
            assert _max_gap(cap.times("tick"), start + 0.05, back[0]) < 0.35
            assert not cap.lines("stall returned")
            # CPU falls back to idle: over 1 s the process uses well under half a core
            await asyncio.sleep(0.3)
            c0, t0 = _cpu_seconds(), time.monotonic()
            await asyncio.sleep(1.0)
            used = (_cpu_seconds() - c0) / (time.monotonic() - t0)
            assert used < 0.3, f"process still burning {used:.0%} of a core"

    run(main())


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def test_memory_bomb_is_stopped_at_the_limit(tmp_path: Path) -> None:
    """Two bombs. The issue's verbatim one appends the *same* 1 MB string (LuaJIT interns
    strings, so each entry costs 8 bytes and the driver mostly burns CPU): it is stopped by
    whichever limit it reaches first. The second appends distinct 1 MB strings and must be
    stopped by the memory limit itself. The host's RSS stays bounded throughout."""
    cfg = _two_drivers(tmp_path, """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init { name = "spinner" }
        d:call_with_delay(0.2, function()
          log.info("bomb start")
          local t = {} while true do t[#t+1] = ("x"):rep(1e6) end
        end, "bomb")
        d:call_with_delay(0.3, function()
          log.info("unique bomb start")
          local t = {} while true do t[#t+1] = ("x"):rep(1e6) .. #t end
        end, "unique-bomb")
        d:call_with_delay(0.4, function() log.info("after bomb") end, "after")
        return d
    """, max_memory="32MiB")

    async def main() -> None:
        rss0 = _rss_kib()
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("after bomb", timeout=8)
            peak = _rss_kib()
            aborted = cap.lines(" aborted: ")
            assert any("timer bomb aborted" in x for x in aborted), aborted
            assert any("timer unique-bomb aborted: memory limit of 32 MiB reached" in x for x in aborted), aborted
            assert all("[spinner]" in x for x in aborted)
            # the host's own RSS stayed bounded: the limit plus interpreter overhead
            assert peak - rss0 < 32 * 1024 + 48 * 1024, (rss0, peak)
            assert sup.slots["spinner"].state == "running"
            # and the driver's memory is back to small after the bombs (the worker reports
            # its drivers' Lua memory once a second)
            await asyncio.sleep(1.2)
            assert 0 < sup.slots["spinner"].memory < 16 * 1024 * 1024

    run(main())


def test_hostile_runtime_attacks_leave_the_hub_and_its_neighbour_alone(tmp_path: Path) -> None:
    """Issue 11's in-sandbox attacks against a real hub, with an innocent neighbour whose
    100 ms timer sets its device's status: a leaked-token forged save, a status hijack of
    the neighbour's device, a timer flood, an error object whose __tostring spins, an
    xpcall whose handler spins, a resume chain that used to segfault, forged log lines."""
    write_driver(tmp_path, "attacker", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init { name = "attacker" }
        local spin = function() while true do end end
        d:call_with_delay(0.2, function(drv)
          local dev = drv:get_device("evil1")
          -- 1. the private wait token: a driver coroutine's sleep is not handed to us
          local ok, w = coroutine.resume(coroutine.create(function() driver_helper.sleep(0) end))
          log.info("token leaked: " .. tostring(type(w) == "table"))
          pcall(coroutine.yield, w, "host", "save", { 999999, "not json\\0" })
        end, "token")
        d:call_with_delay(0.3, function(drv)
          local dev = drv:get_device("evil1")
          local ok, e = pcall(function()
            setmetatable({ id = "inn1" }, getmetatable(dev)).status.power = "hijacked"
          end)
          log.info("hijack refused: " .. tostring(not ok))
          local n = 0
          for i = 1, 343000 do
            if not pcall(drv.call_with_delay, drv, 3600, function() end) then break end
            n = n + 1
          end
          log.info("timers accepted: " .. n)
          log.info("line\\n[innocent] FORGED LINE\\27[31m")
        end, "hijack")
        d:call_with_delay(0.4, function() error(setmetatable({}, { __tostring = spin })) end, "tostring")
        d:call_with_delay(1.0, function() xpcall(spin, spin) end, "xpcall")
        d:call_with_delay(1.6, function()
          local function f(n) return coroutine.resume(coroutine.create(f), n + 1) end
          log.info("resume chain ended: " .. tostring(select(2, pcall(f, 1)) ~= nil))
        end, "chain")
        return d
    """)
    write_driver(tmp_path, "innocent", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init { name = "innocent" }
        local n = 0
        d:call_on_schedule(0.1, function(drv)
          n = n + 1
          drv:get_device("inn1").status.power = "on " .. n
          log.info("tick")
        end, "tick")
        return d
    """)
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "attacker"
        path = "attacker"
        cpu_limit = 0.3
        max_timers = 2000

        [[drivers.devices]]
        id = "evil1"

        [[drivers]]
        id = "innocent"
        path = "innocent"

        [[drivers.devices]]
        id = "inn1"
    """)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            powers: list[str | None] = []
            sup.status.add_listener(lambda dev, name, value: powers.append(value) if dev == "inn1" else None)
            start = time.time()
            await cap.wait_for("resume chain ended", timeout=6)
            end = time.time()
            assert cap.lines("token leaked: false") and cap.lines("hijack refused: true")
            assert cap.lines("timers accepted: 1997")   # 3 of its timers still pending
            assert len(cap.lines("timer tostring aborted: cpu limit exceeded")) == 1
            assert len(cap.lines("timer xpcall aborted: cpu limit exceeded")) == 1
            assert cap.lines("resume chain ended: true")
            forged = [line for line in cap.lines("FORGED")]
            assert forged and all("\n" not in line and "\x1b" not in line for line in forged)
            assert powers and not [p for p in powers if p and "hijacked" in p]
            assert _max_gap(cap.times("tick"), start + 0.05, end) < 0.35
            assert sup.slots["attacker"].state == "running"
            store = tmp_path / "state" / "attacker" / "datastore.json"
            if store.exists():
                json.loads(store.read_text())

    run(main())
