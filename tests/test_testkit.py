"""The driver test kit from Python: its virtual clock, its restart (which must really go
through the disk), how kit failures show in pytest, and `hubhost test` as an author runs
it. The kit's Lua API is covered by tests/lua/kitdriver/spec/testkit_spec.lua and the
bundled drivers' specs, which run through the plugin with the rest of the suite."""

from __future__ import annotations

import gc
import glob
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import orjson
import pytest

from hubhost.testing import specrun, testkit
from hubhost.testing.testkit import KitDevice, KitDriver, KitError, VirtualClock

pytest_plugins = ["pytester"]

ROOT = Path(__file__).resolve().parent.parent
KITDRIVER = ROOT / "tests" / "lua" / "kitdriver"


# -- the virtual clock ------------------------------------------------------------------------

def test_clock_runs_events_by_due_time_then_arrival_and_only_when_asked() -> None:
    clock = VirtualClock()
    ran: list[tuple[str, float]] = []

    def note(name: str) -> None:
        ran.append((name, clock.now))

    clock.call_later(2, note, "b")
    clock.call_later(1, note, "a")
    clock.call_later(2, note, "c")
    dropped = clock.call_later(1.5, note, "cancelled")
    dropped.cancel()
    clock.post(note, "now")
    assert ran == []
    clock.settle()
    assert ran == [("now", 0.0)]
    clock.run_until(1.9)
    assert ran[1:] == [("a", 1.0)] and clock.now == 1.9
    clock.run_until(5)
    assert ran[2:] == [("b", 2.0), ("c", 2.0)] and clock.now == 5.0


def test_clock_events_may_schedule_more_and_stop_early() -> None:
    clock = VirtualClock()
    ran: list[float] = []

    def tick() -> None:
        ran.append(clock.now)
        if len(ran) < 5:
            clock.call_later(1, tick)

    clock.call_later(1, tick)
    assert clock.run_until(100, stop=lambda: len(ran) == 3) is True
    assert ran == [1.0, 2.0, 3.0] and clock.now == 3.0     # time stops where the condition held
    assert clock.run_until(100) is False
    assert ran == [1.0, 2.0, 3.0, 4.0, 5.0] and clock.now == 100.0


