"""Driver life cycle, timers, coroutine sleep, fault isolation and restart backoff."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from hubutil import run, running_hub, write_config, write_driver

LIFECYCLE = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init {
      name = "lc",
      lifecycle = {
        added = function(driver, device) log.info("EV added", device.id, device.label) end,
        init = function(driver, device) log.info("EV init", device.id, device.config.color) end,
        removed = function(driver, device) log.info("EV removed", device.id) end,
        shutdown = function(driver) log.info("EV shutdown") end,
      },
    }
"""


def _config(tmp_path: Path, devices: list[str]) -> Path:
    devs = "".join(f"""
        [[drivers.devices]]
        id = "{d}"
        label = "Label {d}"
        config = {{ color = "red-{d}" }}
    """ for d in devices)
    return write_config(tmp_path / "hub.toml", f"""
        [[drivers]]
        id = "lc"
        path = "lc"
    """ + devs)


def test_lifecycle_order_across_restarts(tmp_path: Path) -> None:
    write_driver(tmp_path, "lc", LIFECYCLE)
    state = tmp_path / "state"

    async def start(devices: list[str]) -> list[str]:
        cfg = _config(tmp_path, devices)
        async with running_hub(cfg, state) as (sup, cap):
            pass
        return [line.split("] ", 1)[1] for line in cap.lines("EV ")]

    first = run(start(["a", "b"]))
    assert first == ["EV added a Label a", "EV init a red-a", "EV added b Label b", "EV init b red-b",
                     "EV shutdown"]
    # second start: devices are known, so no `added`
    second = run(start(["a", "b"]))
    assert second == ["EV init a red-a", "EV init b red-b", "EV shutdown"]
    # b left the config: `removed` once, before the remaining devices start; c is new
    third = run(start(["a", "c"]))
    assert third == ["EV removed b", "EV init a red-a", "EV added c Label c", "EV init c red-c", "EV shutdown"]
    fourth = run(start(["a", "c"]))
    assert "EV removed b" not in fourth


TIMERS = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local d = driver_helper.init { name = "timers" }
    local n = 0
    local sched
    sched = d:call_on_schedule(0.1, function(driver)
      n = n + 1
      log.info("EV sched", n)
      if n == 3 then driver:cancel_timer(sched) end
    end, "sched")
    local once = d:call_with_delay(0.15, function() log.info("EV once") end, "once")
    local cancelled = d:call_with_delay(0.2, function() log.info("EV must not run") end)
    log.info("EV cancel returned", tostring(d:cancel_timer(cancelled)), tostring(d:cancel_timer(cancelled)))
    for _, bad in ipairs({ {0}, {-1}, {"1"}, {0/0}, {math.huge}, {1, "notfn"}, {1, function() end, 5} }) do
      local ok, err = pcall(function() d:call_with_delay(bad[1], bad[2] or function() end, bad[3]) end)
      log.info("EV bad", tostring(ok), err)
      ok, err = pcall(function() d:call_on_schedule(bad[1], bad[2] or function() end, bad[3]) end)
      log.info("EV bad", tostring(ok), err)
    end
    local ok, err = pcall(d.cancel_timer, d, 42)
    log.info("EV badcancel", tostring(ok), err)
    return d
"""


def test_timers_cancel_and_bad_arguments(tmp_path: Path) -> None:
    write_driver(tmp_path, "timers", TIMERS)
    cfg = write_config(tmp_path / "hub.toml", '[[drivers]]\nid = "t"\npath = "timers"\n')

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await asyncio.sleep(0.8)
            lines = [line.split("] ", 1)[1] for line in cap.lines("EV ")]
            assert [x for x in lines if x.startswith("EV sched")] == ["EV sched 1", "EV sched 2", "EV sched 3"]
            assert "EV once" in lines
            assert "EV must not run" not in lines
            assert "EV cancel returned true false" in lines
            bad = [x for x in lines if x.startswith("EV bad ")]
            assert len(bad) == 14 and all(x.startswith("EV bad false") for x in bad)
            joined = "\n".join(bad)
            assert "seconds must be positive and finite, got 0" in joined
            assert "seconds must be positive and finite, got -1" in joined
            assert "seconds must be a number, got string" in joined
            assert "seconds must be a number, got nan" in joined
            assert "seconds must be positive and finite, got inf" in joined
            assert "callback must be a function, got string" in joined
            assert "name must be a string or nil, got number" in joined
            assert "init.lua:" in joined  # errors point at the driver's own line
            assert any("expected a timer returned by call_with_delay" in x for x in lines)

    run(main())


SLEEPER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local d = driver_helper.init { name = "sleeper" }
    d:call_with_delay(0.05, function()
      log.info("EV A start")
      driver_helper.sleep(0.3)
      log.info("EV A end")
    end, "a")
    d:call_with_delay(0.1, function() log.info("EV B runs while A sleeps") end, "b")
    d:call_with_delay(0.05, function()
      local ok, err = pcall(driver_helper.sleep, -1)
      log.info("EV badsleep", err)
    end)
    local ok, err = pcall(driver_helper.sleep, 1)
    log.info("EV chunk sleep", err)
    return d
"""


