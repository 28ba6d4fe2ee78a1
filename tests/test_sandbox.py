"""Sandbox escape suite: each attempt must fail with a clean Lua error (a string message,
not a Python exception object) and leave the runtime healthy."""

from __future__ import annotations

from pathlib import Path

import pytest

from hubhost.cli.check import _NullPort
from hubhost.sandbox.runtime import DriverRuntime
from hubhost.sandbox.sandbox import LuaError, Sandbox


@pytest.fixture
def sb(tmp_path: Path) -> Sandbox:
    """The sandbox of a real driver runtime (so the bundled library has its host glue)."""
    (tmp_path / "mod").mkdir()
    (tmp_path / "mod" / "ok.lua").write_text("return { answer = 42 }")
    (tmp_path / "init.lua").write_text("return require('driver_helper').init { name = 't' }")
    rt = DriverRuntime("t", tmp_path, _NullPort())
    rt.load()
    return rt.sandbox


def healthy(sb: Sandbox) -> None:
    assert sb.run("return 1 + 1") == 2
    assert sb.run("return require('mod.ok').answer") == 42


# Each entry: (name, Lua code that must raise, substring the error must contain)
RAISING = [
    ("python global", "return python.eval('1')", "attempt to index global 'python'"),
    ("require python", "return require 'python'", "not available"),
    ("python builtins via registry", "return debug.getregistry()", "attempt to call field 'getregistry'"),
    ("string.dump", "return string.dump(function() end)", "attempt to call field 'dump'"),
    ("string.dump via method", "return ('').dump(print)", "attempt to call field 'dump'"),
    ("string metatable", "return getmetatable('').__index.dump", "attempt to index a boolean value"),
    ("setmetatable on string", "return setmetatable('', {})", "table expected, got string"),
    ("require ffi", "return require 'ffi'", "module 'ffi' is not available"),
    ("require jit", "return require 'jit'", "module 'jit' is not available"),
    ("require debug", "return require 'debug'", "module 'debug' is not available"),
    ("require io", "return require 'io'", "module 'io' is not available"),
    ("require os", "return require 'os'", "module 'os' is not available"),
    ("require C module path", "return require 'socket.core'", "not found"),
    ("require with ..", "return require '../../etc/passwd'", "dotted Lua identifiers"),
    ("require absolute", "return require '/etc/passwd'", "dotted Lua identifiers"),
    ("require dots", "return require 'mod..ok'", "dotted Lua identifiers"),
    ("require non-string", "return require(io)", "string expected"),
    ("package.loadlib", "return package.loadlib('libc.so.6', 'system')", "attempt to index global 'package'"),
    ("getfenv", "return getfenv(0)", "attempt to call global 'getfenv'"),
    ("setfenv", "return setfenv(1, {})", "attempt to call global 'setfenv'"),
    ("io.open", "return io.open('/etc/passwd')", "attempt to index global 'io'"),
    ("io.popen", "return io.popen('id')", "attempt to index global 'io'"),
    ("os.execute", "return os.execute('id')", "attempt to call field 'execute'"),
    ("os.exit", "return os.exit(1)", "attempt to call field 'exit'"),
    ("os.getenv", "return os.getenv('HOME')", "attempt to call field 'getenv'"),
    ("os.remove", "return os.remove('/tmp/x')", "attempt to call field 'remove'"),
    ("dofile", "return dofile('/etc/passwd')", "attempt to call global 'dofile'"),
    ("loadfile", "return loadfile('/etc/passwd')", "attempt to call global 'loadfile'"),
    ("collectgarbage stop", "return collectgarbage('stop')", "not allowed in the sandbox"),
    ("collectgarbage setpause", "return collectgarbage('setpause', 0)", "not allowed in the sandbox"),
    ("collectgarbage full collect", "return collectgarbage()", "collectgarbage('collect') is not allowed"),
    ("jit global", "return jit.off()", "attempt to index global 'jit'"),
    ("debug.sethook", "return debug.sethook()", "attempt to call field 'sethook'"),
    ("debug.getupvalue", "return debug.getupvalue(require, 1)", "attempt to call field 'getupvalue'"),
    ("debug.getinfo", "return debug.getinfo(1)", "attempt to call field 'getinfo'"),
    ("newproxy", "return newproxy(true)", "attempt to call global 'newproxy'"),
    ("binary chunk via load", "return assert(load('\\27LJ\\2\\0'))", "binary chunk"),
    ("binary chunk via loadstring", "return assert(loadstring('\\27LuaQ'))", "binary chunk"),
    ("binary chunk via reader", "local done = false\n"
     "return assert(load(function() if done then return nil end done = true return '\\27LJ' end))",
     "binary chunk"),
    ("load with binary mode", "return assert(load('return 1', 'x', 'b'))", "mode is 'b'"),
    ("os.date bad conversion", "return os.date('%Ez')", "unsupported conversion"),
    ("table.new", "return require 'table.new'", "not available"),
    ("string.buffer", "return require 'string.buffer'", "not available"),
]


