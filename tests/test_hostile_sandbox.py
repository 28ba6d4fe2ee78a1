"""Hostile drivers against the Lua runtime itself (issue 11, items 3-4).

Driver code is untrusted, and so is every value it makes: host code must never run a
driver's metamethod, __tostring or message handler with the CPU budget disarmed, never let
driver code obtain or forge the host's private wait token, never nest C calls until the C
stack overflows, and must cap what one driver can make the host hold.

Each attack runs in a subprocess (`isolated`): a regression shows up as a crash (SIGSEGV)
or a timeout of that subprocess, never as a dead or hanging pytest.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

PRELUDE = r'''
import json, logging, sys, time, threading
from pathlib import Path
from hubhost.sandbox.runtime import DeviceInfo, DriverLoadError, DriverRuntime

class Port:
    def __init__(self):
        self.timers, self.sleeps, self.host_waits, self.failed = {}, [], [], []
    def timer_start(self, rt, tid, seconds, periodic): self.timers[tid] = (seconds, periodic)
    def timer_cancel(self, rt, tid): self.timers.pop(tid, None)
    def wait_timer(self, rt, token, seconds): self.sleeps.append(token)
    def wait_host(self, rt, token, what, arg): self.host_waits.append((token, what))
    def handler_failed(self, rt, label, kind, message): self.failed.append([label, kind, message])

class Records(logging.Handler):
    def __init__(self):
        super().__init__()
        self.lines = []
    def emit(self, record):
        self.lines.append(self.format(record))

records = Records()
records.setFormatter(logging.Formatter("%(message)s"))
logging.getLogger("hubhost").addHandler(records)
logging.getLogger("hubhost").setLevel(logging.DEBUG)
logging.getLogger("hubhost").propagate = False

DIR = Path(sys.argv[1])
out = {}

def runtime(init_src, devices=(), cpu_limit=0.3, **kw):
    DIR.mkdir(parents=True, exist_ok=True)
    (DIR / "init.lua").write_text(init_src)
    port = Port()
    rt = DriverRuntime("hostile", DIR, port, cpu_limit=cpu_limit, **kw)
    rt.load()
    rt.test_env = rt.sandbox.new_env()   # one environment for a test's handlers and get()
    for d in devices:
        rt.start_device(DeviceInfo(id=d), True)
    return rt, port

PLAIN = 'return require("driver_helper").init { name = "plain" }'

def handler(rt, src, *args):
    """Run `src` (a chunk returning a function) as one handler; returns its run time."""
    fn = rt.sandbox.run(src, env=rt.test_env)
    t = time.monotonic()
    rt.call("attack", fn, *args)
    return time.monotonic() - t

def get(rt, name):
    """A global that the test's handlers set."""
    return rt.sandbox.run("return " + name, env=rt.test_env)

def timed(f, *a):
    t = time.monotonic()
    try:
        r = ("ok", f(*a))
    except Exception as e:
        r = ("error", type(e).__name__ + ": " + str(e))
    return r, time.monotonic() - t
'''


def isolated(tmp_path: Path, body: str, timeout: float = 60) -> dict:
    """Run PRELUDE + body in a fresh interpreter; return its `out` dict."""
    script = PRELUDE + textwrap.dedent(body) + "\nprint('RESULT ' + json.dumps(out, default=str))\n"
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        p = subprocess.run([sys.executable, "-c", script, str(tmp_path / "drv")], env=env,
                           capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the attack did not end within {timeout} s (an unbudgeted loop?)")
    assert p.returncode == 0, f"subprocess died with {p.returncode} (negative: a signal)\n{p.stderr[-3000:]}"
    lines = [line for line in p.stdout.splitlines() if line.startswith("RESULT ")]
    assert lines, p.stdout[-2000:] + p.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT "):])


SPIN = "function() while true do end end"


# -- 1. driver tables are read raw or under the budget ---------------------------------------

def test_driver_table_traps_do_not_reach_the_host(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        rt, port = runtime("""
          local driver_helper = require "driver_helper"
          local d = driver_helper.init {{
            name = "trapped",
            framing = {{ delimiter = "\\\\r" }},
            lifecycle = {{ init = function(d, dev) dev.status.seen = true end }},
          }}
          -- every read of a missing field through the driver's metatable would spin
          rawset(d, "name", nil)
          getmetatable(d).__index = {SPIN}
          rawset(d, "on_receive", nil)
          setmetatable(d.lifecycle, {{ __index = {SPIN} }})
          setmetatable(d.framing, {{ __index = {SPIN}, __pairs = {SPIN} }})
          return d
        """, devices=["d1"])
        t = time.monotonic()
        out["name"] = rt.driver_name()
        out["metadata"] = rt.metadata()
        out["framing_keys"] = sorted(k.decode() for k in rt.framing().keys())
        rt.start_device(DeviceInfo(id="d2"), True)     # added / init looked up raw
        rt.remove_device(DeviceInfo(id="d2"))          # removed: missing, looked up raw
        rt.shutdown()                                  # shutdown: missing, looked up raw
        out["seconds"] = time.monotonic() - t
        out["status"] = rt.status.get("d1", "seen")
        out["failed"] = port.failed
    ''')
    assert out["name"] == "trapped"
    assert out["metadata"]["functions"] == {}
    assert out["framing_keys"] == ["delimiter"]
    assert out["status"] == "true"
    assert out["seconds"] < 1.0, "the host ran the driver's __index with no budget"
    assert out["failed"] == []