def test_sleep_yields_the_handler_only(tmp_path: Path) -> None:
    write_driver(tmp_path, "sleeper", SLEEPER)
    cfg = write_config(tmp_path / "hub.toml", '[[drivers]]\nid = "s"\npath = "sleeper"\n')

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("EV A end", timeout=3)
            order = [line.split("] ", 1)[1] for line in cap.lines("EV ")]
            assert order.index("EV A start") < order.index("EV B runs while A sleeps") < order.index("EV A end")
            t0, t1 = cap.times("EV A start")[0], cap.times("EV A end")[0]
            assert 0.28 <= t1 - t0 < 0.8
            assert any("seconds must be a non-negative number" in x for x in cap.lines("EV badsleep"))
            assert any("can only be called from a handler" in x for x in cap.lines("EV chunk sleep"))

    run(main())


def test_handler_error_is_logged_with_traceback_and_driver_goes_on(tmp_path: Path) -> None:
    write_driver(tmp_path, "bad", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local helpers = require "helpers"
        local d = driver_helper.init { name = "bad" }
        d:call_with_delay(0.05, function() helpers.explode() end, "boom")
        d:call_with_delay(0.2, function() log.info("EV still here") end)
        return d
    """, **{"helpers.lua": """
        local M = {}
        function M.explode()
          local t = nil
          return t.field
        end
        return M
    """})
    cfg = write_config(tmp_path / "hub.toml", '[[drivers]]\nid = "bad"\npath = "bad"\n')

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("EV still here", timeout=3)
            err = "\n".join(cap.errors())
            assert "handler timer boom failed" in err
            assert "helpers.lua:5: attempt to index local 't' (a nil value)" in err
            assert "init.lua:6" in err  # the traceback reaches the driver's own frame
            assert sup.slots["bad"].state == "running"

    run(main())


@pytest.mark.parametrize("where", ["chunk", "init"])
def test_crash_in_entry_chunk_or_init_restarts_with_backoff(tmp_path: Path, where: str) -> None:
    body = "error('broken on purpose')" if where == "chunk" else ""
    init = "error('init broke')" if where == "init" else ""
    write_driver(tmp_path, "crashy", f"""
        local driver_helper = require "driver_helper"
        local log = require "log"
        log.info("EV boot")
        {body}
        return driver_helper.init {{
          name = "crashy",
          lifecycle = {{ init = function(driver, device) {init} end }},
        }}
    """)
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "crashy"
        path = "crashy"
        [[drivers.devices]]
        id = "d1"
    """)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("EV boot", timeout=9, count=3)
            boots = cap.times("EV boot")
            gaps = [b - a for a, b in zip(boots, boots[1:])]
            # 1 s, then 2 s between attempts (exponential backoff)
            assert 0.9 <= gaps[0] < 1.9, gaps
            assert 1.9 <= gaps[1] < 3.2, gaps
            crash_lines = cap.lines("driver crashed")
            assert "restarting in 1 s" in crash_lines[0] and "restarting in 2 s" in crash_lines[1]
            what = "broken on purpose" if where == "chunk" else "init [d1] handler failed"
            assert what in crash_lines[0]
            assert "init.lua:" in crash_lines[0]
            # the third attempt fails too and waits out its backoff (its "EV boot" line is
            # logged while it is still starting: wait for the crash that follows)
            for _ in range(200):
                if sup.slots["crashy"].state == "restarting":
                    break
                await asyncio.sleep(0.01)
            assert sup.slots["crashy"].state == "restarting"

    run(main())
