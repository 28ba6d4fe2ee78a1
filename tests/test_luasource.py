"""Tests for hubhost.luasource.rewrite_len: the `#` → `__hh_len(...)` source transform.

Checked three ways: exact expected text for a table of cases, properties over random
Lua-ish token streams, and real LuaJIT running original and rewritten code side by side.
"""

from __future__ import annotations

import time

import lupa.luajit21 as luajit
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from hubhost.sandbox.luasource import LEN_FUNCTION, rewrite_len

# ---------------------------------------------------------------------------------------
# Table of cases: input -> expected output

CASES = [
    # plain operands
    ("return #t", "return __hh_len(t)"),
    ("return # t", "return __hh_len( t)"),
    ("return #t + 1", "return __hh_len(t) + 1"),
    ("return -#t", "return -__hh_len(t)"),
    ("return not #t", "return not __hh_len(t)"),
    ("return #t .. 'x'", "return __hh_len(t) .. 'x'"),
    ("return #t==0", "return __hh_len(t)==0"),
    ("return 2^#t", "return 2^__hh_len(t)"),
    # suffix chains
    ("return #a.b[c]:d(e).f", "return __hh_len(a.b[c]:d(e).f)"),
    ("return #a.b.c - 1", "return __hh_len(a.b.c) - 1"),
    ("return #t[1], #t[i][j]", "return __hh_len(t[1]), __hh_len(t[i][j])"),
    ('return #f"str"', 'return __hh_len(f"str")'),
    ("return #f'str'", "return __hh_len(f'str')"),
    ("return #f[[str]]", "return __hh_len(f[[str]])"),
    ("return #t[[[x]]", "return __hh_len(t[[[x]])"),  # `[[` is always a long string
    ("return #f{1}", "return __hh_len(f{1})"),
    ("return #o:m{1}.x", "return __hh_len(o:m{1}.x)"),
    ("return #o:m'x'", "return __hh_len(o:m'x')"),
    ('return #("x"):rep(3)', 'return __hh_len(("x"):rep(3))'),
    ("return #((t))", "return __hh_len(((t)))"),
    ("return #t\n[1]", "return __hh_len(t\n[1])"),
    ("return #t -- c\n[1]", "return __hh_len(t -- c\n[1])"),
    ("return #t --[[ c\n]] .x", "return __hh_len(t --[[ c\n]] .x)"),
    ("return #f(function() return 1 end)", "return __hh_len(f(function() return 1 end))"),
    # literals and varargs
    ('return #"abc"', 'return __hh_len("abc")'),
    ("return #[==[a]]b]==]", "return __hh_len([==[a]]b]==])"),
    ("return #{1, 2}", "return __hh_len({1, 2})"),
    ("return #...", "return __hh_len((...))"),
    ("return #... + 1", "return __hh_len((...)) + 1"),
    # nesting
    ("t[#t+1] = v", "t[__hh_len(t)+1] = v"),
    ("return #t[#t]", "return __hh_len(t[__hh_len(t)])"),
    ("return #t[#u[#v]]", "return __hh_len(t[__hh_len(u[__hh_len(v)])])"),
    ("return #{#t, #u}", "return __hh_len({__hh_len(t), __hh_len(u)})"),
    ("return #f(#t)", "return __hh_len(f(__hh_len(t)))"),
    ("return ##t", "return #__hh_len(t)"),
    ("return #-#t", "return #-__hh_len(t)"),
    # a `#` glued to a keyword or name must not merge with it
    ("if a and#t>0 then end", "if a and __hh_len(t)>0 then end"),
    ("return#t", "return __hh_len(t)"),
    ("while#t>0 do end", "while __hh_len(t)>0 do end"),
    ("x = é..#t", "x = é..__hh_len(t)"),
    # non-ASCII names (LuaJIT accepts bytes >= 0x80 in names)
    ("return #é", "return __hh_len(é)"),
    ("return #t.é", "return __hh_len(t.é)"),
    # left alone: `^` binds tighter than `#`
    ("return #t^2", "return #t^2"),
    ("return #t[1] ^ 2", "return #t[1] ^ 2"),
    ("return #t[#u]^2", "return #t[__hh_len(u)]^2"),
    # left alone: operands that are never datastore nodes
    ("return #-t", "return #-t"),
    ("return #nil, #1, #true", "return #nil, #1, #true"),
    ("return #function() end", "return #function() end"),
    # left alone: invalid source must stay invalid
    ('return #"x":rep(2)', 'return #"x":rep(2)'),
    ("return #{}.n", "return #{}.n"),
    ("return #...[1]", "return #...[1]"),
    ("return #t.end", "return #t.end"),
    ("return #t:m", "return #t:m"),
    ("return #t[1", "return #t[1"),
    ("return #t(]", "return #t(]"),
    ("x = 1 #t", "x = 1 #t"),
    ("f() #t", "f() #t"),
    ("x = y; #t", "x = y; #t"),
    ("#t = 1", "#t = 1"),
    ("do #t end", "do #t end"),
    ("x = ...#t", "x = ...#t"),
    ("x = y --[[ c ]] #t", "x = y --[[ c ]] #t"),
    ("f(#t)#t", "f(__hh_len(t))#t"),
    ("xreturn #t", "xreturn #t"),
    ("return #", "return #"),
    # an expression may follow these, across comments and lines
    ("return -- c\n #t", "return -- c\n __hh_len(t)"),
    ("x = --[[ a\n b ]] #t", "x = --[[ a\n b ]] __hh_len(t)"),
    ("for k in #t do end", "for k in __hh_len(t) do end"),
    ("repeat until #t", "repeat until __hh_len(t)"),
    ("x = y or #t", "x = y or __hh_len(t)"),
    ("f(a, #t)", "f(a, __hh_len(t))"),
    ("x = {[#t] = 1}", "x = {[__hh_len(t)] = 1}"),
    ("x = a ~= #t", "x = a ~= __hh_len(t)"),
    ("x = a %#t", "x = a %__hh_len(t)"),
    # `#` in strings and comments
    ('s = "#t" .. \'#t\' .. [[#t]] .. [=[ ]] #t ]=]', None),
    ('s = "a\\"#t" .. "\\\\" .. #t', 's = "a\\"#t" .. "\\\\" .. __hh_len(t)'),
    ('s = "a\\z\n   #t" .. #t', 's = "a\\z\n   #t" .. __hh_len(t)'),
    ('s = "a\\\n#t" .. #t', 's = "a\\\n#t" .. __hh_len(t)'),
    ("-- #t\nx = 1 --[[ #t\n]] --[==[ #t ]] ]==]", None),
    ("--[==\nx = #t", "--[==\nx = __hh_len(t)"),  # `--[==` without `[` is a line comment
    ("---[[ #t\nx = #t", "---[[ #t\nx = __hh_len(t)"),
    # numbers never hide a `#`
    ("x = 0x1F+#t", "x = 0x1F+__hh_len(t)"),
    ("x = 1e-#t", "x = 1e-__hh_len(t)"),
    ("x = .5*#t", "x = .5*__hh_len(t)"),
    # shebang header (LuaJIT skips it, after an optional BOM)
    ("#!/usr/bin/env lua\nreturn #t", "#!/usr/bin/env lua\nreturn __hh_len(t)"),
    ("\ufeff#!/usr/bin/env lua\nreturn #t", "\ufeff#!/usr/bin/env lua\nreturn __hh_len(t)"),
    ("#!/x #t", None),
    # unterminated strings/comments: nothing after them is touched
    ('x = #t .. "oops #u\ny = #v', 'x = __hh_len(t) .. "oops #u\ny = #v'),
    ("x = #t --[[ oops #u\ny = #v", "x = __hh_len(t) --[[ oops #u\ny = #v"),
    ("x = #t .. [==[ oops ]] #u", "x = __hh_len(t) .. [==[ oops ]] #u"),
    # line endings are kept as they are
    ("x = #t\r\ny = #u\r\n", "x = __hh_len(t)\r\ny = __hh_len(u)\r\n"),
    ("x = #t\ry = #u", "x = __hh_len(t)\ry = __hh_len(u)"),
]