def test_implements_with_a_spinning_len(tmp_path: Path) -> None:
    """Assigned after init it is never read (the interface comes from the template); in the
    template or a hand-made driver table it is read under the entry chunk's budget."""
    out = isolated(tmp_path, f'''
        t = time.monotonic()
        rt, port = runtime("""
              local d = require("driver_helper").init {{ name = "x", implements = {{ "A" }} }}
              d.implements = setmetatable({{ "X" }}, {{ __len = {SPIN} }})
              d.requirements = setmetatable({{}}, {{ __index = {SPIN} }})
              return d""")
        text, _ = rt.R.caps.functions_api.metadata_json(rt.R.driver())
        out["after_init"] = [rt.metadata()["implements"], json.loads(text.decode())["implements"],
                             time.monotonic() - t]
        for answer in ("1, then 1e15", "1e15"):
            t = time.monotonic()
            r = timed(runtime, """
              local calls = 0
              local len = function() calls = calls + 1 return (calls == 1 and FIRST) or 1e15 end
              return require("driver_helper").init {{
                name = "x", implements = setmetatable({{ "X" }}, {{ __len = len }}) }}
              """.replace("FIRST", "1" if answer.startswith("1,") else "1e15"))
            out["len " + answer] = [r[0][0], r[0][1] if r[0][0] == "error" else None, r[1]]
        for where, src in {{
            "in the template": """
              return require("driver_helper").init {{
                name = "x", implements = setmetatable({{ "X" }}, {{ __len = {SPIN} }}) }}""",
            "a hand-made driver table": """
              require "driver_helper"
              return setmetatable({{}}, {{ __index = {SPIN} }})""",
        }}.items():
            def load():
                runtime(src, cpu_limit=0.3)
            out[where] = timed(load)
    ''')
    md_implements, interface_implements, seconds = out.pop("after_init")
    assert md_implements == ["A"] and interface_implements == ["A"] and seconds < 0.5
    # a __len that answers 1 to the check and 1e15 later: `#` is read once, never looped on
    assert out.pop("len 1, then 1e15")[0] == "ok"
    kind, msg, seconds = out.pop("len 1e15")
    assert kind == "error" and "template.implements[2] must be a string, got nil" in msg and seconds < 2
    for where, ((kind, msg), seconds) in out.items():
        assert kind == "error" and "DriverLoadError" in msg and "cpu limit exceeded" in msg, (where, msg)
        assert seconds < 2.0, where


def test_functions_and_params_traps_and_hostile_results(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        rt, port = runtime("""
          local spin = {SPIN}
          local fns = setmetatable({{
            ok = {{ handler = function() return setmetatable({{ a = 1 }}, {{ __index = spin, __len = spin,
                                                                         __tostring = spin }}) end }},
            bad = {{ handler = function() error(setmetatable({{}}, {{ __tostring = spin }})) end }},
          }}, {{ __index = spin }})
          return require("driver_helper").init {{ name = "f", functions = fns }}
        """, devices=["d1"], cpu_limit=0.3)
        done = {{}}
        rt.sandbox.expose(fn_done=lambda cid, ok, payload: done.__setitem__(cid, [ok, payload.decode()]))
        api = rt.R.caps.functions_api
        t = time.monotonic()
        text, timeouts = api.metadata_json(rt.R.driver())
        out["interface"] = json.loads(text.decode())
        out["metadata_seconds"] = time.monotonic() - t
        for cid, name in ((1, b"ok"), (2, b"bad"), (3, b"missing")):
            t = time.monotonic()
            rt.call("function", api.invoke, rt.R.driver(), b"d1", name, rt.lua.table(), cid)
            out[name.decode()] = [done.get(cid), time.monotonic() - t]
        out["failed"] = port.failed
    ''')
    assert sorted(out["interface"]["functions"]) == ["bad", "ok"]
    assert out["metadata_seconds"] < 1.0
    assert out["ok"][0] == [True, '{"a":1}']            # encoded raw, no metamethod ran
    assert out["bad"][0][0] is False and "cpu limit exceeded" in out["bad"][0][1]
    assert out["bad"][1] < 2.0
    # a missing function: driver.functions[name] runs the driver's __index, budgeted
    assert out["missing"][1] < 2.0
    kinds = [f[1] for f in out["failed"]]
    assert kinds.count("cpu") == 2, out["failed"]


# -- 2. error objects and message handlers run under the budget ------------------------------

@pytest.mark.parametrize("attack", [
    f"error(setmetatable({{}}, {{ __tostring = {SPIN} }}))",
    f"xpcall({SPIN}, {SPIN})",
    f"xpcall(function() error('x') end, {SPIN})",
    f"xpcall(function() error(setmetatable({{}}, {{ __tostring = {SPIN} }})) end, function(m) return tostring(m) end)",
    f"local ok, e = pcall(error, setmetatable({{}}, {{ __tostring = {SPIN} }})) error(e)",
    f"print(setmetatable({{}}, {{ __tostring = {SPIN} }}))",
    f"local log = require 'log' log.info(setmetatable({{}}, {{ __tostring = {SPIN} }}))",
], ids=["error-object", "xpcall-spin-spin", "xpcall-error-spin", "xpcall-tostring", "rethrow",
        "print", "log"])
def test_error_objects_and_handlers_are_budgeted(tmp_path: Path, attack: str) -> None:
    out = isolated(tmp_path, f'''
        rt, port = runtime(PLAIN, cpu_limit=0.3)
        out["seconds"] = handler(rt, """return function() {attack} end""")
        out["failed"] = port.failed
        out["after"] = rt.sandbox.run("return 1 + 1")
    ''')
    assert out["seconds"] < 1.5, "ran past the budget"
    assert [f[1] for f in out["failed"]] == ["cpu"], out["failed"]
    assert out["after"] == 2


def test_entry_chunk_error_object_is_budgeted(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        out["load"] = timed(runtime, "error(setmetatable({{}}, {{ __tostring = {SPIN} }}))")
    ''')
    (kind, msg), seconds = out["load"]
    assert kind == "error" and "cpu limit exceeded" in msg and seconds < 2.0