@pytest.mark.parametrize("name,code,expected", RAISING, ids=[r[0] for r in RAISING])
def test_escape_attempt_fails_cleanly(sb: Sandbox, name: str, code: str, expected: str) -> None:
    with pytest.raises(LuaError) as exc:
        sb.run(code, name="escape")
    assert expected in str(exc.value)
    healthy(sb)


def test_caught_errors_are_strings_not_python_objects(sb: Sandbox) -> None:
    # a host function that raises: its error reaches Lua as a string
    def boom(*args):
        raise ValueError("host refused")

    sb.expose(boom=boom)
    f = sb.lua.eval(b"function(host) local ok, e = pcall(host.boom) return ok, type(e), e end")
    ok, kind, msg = f(sb.host)
    assert ok is False and kind == b"string" and b"host refused" in msg
    # errors raised by the sandbox itself
    r = sb.run("local ok, e = pcall(require, 'ffi') return type(e)")
    assert r == b"string"


def test_no_python_object_is_reachable_from_driver_code(sb: Sandbox) -> None:
    """Walk everything reachable from a driver environment (values, keys, metatables,
    library modules); no userdata (Python objects arrive as userdata) may be found, and
    dunder lookups on everything reachable yield nothing."""
    found = sb.run("""
        local seen, bad, n = {}, {}, 0
        local dh = require 'driver_helper'
        local log = require 'log'
        local function walk(v, path)
          if seen[v] then return end
          local t = type(v)
          if t == 'userdata' or t == 'thread' then bad[#bad + 1] = path return end
          if t ~= 'table' and t ~= 'function' then return end
          seen[v] = true
          n = n + 1
          if t == 'table' then
            for k, x in pairs(v) do walk(k, path .. '.<key>') walk(x, path .. '.' .. tostring(k)) end
            local mt = getmetatable(v)
            if mt ~= nil then walk(mt, path .. '.<mt>') end
            for _, dunder in ipairs({'__class__', '__dict__', '__globals__', '__builtins__', '__subclasses__'}) do
              if rawget(v, dunder) ~= nil then bad[#bad + 1] = path .. '.' .. dunder end
            end
          end
        end
        walk(_G, '_G') walk(dh, 'driver_helper') walk(log, 'log')
        walk(getmetatable(''), 'string_mt')
        return table.concat(bad, ','), n
    """)
    bad, count = found
    assert bad == b""
    assert count > 20


def test_globals_of_one_driver_are_invisible_to_another(tmp_path: Path) -> None:
    (tmp_path / "init.lua").write_text("return {}")
    a, b = Sandbox(tmp_path), Sandbox(tmp_path)
    a.run("secret = 'a-secret'; string.find = nil; table.insert = nil")
    assert b.run("return secret") is None
    assert b.run("return ('abc'):find('b')") == (2, 2)
    assert b.run("local t = {} table.insert(t, 1) return #t") == 1
    # within one runtime, envs are separate too: a library module does not see driver globals
    env1, env2 = a.new_env(), a.new_env()
    a.run("x = 1", env=env1)
    assert a.run("return x", env=env2) is None
    # and a driver replacing its own string table does not change the shared string methods
    assert a.run("return ('abc'):find('c')") == (3, 3)


def test_load_runs_in_the_callers_sandbox(sb: Sandbox) -> None:
    assert sb.run("return load('return io')()") is None
    assert sb.run("return load('return debug.getinfo')()") is None
    assert sb.run("return load('return x', 'chunk', 't', { x = 5 })()") == 5
    assert sb.run("return loadstring('return 1 + 2')()") == 3


def test_collectgarbage_count_and_bit_and_string_library_work(sb: Sandbox) -> None:
    assert sb.run("return type(collectgarbage('count'))") == b"number"
    assert sb.run("return bit.band(0xff, 0x0f)") == 15
    assert sb.run("return ('%d-%s'):format(3, 'x')") == b"3-x"
    assert sb.run("return #('abc'):rep(3)") == 9


def test_library_tables_are_per_environment_copies(sb: Sandbox) -> None:
    sb.run("string.upper = function() return 'pwned' end")
    # the library's log module still has the real functions; other envs unaffected
    assert sb.run("return ('x'):upper()", env=sb.new_env()) == b"X"


def test_bytes_pass_unchanged(sb: Sandbox) -> None:
    everything = bytes(range(256))
    f = sb.run("return function(s) return s, #s end")
    out, n = f(everything)
    assert out == everything and n == 256