@pytest.mark.parametrize(("source", "expected"), CASES, ids=[repr(c[0]) for c in CASES])
def test_rewrite_cases(source: str, expected: str | None) -> None:
    out = rewrite_len(source)
    if expected is None:
        assert out is source  # no `#` operator at all: the very same object
    else:
        assert out == expected


def test_no_hash_is_the_same_object() -> None:
    source = "local t = {}\nreturn t\n"
    assert rewrite_len(source) is source


def test_len_function_name() -> None:
    assert LEN_FUNCTION == "__hh_len"


# ---------------------------------------------------------------------------------------
# Properties over random Lua-ish token streams

_PLAIN_TOKENS = [
    "t", "u", "f", "s", "x", "é", "and", "or", "not", "return", "local", "end", "nil",
    "if", "then", "do", "function", "1", "0x1F", "1e+5", ".5", "+", "-", "*", "/", "^",
    "..", "...", ".", ":", ",", ";", "(", ")", "[", "]", "{", "}", "=", "==", "~=", "<",
]  # fmt: skip
_HIDING_TOKENS = [
    '"a#b"', "'x\\'#'", '"\\z\n #"', '"\\\n#"', "[[#\n]]", "[==[ ]] # ]==]",
    "-- # c\n", "--[[ # \n ]]", "--[=[ # ]=]", "--[==\n",
]  # fmt: skip
_SPACES = [" ", "\n", "\r\n", "\t", "  \n  "]


