"""The datastore guard and nodes (issue 3, DESIGN section 4): the seed example, the error
forms, rejected writes changing nothing, move/copy semantics, and nodes acting like
tables. Real runtimes, real files; Lua runs as driver code (interpreted, sandboxed)."""

from __future__ import annotations

import re
from pathlib import Path

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from drivers_datastore.kit import HERE, PREFIX, Kit, text
from hubhost.state.datastore import DatastoreBinding
from hubhost.sandbox.runtime import DriverRuntime

SEED = Path("/work/shared/seeds/003_ee4f44d12c2c984c.txt")
ADDR = re.compile(r"0x[0-9a-f]+")


@pytest.fixture
def kit(tmp_path: Path) -> Kit:
    return Kit(tmp_path / "state")


def lua_lines(kit: Kit, body: str) -> list[str]:
    """Run `body` with `ds` (the root), `p(...)` (collect a line) and `try(f)` (pcall, p)."""
    src = (
        'local ds = require("datastore").init()\n'
        "local out = {}\n"
        "local function p(...) local t = {} for i = 1, select('#', ...) do "
        "t[i] = tostring((select(i, ...))) end out[#out + 1] = table.concat(t, ' ') end\n"
        "local function try(f, ...) local ok, e = pcall(f, ...) p(ok, e) return ok end\n"
        + body + "\nreturn table.concat(out, '\\n')\n"
    )
    return text(kit.run(src)).split("\n")


# -- the seed example -------------------------------------------------------------------------

def test_seed_example_runs_verbatim_and_prints_what_its_comments_say(tmp_path: Path) -> None:
    driver = HERE / "seed"
    init = (driver / "init.lua").read_text()
    block = init.split("-- BEGIN SEED EXAMPLE\n")[1].split("-- END SEED EXAMPLE\n")[0]
    if SEED.exists():  # the driver holds the seed's code block, byte for byte
        seed = SEED.read_text()
        code = re.search(r"\.\. code-block:: lua\n\n(.*?)\n\n\S", seed, re.S).group(1)
        assert block.rstrip("\n") == "\n".join(
            line[4:] if line.startswith("    ") else line for line in code.split("\n")).rstrip("\n")
    comments = [m.group(1) for m in re.finditer(r"print\(.*\)\s*--\s*(.+)", block)]
    comments += [m.group(1).strip() for m in re.finditer(r"^\s*-- (Data store keys.*)$", block, re.M)]
    assert "true" in comments and "false" in comments

    state = tmp_path / "state"
    kit = Kit(state, driver)
    printed = kit.printed
    func_line = ADDR.sub("0x@", "Data store keys and values must be JSON encodable: "
                                "function: 0x55a76bbfc490 is of unsupported type function")
    assert [ADDR.sub("0x@", line) for line in printed] == [func_line, func_line, "true", "false", "true"]
    assert printed[0] == printed[1]  # both name the same function (my_func)
    assert not any("should have failed" in line for line in printed)
    # the last save() reached the disk: my_table is gone, the nested table is there
    on_disk = orjson.loads((state / "datastore.json").read_bytes())
    assert on_disk == {"multi_nested_table": {"deeper": {"number": 1, "deepest": {}}}}
    assert kit.binding.is_dirty() is False


# -- error forms; a rejected write changes nothing ---------------------------------------------

BAD = [
    # (Lua expression, pattern of the message after the prefix)
    ("print", r"function: 0x[0-9a-f]+ is of unsupported type function"),
    ("coroutine.create(print)", r"thread: 0x[0-9a-f]+ is of unsupported type thread"),
    ("UD", r"userdata: 0x[0-9a-f]+ is of unsupported type userdata"),
    ("0/0", r"-?nan is not a finite number"),
    ("1/0", r"inf is not a finite number"),
    ("-1/0", r"-inf is not a finite number"),
    ('"ok\\255"', r'"ok\\255" is not valid UTF-8'),
    ('"\\237\\160\\128"', r'"\\237\\160\\128" is not valid UTF-8'),  # a UTF-16 surrogate
    ('{ ["\\192\\128"] = 1 }', r'key "\\192\\128" is not valid UTF-8'),  # overlong NUL
    ("{ 1, 2, nil, 4 }", r"table: 0x[0-9a-f]+ is a sparse array \(keys must be exactly 1..n\)"),
    ("{ [2] = 1 }", r"table: 0x[0-9a-f]+ is a sparse array"),
    ('{ 1, x = 2 }', r"table: 0x[0-9a-f]+ mixes array indices and string keys"),
    ("{ [true] = 1 }", r"key true is of unsupported type boolean"),
    ("{ [{}] = 1 }", r"key table: 0x[0-9a-f]+ is of unsupported type table"),
    ("{ [1.5] = 1 }", r"key 1.5 is not an array index"),
    ("{ [0] = 1 }", r"key 0 is not an array index"),
    ("{ [-1] = 1 }", r"key -1 is not an array index"),
    ("setmetatable({}, {})", r"table: 0x[0-9a-f]+ has a metatable \(only plain tables can be stored\)"),
    ("CYCLE", r"table: 0x[0-9a-f]+ contains itself \(a cycle\)"),
    ("{ a = { b = { c = print } } }", r"function: 0x[0-9a-f]+ is of unsupported type function"),
    ("{ ok = 1, list = { 1, { 0/0 } } }", r"-?nan is not a finite number"),
]


