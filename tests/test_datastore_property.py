"""Property test of the guard and the round trip (issue 3): random Lua values, good and bad,
nested up to depth 8. Every accepted value reads back identical after save(), a fresh
runtime in a new process and load; every rejected value raises the documented form and
leaves the persisted JSON, is_dirty() and the value itself as they were."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypo import examples

from drivers_datastore.kit import PREFIX, Kit, text

ROOT = Path(__file__).resolve().parent.parent
MAX_DEPTH = 8

# -- descriptions of Lua values -----------------------------------------------------------------
# ("num", float) ("str", bytes) ("bool", b) ("arr", [d]) ("obj", [(key bytes, d)])
# ("bad", lua expression, problem) ("badtable", lua expression template, problem, [d])

BAD_LEAVES = [
    ("print", "function"), ("coroutine.create(print)", "thread"), ("UD", "userdata"),
    ("(0/0)", "nan"), ("(1/0)", "inf"), ("(-1/0)", "inf"),
    ('"\\255"', "utf8"), ('"ab\\192\\128"', "utf8"), ('"\\237\\160\\128"', "utf8"),
    ('"\\244\\144\\128\\128"', "utf8"),
]
PROBLEMS = {
    "function": r"function: 0x[0-9a-f]+ is of unsupported type function",
    "thread": r"thread: 0x[0-9a-f]+ is of unsupported type thread",
    "userdata": r"userdata: 0x[0-9a-f]+ is of unsupported type userdata",
    "nan": r"-?nan is not a finite number",
    "inf": r"-?inf is not a finite number",
    "utf8": r'(key )?".*" is not valid UTF-8',
    "sparse": r"table: 0x[0-9a-f]+ is a sparse array \(keys must be exactly 1\.\.n\)",
    "mixed": r"table: 0x[0-9a-f]+ mixes array indices and string keys",
    "keytype": r"key (true|false|table: 0x[0-9a-f]+) is of unsupported type (boolean|table)",
    "keyindex": r"key -?[0-9.e+]+ is not an array index \(keys are strings, or exactly 1\.\.n in arrays\)",
    "meta": r"table: 0x[0-9a-f]+ has a metatable \(only plain tables can be stored\)",
    "cycle": r"table: 0x[0-9a-f]+ contains itself \(a cycle\)",
}


def lua_num(x: float) -> str:
    if x == 0 and str(x).startswith("-"):
        return "(-0.0)"
    return f"({x:.17g})"


def lua_str(b: bytes) -> str:
    return '"' + "".join(f"\\{c:03d}" for c in b) + '"'


def to_lua(d: tuple) -> str:
    kind = d[0]
    if kind == "num":
        return lua_num(d[1])
    if kind == "str":
        return lua_str(d[1])
    if kind == "bool":
        return "true" if d[1] else "false"
    if kind == "arr":
        return "{" + ", ".join(to_lua(x) for x in d[1]) + "}"
    if kind == "obj":
        return "{" + ", ".join(f"[{lua_str(k)}] = {to_lua(v)}" for k, v in d[1]) + "}"
    if kind == "bad":
        return d[1]
    # badtable: template with {items} holding the good children
    return d[1].format(items=", ".join(to_lua(x) for x in d[3]))


def problems(d: tuple) -> set[str]:
    kind = d[0]
    if kind == "bad":
        return {d[2]}
    if kind == "badtable":
        return {d[2]} | set().union(*(problems(x) for x in d[3])) if d[3] else {d[2]}
    if kind == "arr":
        return set().union(*(problems(x) for x in d[1])) if d[1] else set()
    if kind == "obj":
        return set().union(*(problems(v) for _, v in d[1])) if d[1] else set()
    return set()


def model(d: tuple) -> Any:
    """What the JSON file holds for an accepted value."""
    kind = d[0]
    if kind in ("num", "bool"):
        return d[1]
    if kind == "str":
        return d[1].decode()
    if kind == "arr":
        return [model(x) for x in d[1]] if d[1] else {}
    return {k.decode(): model(v) for k, v in d[1]}


def canon(d: tuple) -> str:
    """The same text as kit.DUMP gives for the Lua value."""
    kind = d[0]
    if kind == "num":
        return f"n:{float(d[1]):.17g}"
    if kind == "str":
        return "s:" + d[1].hex()
    if kind == "bool":
        return "b:" + ("true" if d[1] else "false")
    if kind == "arr":
        items = [f"n:{float(i):.17g}={canon(x)}" for i, x in enumerate(d[1], 1)]
    else:
        items = [f"s:{k.hex()}={canon(v)}" for k, v in d[1]]
    return "{" + ",".join(sorted(items)) + "}"


finite = st.floats(allow_nan=False, allow_infinity=False)
numbers = st.one_of(st.integers(-(2**60), 2**60).map(float), finite, st.sampled_from([0.0, -0.0, 2.0**53, 5e-324]))
texts = st.text(max_size=12).map(str.encode)
keys = st.text(max_size=6).map(str.encode)
good_leaf = st.one_of(numbers.map(lambda x: ("num", x)), texts.map(lambda b: ("str", b)),
                      st.booleans().map(lambda b: ("bool", b)))
bad_leaf = st.sampled_from(BAD_LEAVES).map(lambda b: ("bad", b[0], b[1]))


def values(depth: int, allow_bad: bool) -> st.SearchStrategy:
    leaf = st.one_of(good_leaf, bad_leaf) if allow_bad else good_leaf
    if depth == 0:
        return leaf
    child = values(depth - 1, allow_bad)
    arr = st.lists(child, max_size=4).map(lambda xs: ("arr", xs))
    obj = st.dictionaries(keys, child, max_size=4).map(lambda m: ("obj", sorted(m.items())))
    options = [leaf, arr, obj]
    if allow_bad:
        kids = st.lists(child, max_size=2)
        options += [
            kids.map(lambda xs: ("badtable", "{{[1] = 1, [3] = 3}}", "sparse", [])),
            kids.map(lambda xs: ("badtable", "{{{items}, [9] = true}}" if xs else "{{[2] = 0}}", "sparse", xs)),
            kids.map(lambda xs: ("badtable", "{{{items}, mixed = 1}}" if xs else "{{1, x = 1}}", "mixed", xs)),
            st.sampled_from(["true", "{{}}"]).map(lambda k: ("badtable", "{{[" + k + "] = 1}}", "keytype", [])),
            st.sampled_from(["1.5", "0", "-3", "0.25"]).map(
                lambda k: ("badtable", "{{[" + k + "] = 1}}", "keyindex", [])),
            st.just(("badtable", '{{["\\255"] = 1}}', "utf8", [])),
            kids.map(lambda xs: ("badtable", "setmetatable({{{items}}}, {{}})", "meta", xs)),
            kids.map(lambda xs: ("badtable", "CYC({{{items}}})", "cycle", xs)),
        ]
    return st.one_of(*options)


EXAMPLE = st.tuples(st.booleans(), st.booleans()).flatmap(
    lambda flags: st.tuples(values(MAX_DEPTH if flags[0] else 3, flags[1]), st.booleans()))

CHUNK = """
local ds = require("datastore").init()
local key, pre_dirty = ...
local function CYC(t) t.cycle = t return t end
local function plain(v, seen)  -- no table reachable from v became a datastore node
  if type(v) ~= "table" then return true end
  seen = seen or {{}}
  if seen[v] then return true end
  seen[v] = true
  if getmetatable(v) == false then return false end
  for _, x in pairs(v) do if not plain(x, seen) then return false end end
  return true