def _streams(with_hash: bool) -> st.SearchStrategy[str]:
    tokens = _PLAIN_TOKENS + _HIDING_TOKENS + (["#", "#", "#"] if with_hash else [])
    pair = st.tuples(st.sampled_from(tokens), st.sampled_from(_SPACES))
    return st.lists(pair, max_size=40).map(lambda ps: "".join(a + b for a, b in ps))


def _line_breaks(text: str) -> list[str]:
    return [c for c in text if c in "\r\n"]


@settings(max_examples=300, deadline=None)
@given(_streams(with_hash=True))
def test_line_breaks_never_change(source: str) -> None:
    out = rewrite_len(source)
    assert _line_breaks(out) == _line_breaks(source)
    assert len(out.splitlines()) == len(source.splitlines())
    # only insertions of our call text: dropping it and every `#`, `(`, `)` and space gives
    # the same text on both sides
    def strip(text: str) -> str:
        text = text.replace(LEN_FUNCTION, "")
        return "".join(c for c in text if c not in "#() ")

    assert strip(out) == strip(source)


@settings(max_examples=300, deadline=None)
@given(_streams(with_hash=False))
def test_no_operator_means_no_change(source: str) -> None:
    assert rewrite_len(source) is source


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.sampled_from(list("#t[](){}\"'=-\n\\ .z^:")), max_size=60))
def test_any_text_never_raises(source: str) -> None:
    out = rewrite_len(source)
    assert _line_breaks(out) == _line_breaks(source)


@pytest.fixture(scope="module")
def lua() -> luajit.LuaRuntime:
    return luajit.LuaRuntime(register_eval=False)


def _load_error_line(lua: luajit.LuaRuntime, source: str) -> int | None:
    """None if LuaJIT compiles the source, else the line its syntax error names."""
    compile = "function(s) local fn, err = loadstring(s, '=chunk') return fn ~= nil, err end"
    ok, err = lua.eval(compile)(source)
    if ok:
        return None
    return int(err.split(":")[1])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_streams(with_hash=True))