def test_error_objects_with_tostring_are_reported_as_text(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN)
        handler(rt, """return function()
          error(setmetatable({}, { __tostring = function() return "custom\\\\nerror" end }))
        end""")
        handler(rt, "return function() error({}) end")
        handler(rt, "return function() error() end")
        out["failed"] = port.failed
    ''')
    msgs = [f[2] for f in out["failed"]]
    assert msgs[0] == "custom\\nerror"                       # escaped: one log line
    assert msgs[1].startswith("table: ")
    assert msgs[2] == "(error object is a nil value: nil)"


# -- 3. the private wait token cannot be obtained, host requests cannot be forged ------------

def test_wait_token_never_reaches_driver_code(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN)
        handler(rt, """return function()
          local driver_helper = require "driver_helper"
          local co = coroutine.create(function() driver_helper.sleep(0) return "slept" end)
          local ok, w = coroutine.resume(co)   -- the wait passes through to the host
          _G.got = { ok, w, type(w), coroutine.status(co) }
          -- a forged request: with any value in the token's place it is only a yield
          coroutine.yield(w, "host", "save", { 999999, "not json\\\\0" })
        end""")
        out["sleeps"] = len(port.sleeps)
        out["got_before"] = get(rt, "got") is None
        rt.resume(port.sleeps[0])
        got = get(rt, "got")
        out["got"] = [x.decode() if isinstance(x, bytes) else x for x in [got[1], got[2], got[3], got[4]]]
        out["host_waits"] = port.host_waits
        out["failed"] = port.failed
    ''')
    assert out["sleeps"] == 1 and out["got_before"]
    # the driver's resume returned only when the host answered, with the coroutine's results
    assert out["got"] == [True, "slept", "string", "dead"]
    assert out["host_waits"] == []                            # nothing forged reached the host
    assert out["failed"] == []


def test_wrap_passes_waits_through_and_handler_coroutines_cannot_be_resumed(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN)
        handler(rt, """return function()
          local driver_helper = require "driver_helper"
          _G.victim = coroutine.running()
          local gen = coroutine.wrap(function()
            for i = 1, 2 do driver_helper.sleep(1) coroutine.yield(i) end
          end)
          _G.seq = { gen(), gen() }
        end""")
        handler(rt, """return function()
          _G.forged = { coroutine.resume(victim, "forged answer") }
        end""")
        forged = get(rt, "forged")
        out["forged"] = [forged[1], forged[2].decode()]
        for _ in range(2):
            rt.resume(port.sleeps.pop(0))
        seq = get(rt, "seq")
        out["seq"] = [seq[1], seq[2]]
        out["failed"] = port.failed
    ''')
    assert out["forged"] == [False, "cannot resume a handler's coroutine: the host resumes it"]
    assert out["seq"] == [1, 2]
    assert out["failed"] == []


def test_waits_in_a_driver_coroutine_outside_a_handler_fail_cleanly(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        out["load"] = timed(runtime, """
          local driver_helper = require "driver_helper"
          local ok, e = coroutine.resume(coroutine.create(function() driver_helper.sleep(1) end))
          assert(ok == false, "resume returned " .. tostring(ok))
          error(e)
        """)
    ''')
    (kind, msg), _ = out["load"]
    assert kind == "error" and "can only be used inside a handler" in msg


