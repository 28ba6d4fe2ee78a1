"""lua/json.lua, the one encoder for values that leave a driver: what it accepts and how
it writes it (sorted keys, number forms), what it refuses and the message forms, datastore
nodes, and the status path through a real runtime. Lua runs as driver code (sandboxed)."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from drivers_datastore.kit import Kit, NullPort, text
from hubhost.sandbox.runtime import DeviceInfo, DriverRuntime
from hubhost.sandbox.sandbox import to_lua
from hubutil import write_driver
from hypo import examples

PREFIX = "Values must be JSON encodable: "


@pytest.fixture(scope="module")
def kit() -> Kit:
    return Kit(None)


@pytest.fixture(scope="module")
def enc(kit: Kit) -> Any:
    """Lua function: value -> (true, text) or (false, message), via pcall(json.encode)."""
    return kit.fn('local json = require "hubhost.json"\n'
                  "return function(src) local v = assert(loadstring('return ' .. src))() "
                  "return pcall(json.encode, v) end")


def encode(enc: Any, src: str) -> tuple[bool, str]:
    ok, res = enc(src.encode())
    return ok, text(res)


GOOD = [
    ("nil", "null"),
    ("true", "true"),
    ("false", "false"),
    ("0", "0"),
    ("-0.0", "0"),
    ("-17", "-17"),
    ("2^53 - 1", "9007199254740991"),
    ("-(2^53 - 1)", "-9007199254740991"),
    ("0.1", "0.1"),
    ("1.5e300", "1.5e+300"),
    ("1.1 * 1.1", "1.2100000000000002"),
    ("1/3", "0.3333333333333333"),
    ('"plain"', '"plain"'),
    ('"q\\"b\\\\n\\n\\t\\1\\31"', '"q\\"b\\\\n\\n\\t\\u0001\\u001f"'),
    ('"h\\195\\169 \\226\\130\\172 \\240\\159\\152\\128"', '"hé € 😀"'),
    ("{}", "{}"),
    ("{1, 2, 3}", "[1,2,3]"),
    ('{ b = 1, a = 2, ["A"] = 3, ["a b"] = 4, aa = 5 }', '{"A":3,"a":2,"a b":4,"aa":5,"b":1}'),
    ('{ z = { y = { 1, { x = false } } }, a = {} }', '{"a":{},"z":{"y":[1,{"x":false}]}}'),
    ('{ [1] = "a", [2] = "b" }', '["a","b"]'),
    ("setmetatable({ k = 1 }, { __index = { hidden = 2 } })", '{"k":1}'),
]


@pytest.mark.parametrize("src,want", GOOD, ids=[g[0] for g in GOOD])
def test_accepted_values_and_their_text(enc: Any, src: str, want: str) -> None:
    assert encode(enc, src) == (True, want)
    orjson.loads(want)  # the expectation itself is JSON


BAD = [
    ("print", r"function: 0x[0-9a-f]+ is of unsupported type function"),
    ("coroutine.create(print)", r"thread: 0x[0-9a-f]+ is of unsupported type thread"),
    ("0/0", r"-?nan is not a finite number"),
    ("1/0", r"inf is not a finite number"),
    ("-1/0", r"-inf is not a finite number"),
    ('"ok\\255"', r'"ok\\255" is not valid UTF-8'),
    ('"\\237\\160\\128"', r'"\\237\\160\\128" is not valid UTF-8'),          # a surrogate
    ("{ 1, nil, 3 }", r"table: 0x[0-9a-f]+ is a sparse array \(keys must be exactly 1\.\.n\)"),
    ("{ [2] = 1 }", r"table: 0x[0-9a-f]+ is a sparse array \(keys must be exactly 1\.\.n\)"),
    ("{ 1, x = 2 }", r"table: 0x[0-9a-f]+ mixes array indices and string keys"),
    ("{ [1.5] = 1 }", r"key 1\.5 is not an array index \(keys are strings, or exactly 1\.\.n in arrays\)"),
    ("{ [0] = 1 }", r"key 0 is not an array index \(keys are strings, or exactly 1\.\.n in arrays\)"),
    ("{ [true] = 1 }", r"key true is of unsupported type boolean"),
    ("{ [{}] = 1 }", r"key table: 0x[0-9a-f]+ is of unsupported type table"),
    ('{ ["k\\255"] = 1 }', r'key "k\\255" is not valid UTF-8'),
    ("{ a = { b = { print } } }", r"function: 0x[0-9a-f]+ is of unsupported type function \(at value\.a\.b\[1\]\)"),
    ('{ ["not id"] = { 0/0 } }', r'-?nan is not a finite number \(at value\["not id"\]\[1\]\)'),
    ("(function() local t = {} t.x = { t } return t end)()",
     r"table: 0x[0-9a-f]+ contains itself \(a cycle\) \(at value\.x\[1\]\)"),
    ("(function() local t = {} for i = 1, 120 do t = { t } end return t end)()",
     r"table: 0x[0-9a-f]+ is nested deeper than 100 levels \(at value(\[1\]){100}\)"),
]


@pytest.mark.parametrize("src,pattern", BAD, ids=[b[0] for b in BAD])
def test_refused_values_name_the_problem(enc: Any, src: str, pattern: str) -> None:
    ok, msg = encode(enc, src)
    assert not ok
    assert re.fullmatch(re.escape(PREFIX) + pattern, msg), msg


def test_what_and_root_name_shape_the_message(kit: Kit) -> None:
    f = kit.fn('local json = require "hubhost.json"\n'
               "return function() return select(2, pcall(json.encode, { x = { print } }, 'Results of function f', 'result')),"
               " select(2, pcall(json.encode, 0/0, 'Status values', 'level')),"
               " json.try_encode(print, 'Arguments of g', 'args') end")
    r1, r2, r3, r4 = f()
    assert re.fullmatch(r"Results of function f must be JSON encodable: function: 0x[0-9a-f]+ is of "
                        r"unsupported type function \(at result\.x\[1\]\)", text(r1))
    assert re.fullmatch(r"Status values must be JSON encodable: -?nan is not a finite number \(at level\)", text(r2))
    assert r3 is None
    assert re.fullmatch(r"Arguments of g must be JSON encodable: function: 0x[0-9a-f]+ is of "
                        r"unsupported type function \(at args\)", text(r4))


def test_a_refusal_midway_leaves_no_state_behind(kit: Kit) -> None:
    f = kit.fn('local json = require "hubhost.json"\n'
               "return function()\n"
               "  local a = pcall(json.encode, { o = { a = 1, b = { c = 1, d = print, e = 2 }, z = 3 } })\n"
               "  local c = {} c.c = c\n"
               "  local b = pcall(json.encode, { k = c })\n"
               "  return a, b, json.encode({ o = { q = 1, b = { r = 2 } } }), json.encode(c.c == c and { k = {} })\n"
               "end")
    a, b, t1, t2 = f()
    assert (a, b) == (False, False)
    assert text(t1) == '{"o":{"b":{"r":2},"q":1}}'
    assert text(t2) == '{"k":{}}'


def test_equal_tables_give_equal_text_whatever_their_history(kit: Kit) -> None:
    f = kit.fn('local json = require "hubhost.json"\n'
               "return function()\n"
               "  local a, b = {}, {}\n"
               "  for i = 1, 200 do a['k' .. i] = i end\n"
               "  for i = 400, 1, -1 do b['k' .. i] = i end\n"
               "  for i = 201, 400 do b['k' .. i] = nil end\n"
               "  return json.encode(a), json.encode(b)\n"
               "end")
    ta, tb = f()
    assert ta == tb
    keys = list(orjson.loads(ta))
    assert keys == sorted(keys) and len(keys) == 200


def test_datastore_nodes_encode_like_the_tables_they_hold(kit: Kit) -> None:
    f = kit.fn('local json = require "hubhost.json"\n'
               "return function()\n"
               "  local ds = require('datastore').init()\n"
               "  ds.enc = { z = 1, a = { 1, 2, { deep = 'x' } }, e = {} }\n"
               "  table.insert(ds.enc.a, 4)\n"
               "  ds.list = { 'a', 'b' }\n"
               "  local bad = pcall(json.encode, { ds.enc, 0/0 })\n"
               "  return json.encode(ds.enc), json.encode({ wrap = ds.list }), bad\n"
               "end")
    node, wrapped, bad = f()
    assert text(node) == '{"a":[1,2,{"deep":"x"},4],"e":{},"z":1}'
    assert text(wrapped) == '{"wrap":["a","b"]}'
    assert bad is False


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53) + 1, 2**53 - 1)
    | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=8),
    lambda inner: st.lists(inner.filter(lambda x: x is not None), min_size=1, max_size=4)
    | st.dictionaries(st.text(max_size=5), inner.filter(lambda x: x is not None), min_size=1, max_size=4),
    max_leaves=12,
).filter(lambda v: v is not None)


@pytest.fixture(scope="module")
def plain_encode(kit: Kit) -> Any:
    return kit.fn('local json = require "hubhost.json" return function(v) return json.encode(v) end')


@settings(max_examples=examples(150), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=JSONS)
@example(value=[3.236972837342524e-194, 3.236972837342524e-194, 3.738519683296515e+16])  # issue 12
@example(value=[[False, False, False]])
def test_round_trip_through_orjson(kit: Kit, plain_encode: Any, value: Any) -> None:
    out = text(plain_encode(to_lua(kit.rt.lua, value)))
    back = orjson.loads(out)
    assert back == value
    if not _has_float(value):  # same text as a sorted-key encoder writes
        assert out == orjson.dumps(value, option=orjson.OPT_SORT_KEYS).decode()


def _has_float(v: Any) -> bool:
    if isinstance(v, float):
        return True
    if isinstance(v, list):
        return any(_has_float(x) for x in v)
    if isinstance(v, dict):
        return any(_has_float(x) for x in v.values())
    return False


# -- status goes through the encoder ---------------------------------------------------------

STATUS_DRIVER = """
local driver_helper = require "driver_helper"
local function try(device, name, v)
  local ok, err = pcall(function() device.status[name] = v end)
  if not ok then device.status["err_" .. name] = err end