@pytest.mark.parametrize("expr,pattern", BAD, ids=[b[0] for b in BAD])
def test_rejected_write_raises_the_documented_form_and_changes_nothing(kit: Kit, expr: str, pattern: str) -> None:
    kit.env.UD = kit.rt.lua.eval(b"newproxy(false)")
    kit.run('local ds = require("datastore").init() ds.keep = { n = 1 } ds:save()')
    file_before = (kit.binding.store.path).read_bytes()
    out = lua_lines(kit, f"""
        local v = {"(function() local t = {{ x = 1 }} t.self = t return t end)()" if expr == "CYCLE" else expr}
        local before = type(v) == "table" and dump(v) or nil
        p(ds:is_dirty())
        try(function() ds.new = v end)
        try(function() ds.keep.inner = v end)
        try(function() rawset(ds.keep, "inner", v) end)
        p(ds:is_dirty(), rawget(ds, "new") == nil, ds.keep.inner == nil)
        if before then p(dump(v) == before) else p(true) end
        p(ds:save())
    """)
    assert out[0] == "false"
    for line in out[1:4]:
        ok, msg = line.split(" ", 1)
        assert ok == "false"
        assert msg.startswith(PREFIX), msg
        assert re.fullmatch(pattern, msg[len(PREFIX):].split("\n")[0]) or re.match(pattern, msg[len(PREFIX):]), msg
    assert out[4] == "false true true"       # not dirty, nothing stored
    assert out[5] == "true"                  # the passed value is as it was (not moved)
    assert out[6] == "true"
    assert kit.binding.store.path.read_bytes() == file_before
    assert kit.binding.store.writes == 1     # save() of a clean store writes nothing


def test_rejected_write_keeps_the_dirty_flag_true(kit: Kit) -> None:
    out = lua_lines(kit, """
        ds.a = 1
        try(function() ds.b = { f = print } end)
        p(ds:is_dirty(), ds.b)
    """)
    assert out[1] == "true nil"


def test_root_method_names_cannot_be_assigned(kit: Kit) -> None:
    out = lua_lines(kit, """
        for _, k in ipairs({ "save", "is_dirty" }) do
          try(function() ds[k] = 1 end)
          try(function() ds[k] = {} end)
          try(function() ds[k] = nil end)
          try(function() ds[k] = "x" end)
        end
        try(function() ds[1] = true end)
        p(ds:is_dirty(), type(ds.save), type(ds.is_dirty))
        ds.sub = { save = 1, is_dirty = true }  -- only the root reserves them
        p(ds.sub.save, ds.sub.is_dirty)
        try(function() table.insert(ds, 1) end)
    """)
    for line in out[:8]:
        assert re.fullmatch(r'false Data store keys and values must be JSON encodable: key "(save|is_dirty)" '
                            r"is reserved: ds:(save|is_dirty)\(\) is a method of the datastore", line), line
    assert out[8].startswith("false " + PREFIX + "key 1 is of unsupported type number")
    assert out[9] == "false function function"
    assert out[10] == "1 true"
    assert out[11].startswith("false " + PREFIX)


