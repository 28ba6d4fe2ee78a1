"""Helpers for the datastore tests: real runtimes on real files, Lua run as driver code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hubhost.state.datastore import DatastoreBinding
from hubhost.sandbox.runtime import DriverRuntime

HERE = Path(__file__).resolve().parent
BASIC = HERE / "basic"
PREFIX = "Data store keys and values must be JSON encodable: "

# Deterministic text of a Lua value (tables by sorted keys, strings in hex, numbers %.17g,
# `m` marks a table that has a metatable). Runs as driver code, so it sees nodes through
# the sandbox's pairs/getmetatable exactly as drivers do.
DUMP = b"""
local function hex(s) return (s:gsub(".", function(c) return string.format("%02x", c:byte()) end)) end
local function key(k)
  if type(k) == "string" then return "s:" .. hex(k) end
  if type(k) == "number" then return "n:" .. string.format("%.17g", k) end
  return type(k) .. ":" .. tostring(k)
end
local function dump(v, path)
  local t = type(v)
  if t == "string" then return "s:" .. hex(v) end
  if t == "number" then return "n:" .. string.format("%.17g", v) end
  if t == "boolean" then return "b:" .. tostring(v) end
  if t ~= "table" then return t end
  path = path or {}
  if path[v] then return "cycle" end
  path[v] = true
  local items = {}
  for k, x in pairs(v) do items[#items + 1] = key(k) .. "=" .. dump(x, path) end
  path[v] = nil
  table.sort(items)
  local mt = getmetatable(v)
  return (mt ~= nil and mt ~= false and "m" or "") .. "{" .. table.concat(items, ",") .. "}"
end
return dump
"""


class NullPort:
    """A port for runtimes used without the supervisor: waits are recorded, not served."""

    def __init__(self) -> None:
        self.waits: list[tuple[int, str, Any]] = []
        self.failures: list[tuple[str, str, str]] = []

    def timer_start(self, *a: Any) -> None: ...
    def timer_cancel(self, *a: Any) -> None: ...
    def wait_timer(self, *a: Any) -> None: ...

    def wait_host(self, rt: DriverRuntime, token: int, what: str, arg: Any) -> None:
        self.waits.append((token, what, arg))

    def handler_failed(self, rt: DriverRuntime, label: str, kind: str, message: str) -> None:
        self.failures.append((label, kind, message))


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


class Kit:
    """One driver runtime with a datastore bound to `state` (or no file). `printed` holds
    what the driver printed, `logs` every record its logger got."""

    _n = 0

    def __init__(self, state: Path | None, driver: Path = BASIC, *, load: bool = True) -> None:
        Kit._n += 1
        self.port = NullPort()
        self.handler = _Collect()
        self.logger = logging.getLogger(f"hubhost.test.datastore.{Kit._n}")
        self.logger.setLevel(logging.DEBUG)
        self.logger.addHandler(self.handler)
        self.rt = DriverRuntime("ds-test", driver, self.port, logger=self.logger)
        self.binding = DatastoreBinding(self.rt, state)
        if load:
            self.rt.load()
        self.env = self.rt.sandbox.new_env()
        self.env.dump = self.rt.sandbox.run(DUMP, "dump")

    @property
    def printed(self) -> list[str]:
        prefix = "[ds-test] "
        return [r.getMessage()[len(prefix):] for r in self.handler.records
                if r.levelno == logging.INFO and r.getMessage().startswith(prefix)]

    @property
    def logs(self) -> list[str]:
        return [r.getMessage() for r in self.handler.records]

    def run(self, src: str, *args: Any) -> Any:
        """Run `src` as driver code (interpreted, sandboxed); `...` are args."""
        fn = self.rt.sandbox.compile(src.encode(), "test", self.env)
        return fn(*args)

    def fn(self, src: str) -> Any:
        """A Lua function from driver-code source `return function(...) ... end`."""
        return self.run(src)


def text(v: Any) -> str:
    return v.decode() if isinstance(v, bytes) else str(v)


# -- a real supervisor with the datastore installed, run in-process --------------------------

def hub_config(tmp: Path, drivers: list[dict[str, Any]], **top: Any) -> Any:
    """A HubConfig from [[drivers]] tables (paths may be absolute)."""
    from hubhost import config

    return config.parse({"hub_id": "ds-test", **top, "drivers": drivers}, base=tmp)


class Hub:
    """A Supervisor without the API or the mirror, on the running asyncio loop (its drivers'
    datastores live in their workers; the files are the supervisor's: `sup.store_files`)."""

    def __init__(self, cfg: Any, state: Path) -> None:
        from hubhost.supervisor.supervisor import Supervisor

        self.sup = Supervisor(cfg, state)

    async def __aenter__(self) -> "Hub":
        await self.sup.start()
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.sup.stop()

    def file(self, driver_id: str) -> Path:
        return self.sup.slots[driver_id].state_dir / "datastore.json"

    def stored(self, driver_id: str) -> Any:
        import orjson

        try:
            return orjson.loads(self.file(driver_id).read_bytes())
        except FileNotFoundError:
            return None


async def until(cond: Any, timeout: float = 10.0, step: float = 0.02) -> Any:
    """Poll `cond()` on the loop until it is truthy (returns it) or fail after `timeout`."""
    import asyncio
    import time

    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout} s")
        await asyncio.sleep(step)


def write_driver(folder: Path, body: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "init.lua").write_text(body)
    return folder


# -- the crash-safety child ---------------------------------------------------------------------

CRASHLOOP = HERE / "crashloop"


def generation(i: int) -> dict[str, Any]:
    """The store of crashloop/init.lua after its i-th change (what its i-th save writes)."""
    d: dict[str, Any] = {"n": i, "payload": chr(97 + i % 26) * (1000 + (i * 7919) % 30000),
                         "list": [i, i * 2, {"half": i / 2}], "flag": i % 2 == 0}
    if i % 3 == 0:
        d["extra"] = {"tag": f"x{i}"}
    return d


def crash_child(state: str, conn: Any) -> None:
    """Run the crashloop driver under a real supervisor until killed; report ("loaded", n)
    and ("saved", i) through `conn` (i is sent after ds:save() returned)."""
    import asyncio
    import re

    class Forward(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            m = re.search(r"\[crash\] (loaded|saved) (\d+)", record.getMessage())
            if m:
                conn.send((m.group(1), int(m.group(2))))

    log = logging.getLogger("hubhost.driver")
    log.setLevel(logging.INFO)
    log.addHandler(Forward())
    cfg = hub_config(Path(state), [{"id": "crash", "path": str(CRASHLOOP), "flush_interval": 3600}])

    async def main() -> None:
        async with Hub(cfg, Path(state)):
            await asyncio.sleep(3600)

    asyncio.run(main())