end
return driver_helper.init {
  name = "status-enc",
  lifecycle = {
    init = function(driver, device)
      device.status.obj = { b = 1, a = { 2, 0.5, "x" } }
      device.status.gone = 1
      device.status.gone = nil
      local ds = require("datastore").init()
      ds.cfg = { on = true, level = 3 }
      device.status.node = ds.cfg
      ds.cfg.level = 4                       -- status keeps what was assigned
      device.status.read_back = device.status.node.level
      try(device, "fn", { f = print })
      try(device, "nan", 0/0)
      try(device, "utf", "bad\\255")
      local cyc = {} cyc[1] = cyc
      try(device, "cyc", cyc)
    end,
  },
}
"""


def test_status_values_are_encoded_in_lua_and_refused_there(tmp_path: Path) -> None:
    d = write_driver(tmp_path, "enc", STATUS_DRIVER)
    port = NullPort()
    rt = DriverRuntime("enc", d, port)
    rt.load()
    rt.start_device(DeviceInfo(id="d1"), True)
    assert port.failures == []
    got = rt.status.device("d1")
    assert got["obj"] == '{"a":[2,0.5,"x"],"b":1}'
    assert "gone" not in got
    assert got["node"] == '{"level":3,"on":true}'
    assert got["read_back"] == "3"
    errs = {k[4:]: orjson.loads(v) for k, v in got.items() if k.startswith("err_")}
    assert set(errs) == {"fn", "nan", "utf", "cyc"}
    line = r"\S*init\.lua:\d+: "
    pre = line + re.escape("Status values must be JSON encodable: ")
    assert re.fullmatch(pre + r"function: 0x[0-9a-f]+ is of unsupported type function \(at fn\.f\)", errs["fn"])
    assert re.fullmatch(pre + r"-?nan is not a finite number \(at nan\)", errs["nan"])
    assert re.fullmatch(pre + r'"bad\\255" is not valid UTF-8 \(at utf\)', errs["utf"])
    assert re.fullmatch(pre + r"table: 0x[0-9a-f]+ contains itself \(a cycle\) \(at cyc\[1\]\)", errs["cyc"])
    for name in ("fn", "nan", "utf", "cyc"):
        assert name not in got   # a refused value changes nothing


def _digits(s: str) -> int:
    mantissa = s.lstrip("-").split("e")[0].replace(".", "").lstrip("0").rstrip("0")
    return len(mantissa)


def test_float_text_is_shortest_round_trip(enc: Any) -> None:
    for x in (0.1, 0.2 + 0.1, 1e-7, 123456.789, 2.5e-308, 1.7976931348623157e308, -3.25, 2.0**60):
        ok, out = encode(enc, repr(x))
        assert ok and float(out) == x, (x, out)
        assert _digits(out) <= max(_digits(repr(x)), 15), (x, out)   # Python's repr is shortest


# -- no ITERN loops in the encoder or the datastore (LuaJIT issue #1510) ---------------------

_OPS = """
local util = require "jit.util"
local function ops(f, into)
  local pc = 1
  while true do
    local ins = util.funcbc(f, pc)
    if ins == nil then break end
    into[ins % 256] = (into[ins % 256] or 0) + 1
    pc = pc + 1
  end
  local i = -1
  while true do
    local k = util.funck(f, i)
    if k == nil then break end
    if type(k) == "proto" or (type(k) == "function") then ops(k, into) end
    i = i - 1
  end
  return into