end
if pre_dirty then ds.counter = (ds.counter or 0) + 1 end
local v = {expr}
local before = dump(v)
local dirty0 = ds:is_dirty()
local ok, err = pcall(function() ds[key] = v end)
local after, still_plain = dump(v), plain(v)
local dirty1 = ds:is_dirty()
local stored = ok and dump(ds[key]) or nil
local saved = ds:save()
return ok, err, before, after, still_plain, dirty0, dirty1, stored, saved, ds:is_dirty()
"""

READER = r"""
import json, sys
sys.path.insert(0, sys.argv[2])
from pathlib import Path
from drivers_datastore.kit import Kit, text
kit = Kit(Path(sys.argv[1]))
keys = json.loads(sys.argv[3])
dump = kit.fn('return function(k) return dump(require("datastore").init()[k]) end')
print(json.dumps({k: text(dump(k.encode())) for k in keys}))
"""


def test_random_values_round_trip_or_are_refused_without_a_trace(tmp_path: Path) -> None:
    state = tmp_path / "state"
    kit = Kit(state)
    kit.env.UD = kit.rt.lua.eval(b"newproxy(false)")
    path = kit.binding.store.path
    expected: dict[str, str] = {}
    on_disk: dict[str, Any] = {}
    counter = [0]
    stats = {"accepted": 0, "rejected": 0}

    @settings(max_examples=examples(300), deadline=None, suppress_health_check=list(HealthCheck))
    @given(example=EXAMPLE)
    def check(example: tuple) -> None:
        desc, pre_dirty = example
        counter[0] += 1
        key = f"k{counter[0]}"
        file_before = path.read_bytes() if path.exists() else None
        fn = kit.rt.sandbox.compile(CHUNK.format(expr=to_lua(desc)).encode(), "example", kit.env)
        ok, err, before, after, still_plain, dirty0, dirty1, stored, saved, dirty2 = fn(key.encode(), pre_dirty)
        if pre_dirty:
            on_disk["counter"] = on_disk.get("counter", 0) + 1
        bad = problems(desc)
        if bad:
            stats["rejected"] += 1
            assert ok is False
            message = text(err)
            assert message.startswith(PREFIX), message
            rest = message[len(PREFIX):]
            assert any(re.fullmatch(PROBLEMS[p], rest, re.S) for p in bad), (rest, bad)
            assert dirty1 == dirty0 == pre_dirty            # is_dirty() as it was
            assert text(after) == text(before) and still_plain is True   # the value as it was
            if not pre_dirty:                                # the file as it was
                assert (path.read_bytes() if path.exists() else None) == file_before
        else:
            stats["accepted"] += 1
            assert ok is True, text(err)
            assert text(before) == canon(desc)
            assert text(stored) == canon(desc)
            expected[key] = canon(desc)
            on_disk[key] = model(desc)
        assert saved is True and dirty2 is False
        if path.exists():
            assert orjson.loads(path.read_bytes()) == on_disk

    check()
    assert stats["accepted"] > 50 and stats["rejected"] > 50, stats
    # a fresh runtime in a new process loads the file: every accepted value is identical
    r = subprocess.run([sys.executable, "-c", READER, str(state), str(ROOT / "tests"), json.dumps(list(expected))],
                       capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == expected
