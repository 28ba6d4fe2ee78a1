"""Datastore persistence (issue 3): flush when dirty and only then, save() from handlers,
flush after faults and crashes and on SIGTERM, quarantine of bad files, write failures,
device stores of removed devices, `hubhost datastore`. Real supervisor, real files, real
processes."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import orjson
import pytest

from drivers_datastore.kit import BASIC, Hub, Kit, hub_config, text, until, write_driver
from hubhost.state import atomicfile
from hubhost.state.datastore import StoreFile, StoreUnreadable, read_store_file
from hubhost.sandbox.runtime import DeviceInfo

ROOT = Path(__file__).resolve().parent.parent


def driver_cfg(path: Path, *, id: str = "drv", devices: list[str] = (), flush: float = 3600.0) -> dict:
    return {"id": id, "path": str(path), "flush_interval": flush,
            "devices": [{"id": d} for d in devices]}


# -- flushing -----------------------------------------------------------------------------------

def test_periodic_flush_writes_a_dirty_store_and_never_a_clean_one(tmp_path: Path) -> None:
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local driver = driver_helper.init { name = "ticker" }
        local n = 0
        local t
        t = driver:call_on_schedule(0.01, function(d)
          for _ = 1, 10 do
            n = n + 1
            d.datastore.count = n
          end
          if n == 100 then d:cancel_timer(t) end
        end, "tick")
        return driver
    """)
    cfg = hub_config(tmp_path, [driver_cfg(drv, flush=0.15)])

    async def main() -> tuple[int, int, object]:
        async with Hub(cfg, tmp_path / "state") as hub:
            await until(lambda: (hub.stored("drv") or {}).get("count") == 100)
            f = hub.sup.store_files["drv"]
            await asyncio.sleep(0.3)          # let the last write finish its bookkeeping
            settled = f.writes
            await asyncio.sleep(0.6)          # four more flush intervals, nothing changed
            return settled, f.writes, hub.stored("drv")

    settled, later, stored = asyncio.run(main())
    assert stored == {"count": 100}
    assert later == settled                  # a clean store is never written
    assert 1 <= settled < 20                 # flushed on the interval, not per change (100)


def test_save_in_a_handler_returns_after_the_write_reached_the_disk(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local driver = driver_helper.init { name = "saver" }
        local n = 0
        local function tick(d)
          n = n + 1
          d.datastore.n = n
          d.datastore.blob = string.rep("x", 20000 * n)
          local ok, err = d.datastore:save()
          log.info("saved", n, ok, err, d.datastore:is_dirty())
          if n < 5 then d:call_with_delay(0.01, tick, "tick") end
        end
        driver:call_with_delay(0.01, tick, "tick")
        return driver
    """)
    cfg = hub_config(tmp_path, [driver_cfg(drv)])
    state = tmp_path / "state"
    seen: list[tuple[int, str, int | None]] = []

    class OnSaved(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.search(r"saved (\d+) (\S+)", record.getMessage())
            if m:  # runs on the driver thread right after save() returned: read the file now
                data = orjson.loads((state / "drivers" / "drv" / "datastore.json").read_bytes())
                seen.append((int(m.group(1)), record.getMessage(), data.get("n")))

    handler = OnSaved()
    logging.getLogger("hubhost.driver").addHandler(handler)
    try:
        async def main() -> None:
            async with Hub(cfg, state):
                await until(lambda: len(seen) == 5)

        asyncio.run(main())
    finally:
        logging.getLogger("hubhost.driver").removeHandler(handler)
    assert [s[0] for s in seen] == [1, 2, 3, 4, 5]
    for n, message, on_disk in seen:
        assert on_disk == n, message
        assert message.endswith(f"saved {n} true nil false")


def test_a_change_made_while_a_save_is_in_flight_keeps_the_store_dirty(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "state")
    handler = kit.fn("""return function()
        local ds = require("datastore").init()
        ds.a = 1
        local ok, err = ds:save()
        ds.result = nil
        return ok, err
    end""")
    kit.rt.call("saver", handler)
    [(token, what, arg)] = kit.port.waits           # the handler yielded for the write
    assert what == "save"
    seq, data = int(arg[1]), arg[2]
    kit.run('require("datastore").init().b = 2')   # another event changes the store meanwhile
    assert kit.binding.store.write(kit.binding.epoch, seq, data) is True
    kit.rt.resume(token, True)
    assert kit.port.failures == []
    assert orjson.loads(kit.binding.store.path.read_bytes()) == {"a": 1}
    assert kit.binding.is_dirty() is True          # b is not on disk yet
    assert kit.binding.flush_now() is True
    assert orjson.loads(kit.binding.store.path.read_bytes()) == {"a": 1, "b": 2}
    assert kit.binding.is_dirty() is False


def test_an_older_generation_never_overwrites_a_newer_one(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "state")
    kit.run('require("datastore").init().v = 1')
    old = kit.binding.snapshot()
    kit.run('require("datastore").init().v = 2')
    assert kit.binding.flush_now() is True
    assert kit.binding.store.write(kit.binding.epoch, *old) is False   # superseded: skipped
    assert orjson.loads(kit.binding.store.path.read_bytes()) == {"v": 2}


def test_a_handler_fault_flushes_the_store(tmp_path: Path) -> None:
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local driver = driver_helper.init { name = "faulty" }
        driver:call_with_delay(0.05, function(d)
          d.datastore.before_error = true
          error("boom")
        end, "fail")
        return driver
    """)
    cfg = hub_config(tmp_path, [driver_cfg(drv)])    # flush_interval 3600 s

    async def main() -> object:
        async with Hub(cfg, tmp_path / "state") as hub:
            return await until(lambda: hub.stored("drv"), timeout=5)

    assert asyncio.run(main()) == {"before_error": True}