def test_lua_parser_agrees(lua: luajit.LuaRuntime, source: str) -> None:
    """Valid stays valid, invalid stays invalid with the error on the same line."""
    assert _load_error_line(lua, rewrite_len(source)) == _load_error_line(lua, source)


def test_lua_parser_agrees_on_the_cases(lua: luajit.LuaRuntime) -> None:
    for source, _ in CASES:
        assert _load_error_line(lua, rewrite_len(source)) == _load_error_line(lua, source), source


# ---------------------------------------------------------------------------------------
# Equivalence with real LuaJIT: same results with a pass-through __hh_len

_PRELUDE = """\
local t = {10, 20, 30}
local n = {{1}, {1, 2}, {1, 2, 3}}
local a = {b = {[2] = {d = function(self, e) return {f = {e, e}} end}}}
local c, e = 2, 7
local function f(x) return {x, x, x} end
local s = "hello"
local é = {1, 2}
"""

_SNIPPETS = [
    "return #t + 1",
    "return -#t",
    "return #t == 0, #t ~= 3, #t < 4, #t <= 3, #t > 2, #t >= 4",
    "return not #t",
    'return #t .. "x"',
    "return #a.b[c]:d(e).f",
    'return #f"str", #f{1}, #f[[x]]',
    'return #("x"):rep(3)',
    "t[#t+1] = 40; return #t, t[4]",
    "return #t * 2, #t / 2, #t % 2, 2 ^ #t, #t - -#t",
    "return pcall(function() return #t^2 end)",
    "return pcall(function() return #t[1] ^ 2 end)",
    'return "#t", \'#t\', [[#t]], [==[ #t ]] ]==]',
    "-- #t comment\n--[[ #t\n ]] return 1 --[==[ #t ]==]",
    "return (function(...) return #..., select('#', ...) end)('abc', 'de')",
    "return #{1, 2, #t}",
    "return #n[#n], #n[#n - 1]",
    "return #n\n[2]",
    'return #"abc" + #[[de]]',
    "local sum = 0 for i = 1, #t do sum = sum + t[i] end return sum",
    "while #t > 0 do table.remove(t) end return #t",
    "return #s:upper(), #s",
    "return #t and #s or 0",
    "if#t>2 then return 1 end return 2",
    "return #(t), #((s))",
    "return #é, é[#é]",
    "return select('#', 1, 2), #t",
    "local x = #t\nreturn pcall(error, 'line ' .. x)",
    "local r = {} for i = 1, #n do r[#r + 1] = #n[i] end return #r, r[1], r[2], r[3]",
]


_RUN = """
local lines = {}
local function ser(v)
  if type(v) ~= "table" then return type(v) .. ":" .. tostring(v) end
  local keys = {}
  for k in pairs(v) do keys[#keys + 1] = k end
  table.sort(keys, function(x, y) return tostring(x) < tostring(y) end)
  local parts = {}
  for _, k in ipairs(keys) do parts[#parts + 1] = ser(k) .. "=" .. ser(v[k]) end
  return "{" .. table.concat(parts, ",") .. "}"
end
return function(source, len)
  local fn, err = loadstring(source, "=snippet")
  if not fn then return "syntax:" .. err end
  setfenv(fn, setmetatable({__hh_len = len}, {__index = _G}))
  local res = {pcall(fn)}
  local out = {}
  for i = 1, table.maxn(res) do out[i] = ser(res[i]) end
  return table.concat(out, " ")
end
"""


@pytest.fixture(scope="module")
def run_lua(lua: luajit.LuaRuntime):
    runner = lua.execute(_RUN)
    plain_len = lua.eval("function(x) return #x end")
    return lambda source, length=plain_len: runner(source, length)


@pytest.mark.parametrize("snippet", _SNIPPETS)
def test_same_results_in_luajit(run_lua, snippet: str) -> None:
    source = _PRELUDE + snippet
    rewritten = rewrite_len(source)
    original = run_lua(source)
    assert not original.startswith("syntax:"), original
    assert run_lua(rewritten) == original


