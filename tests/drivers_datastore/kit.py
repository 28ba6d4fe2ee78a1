"""Helpers for the datastore tests: real runtimes on real files, Lua run as driver code."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from hubhost.datastore import DatastoreBinding
from hubhost.runtime import DriverRuntime

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