def test_a_driver_crash_flushes_before_the_restart_loads(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init { name = "crashy", lifecycle = {
          init = function(driver, device)
            local ds = driver.datastore
            log.info("boot", ds.boots or 0)
            ds.boots = (ds.boots or 0) + 1
            if ds.boots == 1 then error("init fails on the first boot") end
          end,
        } }
    """)
    cfg = hub_config(tmp_path, [driver_cfg(drv, devices=["dev"])])

    async def main() -> object:
        async with Hub(cfg, tmp_path / "state") as hub:
            await until(lambda: hub.sup.slots["drv"].state == "running" and hub.sup.slots["drv"].restarts == 1,
                        timeout=10)
        return hub.stored("drv")

    stored = asyncio.run(main())
    boots = [r.getMessage() for r in caplog.records if "boot " in r.getMessage()]
    assert [b.split()[-1] for b in boots] == ["0", "1"]   # the restart saw the crashed run's change
    assert stored == {"boots": 2}                            # flushed at shutdown


def test_removed_devices_lose_their_store_after_removed_ran(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init { name = "devices", lifecycle = {
          init = function(driver, device) device.persistent_store.mine = device.id end,
          removed = function(driver, device)
            log.info("removed sees", device.persistent_store.mine)
          end,
        } }
    """)
    state = tmp_path / "state"

    async def run(devices: list[str]) -> object:
        async with Hub(hub_config(tmp_path, [driver_cfg(drv, devices=devices)]), state) as hub:
            pass
        return hub.stored("drv")

    assert asyncio.run(run(["a", "b"])) == {"__a": {"mine": "a"}, "__b": {"mine": "b"}}
    assert asyncio.run(run(["a"])) == {"__a": {"mine": "a"}}
    assert any(r.getMessage().endswith("removed sees b") for r in caplog.records)


