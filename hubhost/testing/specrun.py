"""Runs busted-style Lua spec files (`*_spec.lua`) in hubhost's sandbox.

Each run of a file gets a fresh sandboxed runtime, like a driver instance, and executes the
file as busted does: the file body, then every describe body when its turn comes, with the
hooks around each test. `run_file` without ids runs everything and lists the tests in
execution order (this is also how pytest collects a file); with ids it runs only those,
like busted's --filter. A file that fails to load is one failing result, never an
exception. Specs `require` the bundled library and their driver's folder (`driver_root`),
and see the spec environment of specenv.lua on top of the driver sandbox.

The only place that knows how a runtime is made is `_new_spec_env`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubhost import paths
from hubhost.sandbox.sandbox import LuaError, Sandbox, chunkname, read_source

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
    """A test's result. setup/teardown hold a failing hook around the test, if any; output
    is what the spec printed while it ran (pytest's captured output of the item)."""

    status: str
    message: str | None = None
    trace: str | None = None
    line: int | None = None
    file: str | None = None
    setup: Outcome | None = None
    teardown: Outcome | None = None
    output: str = ""


@dataclass(frozen=True)
class FileRun:
    """One busted-style run of a spec file: its tests in execution order and their results.

    load_error is set when the file itself failed to load (syntax error, error at its top
    level): busted reports that as one error for the file and runs the other files, so it
    is one failing item named `file_item`, never an exception."""

    path: Path
    tests: list[SpecTest]
    results: dict[str, SpecResult]
    load_error: SpecResult | None = None
    output: str = ""
    file_item: str = field(default="")


SPEC_DIR_NAMES = ("spec", "specs")


def driver_root(spec_path: Path) -> Path:
    """The folder `require` searches for a spec: the nearest folder up from the spec that
    holds `init.lua` (a driver), else the folder above the nearest `spec/` (a library),
    else the spec's own folder. So `drv/spec/features/x_spec.lua` resolves modules from
    `drv` like `drv/spec/x_spec.lua` does."""
    folder = spec_path.parent
    for d in (folder, *folder.parents):
        if (d / "init.lua").is_file():
            return d
        if d.name in SPEC_DIR_NAMES:
            return d.parent
        if (d / ".git").exists():
            break
    return folder


def test_dir(spec_path: Path, root: Path) -> Path | None:
    """The folder of test code around a spec: the top folder below the root that holds it
    (`drv/spec` for `drv/spec/features/x_spec.lua`); None for a spec in the root itself."""
    try:
        rel = spec_path.resolve().parent.relative_to(root)
    except ValueError:
        return None
    return root / rel.parts[0] if rel.parts else None




class _SpecHost:
    """The host side of specenv.lua for one spec runtime: files of the driver folder
    (read-only, nothing outside it) and the captured output."""

    def __init__(self, sb: Sandbox, spec_path: Path) -> None:
        self.sb = sb
        self.root = driver_root(spec_path).resolve()
        self.tests = test_dir(spec_path, self.root)
        self.out: list[str] = []

    def _inside(self, path: bytes) -> tuple[Path | None, str]:
        """The real path of a spec's file argument inside the driver folder, or a reason."""
        text = path.decode("utf-8", "replace")
        p = Path(text)
        real = (p if p.is_absolute() else self.root / p).resolve()
        if not real.is_relative_to(self.root):
            return None, (f"{text}: outside the driver folder {self.root} "
                          "(specs may read files of their driver only)")
        if not real.is_file():
            return None, f"{text}: No such file or directory"
        return real, ""

    def _is_test(self, real: Path) -> bool:
        if real.name.endswith(SPEC_SUFFIX):
            return True
        return self.tests is not None and real.is_relative_to(self.tests)

    def read_bytes(self, path: bytes) -> tuple[bytes | None, bytes | None]:
        real, why = self._inside(path)
        if real is None:
            return None, why.encode()
        try:
            return real.read_bytes(), None
        except OSError as exc:
            return None, f"{path.decode('utf-8', 'replace')}: {exc.strerror}".encode()

    def read_source(self, path: bytes) -> tuple[bytes | None, bytes]:
        real, why = self._inside(path)
        if real is None:
            return None, f"cannot open {why}".encode()
        return read_source(real), chunkname(real)

    def _candidates(self, name: bytes, path: bytes) -> list[tuple[str, Path | None]]:
        """(shown template, real file or None when outside the folder) per path entry."""
        rel = name.decode("utf-8", "replace").replace(".", "/")
        out: list[tuple[str, Path | None]] = []
        for template in path.decode("utf-8", "replace").split(";"):
            if not template or "?" not in template:
                continue
            filled = template.replace("?", rel)
            p = Path(filled)
            real = (p if p.is_absolute() else self.root / p).resolve()
            out.append((filled, real if real.is_relative_to(self.root) else None))
        return out

    def search_path(self, name: bytes, path: bytes) -> tuple[Any, bytes, bool]:
        tried = []
        for shown, real in self._candidates(name, path):
            if real is None:
                continue   # edits of package.path that point outside the driver: ignored
            if real.is_file():
                return read_source(real), chunkname(real), self._is_test(real)
            tried.append(f"\n\tno file '{shown}'")
        return None, "".join(tried).encode(), False

    def searchpath(self, name: bytes, path: bytes) -> tuple[bytes | None, bytes | None]:
        tried = []
        for shown, real in self._candidates(name, path):
            if real is not None and real.is_file():
                return shown.encode(), None
            tried.append(f"\n\tno file '{shown}'")
        return None, "".join(tried).encode()

    def in_library(self, name: bytes) -> bool:
        text = name.decode("utf-8", "replace")
        if not re.match(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$", text):
            return False
        rel = Path(*text.split("."))
        lib = self.sb.lib_dir
        return (lib / rel.with_suffix(".lua")).is_file() or (lib / rel / "init.lua").is_file()

    def write(self, text: bytes) -> None:
        self.out.append(text.decode("utf-8", "replace"))

    def print_line(self, text: str) -> None:
        self.out.append(text + "\n")

    def take_output(self) -> bytes:
        text = "".join(self.out)
        self.out.clear()
        return text.encode()


class _LazyKit:
    """The driver test kit's host side, made when a spec first uses it: importing it (the
    supervisor's parts, asyncio) was a third of `hubhost test`'s start-up, and most spec
    files of libraries never load a driver."""

    def __init__(self, sb: Sandbox, spec_path: Path) -> None:
        self.sb, self.spec_path = sb, spec_path
        self.kit: Any = None
        sb.expose(testkit_load=self.load, testkit_op=self.op)
        caps = sb.lua.table()
        caps[b"testkit"] = sb.lua.table_from({b"load": sb.host[b"testkit_load"], b"op": sb.host[b"testkit_op"]})
        sb.sb.set_library_caps(caps)

    def _kit(self) -> Any:
        if self.kit is None:
            from hubhost.testing import testkit  # here: testkit imports this module

            self.kit = testkit.install(self.sb, self.spec_path)
        return self.kit

    def load(self, *args: Any) -> Any:
        return self._kit().load(*args)

    def op(self, *args: Any) -> Any:
        return self._kit().op(*args)


_SPECENV = Path(__file__).resolve().parent / "specenv.lua"


def _new_spec_env(spec_path: Path) -> tuple[Sandbox, Any, Callable[[bytes, str, Any], Any], _SpecHost, Any]:
    """A fresh sandboxed runtime for one spec file: (runtime, driver environment, load_fn,
    host, spec environment module). load_fn(source, name, env) compiles source text as
    chunk `@name` bound to env."""
    holder: list[_SpecHost] = []
    sb = Sandbox(driver_root(spec_path), on_print=lambda text: holder[0].print_line(text))
    host = _SpecHost(sb, spec_path)
    holder.append(host)
    _LazyKit(sb, spec_path)   # `require "hubhost.test"`: the driver test kit, on first use
    env = sb.new_env()
    sb.expose(spec_read_bytes=host.read_bytes, spec_read_source=host.read_source,
              spec_search_path=host.search_path, spec_searchpath=host.searchpath,
              spec_in_library=host.in_library, spec_write=host.write)
    caps = sb.lua.table_from({
        b"read_bytes": sb.host[b"spec_read_bytes"], b"read_source": sb.host[b"spec_read_source"],
        b"search_path": sb.host[b"spec_search_path"], b"searchpath": sb.host[b"spec_searchpath"],
        b"in_library": sb.host[b"spec_in_library"], b"write": sb.host[b"spec_write"],
    })
    loader = sb.lua.eval(b"function(s, n) local f, e = loadstring(s, n) return f, e end")
    fn, err = loader(_SPECENV.read_bytes(), b"@hubhost/testing/specenv.lua")
    if fn is None:
        raise LuaError(err.decode())
    specenv = fn(caps, sb.sb, env)
    return sb, env, lambda src, name, env: sb.compile(src, name, env), host, specenv


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


def _result(r: Any) -> SpecResult:
    return SpecResult(
        status=_text(r[b"status"]) or "error",
        message=_text(r[b"message"]),
        trace=_text(r[b"trace"]),
        line=_int(r[b"line"]),
        file=_text(r[b"file"]),
        setup=_outcome(r[b"setup"]),
        teardown=_outcome(r[b"teardown"]),
        output=_text(r[b"output"]) or "",
    )


_LOCATION = re.compile(r"^(?P<file>[^\n]*?):(?P<line>\d+): ")


def _load_failure(message: str, trace: str | None = None, output: str = "") -> SpecResult:
    m = _LOCATION.match(message)
    return SpecResult(status="error", message=message, trace=trace,
                      line=int(m["line"]) if m else None, file=m["file"] if m else None,
                      output=output)


def run_file(spec_path: Path, ids: Sequence[str] | None = None,
             time_limit: float | None = DEFAULT_TIME_LIMIT) -> FileRun:
    """Run a spec file as busted does: all of it (ids None) or the given test ids only."""
    name = display_name(spec_path)
    item = spec_path.name
    try:
        source = spec_path.read_bytes()
    except OSError as exc:
        return FileRun(spec_path, [], {}, _load_failure(f"{name}: cannot read spec file: {exc.strerror}"),
                       file_item=item)
    try:
        sb, env, load, host, specenv = _new_spec_env(spec_path)
    except LuaError as exc:
        return FileRun(spec_path, [], {}, _load_failure(f"{name}: cannot start the spec runtime: {_text(exc.args[0])}"),
                       file_item=item)
    lua = sb.lua
    getinfo, traceback = lua.execute(_CAPABILITIES)
    lib = paths.lua_library_dir()
    prefixes = [chunkname(lib / "x")[:-1], b"@" + str(lib).encode() + b"/", b"@hubhost/"]
    opts = lua.table_from({
        b"env": env,
        b"getinfo": getinfo,
        b"traceback": traceback,
        b"internal_prefixes": lua.table_from(prefixes),
        b"globals": specenv[b"globals"],
        b"take_output": sb._wrap(host.take_output),
    })
    if time_limit:
        opts[b"arm"], opts[b"disarm"] = sb.sb[b"arm"], sb.sb[b"disarm"]
        opts[b"time_limit"] = float(time_limit)
    try:
        busted = env[b"require"](b"busted")
        runner = busted[b"new"](opts)
        specenv[b"bind"](runner[b"env"])
    except LuaError as exc:
        return FileRun(spec_path, [], {}, _load_failure(f"{name}: spec runner failed: {_text(exc.args[0])}"),
                       file_item=item)
    try:
        chunk = load(source, name, runner[b"env"])
    except LuaError as exc:   # a syntax error: the file's one failing item
        return FileRun(spec_path, [], {}, _load_failure(_text(exc.args[0]) or str(exc)), file_item=item)
    wanted = None if ids is None else lua.table_from([i.encode() for i in ids])
    try:
        out = runner[b"run"](runner, chunk, wanted)
    except LuaError as exc:   # a bug in the runner itself, not in the spec
        return FileRun(spec_path, [], {}, _load_failure(f"{name}: spec runner failed: {_text(exc.args[0])}"),
                       file_item=item)
    fe = out[b"file_error"]
    trailing = _text(out[b"output"]) or ""
    if fe is not None:
        return FileRun(spec_path, [], {}, _load_failure(_text(fe[b"message"]) or "error", _text(fe[b"trace"]),
                                                        trailing), file_item=item)
    tests = []
    listing = out[b"listing"]
    for i in range(1, len(listing) + 1):
        t = listing[i]
        tags = t[b"tags"]
        tests.append(SpecTest(
            id=_text(t[b"id"]) or "",
            name=_text(t[b"name"]) or "",
            tags=tuple(_text(tags[j]) or "" for j in range(1, len(tags) + 1)),
            line=_int(t[b"line"]) or 0,
            pending=bool(t[b"pending"]),
            error=_text(t[b"error"]),
        ))
    results = {(_text(k) or ""): _result(v) for k, v in out[b"results"].items()}
    return FileRun(spec_path, tests, results, None, trailing, file_item=item)


def collect(spec_path: Path, time_limit: float | None = DEFAULT_TIME_LIMIT) -> list[SpecTest]:
    """The tests of a spec file in execution order; SpecLoadError if the file cannot load."""
    fr = run_file(spec_path, None, time_limit)
    if fr.load_error is not None:
        raise SpecLoadError(fr.load_error.message or "error", fr.load_error.trace)
    return fr.tests


def run(spec_path: Path, ids: Sequence[str],
        time_limit: float | None = DEFAULT_TIME_LIMIT) -> dict[str, SpecResult]:
    """Run the given test ids of a spec file in one pass; every id gets a result."""
    fr = run_file(spec_path, ids, time_limit)
    if fr.load_error is not None:
        return {i: fr.load_error for i in ids}
    return {i: fr.results[i] for i in ids}