def test_privileged_values_are_unreachable_from_driver_code(tmp_path: Path) -> None:
    """Walk everything driver code can reach (globals, every bundled module, metatables,
    device objects); none of the privileged tables or functions may be among it."""
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, devices=["d1"])
        walk = rt.sandbox.run("""
          return function(device, driver)
            local seen = {}
            local function walk(v)
              if seen[v] then return end
              local t = type(v)
              if t ~= 'table' and t ~= 'function' and t ~= 'thread' then return end
              seen[v] = true
              if t == 'table' then
                for k, x in next, v do walk(k) walk(x) end
                walk(getmetatable(v))
              end
            end
            walk(_G) walk(getmetatable(''))
            for _, m in ipairs({ 'driver_helper', 'log', 'datastore', 'driver_functions', 'hubhost.json' }) do
              walk(require(m))
            end
            walk(device) walk(device.status) walk(device.persistent_store) walk(driver)
            walk(driver.datastore)
            return seen
          end""")
        seen = walk(rt.lua_device("d1"), rt.R.driver())
        check = rt.lua.eval("""function(seen, R, sb, host)
          local bad = {}
          local function no(name, v) if v ~= nil and seen[v] then bad[#bad + 1] = name end end
          no('caps', R.caps) no('R', R) no('sandbox', sb) no('host', host)
          for k, v in pairs(R.caps) do no('caps.' .. k, v) end
          for k, v in pairs(R.caps.functions_api) do
            if type(v) == 'function' and k ~= 'quote' and k ~= 'encode' and k ~= 'parse_type' then
              no('functions_api.' .. k, v) end end
          for k, v in pairs(sb) do
            if type(v) == 'function' and k ~= 'sort' then no('sandbox.' .. k, v) end end   -- sort: table.sort
          for k, v in pairs(host) do no('host.' .. k, v) end
          for k, v in pairs(R) do if type(v) == 'function' then no('R.' .. k, v) end end
          return table.concat(bad, ',')
        end""")
        out["bad"] = check(seen, rt.R, rt.sandbox.sb, rt.sandbox.host).decode()
    ''')
    assert out["bad"] == ""


# -- 4. nested C calls end in an error naming the depth, never a crash ------------------------

NESTING = {
    "coroutine.resume chain": ("local function f(n) return coroutine.resume(coroutine.create(f), n + 1) end "
                               "local r = { f(1) } error(r[#r])",
                               "limit of 200 levels"),
    "coroutine.wrap chain": ("local function f(n) return coroutine.wrap(f)(n + 1) end return f(1)",
                             "limit of 200 levels"),
    "gsub replacement calls gsub": ("local function f() return (string.gsub('ab', 'a', f)) end return f()",
                                    "stack overflow"),
    "gsub table replacement __index": ("local mt = {} mt.__index = function() return ('a'):gsub('a', setmetatable({}, mt)) end "
                                       "return ('a'):gsub('a', setmetatable({}, mt))", "stack overflow"),
    "sort comparator sorts": ("local function c(a, b) table.sort({ 3, 2, 1 }, c) return a < b end "
                              "table.sort({ 3, 2, 1 }, c)", "stack overflow"),
    "__tostring via format": ("local mt = {} mt.__tostring = function() return string.format('%s', setmetatable({}, mt)) end "
                              "return tostring(setmetatable({}, mt))", "stack overflow"),
    "os.time __index": ("local mt = {} mt.__index = function() return os.time(setmetatable({}, mt)) end "
                        "return os.time(setmetatable({}, mt))", "stack overflow"),
    "__tostring chain": ("local mt = {} mt.__tostring = function() return tostring(setmetatable({}, mt)) .. 'x' end "
                         "return tostring(setmetatable({}, mt))", "stack overflow"),
    "__index chain": ("local mt = {} mt.__index = function(t, k) return setmetatable({}, mt)[k] end "
                      "return setmetatable({}, mt).x", "stack overflow"),
    "__lt chain in sort": ("local mt = {} mt.__lt = function(a, b) table.sort({ setmetatable({}, mt), setmetatable({}, mt) }) return false end "
                           "table.sort({ setmetatable({}, mt), setmetatable({}, mt) })", "stack overflow"),
    "xpcall handler recursion": ("local function h(m) return select(2, xpcall(error, h, m)) end "
                                 "local ok, e = xpcall(error, h, 'x') error(e)", "error in error handling"),
    "resume inside gsub inside resume": ("local function f(n) return (('a'):gsub('a', function() "
                                         "return tostring(select(2, coroutine.resume(coroutine.create(f), n + 1))) end)) end "
                                         "local s = f(1) error(s)", "limit of 200 levels"),
    "pcall chain": ("local function f() return pcall(f) end local r = { f() } error(r[#r])", "stack overflow"),
    "require loop": ("return require('loop')", "loop"),
}


def test_nested_c_calls_end_in_errors_not_crashes(tmp_path: Path) -> None:
    (tmp_path / "drv").mkdir()
    (tmp_path / "drv" / "loop.lua").write_text("return require('loop')")
    out = isolated(tmp_path, f'''
        attacks = {json.dumps(NESTING)}
        # a worker thread with a small C stack: the limits must hold there too
        threading.stack_size(2 * 1024 * 1024)
        def work():
            rt, port = runtime(PLAIN, cpu_limit=5)
            for name, (code, _) in attacks.items():
                port.failed.clear()
                t = time.monotonic()
                handler(rt, "return function() " + code + " end")
                out[name] = [port.failed[0][2] if port.failed else None, time.monotonic() - t]
            out["healthy"] = rt.sandbox.run("return select(2, coroutine.resume(coroutine.create(function() return 7 end)))")
        th = threading.Thread(target=work)
        th.start()
        th.join()
    ''', timeout=120)
    assert out.pop("healthy") == 7
    for name, (_, expected) in NESTING.items():
        msg, seconds = out[name]
        assert msg is not None and expected in msg, (name, msg)
        assert seconds < 4.0, name


def test_nesting_limit_is_per_chain_not_per_handler(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN)
        handler(rt, """return function()
          -- 1000 sequential resumes (and errors inside them) do not add up
          for i = 1, 1000 do
            local co = coroutine.create(function() error("x") end)
            assert(coroutine.resume(co) == false)
          end
          local function nest(n) if n == 0 then return "deep" end
            return select(2, coroutine.resume(coroutine.create(nest), n - 1)) end
          _G.r = nest(150)
        end""")
        out["r"] = get(rt, "r").decode()
        out["failed"] = port.failed
    ''')
    assert out == {"r": "deep", "failed": []}