def test_sigterm_loses_nothing(tmp_path: Path) -> None:
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local driver = driver_helper.init { name = "counter" }
        local n = 0
        driver:call_on_schedule(0.01, function(d)
          n = n + 1
          d.datastore.count = n
          d.datastore.log = d.datastore.log or {}
          table.insert(d.datastore.log, n)
          log.info("count", n)
        end, "tick")
        return driver
    """)
    (tmp_path / "hub.toml").write_text(textwrap.dedent(f"""
        hub_id = "sigterm"
        flush_interval = 3600
        [[drivers]]
        id = "drv"
        path = "{drv}"
    """))
    state = tmp_path / "state"
    proc = subprocess.Popen([sys.executable, "-m", "hubhost", "run", "--config", str(tmp_path / "hub.toml"),
                             "--state-dir", str(state), "--log-level", "info"],
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    last = 0
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"\[drv\] count (\d+)", line)
            if m:
                last = int(m.group(1))
                if last >= 30:
                    proc.send_signal(signal.SIGTERM)
                    break
        rest = proc.stderr.read()
        for m in re.finditer(r"\[drv\] count (\d+)", rest):
            last = int(m.group(1))   # changes logged after the signal arrived count too
        assert proc.wait(timeout=30) == 0, rest
    finally:
        if proc.poll() is None:
            proc.kill()
    stored = orjson.loads((state / "drivers" / "drv" / "datastore.json").read_bytes())
    assert stored["count"] >= last >= 30
    assert stored["log"] == list(range(1, stored["count"] + 1))


# -- bad files at start -------------------------------------------------------------------------

GOOD = orjson.dumps({"from": "bak", "list": [1, 2], "nested": {"x": {}}})
BAD_FILES = {
    "corrupt": b'{"from": "main", "list": [1, 2}',
    "empty": b"",
    "truncated": orjson.dumps({"from": "main", "big": "x" * 1000})[:500],
    "wrong-type": b'["an", "array"]',
    "garbage": bytes(range(256)),
}


@pytest.mark.parametrize("kind", list(BAD_FILES))
@pytest.mark.parametrize("with_bak", [True, False], ids=["bak", "no-bak"])
def test_bad_file_at_start_is_quarantined_and_the_bak_loaded(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                            kind: str, with_bak: bool) -> None:
    drv = write_driver(tmp_path / "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local driver = driver_helper.init { name = "loader" }
        log.info("loaded from", tostring(driver.datastore.from))
        return driver
    """)
    folder = tmp_path / "state" / "drivers" / "drv"
    folder.mkdir(parents=True)
    (folder / "datastore.json").write_bytes(BAD_FILES[kind])
    if with_bak:
        (folder / "datastore.json.bak").write_bytes(GOOD)
    caplog.set_level(logging.INFO)

    async def main() -> str:
        async with Hub(hub_config(tmp_path, [driver_cfg(drv)]), tmp_path / "state") as hub:
            return hub.sup.slots["drv"].state

    assert asyncio.run(main()) == "running"
    quarantined = list(folder.glob("datastore.json.corrupt-*"))
    assert len(quarantined) == 1
    assert re.fullmatch(r"datastore\.json\.corrupt-\d{8}T\d{6}Z", quarantined[0].name)
    assert quarantined[0].read_bytes() == BAD_FILES[kind]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR and r.name == "hubhost.state.datastore"]
    assert len(errors) == 1 and "datastore.json is unusable" in errors[0].getMessage()
    loaded = [r.getMessage() for r in caplog.records if "loaded from" in r.getMessage()]
    if with_bak:
        assert loaded[-1].endswith("loaded from bak")
        assert (folder / "datastore.json").read_bytes() == GOOD   # put back in place
    else:
        assert loaded[-1].endswith("loaded from nil")
        assert "starting with an empty datastore" in errors[0].getMessage()