def test_depth_limit_keeps_the_file_loadable(kit: Kit) -> None:
    out = lua_lines(kit, """
        local function nest(n) local t = {} local cur = t for i = 1, n do cur.d = {} cur = cur.d end return t end
        p(try(function() ds.ok = nest(99) end))
        try(function() ds.deep = nest(100) end)
        try(function() local x = ds.ok for i = 1, 99 do x = x.d end x.more = {} end)
    """)
    assert out[1] == "true"
    assert re.fullmatch(r"false " + re.escape(PREFIX) + r"table: 0x[0-9a-f]+ is nested deeper than 100 levels", out[2])
    assert out[3].startswith("false " + PREFIX)


# -- move and copy semantics ------------------------------------------------------------------

def test_assigned_table_becomes_the_node(kit: Kit) -> None:
    out = lua_lines(kit, """
        local t = { inner = { 1, 2 }, s = "x" }
        local inner = t.inner
        ds.t = t
        p(ds.t == t, ds.t.inner == inner, getmetatable(t), type(t), #inner)
        ds:save()
        t.s = "y"                          -- through the caller's reference: guarded, dirty
        p(ds:is_dirty(), ds.t.s)
        try(function() inner[5] = 1 end)
        try(function() t.f = print end)
    """)
    assert out[0] == "true true false table 2"
    assert out[1] == "true y"
    assert out[2].startswith("false " + PREFIX + "index 5 would make table")
    assert out[3].startswith("false " + PREFIX + "function")
    assert kit.binding.data() == {"t": {"inner": [1, 2], "s": "y"}}


def test_assigning_a_live_node_stores_a_deep_copy(kit: Kit) -> None:
    out = lua_lines(kit, """
        ds.a = { list = { 1, { x = 1 } } }
        ds.b = ds.a
        p(ds.b ~= ds.a, ds.b.list ~= ds.a.list, ds.b.list[2] ~= ds.a.list[2])
        ds.b.list[2].x = 2
        p(ds.a.list[2].x, ds.b.list[2].x)
        ds.a.self = ds.a                   -- a copy of itself, not a cycle
        p(ds.a.self ~= ds.a, ds.a.self.self)
        ds.same = ds.a
        local before = ds.same
        ds.same = ds.same                  -- assigning a value over itself changes nothing
        p(ds.same == before)
    """)
    assert out == ["true true true", "1 2", "true nil", "true"]


def test_removed_nodes_are_detached_and_move_back_in(kit: Kit) -> None:
    out = lua_lines(kit, """
        ds.a = { inner = { v = 1 } }
        local a, inner = ds.a, ds.a.inner
        ds.a = nil
        ds:save()
        inner.v = 2                         -- detached: still checked, store stays clean
        p(ds:is_dirty(), inner.v)
        try(function() inner.f = print end)
        inner.back = nil
        try(function() inner.back = a end)  -- a contains inner: a cycle
        ds.b = a                             -- moved back in, not copied
        p(ds.b == a, ds.b.inner == inner, ds:is_dirty())
        ds:save()
        inner.v = 3
        p(ds:is_dirty())
        local x = table.remove((function() ds.list = { { n = 1 }, { n = 2 } } return ds.list end)())
        ds:save()
        x.n = 20
        p(ds:is_dirty())
        table.insert(ds.list, x)
        p(ds.list[2] == x, ds:is_dirty())
    """)
    assert out[0] == "false 2"
    assert out[1].startswith("false " + PREFIX + "function")
    assert re.fullmatch(r"false " + re.escape(PREFIX) + r"table: 0x[0-9a-f]+ would contain itself \(a cycle\)", out[2])
    assert out[3:] == ["true true true", "true", "false", "true true"]
    assert kit.binding.data() == {"b": {"inner": {"v": 3}}, "list": [{"n": 1}, {"n": 20}]}


def test_a_table_reached_twice_is_moved_once_and_copied_once(kit: Kit) -> None:
    out = lua_lines(kit, """
        local shared = { n = 1 }
        ds.t = { a = shared, b = shared }
        local moved = (ds.t.a == shared and 1 or 0) + (ds.t.b == shared and 1 or 0)
        p(moved, ds.t.a ~= ds.t.b)
    """)
    assert out == ["1 true"]


