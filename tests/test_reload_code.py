"""Reload follows the code (issue 13): a real `hubhost run`, real files edited on disk, the
real `hubhost reload` command and SIGHUP. A driver whose Lua files changed restarts with its
datastore; a second driver's timer and TCP connection are untouched; a driver that failed
to start is running after its fix and a reload."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hubproc import HubProcess
from hubutil import write_config, write_driver

EDITED = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local driver = driver_helper.init {
      name = "edited",
      lifecycle = {
        init = function(driver, device)
          local ds = driver.datastore
          ds.boots = (ds.boots or 0) + 1
          ds:save()
          log.info("EDITED-BOOT " .. VERSION .. " boots=" .. ds.boots)
        end,
      },
      functions = {
        version = { handler = function(driver) return { version = VERSION, boots = driver.datastore.boots } end },
      },
    }
    return driver
"""

TICKER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local n = 0
    return driver_helper.init_tcp {
      name = "ticker",
      framing = { delimiter = "\\n" },
      lifecycle = {
        init = function(driver, device)
          log.info("TICKER-BOOT")
          driver:call_on_schedule(0.05, function() n = n + 1; device.status.ticks = n end, "tick")
        end,
      },
      on_receive = function() end,
    }
"""


class Listener:
    """A real TCP peer that counts the connections it accepted."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.accepted = 0
        self.conns: list[socket.socket] = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            self.conns.append(c)

    def close(self) -> None:
        self.sock.close()
        for c in self.conns:
            c.close()


def _config(tmp: Path, port: int) -> Path:
    return write_config(tmp / "hub.toml", f"""
        [[drivers]]
        id = "edited"
        path = "edited"
        [[drivers.devices]]
        id = "e1"

        [[drivers]]
        id = "ticker"
        path = "ticker"
        [[drivers.devices]]
        id = "t1"
        transport = "tcp"
        host = "127.0.0.1"
        port = {port}

        [[drivers]]
        id = "broken"
        path = "broken"
        [[drivers.devices]]
        id = "b1"
    """)


def _cli(state: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("RUNTIME_DIRECTORY", "HUBHOST_CONFIG")}
    return subprocess.run([sys.executable, "-m", "hubhost", *args, "--state-dir", str(state)],
                          capture_output=True, text=True, env=env, timeout=60)


