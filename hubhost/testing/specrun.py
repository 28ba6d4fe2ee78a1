"""Runs busted-style Lua spec files (`*_spec.lua`) in hubhost's sandbox.

Each pass over a file gets a fresh sandboxed runtime, like a driver instance: `collect`
lists the file's tests (it runs the file and its describe bodies, never tests or hooks);
`run` executes a selection of them in file order with busted's hook semantics and returns
one result per test. Specs `require` the bundled library and their driver's folder: the
folder holding the spec, or its parent when the spec sits in a `spec/` folder.

The only place that knows how a runtime is made is `_new_spec_env`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hubhost import paths
from hubhost.sandbox.sandbox import LuaError, Sandbox, chunkname

# Privileged Lua (full standard library): the capabilities busted gets from the host.
# getinfo returns plain data only, never functions, locals or upvalues.
_CAPABILITIES = b"""
local getinfo, traceback, type = debug.getinfo, debug.traceback, type
local function info(what)
  local i
  if type(what) == "number" then
    if what < 0 then return nil end
    i = getinfo(what + 1, "Sln")
  elseif type(what) == "function" then
    i = getinfo(what, "S")
  end
  if not i then return nil end
  return { source = i.source, short_src = i.short_src, currentline = i.currentline,
           linedefined = i.linedefined, what = i.what, name = i.name, namewhat = i.namewhat }
end
local function tb(msg, level) return traceback(msg, (level or 1) + 1) end
return info, tb
"""

SPEC_SUFFIX = "_spec.lua"


class SpecLoadError(Exception):
    """The spec file itself could not be loaded or its top level failed."""

    def __init__(self, message: str, trace: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.trace = trace


@dataclass(frozen=True)
class SpecTest:
    """One collected test (`it`/`pending`), or a describe whose body failed (error set)."""

    id: str
    name: str
    tags: tuple[str, ...]
    line: int
    pending: bool = False
    error: str | None = None
    trace: str | None = None


@dataclass(frozen=True)
class Outcome:
    """A failure of user code: status is "failure" (luassert), "error" or "pending"."""

    status: str
    message: str | None = None
    trace: str | None = None
    line: int | None = None
    file: str | None = None
    hook: str | None = None
    block: str | None = None


@dataclass(frozen=True)
class SpecResult:
    """A test's result. setup/teardown hold a failing hook around the test, if any."""

    status: str
    message: str | None = None
    trace: str | None = None
    line: int | None = None
    file: str | None = None
    setup: Outcome | None = None
    teardown: Outcome | None = None


def driver_root(spec_path: Path) -> Path:
    """The folder `require` searches: the driver for `<driver>/spec/x_spec.lua`."""
    folder = spec_path.parent
    return folder.parent if folder.name in ("spec", "specs") else folder


def _print(text: str) -> None:
    sys.stdout.write(text + "\n")


def _new_spec_env(spec_path: Path) -> tuple[Sandbox, Any, Callable[[bytes, str, Any], Any]]:
    """A fresh sandboxed runtime for one spec file: (runtime, environment, load_fn).

    load_fn(source, name, env) compiles source text as chunk `@name` bound to env.
    """
    sb = Sandbox(driver_root(spec_path), on_print=_print)
    from hubhost.testing import testkit  # here, not at the top: testkit imports this module

    testkit.install(sb, spec_path)   # `require "hubhost.test"`: the driver test kit
    env = sb.new_env()
    return sb, env, lambda src, name, env: sb.compile(src, name, env)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _int(value: Any) -> int | None:
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def display_name(spec_path: Path) -> str:
    """How Lua names the spec file in messages and tracebacks (its chunk name)."""
    return chunkname(spec_path)[1:].decode("utf-8", "replace")


DEFAULT_TIME_LIMIT = 60.0
"""Seconds one describe body, hook or test may run before it is stopped (wall time spent
running, the sandbox's CPU budget). Lua inside C cannot be interrupted by Python signals,
so without it a runaway spec would hang pytest for good."""