def test_writes_that_would_break_an_array_are_refused(kit: Kit) -> None:
    out = lua_lines(kit, """
        ds.arr = { 1, 2, 3 }
        local arr = ds.arr
        try(function() arr[2] = nil end)
        try(function() arr[5] = 5 end)
        try(function() arr.x = 1 end)
        try(function() arr[1.5] = 1 end)
        try(function() table.insert(arr, 6, 1) end)
        try(function() table.insert(arr, 1, nil) end)
        p(dump(arr))
        arr[4] = 4 arr[4] = nil arr[3] = nil arr[1] = 10
        p(dump(arr), #arr)
        ds.obj = { a = 1 }
        try(function() ds.obj[1] = 1 end)
        try(function() table.insert(ds.obj, 1) end)
        ds.obj.a = nil
        ds.obj[1] = "now an array"
        p(#ds.obj)
    """)
    for line in out[:6]:
        assert line.startswith("false " + PREFIX), line
    assert out[6] == "{n:1=n:1,n:2=n:2,n:3=n:3}"
    assert out[7] == "{n:1=n:10,n:2=n:2} 2"
    assert out[8].startswith("false " + PREFIX) and out[9].startswith("false " + PREFIX)
    assert out[10] == "1"


def test_values_round_trip_through_the_json_file(tmp_path: Path) -> None:
    state = tmp_path / "state"
    k1 = Kit(state)
    k1.run(r"""
        local ds = require("datastore").init()
        ds.s = "tab\t quote\" backslash\\ nul\0 ctrl\1 del\127 é 漢 😀"
        ds["key with \"quotes\""] = { [""] = "", ["1"] = 1 }
        ds.nums = { 0, -0.0, 1, -1, 0.1, 1e300, -1e-300, 2^53, 2^53 + 2, 2^63, 123456789.125, 5e-324 }
        ds.empty = {}
        ds.nested = { {}, { {} }, { a = {} } }
        ds.b = { true, false }
        assert(ds:save())
    """)
    k2 = Kit(state)
    dump_then = text(k1.run('return dump(require("datastore").init())'))
    dump_now = text(k2.run('return dump(require("datastore").init())'))
    assert dump_now == dump_then
    assert "n:-0" in dump_now  # -0.0 kept its sign
    assert k2.binding.is_dirty() is False


# -- nodes behave like plain tables -----------------------------------------------------------

SIDE_BY_SIDE = r"""
local ops = ...
local ds = require("datastore").init()
local function observe(t)
  local o = {}
  o[#o + 1] = "#" .. #t .. " getn " .. table.getn(t) .. " maxn " .. table.maxn(t)
  local ip = {}
  for i, v in ipairs(t) do ip[#ip + 1] = i .. "=" .. tostring(v) end
  o[#o + 1] = "ipairs " .. table.concat(ip, " ")
  local pk = {}
  for k, v in pairs(t) do pk[#pk + 1] = tostring(k) .. "=" .. tostring(v) end
  table.sort(pk)
  o[#o + 1] = "pairs " .. table.concat(pk, " ")
  local n, k = 0, next(t)
  while k ~= nil do n = n + 1 k = next(t, k) end
  o[#o + 1] = "next " .. n .. " " .. tostring(next({}))
  o[#o + 1] = "concat " .. table.concat(t, ",") .. " | " .. table.concat(t, "-", 2)
  o[#o + 1] = "unpack " .. select("#", unpack(t)) .. " " .. table.concat({ unpack(t, 1, 2) }, ",")
  o[#o + 1] = "rawget " .. tostring(rawget(t, 1)) .. " type " .. type(t)
  return table.concat(o, "; ")
end
local function count(...) return select("#", ...) .. ":" .. tostring((...)) end
local function apply(t, op)
  local name, a, b = op[1], op[2], op[3]
  if name == "insert" then table.insert(t, a) return "ok"
  elseif name == "insert_at" then table.insert(t, math.min(a, #t + 1), b) return "ok"
  elseif name == "remove" then return count(table.remove(t))
  elseif name == "remove_at" then return count(table.remove(t, a)) .. "/" .. #t
  elseif name == "sort" then table.sort(t) return "ok"
  elseif name == "sort_desc" then table.sort(t, function(x, y) return x > y end) return "ok"
  elseif name == "set" then t[math.min(a, #t + 1)] = b return "ok"
  elseif name == "append" then t[#t + 1] = a return "ok"
  elseif name == "rawset" then rawset(t, math.min(a, #t + 1), b) return "ok"
  elseif name == "pop" then if #t > 0 then t[#t] = nil end return "ok"
  end
end
local plain = {}
ds.node = {}
local node = ds.node
local log_plain, log_node = {}, {}
for i, op in ipairs(ops) do
  log_plain[i] = apply(plain, op) .. " :: " .. observe(plain)
  log_node[i] = apply(node, op) .. " :: " .. observe(node)
end
return table.concat(log_plain, "\n"), table.concat(log_node, "\n"), ds:is_dirty()
"""