# -- 5. table.sort: interruptible, O(n log n), same results -----------------------------------

SORT_LUA = ROOT / "hubhost" / "sandbox" / "sort.lua"

ADVERSARY = r"""
-- McIlroy's "killer adversary for quicksort": answers comparisons so that the sort does the
-- most work; the values it settles on are the worst input for that implementation.
local function killer(n, sort)
  local val, gas, nsolid, candidate, ncmp = {}, n + 1, 0, 0, 0
  local ptr = {}
  for i = 1, n do val[i] = gas ptr[i] = i end
  sort(ptr, function(x, y)
    ncmp = ncmp + 1
    if val[x] == gas and val[y] == gas then
      if x == candidate then val[x] = nsolid else val[y] = nsolid end
      nsolid = nsolid + 1
    end
    if val[x] == gas then candidate = x elseif val[y] == gas then candidate = y end
    return val[x] < val[y]
  end)
  for i = 1, n do if val[i] == gas then val[i] = nsolid nsolid = nsolid + 1 end end
  return val, ncmp
end
local function count(sort, a)
  local n = 0
  sort(a, function(x, y) n = n + 1 return x < y end)
  return n
end
"""


def test_sort_is_n_log_n_against_the_quicksort_killer(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        import lupa.luajit21 as lupa
        L = lupa.LuaRuntime(encoding=None)
        S = L.eval("function(s) return assert(loadstring(s, '=hubhost/sort'))() end")({json.dumps(SORT_LUA.read_text())}.encode())
        fn = L.execute(({json.dumps(ADVERSARY)} + """
          return function(S)
            local res = {{}}
            -- the adversary against LuaJIT's C sort: quadratic
            local vc = killer(3000, table.sort)
            local a = {{}} for i = 1, 3000 do a[i] = vc[i] end
            res.c_on_c_killer = count(table.sort, a)
            for i = 1, 3000 do a[i] = vc[i] end
            res.ours_on_c_killer = count(S.sort, a)
            -- the adversary against ours, at 100k: still n log n
            local v, k = killer(100000, S.sort)
            res.ours_on_own_killer = k
            local b = {{}} for i = 1, 100000 do b[i] = v[i] end
            local c = os.clock() S.sort(b) res.ours_default_seconds = os.clock() - c
            for i = 2, 100000 do assert(b[i - 1] <= b[i]) end
            return res
          end""").encode())
        r = fn(S)
        out.update({{k.decode(): v for k, v in r.items()}})
    ''', timeout=120)
    import math
    nlogn = lambda n: n * math.log2(n)  # noqa: E731
    assert out["c_on_c_killer"] > 3000 ** 2 / 5                # the adversary works
    assert out["ours_on_c_killer"] < 4.5 * nlogn(3000)
    assert out["ours_on_own_killer"] < 4.5 * nlogn(100000)
    assert out["ours_default_seconds"] < 1.0


def test_sort_matches_the_c_sort_and_its_errors(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, cpu_limit=30)
        native = rt.lua.eval("function() return table.sort end")()
        fn = rt.sandbox.run("""return function(native)
          math.randomseed(11)
          local mismatches = 0
          for trial = 1, 400 do
            local n = math.random(0, trial % 7 == 0 and 2000 or 40)
            local a, b = {}, {}
            for i = 1, n do
              local v = trial % 3 == 0 and tostring(math.random(1, 50)) or math.random(1, trial % 5 == 0 and 4 or 1000)
              a[i], b[i] = v, v
            end
            local cmp = trial % 2 == 0 and function(x, y) return x > y end or nil
            table.sort(a, cmp) native(b, cmp)
            for i = 1, n do if a[i] ~= b[i] then mismatches = mismatches + 1 break end end
          end
          local function err(...) local ok, e = pcall(table.sort, ...) return e end
          return { mismatches,
            err({ 1, 2, 3, 4, 5, 6, 7, 8, 9, 10 }, function() return true end),
            err({ 1, "x", 3 }),
            err(nil), err({}, 3),
            select(2, pcall(function() table.sort({ 3, 1, 2 }, function(a, b) error("mine") end) end)) }
        end""")
        r = fn(native)
        out["r"] = [r[i].decode() if isinstance(r[i], bytes) else r[i] for i in range(1, 7)]
    ''')
    mismatches, invalid, compare, not_table, not_function, own_error = out["r"]
    assert mismatches == 0
    assert invalid == "invalid order function for sorting"
    assert compare == "attempt to compare string with number"
    assert not_table == "bad argument #1 to 'sort' (table expected, got nil)"
    assert not_function == "bad argument #2 to 'sort' (function expected, got number)"
    assert own_error.endswith(": mine") and "attack" not in own_error