end
return function(src, name)
  local f = assert(loadstring(src, name))
  local t = {}
  for op, n in pairs(ops(f, {})) do t[#t + 1] = op end
  return table.concat(t, ",")
end
"""


def test_the_encoder_and_the_datastore_have_no_itern_loops() -> None:
    """Why: LuaJIT 2.1.1774896198 (lupa 2.8) can drop an element from a `for k in pairs(t)`
    or `for k, v in next, t` loop (bytecode ITERN) when a trace records next() right after
    the loop was despecialized (LuaJIT #1510, fixed upstream 2026-08-18). It is rare and
    depends on the JIT's history, so it showed as a hypothesis FlakyFailure: a 3-element
    array refused as "sparse" once, accepted on the retry. A dropped element in the
    datastore's encoder would be a member missing from the file. The loops iterate through
    a variable of another name, which the parser compiles as ITERC instead."""
    import lupa.luajit21 as lj

    lua = lj.LuaRuntime()
    ops = lua.execute(_OPS)

    def opset(src: str) -> set[int]:
        out = ops(src.encode(), b"=t")
        return {int(x) for x in (out.decode() if isinstance(out, bytes) else out).split(",") if x}

    specialized = opset("local pairs = pairs return function(t) for k in pairs(t) do end end")
    generic = opset("local iterate = pairs return function(t) for k in iterate(t) do end end")
    itern = specialized - generic          # ISNEXT and ITERN
    assert len(itern) == 2, (specialized, generic)
    root = Path(__file__).resolve().parents[1]
    # every Lua file of hubhost's own: the library and the privileged glue run with the JIT on
    files = sorted([*(root / "lua").rglob("*.lua"), *(root / "hubhost").rglob("*.lua")])
    assert len(files) > 20
    for path in files:
        got = opset(path.read_text()) & itern
        rel = path.relative_to(root)
        assert not got, f"{rel} has ITERN loops again (opcodes {got}): iterate with a variable not named pairs/next"