def test_error_lines_are_kept(run_lua) -> None:
    source = _PRELUDE + "local x = #t\nlocal y = #n[#n] + 1\nerror('boom')\n"
    out = run_lua(rewrite_len(source))
    assert out == run_lua(source)
    assert "snippet:10: boom" in out


def test_rewrite_really_calls_hh_len(lua: luajit.LuaRuntime, run_lua) -> None:
    counter = lua.execute(
        """
        local calls = 0
        return function(x) calls = calls + 1 return #x end, function() return calls end
        """
    )
    length, calls = counter
    source = _PRELUDE + (
        'local hidden = "#t" .. [[#t]] -- #t\n'
        "return #t + #s + #a.b[c]:d(e).f + (function(...) return #... end)('xy')"
    )
    assert run_lua(rewrite_len(source), length) == "boolean:true number:12"
    assert calls() == 4


def test_proxy_length_seen_through_hh_len(lua: luajit.LuaRuntime, run_lua) -> None:
    """The point of it all: `#` on a proxy gives 0 in plain LuaJIT, the real length after."""
    proxy_len = lua.eval(
        "function(x) local mt = getmetatable(x)"
        " if mt and mt.__hh_len then return mt.__hh_len(x) end return #x end"
    )
    source = (
        "local p = setmetatable({}, {__index = {5, 6, 7},"
        " __hh_len = function() return 3 end})\n"
        "local r = {} for i = 1, #p do r[#r + 1] = p[i] end return #p, #r"
    )
    assert run_lua(source, proxy_len) == "boolean:true number:0 number:0"
    assert run_lua(rewrite_len(source), proxy_len) == "boolean:true number:3 number:3"


# Random expressions from a small Lua grammar, with comments and line breaks between the
# tokens, evaluated by LuaJIT before and after the rewrite. Lua's own precedence decides
# what each text means; the rewrite must never change it.

_EXPR_PRELUDE = """\
local mt = {}
local function mk(n)
  n = tonumber(n) or 2
  if n ~= n then n = 0 end
  n = math.min(math.max(math.floor(n), 0), 5)
  local r = {}
  for i = 1, n do r[i] = i end
  return setmetatable(r, mt)
end
mt.__index = function(self, k) if k == "x" then return mk(#self + 1) end end
local t, u, n, s = mk(3), mk(1), {mk(1), mk(2), mk(3)}, "hello"
local o = {m = function(self, k) return mk(k) end}
local function f(k) if type(k) == "table" then return k end return mk(k) end
local function g(str) return mk(#str) end
"""

_SEPARATORS = st.sampled_from([" ", " ", " ", "", "\n", " --[[ # ]] ", " -- # c\n"])


def _seq(*parts: st.SearchStrategy[list[str]] | list[str]) -> st.SearchStrategy[list[str]]:
    strategies = [p if isinstance(p, st.SearchStrategy) else st.just(p) for p in parts]
    return st.tuples(*strategies).map(lambda lists: [tok for lst in lists for tok in lst])


_BINARY_OPERATORS = ["+", "-", "*", "%", "^", "..", "==", "<", "and", "or"]