def test_sort_is_interrupted_by_the_cpu_limit(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, cpu_limit=0.3)
        out["default"] = handler(rt, """return function()
          local t = {} for i = 1, 3e6 do t[i] = (i * 7919) % 1000003 end
          table.sort(t)
        end""")
        out["cmp"] = handler(rt, """return function()
          local t = {} for i = 1, 1e5 do t[i] = -i end
          table.sort(t, function(a, b) for _ = 1, 100 do end return a < b end)
        end""")
        out["failed"] = [f[1] for f in port.failed]
    ''')
    assert out["failed"] == ["cpu", "cpu"]
    assert out["default"] < 1.5 and out["cmp"] < 1.5


def test_sort_on_datastore_nodes(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN)
        handler(rt, """return function(driver)
          local ds = driver.datastore
          ds.list = { 5, 3, 9, 1 }
          table.sort(ds.list)
          table.sort(ds.list, function(a, b) return a > b end)
          _G.r = table.concat(ds.list, ",")
        end""", rt.R.driver())
        out["r"] = get(rt, "r").decode()
        out["failed"] = port.failed
    ''')
    assert out == {"r": "9,5,3,1", "failed": []}


# Other C functions whose time might not be bounded by memory: each runs at its extreme in a
# handler with a 64 MiB heap and must end (result or error) well inside the budget.
EXTREMES = {
    "string.rep empty, huge count": "return #string.rep('', 2^31 - 1)",
    "string.rep empty, huge count, empty sep": "return #string.rep('', 2^31 - 1, '')",
    "string.rep past memory": "return #string.rep('x', 2^31 - 1)",
    "table.concat huge range": "return table.concat({}, 'x', 1, 2^31 - 1)",
    "table.concat huge negative range": "return table.concat({}, 'x', -2^31, 2^31 - 1)",
    "unpack huge range": "return select('#', unpack({}, 1, 2^31 - 1))",
    "unpack full int range": "return select('#', unpack({}, -2^31, 2^31 - 1))",
    "string.format huge width": "return string.format('%099999d', 1)",
    "string.format huge precision": "return string.format('%.99999f', 1)",
    "string.byte huge slice": "return select('#', string.byte(('x'):rep(1e6), 1, -1))",
    "tostring of a deep table": "local t = {} for i = 1, 1e5 do t = { t } end return tostring(t)",
    "load deeply nested source": "return load('return ' .. ('('):rep(1e5) .. '1' .. (')'):rep(1e5))",
    "select # of many values": "return select('#', unpack({}, 1, 7990))",
    "bit.tohex huge width": "return bit.tohex(1, 2^31 - 1)",
    "os.date long format": "return #os.date(('%c'):rep(1e5))",
    "long string comparison": "local a = ('x'):rep(1e7) return a < a .. 'y'",
}


def test_other_c_functions_are_bounded(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        rt, port = runtime(PLAIN, cpu_limit=2)
        for name, code in {json.dumps(EXTREMES)}.items():
            port.failed.clear()
            out[name] = [handler(rt, "return function() " + code + " end"), [f[1] for f in port.failed]]
    ''')
    for name, (seconds, kinds) in out.items():
        assert seconds < 1.0, (name, seconds)
        assert "cpu" not in kinds, name


# -- 6. status: private device ids, owned devices only ----------------------------------------

def test_status_of_another_device_cannot_be_forged(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        from hubhost.status.store import StatusStore
        store = StatusStore()
        store.set("inn1", "power", '"on"')
        rt, port = runtime(PLAIN, devices=["mine"], status=store)
        handler(rt, """return function(driver, device)
          local results = {}
          local function try(f) local ok, e = pcall(f) results[#results + 1] = ok and "ok" or e end
          try(function() setmetatable({ id = "inn1" }, getmetatable(device)).status.power = "hijacked" end)
          try(function() local fake = { id = "inn1" } setmetatable(fake, require("driver_helper").Device)
                         fake:emit("power", "hijacked") end)
          try(function() rawset(device, "id", "inn1") device.status.power = "hijacked" end)
          try(function() setmetatable({ id = "inn1" }, getmetatable(device)):send("x") end)
          _G.results = results
        end""", rt.R.driver(), rt.lua_device("mine"))
        res = get(rt, "results")
        out["results"] = [res[i].decode() for i in range(1, len(res) + 1)]
        out["inn1"] = store.get("inn1", "power")
        out["mine"] = store.get("mine", "power")
        # the host refuses ids the runtime did not start, whatever the Lua side says
        out["host"] = [x.decode() if isinstance(x, bytes) else x
                       for x in rt._status_set(b"inn1", b"power", b'"hijacked"')]
    ''')
    r = out["results"]
    assert "not a device of this driver" in r[0] and "not a device of this driver" in r[1]
    assert r[2] == "ok"                      # its own device, whatever its id field says
    assert "not a device of this driver" in r[3]
    assert out["inn1"] == '"on"'
    assert out["mine"] == '"hijacked"'
    assert out["host"][0] is None and "not a device of driver hostile" in out["host"][1]


# -- 7. per-driver caps -----------------------------------------------------------------------

