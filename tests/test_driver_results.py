"""Function results and time-outs, defined (issue 13): `return nil, err` and `error()` reach
the caller as driver_error with the driver's message (and file:line), a call past its
time-out is cancelled in the driver (its handler is never resumed; the driver logs a warning
naming the call), and descriptions reach `check`, the metadata and `interface/` in Redis."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from hubhost.functions import ExecError
from hubutil import run, running_hub, write_config, write_driver

DRIVER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init {
      name = "results",
      functions = {
        busy = { description = "fails the Lua way",
                 handler = function() return nil, "projector busy (warming up)" end },
        boom = { handler = function()
          local x = nil
          error("lamp failure")
        end },
        boom0 = { handler = function() error("no location of its own", 0) end },
        boomt = { handler = function() error({ message = "a table error" }) end },
        ok = { handler = function() return { fine = true } end },
        slow = {
          description = "powers the projector on after a while",
          params = { n = { "Int32", description = "which attempt" } },
          handler = function(driver, device, args)
            driver_helper.sleep(0.4)
            log.info("SLOW-RESUMED " .. args.n)
            device.status.powered = args.n
            return args.n
          end,
        },
      },
    }
"""


def _hub(tmp_path: Path, redis_url: str | None = None) -> Path:
    write_driver(tmp_path, "results", DRIVER)
    redis = f'[redis]\nurl = "{redis_url}"\n' if redis_url else ""
    return write_config(tmp_path / "hub.toml", redis + """
        [[drivers]]
        id = "results"
        path = "results"
        [[drivers.devices]]
        id = "r1"
    """)


def test_errors_and_nil_err_reach_the_caller_as_driver_error(tmp_path: Path) -> None:
    cfg = _hub(tmp_path)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            f = sup.functions
            assert orjson.loads(await f.exec("r1", "ok")) == {"fine": True}
            with pytest.raises(ExecError) as e:
                await f.exec("r1", "busy")
            assert e.value.code == "driver_error"
            assert e.value.message == "busy on 'r1': projector busy (warming up)"
            with pytest.raises(ExecError) as e:
                await f.exec("r1", "boom")
            assert e.value.code == "driver_error"
            assert e.value.message.endswith("results/init.lua:11: lamp failure"), e.value.message
            for fn, text in (("boom0", "no location of its own"), ("boomt", "a table error")):
                with pytest.raises(ExecError) as e:
                    await f.exec("r1", fn)
                assert e.value.code == "driver_error"
                # the driver's own file:line is added when the error carries none
                assert "results/init.lua:" in e.value.message and e.value.message.endswith(text), e.value.message
            # the driver keeps running after each of them
            assert orjson.loads(await f.exec("r1", "ok")) == {"fine": True}

    run(main())


def test_timed_out_call_is_cancelled_in_the_driver(tmp_path: Path) -> None:
    cfg = _hub(tmp_path)

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            f = sup.functions
            t0 = time.monotonic()
            with pytest.raises(ExecError) as e:
                await f.exec("r1", "slow", {"n": 1}, timeout=0.1)
            assert e.value.code == "timeout" and time.monotonic() - t0 < 0.5
            assert "cancelled" in e.value.message
            warn = await cap.wait_for("function slow timed out after 0.1 s: cancelled")
            assert "[results/r1]" in warn[0]
            await asyncio.sleep(0.8)           # well past the handler's sleep
            assert not cap.lines("SLOW-RESUMED 1"), "the cancelled handler was resumed"
            assert sup.status.get("r1", "powered") is None
            # a call that fits its time-out still runs to the end
            assert orjson.loads(await f.exec("r1", "slow", {"n": 2}, timeout=3)) == 2
            assert cap.lines("SLOW-RESUMED 2") and sup.status.get("r1", "powered") == "2"

    run(main())


def test_descriptions_in_check_metadata_and_interface(tmp_path: Path, redis_server) -> None:
    cfg = _hub(tmp_path, redis_server.url)
    out = subprocess.run([sys.executable, "-m", "hubhost", "check", str(tmp_path / "results")],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    doc = orjson.loads(out.stdout)
    assert doc["descriptions"]["slow"] == {"description": "powers the projector on after a while",
                                           "params": {"n": "which attempt"}}
    assert doc["descriptions"]["busy"] == {"description": "fails the Lua way"}

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            iface = sup.functions.interface_of("r1").doc
            assert iface["descriptions"]["slow"]["params"] == {"n": "which attempt"}
            assert iface["functions"]["slow"] == {"n": ["Int32"]}     # the DESIGN format stays
            r = redis_server.client()
            deadline = time.monotonic() + 5
            text = None
            while time.monotonic() < deadline:
                text = r.get("interface/r1")
                if text:
                    break
                await asyncio.sleep(0.05)
            assert text is not None
            assert orjson.loads(text)["descriptions"]["busy"]["description"] == "fails the Lua way"

    run(main())