def test_clock_refuses_a_loop_that_never_lets_time_pass(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(testkit, "MAX_EVENTS", 1000)
    clock = VirtualClock()

    def again() -> None:
        clock.post(again)

    clock.post(again)
    with pytest.raises(KitError, match="more than 1000 events ran in one kit call"):
        clock.settle()


def test_request_futures_resolve_through_the_clock() -> None:
    clock = VirtualClock()
    fut = clock.create_future()
    seen: list[Any] = []
    fut.add_done_callback(lambda f: seen.append(f.result()))
    fut.set_result((b"x", None))
    assert seen == []            # like asyncio: callbacks run later, as events
    clock.settle()
    assert seen == [(b"x", None)]
    with pytest.raises(RuntimeError):
        fut.set_result((b"y", None))


# -- restart goes through the disk --------------------------------------------------------

def _kit(tmp_path: Path, **kw: Any) -> KitDriver:
    return KitDriver(KITDRIVER, tmp_path, driver_id="kit", devices=[KitDevice("dev1", "dev1")], **kw)


def _exec(h: KitDriver, fn: str, args: Any = None) -> Any:
    return h.wait_call(h.exec_start("dev1", fn, args, "administrator"))


def test_restart_loads_what_is_on_disk_not_the_live_table(tmp_path: Path) -> None:
    h = _kit(tmp_path)
    _exec(h, "remember", {"key": "k", "value": "in memory"})
    h.stop()                                  # shutdown handler, then a real flush
    file = h.state_dir / "datastore.json"
    on_disk = orjson.loads(file.read_bytes())
    assert on_disk["k"] == "in memory" and on_disk["shutdowns"] == 1
    # change the file behind the kit's back: the next runtime must see the file's content
    on_disk["k"] = "edited on disk"
    file.write_bytes(orjson.dumps(on_disk))
    h.restart()
    assert _exec(h, "recall", {"key": "k"}) == "edited on disk"
    assert h.binding is not None and h.binding.data()["k"] == "edited on disk"


def test_restart_flushes_for_real_and_power_loss_loses_unwritten_changes(tmp_path: Path) -> None:
    h = _kit(tmp_path)
    _exec(h, "remember", {"key": "a", "value": 1})
    assert not (h.state_dir / "datastore.json").exists()
    old_rt = h.rt
    h.restart()
    assert h.rt is not old_rt                 # a new runtime (a new Lua state), not a reset
    assert orjson.loads((h.state_dir / "datastore.json").read_bytes())["a"] == 1
    _exec(h, "remember", {"key": "b", "value": 2})
    h.restart(power_loss=True)
    assert _exec(h, "recall", {"key": "a"}) == 1
    assert _exec(h, "recall", {"key": "b"}) is None


def test_restart_after_a_corrupt_file_uses_the_backup_and_logs_it(tmp_path: Path) -> None:
    h = _kit(tmp_path)
    _exec(h, "remember", {"key": "k", "value": "first"})
    h.restart()                               # generation 1 on disk
    _exec(h, "remember", {"key": "k", "value": "second"})
    h.stop()                                  # generation 2; generation 1 is the .bak
    (h.state_dir / "datastore.json").write_bytes(b'{"k": "trunc')
    h.restart()
    assert _exec(h, "recall", {"key": "k"}) == "first"
    assert any(r["level"] == "error" and "is unusable" in r["message"] for r in h.capture.records)
    assert glob.glob(str(h.state_dir / "datastore.json.corrupt-*"))


def test_kit_state_dirs_are_thrown_away(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # the kit's folders go to a temp dir of this test's own: other runs on the machine make
    # hubhost-spec-* folders of their own in /tmp, which must not count here
    import tempfile

    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    before = set(glob.glob(os.path.join(str(tmp_path), "hubhost-spec-*")))
    spec = KITDRIVER / "spec" / "testkit_spec.lua"
    ids = [t.id for t in specrun.collect(spec) if "restart" in t.id]
    results = specrun.run(spec, ids)
    assert {r.status for r in results.values()} == {"success"}, results
    gc.collect()
    after = set(glob.glob(os.path.join(str(tmp_path), "hubhost-spec-*")))
    assert after <= before


# -- kit failures in pytest's report ------------------------------------------------------

def _driver(pytester: pytest.Pytester, init: str, spec: str) -> None:
    (pytester.path / "drv" / "spec").mkdir(parents=True)
    (pytester.path / "drv" / "init.lua").write_text(textwrap.dedent(init).lstrip("\n"))
    (pytester.path / "drv" / "spec" / "drv_spec.lua").write_text(textwrap.dedent(spec).lstrip("\n"))


SIMPLE = """
    local driver_helper = require "driver_helper"
    return driver_helper.init_tcp {
      name = "simple",
      framing = { delimiter = "\\n" },
      on_receive = function(driver, device, frame)
        if frame == "bad" then local x = nil; return x.field end
        device.status.last = frame
      end,
      functions = { ok = { params = {}, handler = function() return true end } },
    }
"""


def test_failures_name_the_spec_line_and_the_driver_line(pytester: pytest.Pytester) -> None:
    _driver(pytester, SIMPLE, """
        local test = require "hubhost.test"
        describe("simple", function()
          local h
          before_each(function() h = test.load_driver("..", { devices = { { id = "d" } } }) end)
          it("feeds an unknown device", function()
            h:feed("nope", "x\\n")
          end)
          it("breaks on_receive", function()
            h:feed("d", "bad\\n")
          end)
          it("sees the status", function()
            h:feed("d", "good\\n")
            assert.are.equal("good", h:status("d", "last"))
          end)
          it("fails an assertion on a copy", function()
            assert.are.same({ connected = false }, h:status("d"))
          end)
        end)
    """)
    result = pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=3)
    out = result.stdout.str()
    assert "drv_spec.lua:6: no device 'nope' in this driver (devices: d)" in out
    assert "handler on_receive [d] failed: " in out and "init.lua:6: attempt to index local 'x'" in out
    assert "drv_spec.lua:16: Expected objects to be the same." in out


def test_a_driver_that_does_not_load_fails_with_its_file_and_line(pytester: pytest.Pytester) -> None:
    _driver(pytester, """
        local driver_helper = require "driver_helper"
        local oops = nil
        return driver_helper.init { name = oops.name }
    """, """
        local test = require "hubhost.test"
        it("loads", function() test.load_driver("..") end)
    """)
    result = pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    assert "did not load: " in result.stdout.str()
    assert "init.lua:3: attempt to index local 'oops'" in result.stdout.str()


def test_hubhost_test_from_a_driver_folder(tmp_path: Path) -> None:
    """An author's session: no Python, no config, just `hubhost test` in the folder."""
    drv = tmp_path / "lamp"
    (drv / "spec").mkdir(parents=True)
    (drv / "init.lua").write_text(textwrap.dedent(SIMPLE))
    (drv / "spec" / "lamp_spec.lua").write_text(textwrap.dedent("""
        local test = require "hubhost.test"
        describe("lamp", function()
          it("passes", function()
            local h = test.load_driver("..", { devices = { { id = "d" } } })
            assert.is_true(h:exec("d", "ok"))
          end)
          it("fails", function() assert.are.equal(1, 2) end)
        end)
    """).lstrip("\n"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTEST_")}

    def hubhost_test(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "hubhost", "test", "-p", "no:cacheprovider",
                               "-p", "no:hypothesispytest", *args],
                              cwd=drv, env=env, capture_output=True, text=True, timeout=60)

    r = hubhost_test()
    assert r.returncode == 1, r.stdout + r.stderr
    assert "1 failed, 1 passed" in r.stdout
    assert "spec/lamp_spec.lua:7: Expected objects to be equal." in r.stdout
    assert "Warning" not in r.stdout + r.stderr
    r = hubhost_test("-k", "passes", "-q")
    assert r.returncode == 0 and "1 passed, 1 deselected" in r.stdout, r.stdout + r.stderr
    (drv / "spec" / "lamp_spec.lua").unlink()
    r = hubhost_test()
    assert r.returncode == 5 and "no specs found" in r.stderr


def test_the_guides_complete_example_passes(tmp_path: Path) -> None:
    """docs/driver-guide.md's example driver and spec, extracted and run as written."""
    guide = (ROOT / "docs" / "driver-guide.md").read_text()
    blocks = re.findall(r"```lua\n-- file: (\S+)\n(.*?)```", guide, re.S)
    assert {name for name, _ in blocks} == {"lamp/init.lua", "lamp/spec/lamp_spec.lua"}
    for name, src in blocks:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(src)
    spec = tmp_path / "lamp" / "spec" / "lamp_spec.lua"
    tests = specrun.collect(spec)
    assert len(tests) == 5
    results = specrun.run(spec, [t.id for t in tests])
    failed = {k: (r.message, r.trace) for k, r in results.items() if r.status != "success"}
    assert not failed


def test_the_kit_is_for_specs_only(tmp_path: Path) -> None:
    """A driver that requires hubhost.test gets a clear refusal, not a kit."""
    from hubhost.cli.check import check_driver

    drv = tmp_path / "sneaky"
    drv.mkdir()
    (drv / "init.lua").write_text(textwrap.dedent("""
        local test = require "hubhost.test"
        test.load_driver("..")
        return require("driver_helper").init { name = "sneaky" }
    """))
    ok, report = check_driver(drv)
    assert not ok
    assert "hubhost.test works in specs run by hubhost's pytest plugin" in report
    assert "init.lua:3:" in report


def test_pattern_framing_and_cpu_limits_work_in_the_kit(pytester: pytest.Pytester) -> None:
    _driver(pytester, """
        local driver_helper = require "driver_helper"
        return driver_helper.init_udp {
          name = "stx",
          -- frames are STX <len byte> <payload>; bytes before STX are noise
          framing = { pattern = function(buf)
            local start = buf:find("\\2", 1, true)
            if not start then return nil, "" end
            local n = buf:byte(start + 1)
            if not n or #buf < start + 1 + n then return nil, buf:sub(start) end
            return buf:sub(start + 2, start + 1 + n), buf:sub(start + 2 + n)
          end },
          on_receive = function(driver, device, frame)
            if frame == "spin" then while true do end end
            device.status.last = frame
          end,
          functions = { spin = { params = {}, handler = function() while true do end end } },
        }
    """, """
        local test = require "hubhost.test"
        describe("stx", function()
          local h
          before_each(function()
            h = test.load_driver("..", { devices = { { id = "d" } }, config = { cpu_limit = 0.05 } })
          end)
          it("frames through the driver's pattern function", function()
            h:feed("d", "xx\\2\\3ab")
            assert.is_nil(h:status("d", "last"))
            h:feed("d", "c\\2\\1z")
            assert.are.equal("z", h:status("d", "last"))
          end)
          it("aborts a handler at its CPU limit", function()
            local ok, err = pcall(h.feed, h, "d", "\\2\\4spin")
            assert.is_false(ok)
            assert.matches("handler on_receive %[d%] failed: cpu limit exceeded", err)
            assert.are.equal("cpu", h:errors()[1].kind)
            assert.has_error(function() h:exec("d", "spin") end)
            h:feed("d", "\\2\\2ok")
            assert.are.equal("ok", h:status("d", "last"))
          end)
        end)
    """)
    result = pytester.runpytest("-p", "no:hypothesispytest", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=2)