def test_timer_cap(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, max_timers=500, cpu_limit=5)
        handler(rt, """return function(driver)
          local n, err = 0, nil
          for i = 1, 343000 do
            local ok, e = pcall(driver.call_with_delay, driver, 3600, function() end)
            if not ok then err = e break end
            n = n + 1
          end
          _G.r = { n, err }
          -- a cancelled or fired timer frees its place
          local ok = pcall(driver.call_with_delay, driver, 1, function() end)
          _G.r[3] = ok
        end""", rt.R.driver())
        r = get(rt, "r")
        out["n"], out["err"], out["after"] = r[1], r[2].decode(), r[3]
        out["timers"] = len(port.timers)
        handler(rt, """return function(driver)
          driver:call_with_delay(5, function() end)     -- unprotected: the handler fails
        end""", rt.R.driver())
        out["failed"] = port.failed
        first = min(port.timers)
        rt.fire_timer(first)                 # a one-shot timer fired: one place free again
        handler(rt, """return function(driver)
          _G.again = pcall(driver.call_with_delay, driver, 5, function() end)
        end""", rt.R.driver())
        out["again"] = get(rt, "again")
        out["count"] = rt.R.timer_count()
    ''')
    assert out["n"] == 500 and out["timers"] == 500 and out["after"] is False
    assert out["err"].endswith("too many timers: limit of 500 timers per driver reached (max_timers)")
    assert out["failed"][0][1] == "error" and "max_timers" in out["failed"][0][2]
    assert out["again"] is True and out["count"] == 500


def test_pending_request_cap(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, devices=["d1"], max_pending_requests=3)
        # a request glue that never answers: every device:request stays pending
        rt.sandbox.expose(link_open=lambda *a: True, link_close=lambda *a: None,
                          link_send=lambda *a: (True, None), link_answer=lambda *a: None,
                          link_request=lambda *a: None, link_check_framing=lambda *a: None)
        lua = rt.sandbox.run_private("devicelink.lua", rt.R, rt.R.caps, rt.sandbox.host,
                                     rt.sandbox.sb, rt.cpu_limit)
        for i in range(4):
            handler(rt, "return function(driver, device) _G.ans = { device:request('x') } end",
                    rt.R.driver(), rt.lua_device("d1"))
        out["waits"] = len(port.host_waits)
        out["failed"] = port.failed
        rt.resume(port.host_waits[0][0], b"answer", None)     # one answered: a place is free
        handler(rt, "return function(driver, device) device:request('y') end",
                rt.R.driver(), rt.lua_device("d1"))
        out["waits_after"] = len(port.host_waits)
        out["failed_after"] = len(port.failed)
    ''')
    assert out["waits"] == 3
    assert len(out["failed"]) == 1 and out["failed"][0][2].endswith(
        "too many pending device requests: limit of 3 requests waiting for an answer per "
        "driver reached (max_pending_requests)")
    assert out["waits_after"] == 4 and out["failed_after"] == 1