OPS = st.lists(st.one_of(
    st.tuples(st.just("insert"), st.integers(-5, 50)),
    st.tuples(st.just("insert_at"), st.integers(1, 12), st.integers(-5, 50)),
    st.tuples(st.just("remove")),
    st.tuples(st.just("remove_at"), st.integers(-1, 12)),
    st.tuples(st.just("sort")),
    st.tuples(st.just("sort_desc")),
    st.tuples(st.just("set"), st.integers(1, 12), st.integers(-5, 50)),
    st.tuples(st.just("append"), st.integers(-5, 50)),
    st.tuples(st.just("rawset"), st.integers(1, 12), st.integers(-5, 50)),
    st.tuples(st.just("pop")),
), min_size=1, max_size=25)


@pytest.fixture(scope="module")
def side_by_side(tmp_path_factory: pytest.TempPathFactory):
    kit = Kit(None)
    return kit, kit.fn("return function(...) " + SIDE_BY_SIDE + " end")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS)
def test_pairs_ipairs_len_next_and_table_functions_behave_as_on_plain_tables(side_by_side, ops) -> None:
    kit, fn = side_by_side
    lua_ops = kit.rt.lua.table_from([kit.rt.lua.table_from([o[0].encode(), *o[1:]]) for o in ops])
    plain, node, dirty = fn(lua_ops)
    assert text(node) == text(plain)
    assert dirty is True


def test_object_nodes_iterate_like_plain_tables(kit: Kit) -> None:
    out = lua_lines(kit, """
        local src = { a = 1, b = "two", c = true, d = { 1 }, e = {} }
        local plain = { a = 1, b = "two", c = true, d = { 1 }, e = {} }
        ds.o = src
        local function keys(t) local r = {} for k, v in pairs(t) do r[#r + 1] = k .. ":" .. type(v) end table.sort(r) return table.concat(r, " ") end
        p(keys(ds.o) == keys(plain), #ds.o, #plain, next(ds.o) ~= nil, select("#", unpack(ds.o)))
        local n = 0 for _ in ipairs(ds.o) do n = n + 1 end
        p(n, table.concat(ds.o), table.maxn(ds.o))
        for k in pairs(ds.o) do ds.o[k] = nil end   -- clearing while iterating, as on plain tables
        p(next(ds.o), #ds.o)
    """)
    assert out == ["true 0 0 true 0", "0  0", "nil 0"]


def test_a_runtime_without_a_file_still_guards_and_save_reports_why(tmp_path: Path) -> None:
    kit = Kit(None)
    out = lua_lines(kit, """
        ds.x = 1
        p(ds:save())
        p(ds:is_dirty())
        try(function() ds.y = print end)
    """)
    assert out[0] == "nil datastore: no datastore file is attached to this runtime"
    assert out[1] == "true"
    assert out[2].startswith("false " + PREFIX)


def test_device_store_is_the_node_at_double_underscore_id(tmp_path: Path) -> None:
    driver = tmp_path / "drv"
    driver.mkdir()
    (driver / "init.lua").write_text("""
        local driver_helper = require "driver_helper"
        return driver_helper.init { name = "dev-store", lifecycle = {
          init = function(driver, device)
            device.persistent_store.seen = (device.persistent_store.seen or 0) + 1
            driver.datastore.same = rawequal(driver.datastore["__" .. device.id], device.persistent_store)
          end,
        } }
    """)
    from hubhost.sandbox.runtime import DeviceInfo
    kit = Kit(tmp_path / "state", driver)
    kit.rt.start_device(DeviceInfo(id="lamp-1"), True)
    assert kit.port.failures == []
    assert kit.binding.data() == {"__lamp-1": {"seen": 1}, "same": True}
    kit.rt.remove_device(DeviceInfo(id="lamp-1"))
    assert "__lamp-1" not in kit.binding.data()


def test_binding_loads_into_a_new_runtime_and_flushes_synchronously(tmp_path: Path) -> None:
    state = tmp_path / "state"
    k1 = Kit(state)
    k1.run('require("datastore").init().v = { 1, 2, 3 }')
    assert k1.binding.is_dirty() is True
    assert k1.binding.flush_now() is True
    assert k1.binding.flush_now() is False          # clean: nothing written
    assert k1.binding.store.writes == 1
    rt = DriverRuntime("other", HERE / "basic", k1.port)
    b2 = DatastoreBinding(rt, state)
    assert b2.data() == {"v": [1, 2, 3]}
    assert DatastoreBinding.of(rt) is b2