class _Pass:
    """One runtime with busted loaded and the spec chunk compiled in the runner's env."""

    def __init__(self, spec_path: Path, time_limit: float | None) -> None:
        self.path = spec_path
        self.name = display_name(spec_path)
        try:
            source = spec_path.read_bytes()
        except OSError as exc:
            raise SpecLoadError(f"{self.name}: cannot read spec file: {exc.strerror}") from exc
        sb, env, load = _new_spec_env(spec_path)
        self.sb = sb
        lua = sb.lua
        getinfo, traceback = lua.execute(_CAPABILITIES)
        lib = paths.lua_library_dir()
        prefixes = [chunkname(lib / "x")[:-1], b"@" + str(lib).encode() + b"/", b"@hubhost/"]
        opts = lua.table_from({
            b"env": env,
            b"getinfo": getinfo,
            b"traceback": traceback,
            b"internal_prefixes": lua.table_from(prefixes),
        })
        if time_limit:
            opts[b"arm"], opts[b"disarm"] = sb.sb[b"arm"], sb.sb[b"disarm"]
            opts[b"time_limit"] = float(time_limit)
        try:
            busted = env[b"require"](b"busted")
            self.runner = busted[b"new"](opts)
            self.chunk = load(source, self.name, self.runner[b"env"])
        except LuaError as exc:
            raise SpecLoadError(_text(exc.args[0] if exc.args else exc) or str(exc)) from exc

    def call(self, method: bytes, *args: Any) -> Any:
        try:
            return self.runner[method](self.runner, *args)
        except LuaError as exc:  # a bug in the runner itself, not in the spec
            raise SpecLoadError(f"{self.name}: spec runner failed: {_text(exc.args[0])}") from exc


def collect(spec_path: Path, time_limit: float | None = DEFAULT_TIME_LIMIT) -> list[SpecTest]:
    """The tests of a spec file in file order; SpecLoadError if the file cannot load."""
    p = _Pass(spec_path, time_limit)
    out = p.call(b"collect", p.chunk)
    file_error = out[b"file_error"]
    if file_error is not None:
        raise SpecLoadError(_text(file_error[b"message"]) or "error", _text(file_error[b"trace"]))
    tests = []
    for i in range(1, len(out) + 1):
        t = out[i]
        tags = t[b"tags"]
        tests.append(SpecTest(
            id=_text(t[b"id"]) or "",
            name=_text(t[b"name"]) or "",
            tags=tuple(_text(tags[j]) or "" for j in range(1, len(tags) + 1)),
            line=_int(t[b"line"]) or 0,
            pending=bool(t[b"pending"]),
            error=_text(t[b"error"]),
            trace=_text(t[b"trace"]),
        ))
    return tests


def _outcome(t: Any) -> Outcome | None:
    if t is None:
        return None
    return Outcome(
        status=_text(t[b"status"]) or "error",
        message=_text(t[b"message"]),
        trace=_text(t[b"trace"]),
        line=_int(t[b"line"]),
        file=_text(t[b"file"]),
        hook=_text(t[b"hook"]),
        block=_text(t[b"block"]),
    )


def run(spec_path: Path, ids: Sequence[str],
        time_limit: float | None = DEFAULT_TIME_LIMIT) -> dict[str, SpecResult]:
    """Run the given test ids of a spec file in one pass; every id gets a result."""
    p = _Pass(spec_path, time_limit)
    lua = p.sb.lua
    wanted = [i.encode() for i in ids]
    results = p.call(b"run", p.chunk, lua.table_from(wanted))
    out: dict[str, SpecResult] = {}
    for key, tid in zip(wanted, ids):
        r = results[key]
        out[tid] = SpecResult(
            status=_text(r[b"status"]) or "error",
            message=_text(r[b"message"]),
            trace=_text(r[b"trace"]),
            line=_int(r[b"line"]),
            file=_text(r[b"file"]),
            setup=_outcome(r[b"setup"]),
            teardown=_outcome(r[b"teardown"]),
        )
    return out