def _wait(pred, timeout: float = 15.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


def test_edit_reload_restarts_changed_driver_only_and_retries_failed(tmp_path: Path) -> None:
    peer = Listener()
    write_driver(tmp_path, "edited", 'local VERSION = "v1"\n' + EDITED)
    write_driver(tmp_path, "ticker", TICKER)
    write_driver(tmp_path, "broken", "local x = = 1\n")
    cfg = _config(tmp_path, peer.port)
    state = tmp_path / "state"
    hub = HubProcess(cfg, state)
    try:
        hub.wait_api()
        hub.wait_for("EDITED-BOOT v1 boots=1")
        _wait(lambda: hub.api("GET", "/api/v1/devices/t1/status")[1].get("ticks", 0) > 3, what="ticks")
        # after its third failure its next try is 4 s away: the fix below lands in between
        _wait(lambda: (lambda b: b["condition"] == "failed" and b["restarts"] >= 3)(
              hub.api("GET", "/api/v1/health")[1]["drivers"]["broken"]), what="broken to fail 3 times")
        assert peer.accepted == 1

        (tmp_path / "edited" / "init.lua").write_text('local VERSION = "v2"\n' + EDITED)
        (tmp_path / "broken" / "init.lua").write_text(
            'return require("driver_helper").init { name = "fixed" }\n')
        ticks_before = hub.api("GET", "/api/v1/devices/t1/status")[1]["ticks"]
        out = _cli(state, "reload")
        assert out.returncode == 0, out.stderr
        assert "restarted: edited, broken" in out.stdout, out.stdout
        assert "edited: code changed (init.lua)" in out.stdout, out.stdout
        assert "broken: code changed (init.lua); was failed: retrying" in out.stdout, out.stdout
        assert "ticker" not in out.stdout, out.stdout

        status, res = hub.api("POST", "/api/v1/exec", {"device": "e1", "function": "version"})
        assert status == 200 and res["result"] == {"version": "v2", "boots": 2}, res   # datastore kept
        _wait(lambda: hub.api("GET", "/api/v1/health")[1]["drivers"]["broken"]["state"] == "running",
              what="the fixed driver to run")
        # the ticker kept its runtime, its timer (its count goes on) and its one connection
        ticks_after = hub.api("GET", "/api/v1/devices/t1/status")[1]["ticks"]
        assert ticks_after >= ticks_before
        time.sleep(0.3)
        assert hub.api("GET", "/api/v1/devices/t1/status")[1]["ticks"] > ticks_after
        assert len(hub.find("TICKER-BOOT")) == 1
        assert peer.accepted == 1
        assert hub.api("GET", "/api/v1/health")[1]["drivers"]["ticker"]["restarts"] == 0

        # a second reload with no changes restarts nothing
        out = _cli(state, "reload")
        assert out.returncode == 0 and "(no driver changes)" in out.stdout, out.stdout

        # an edited module (not init.lua) counts too, and SIGHUP does the same as the command
        (tmp_path / "edited" / "init.lua").write_text('local VERSION = require("ver")\n' + EDITED)
        (tmp_path / "edited" / "ver.lua").write_text('return "v3"\n')
        hub.proc.send_signal(signal.SIGHUP)
        hub.wait_for("EDITED-BOOT v3 boots=3")
        hub.wait_for("[edited] reload: code changed (init.lua, ver.lua)")
        assert len(hub.find("TICKER-BOOT")) == 1 and peer.accepted == 1

        # editing only a spec changes nothing that runs
        (tmp_path / "edited" / "spec").mkdir()
        (tmp_path / "edited" / "spec" / "x_spec.lua").write_text("describe('x', function() end)\n")
        out = _cli(state, "reload")
        assert "(no driver changes)" in out.stdout, out.stdout

        # reload DRIVER: only that one, even unchanged
        out = _cli(state, "reload", "ticker")
        assert out.returncode == 0 and "ticker: named in the reload" in out.stdout, out.stdout
        hub.wait_for("TICKER-BOOT", count=2)
        assert len(hub.find("EDITED-BOOT")) == 3
        out = _cli(state, "reload", "nosuch")
        assert out.returncode == 1 and "nosuch" in out.stderr, out
    finally:
        code, _ = hub.stop()
        peer.close()
    assert code == 0


def test_a_failed_driver_is_retried_by_reload_without_any_change(tmp_path: Path) -> None:
    """No code or config change: the driver failed on its state, the operator fixed that,
    `reload` retries it at once instead of after its backoff."""
    import asyncio
    import json

    from hubhost.api.server import reload_config
    from hubutil import run, running_hub

    write_driver(tmp_path, "picky", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init {
          name = "picky",
          lifecycle = { init = function(driver, device)
            if driver.datastore.broken then error("the stored state is broken") end
            log.info("PICKY-RUNNING")
          end },
        }
    """)
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "picky"
        path = "picky"
        [[drivers.devices]]
        id = "p1"
    """)
    store = tmp_path / "state" / "drivers" / "picky" / "datastore.json"
    store.parent.mkdir(parents=True)
    store.write_text(json.dumps({"broken": True}))

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            deadline = time.monotonic() + 15
            while time.monotonic() < deadline and sup.slots["picky"].restarts < 3:
                await asyncio.sleep(0.05)
            assert sup.slots["picky"].restarts >= 3 and sup.slots["picky"].state != "running"
            store.write_text(json.dumps({"broken": False}))      # next retry is 4 s away
            t0 = time.monotonic()
            report = await reload_config(sup)
            assert report["restarted"] == ["picky"]
            assert report["reasons"] == {"picky": "was failed: retrying"}, report
            await cap.wait_for("PICKY-RUNNING", timeout=3)
            assert sup.slots["picky"].state == "running" and time.monotonic() - t0 < 3

    run(main())