# -- the saved file always matches what drivers see (cached JSON of subtrees) ------------------

MUTATE = r"""
local codes, check = ...
local ds = require("datastore").init()
local K = { "a", "b", "c", "__dev" }
local S = { "x", "y", "z" }
local i = 0
local function nxt() i = i + 1 return codes[(i - 1) % #codes + 1] end
local function node_at(depth)          -- a random table in the store (or nil)
  local t = ds[K[nxt() % #K + 1]]
  for _ = 1, depth do
    if type(t) ~= "table" then return nil end
    local n = #t
    local c = (n > 0 and t[nxt() % n + 1]) or t[S[nxt() % #S + 1]]
    if type(c) ~= "table" then return t end
    t = c
  end
  return type(t) == "table" and t or nil
end
local function value()
  local c = nxt() % 6
  if c == 0 then return nxt() end
  if c == 1 then return "s" .. nxt() end
  if c == 2 then return { x = nxt(), y = { nxt(), nxt() } } end
  if c == 3 then return { nxt(), { z = "q" } } end
  if c == 4 then return nil end
  return nxt() % 2 == 0
end
local detached = {}
for step = 1, #codes do
  local op = nxt() % 10
  local t = node_at(nxt() % 3)
  pcall(function()
    if op == 0 then ds[K[nxt() % #K + 1]] = value()
    elseif op == 1 and t then t[S[nxt() % #S + 1]] = value()
    elseif op == 2 and t then t[#t + 1] = value()
    elseif op == 3 and t then table.insert(t, 1, value())
    elseif op == 4 and t then detached[#detached + 1] = table.remove(t)
    elseif op == 5 and t then table.sort(t, function(p, q) return tostring(p) < tostring(q) end)
    elseif op == 6 and t and #detached > 0 then t[S[nxt() % #S + 1]] = table.remove(detached)
    elseif op == 7 and t then ds[K[nxt() % #K + 1]] = t            -- a copy of a live node
    elseif op == 8 and t then
      local k = K[nxt() % #K + 1]
      detached[#detached + 1] = ds[k]
      ds[k] = nil
    elseif op == 9 then
      for _, d in ipairs(detached) do if type(d) == "table" then d[S[nxt() % #S + 1]] = nxt() end end
    end
  end)
  if step % 5 == 0 then
    assert(ds:save())
    check(dump(ds))
  end
end
"""


def canon_json(v: object) -> str:
    """kit.DUMP's text for the Lua value a JSON value loads as."""
    if isinstance(v, bool):
        return "b:" + ("true" if v else "false")
    if isinstance(v, (int, float)):
        return f"n:{float(v):.17g}"
    if isinstance(v, str):
        return "s:" + v.encode().hex()
    items = (enumerate(v, 1) if isinstance(v, list) else v.items())
    return "{" + ",".join(sorted(
        (f"n:{float(k):.17g}" if isinstance(k, int) else "s:" + k.encode().hex()) + "=" + canon_json(x)
        for k, x in items)) + "}"


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(codes=st.lists(st.integers(0, 1000), min_size=10, max_size=120))
def test_every_save_writes_exactly_what_drivers_see(tmp_path_factory: pytest.TempPathFactory, codes) -> None:
    kit = Kit(tmp_path_factory.mktemp("mutate"))
    path = kit.binding.store.path
    checked = []

    def check(dump: bytes) -> None:
        on_disk = canon_json(orjson.loads(path.read_bytes())) if path.exists() else "{}"
        assert on_disk == text(dump)
        checked.append(1)

    kit.fn("return function(...) " + MUTATE + " end")(kit.rt.lua.table_from(codes), check)
    assert len(checked) == len(codes) // 5
    if path.exists():          # a new runtime loads the same content, and goes on changing it
        fresh = Kit(path.parent)
        assert text(fresh.run('return dump(require("datastore").init())')) == canon_json(orjson.loads(path.read_bytes()))
        fresh.fn("return function(...) " + MUTATE + " end")(fresh.rt.lua.table_from(codes[::-1]), check)
        assert len(checked) == 2 * (len(codes) // 5)