def _grammar() -> st.SearchStrategy[tuple[tuple[str, str], list[str]]]:
    ints: st.SearchStrategy[list[str]] = st.deferred(lambda: integer)
    tables: st.SearchStrategy[list[str]] = st.deferred(lambda: table)
    strings: st.SearchStrategy[list[str]] = st.deferred(lambda: string)
    table = st.one_of(
        st.sampled_from([["t"], ["u"]]),
        _seq(["n", "["], ints, ["]"]),
        _seq(["f", "("], ints, [")"]),
        _seq(["o", ":", "m", "("], ints, [")"]),
        _seq(["f", "{"], ints, [",", "1", "}"]),
        _seq(["g"], st.sampled_from([['"ab#c"'], ["[[x#y]]"], ["'z'"]])),
        _seq(["("], tables, [")"]),
        _seq(tables, [".", "x"]),
        _seq(["{"], ints, [","], ints, ["}"]),
    )
    string = st.one_of(
        st.sampled_from([["s"], ['"ab#c"'], ["[==[x]]#y]==]"]]),
        _seq(["("], strings, [")"]),
        _seq(["s", ":", "rep", "("], ints, [")"]),
        _seq(strings, [".."], strings),
    )
    integer = st.one_of(
        st.sampled_from(
            [["1"], ["2"], ["0x3"], ["#", "..."], ["select", "(", "'#'", ",", "...", ")"]]
        ),
        _seq(["#"], tables),
        _seq(["#"], strings),
        _seq(["#"], ints),
        _seq(["-"], ints),
        _seq(["not"], ints),
        _seq(["("], ints, [")"]),
        _seq(ints, st.sampled_from([[op] for op in _BINARY_OPERATORS]), ints),
    )
    statement = st.sampled_from(
        [("return ", ""), ("local x = ", " return x"), ("if ", " then return 1 end return 2"),
         ("return {", "}"), ("local r = {} r[", "] = 1 return next(r)")]
    )  # fmt: skip
    return st.tuples(statement, integer)


@st.composite
def _programs(draw: st.DrawFn) -> str:
    (head, tail), tokens = draw(_grammar())
    seps = draw(st.lists(_SEPARATORS, min_size=len(tokens), max_size=len(tokens)))
    return _EXPR_PRELUDE + head + "".join(tok + sep for tok, sep in zip(tokens, seps)) + tail


@pytest.fixture(scope="module")
def run_verdict(lua: luajit.LuaRuntime):
    runner = lua.execute(_RUN)
    plain_len = lua.eval("function(x) return #x end")

    def verdict(source: str) -> str:
        out = runner(source, plain_len)
        if out.startswith("syntax:"):
            return "syntax error on line " + out.split(":")[2]
        return out if out.startswith("boolean:true") else "runtime error"

    return verdict


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(_programs())
def test_random_expressions_mean_the_same(run_verdict, source: str) -> None:
    assert run_verdict(rewrite_len(source)) == run_verdict(source)


# ---------------------------------------------------------------------------------------
# Speed: it runs on every chunk load

_DRIVER_BLOCK = """\
local function handle_{i}(driver, device, frame, ...) -- parse # frames
  local parts = {{}}
  for word in frame:gmatch("[^#]+") do parts[#parts + 1] = word end
  if #parts == 0 or #device.persistent_store.queue[1] > 0x1F then return end
  --[[ long comment with # and ]]
  device.status.count = #parts * 1.5e+3 .. [==[ # ]==]
  local q = device.persistent_store.queue
  q[#q + 1] = {{ parts = parts, n = #parts[#parts] }}
  return #q, select("#", ...), "it's" -- "#"
end
"""


def _best_of(n: int, fn) -> float:
    best = float("inf")
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def test_ten_thousand_lines_are_fast() -> None:
    source = "".join(_DRIVER_BLOCK.format(i=i) for i in range(1000))
    assert source.count("\n") == 10_000
    out = rewrite_len(source)
    assert out.count(LEN_FUNCTION) == 8_000
    # the target is well under 50 ms; the bound is loose because these machines are shared
    assert _best_of(3, lambda: rewrite_len(source)) < 0.25


def test_deep_nesting_is_not_quadratic() -> None:
    depth = 150
    source = "return " + "#f(" * depth + "x" + ")" * depth
    out = rewrite_len(source)
    assert out == "return " + "__hh_len(f(" * depth + "x" + "))" * depth
    long_body = "return #f(function()\n" + "local x = #t + #u[#v]\n" * 5000 + "end)"
    assert rewrite_len(long_body).count(LEN_FUNCTION) == 1 + 3 * 5000
    assert _best_of(2, lambda: rewrite_len(long_body)) < 0.5