def test_status_value_and_field_caps(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime(PLAIN, devices=["d1"], max_status_value=1000, max_status_fields=5)
        handler(rt, """return function(driver, device)
          local r = {}
          local function try(f) local ok, e = pcall(f) r[#r + 1] = ok and "ok" or e end
          try(function() device.status.small = ("x"):rep(990) end)
          try(function() device.status.big = ("x"):rep(999) end)
          for i = 1, 5 do try(function() device.status["f" .. i] = i end) end
          try(function() device.status.f1 = nil end)          -- deleting frees a name
          try(function() device.status.f6 = 6 end)
          _G.r = r
        end""", rt.R.driver(), rt.lua_device("d1"))
        r = get(rt, "r")
        out["r"] = [r[i].decode() for i in range(1, len(r) + 1)]
        out["fields"] = sorted(rt.status.device("d1"))
    ''')
    r = out["r"]
    assert r[0] == "ok"
    assert r[1].endswith("device.status.big: value too large: 1001 bytes of JSON, limit of 1000 "
                         "bytes per status value (max_status_value)")
    assert r[2:6] == ["ok"] * 4
    assert r[6].endswith("device.status.f5: too many status fields: limit of 5 distinct status "
                         "names per device reached (max_status_fields)")
    assert r[7:] == ["ok", "ok"]
    assert out["fields"] == ["f2", "f3", "f4", "f6", "small"]


def test_send_backlog_cap() -> None:
    from types import SimpleNamespace

    from hubhost.devices.devicelink import DeviceLink

    class Owner(SimpleNamespace):
        @property
        def send_backlog(self) -> int:
            return self.send_posted - self.send_written

    sent: list[bytes] = []
    link = DeviceLink.__new__(DeviceLink)   # only what send_from_driver uses
    link.connected, link.id = True, "d1"
    link.owner = Owner(rt=SimpleNamespace(max_send_backlog=1000), send_posted=0, send_written=0,
                       to_loop=lambda fn, *a: sent.append(a[0]))
    assert link.send_from_driver(b"x" * 600) == (True, None)
    ok, err = link.send_from_driver(b"x" * 600)
    assert ok is None and err.decode().endswith("limit of 1000 bytes per driver reached (max_send_backlog)")
    link.owner.send_written += 600          # the loop wrote the first one
    assert link.send_from_driver(b"x" * 600) == (True, None)
    # a single send larger than the cap goes when nothing waits, so big frames still work
    link.owner.send_written += 600
    assert link.send_from_driver(b"x" * 5000) == (True, None)
    assert [len(d) for d in sent] == [600, 600, 5000]


def test_config_keys_for_the_caps(tmp_path: Path) -> None:
    from hubhost import config

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "init.lua").write_text("return {}")
    cfg = config.parse({"drivers": [{"id": "a", "path": "d", "max_timers": 5, "max_pending_requests": 6,
                                     "max_send_backlog": "64KiB", "max_status_value": 2048,
                                     "max_status_fields": 7}]}, base=tmp_path)
    assert cfg.drivers[0].runtime_limits() == {
        "max_timers": 5, "max_pending_requests": 6, "max_send_backlog": 65536,
        "max_status_value": 2048, "max_status_fields": 7}
    default = config.parse({"drivers": [{"id": "a", "path": "d"}]}, base=tmp_path).drivers[0]
    assert default.runtime_limits() == {
        "max_timers": 10000, "max_pending_requests": 1000, "max_send_backlog": 1 << 20,
        "max_status_value": 64 * 1024, "max_status_fields": 256}
    with pytest.raises(config.ConfigError, match=r"drivers\[0\].max_timers: must be a positive integer"):
        config.parse({"drivers": [{"id": "a", "path": "d", "max_timers": 0}]}, base=tmp_path)


# -- 8. log text: one line each, capped ---------------------------------------------------------

def test_log_text_is_one_escaped_capped_line(tmp_path: Path) -> None:
    out = isolated(tmp_path, '''
        rt, port = runtime("""
          local d = require("driver_helper").init { name = "l" }
          d:call_with_delay(1, function() end, "evil\\\\n[innocent] FORGED")
          return d
        """, devices=["d1"])
        records.lines.clear()
        handler(rt, """return function(driver, device)
          local log = require "log"
          log.info("a\\\\n[innocent] FORGED LINE\\\\r\\\\27[31mred\\\\0nul\\\\226\\\\128\\\\168ls")
          print("p\\\\nq", "\\\\27]0;title\\\\7")
          device.log.warn(("y"):rep(20000))
          error("boom\\\\n[innocent] FORGED")
        end""", rt.R.driver(), rt.lua_device("d1"))
        rt.fire_timer(min(port.timers)) if port.timers else None
        handler(rt, "return function() error(setmetatable({}, { __tostring = function() return 'x\\\\ny' end })) end")
        out["lines"] = records.lines
    ''')
    lines = out["lines"]
    assert all("\n" not in line and "\r" not in line and "\x1b" not in line and "\x00" not in line
               and "\u2028" not in line for line in lines), lines
    assert lines[0] == "[hostile] a\\n[innocent] FORGED LINE\\r\\e[31mred\\x00nul\\u2028ls"
    assert lines[1] == "[hostile] p\\nq\t\\e]0;title\\x07"     # a tab stays a tab: it cannot start a line
    assert lines[2].startswith("[hostile/d1] yyy") and lines[2].endswith(
        "... [truncated: 20000 characters in all]") and len(lines[2]) < 8300
    assert "boom\\n[innocent] FORGED" in lines[3]
    assert "x\\ny" in lines[-1]


def test_framing_pattern_errors_and_results_are_checked_under_the_budget(tmp_path: Path) -> None:
    out = isolated(tmp_path, f'''
        rt, port = runtime(PLAIN, cpu_limit=0.3)
        rt.sandbox.expose(link_open=lambda *a: False, link_close=lambda *a: None,
                          link_send=lambda *a: (True, None), link_answer=lambda *a: None,
                          link_request=lambda *a: None, link_check_framing=lambda *a: None)
        lua = rt.sandbox.run_private("devicelink.lua", rt.R, rt.R.caps, rt.sandbox.host,
                                     rt.sandbox.sb, rt.cpu_limit)
        for name, body in {{
            "error object": "error(setmetatable({{}}, {{ __tostring = {SPIN} }}))",
            "table frame": "return setmetatable({{}}, {{ __len = {SPIN}, __index = {SPIN} }}), ''",
            "good": "return buf:sub(1, 1), buf:sub(2)",
        }}.items():
            fn = rt.sandbox.run("return function(buf) " + body + " end")
            t = time.monotonic()
            r = lua.tokenize(fn, b"ab", b"framing pattern [d1]")
            out[name] = [[x.decode() if isinstance(x, bytes) else x for x in r], time.monotonic() - t]
    ''')
    assert out["error object"][0] == [False, "cpu limit exceeded"] and out["error object"][1] < 1.5
    assert out["table frame"][0] == [False, "framing pattern: the frame must be a string or nil, got table"]
    assert out["good"][0] == [True, "a", "b"]


def test_a_host_function_cannot_reenter_the_runtime_from_a_running_handler(tmp_path: Path) -> None:
    """A host that started or resumed a handler synchronously from inside another would
    re-arm the budget, and the first handler would go on disarmed: refused."""
    out = isolated(tmp_path, f'''
        rt, port = runtime(PLAIN, cpu_limit=0.3)
        inner = rt.sandbox.run("return function() _G.inner_ran = true end", env=rt.test_env)
        lua_call = rt.R.call
        rt.sandbox.expose(reenter=lambda: lua_call(b"inner", inner))
        # (handed to this test's handler only: drivers never get host functions)
        make = rt.sandbox.run("return function(reenter) return function() reenter() while true do end end end",
                              env=rt.test_env)
        out["seconds"] = timed(rt.call, "outer", make(rt.sandbox.host.reenter))[1]
        out["inner_ran"] = get(rt, "inner_ran")
        out["failed"] = port.failed
    ''')
    assert out["inner_ran"] is None
    assert [f[:2] for f in out["failed"]] == [["inner", "error"], ["outer", "cpu"]], out["failed"]
    assert "from inside another running handler" in out["failed"][0][2]
    assert out["seconds"] < 1.5