def test_values_the_guard_would_refuse_are_dropped_on_load_and_logged(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    deep: object = {}
    for _ in range(101):
        deep = {"d": deep}
    (state / "datastore.json").write_bytes(orjson.dumps(
        {"save": 1, "ok": {"a": None, "b": [1, None, 2]}, "deep": deep, "kept": "\u00e9"}))
    kit = Kit(state)
    assert kit.binding.data()["ok"] == {"b": [1, 2]}
    assert kit.binding.data()["kept"] == "é"
    assert "save" not in kit.binding.data()
    errors = [m for m in kit.logs if "dropped while loading" in m]
    assert len(errors) == 1 and "4 values" in errors[0]
    assert text(kit.run('return type(require("datastore").init().save)')) == "function"


# -- write failures -------------------------------------------------------------------------------

FSIZE_CHILD = r"""
import json, logging, resource, sys, time
sys.path.insert(0, sys.argv[2])
from drivers_datastore.kit import Kit
import hubhost.state.datastore as hd
from pathlib import Path

records = []
class H(logging.Handler):
    def emit(self, r): records.append((r.levelname, r.getMessage()))
logging.getLogger("hubhost.state.datastore").addHandler(H())
logging.getLogger("hubhost.state.datastore").setLevel(logging.INFO)

kit = Kit(Path(sys.argv[1]))
store = kit.binding.store
kit.run('require("datastore").init().small = "old"')
assert kit.binding.flush_now()
old = store.path.read_bytes()
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
kit.run('local ds = require("datastore").init() ds.small = "new" ds.big = string.rep("b", 100000)')
out = {"errors": []}
for attempt in range(3):
    try:
        kit.binding.flush_now()
        out["errors"].append(None)
    except OSError as e:
        out["errors"].append(e.errno)
    out.setdefault("intact", []).append(store.path.read_bytes() == old)
    out.setdefault("dirty", []).append(kit.binding.is_dirty())
out["failing"] = store.failing
out["leftovers"] = sorted(p.name for p in store.folder.iterdir())
resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
out["written"] = kit.binding.flush_now()
out["dirty_after"] = kit.binding.is_dirty()
out["data"] = json.loads(store.path.read_bytes())["small"]
out["records"] = records
print(json.dumps(out))
"""


def test_a_write_failure_keeps_the_old_file_and_the_store_dirty(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", FSIZE_CHILD, str(tmp_path / "state"), str(ROOT / "tests")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    import errno
    assert out["errors"] == [errno.EFBIG] * 3
    assert out["intact"] == [True] * 3 and out["dirty"] == [True] * 3 and out["failing"] is True
    assert out["leftovers"] == ["datastore.json", "datastore.json.bak"] or out["leftovers"] == ["datastore.json"]
    assert out["written"] is True and out["dirty_after"] is False and out["data"] == "new"
    errors = [m for level, m in out["records"] if level == "ERROR"]
    assert len(errors) == 1 and "cannot write" in errors[0] and "file too large" in errors[0]
    assert any("written again after 3 failed attempts" in m for _, m in out["records"])


HUB_FSIZE_CHILD = r"""
import asyncio, json, logging, resource, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
import hubhost.state.datastore as hd
from drivers_datastore.kit import Hub, hub_config, until, write_driver
hd.RETRY_START = 0.05
records = []
class H(logging.Handler):
    def emit(self, r): records.append((r.levelname, r.getMessage()))
logging.getLogger("hubhost.state.datastore").addHandler(H())
tmp = Path(sys.argv[1])
drv = write_driver(tmp / "d", '''
  local driver_helper = require "driver_helper"
  local driver = driver_helper.init { name = "big" }
  driver.datastore.small = "old"
  driver.datastore:save()
  driver:call_with_delay(0.05, function(d) d.datastore.big = string.rep("b", 100000) end, "grow")
  return driver
''')
cfg = hub_config(tmp, [{"id": "drv", "path": str(drv), "flush_interval": 0.05}])
async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    async with Hub(cfg, tmp / "state") as hub:
        f = hub.sup.store_files["drv"]
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
        await until(lambda: f.failures >= 3)
        intact = "big" not in json.loads(f.path.read_bytes())
        resource.setrlimit(resource.RLIMIT_FSIZE, (hard, hard))
        await until(lambda: not f.failing)
        return intact, f.failures
intact, failures = asyncio.run(main())
data = json.loads((tmp / "state/drivers/drv/datastore.json").read_bytes())
print(json.dumps({"intact": intact, "big": len(data.get("big", "")), "records": records}))
"""


def test_the_flusher_retries_a_failed_write_with_backoff_and_logs_once(tmp_path: Path) -> None:
    r = subprocess.run([sys.executable, "-c", HUB_FSIZE_CHILD, str(tmp_path), str(ROOT / "tests")],
                       capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout)
    assert out["intact"] is True and out["big"] == 100000
    errors = [m for level, m in out["records"] if level == "ERROR"]
    assert len(errors) == 1, errors
    assert any("written again after" in m for _, m in out["records"])


# -- hubhost datastore ------------------------------------------------------------------------------

def test_cli_prints_the_store_and_falls_back_to_the_bak(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from hubhost.cli.main import main

    folder = tmp_path / "drivers" / "drv"
    assert main(["datastore", "drv", "--state-dir", str(tmp_path)]) == 1
    assert "no datastore" in capsys.readouterr().err
    folder.mkdir(parents=True)
    (folder / "datastore.json").write_bytes(orjson.dumps({"b": [1, {"c": "é"}], "a": 1}))
    assert main(["datastore", "drv", "--state-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"a": 1, "b": [1, {"c": "é"}]}
    (folder / "datastore.json.bak").write_bytes(b'{"from": "bak"}')
    (folder / "datastore.json").write_bytes(b'{"trunc')
    assert main(["datastore", "drv", "--state-dir", str(tmp_path)]) == 0
    assert json.loads(capsys.readouterr().out) == {"from": "bak"}
    assert (folder / "datastore.json").read_bytes() == b'{"trunc'   # read-only: nothing moved
    (folder / "datastore.json.bak").write_bytes(b"")
    with pytest.raises(StoreUnreadable):
        read_store_file(folder)


def test_reading_while_the_store_is_being_written_always_sees_a_whole_file(tmp_path: Path) -> None:
    kit = Kit(tmp_path / "state")
    bump = kit.fn('return function(i) local ds = require("datastore").init() ds.i = i ds.pad = string.rep("p", 50000 + i) end')
    stop = threading.Event()
    reads: list[int] = []

    def reader() -> None:
        while not stop.is_set():
            try:
                reads.append(read_store_file(kit.binding.store.folder)["i"])
            except StoreUnreadable:
                pass

    t = threading.Thread(target=reader)
    t.start()
    try:
        for i in range(40):
            bump(i)
            kit.binding.flush_now()
    finally:
        stop.set()
        t.join()
    assert reads and reads == sorted(reads)


def test_store_file_quarantine_names_are_unique(tmp_path: Path) -> None:
    f = StoreFile(tmp_path, "x")
    for _ in range(3):
        (tmp_path / "datastore.json").write_bytes(b"{")
        assert f.load() is None
    assert len(list(tmp_path.glob("datastore.json.corrupt-*"))) == 3


def test_atomic_write_keeps_the_previous_generation_as_bak(tmp_path: Path) -> None:
    p = tmp_path / "datastore.json"
    atomicfile.write_atomic(p, b'{"v":1}', backup=True)
    atomicfile.write_atomic(p, b'{"v":2}', backup=True)
    assert p.read_bytes() == b'{"v":2}'
    assert (tmp_path / "datastore.json.bak").read_bytes() == b'{"v":1}'
    assert sorted(x.name for x in tmp_path.iterdir()) == ["datastore.json", "datastore.json.bak"]
    _ = os, time, BASIC, DeviceInfo


def test_hand_edited_json_loads_with_escapes_whitespace_and_number_forms(tmp_path: Path) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "datastore.json").write_bytes(
        b' {\n "s" : "\\u00e9\\ud83d\\ude00\\/\\n\\u0000\\"\\\\\\t\\b\\f\\r" ,\t"k\\u00e9y":1E2,\r\n'
        b' "n": [ -0 , 1.5e-3, 12345678901234567890, 0.1 ], "t": true, "f": false, "e": {}, "a": [] }\n')
    kit = Kit(state)
    out = text(kit.run(r"""
        local ds = require("datastore").init()
        return table.concat({
          tostring(ds.s == "\195\169\240\159\152\128/\n\0\"\\\t\b\f\r"),
          tostring(ds["k\195\169y"] == 100), tostring(ds.t), tostring(ds.f),
          tostring(next(ds.e) == nil and next(ds.a) == nil),
          tostring(ds.n[2] == 0.0015 and ds.n[3] == 12345678901234567890 and ds.n[4] == 0.1),
        }, " ")"""))
    assert out == "true true true false true true"
    out = text(kit.run('local ds = require("datastore").init() '
                       'return string.format("%d %s %s", #ds.n, tostring(1 / ds.n[1]), ds.s:sub(1, 2))'))
    assert out == "4 -inf é"
