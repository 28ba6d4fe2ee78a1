"""Driver functions: template validation, metadata, argument checking, exec with every
error code from the HTTP API and from Lua callers (driver-to-driver calls)."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from hypothesis import given, settings, strategies as st

from hubhost.cli.check import _NullPort
from hubhost.functions import ExecError, Function, Interface, bind_args
from hubhost.sandbox.runtime import DriverLoadError, DriverRuntime
from hubutil import run, running_hub, write_config, write_driver

# The example of seeds/001, as a driver template.
SEED_EXAMPLE = """
    local driver_helper = require "driver_helper"
    local function noop() end
    return driver_helper.init {
      name = "seed",
      functions = {
        switch_input = { params = { input = { "String" } }, handler = noop },
        add = { params = { { "a", "Int32" }, { "b", "Int32" } }, handler = noop },
        perform_task = { params = { name = { "String|Int32" } }, handler = noop },
        error_task = { handler = noop },
        future_add = { params = { { "a", "Int32" }, { "b", "Int32", 200 } }, handler = noop },
      },
      implements = { "VideoConferenceSpace" },
      requirements = { Display_1 = { "Powerable" }, Camera = { "Powerable", "Moveable" } },
      security = { support = { "error_task", "future_add" }, administrator = { "perform_task" } },
    }
"""


def load_runtime(tmp_path: Path, src: str) -> DriverRuntime:
    d = write_driver(tmp_path, "drv", src)
    rt = DriverRuntime("drv", d, _NullPort())
    rt.load()
    return rt


def test_metadata_is_the_interface_document_of_the_seed(tmp_path: Path) -> None:
    rt = load_runtime(tmp_path, SEED_EXAMPLE)
    text, timeouts = rt.R.caps.functions_api.metadata_json(rt.R.driver())
    doc = orjson.loads(text)
    assert doc["functions"] == {
        "add": {"a": ["Int32"], "b": ["Int32"]},
        "error_task": {},
        "future_add": {"a": ["Int32"], "b": ["Int32", 200]},
        "perform_task": {"name": ["String|Int32"]},
        "switch_input": {"input": ["String"]},
    }
    assert list(doc["functions"]["future_add"]) == ["a", "b"]   # declared order kept
    assert doc["implements"] == ["VideoConferenceSpace"]
    assert doc["requirements"] == {"Display_1": ["Powerable"], "Camera": ["Powerable", "Moveable"]}
    assert doc["security"] == {"support": ["error_task", "future_add"], "administrator": ["perform_task"]}
    assert list(doc) == ["functions", "implements", "requirements", "security"]
    iface = Interface(text.decode(), orjson.loads(timeouts))
    assert iface.functions["perform_task"].level == "administrator"
    assert iface.functions["future_add"].params[1].default == 200
    # `hubhost check` prints the same content
    assert rt.metadata()["security"] == doc["security"]


@pytest.mark.parametrize("functions, message", [
    ('power = { params = { state = { "Boolean" } }, handler = f }',
     'template.functions.power.params.state: unknown type "Boolean"'),
    ('power = { params = { state = { "Bool|Nope" } }, handler = f }',
     'template.functions.power.params.state: unknown type "Nope"'),
    ('add = { params = { b = { "Int32", 1.5 } }, handler = f }',
     "template.functions.add.params.b: default 1.5 is not Int32"),
    ('add = { params = { b = { "Int32", 2^40 } }, handler = f }',
     "template.functions.add.params.b: default 1099511627776 is not Int32"),
    ('add = { params = { { "a", "Int32" }, { "a", "String" } }, handler = f }',
     "template.functions.add.params: a appears twice"),
    ('add = { params = { ["1x"] = { "Int32" } }, handler = f }',
     "template.functions.add: parameter name 1x must be an identifier"),
    ('add = { params = { x = 5 }, handler = f }',
     "template.functions.add.params.x must be"),
    ('reset = { security = "root", handler = f }',
     'template.functions.reset.security must be "support" or "administrator", got root'),
    ('reset = { timeout = -1, handler = f }',
     "template.functions.reset.timeout must be a positive number of seconds, got -1"),
    ('reset = { handler = f, sekurity = "support" }',
     "unknown key 'sekurity' in function reset (did you mean 'security'?)"),
    ('reset = { handler = 5 }',
     "template.functions.reset must be a table with a handler function"),
])
def test_bad_templates_fail_at_load_naming_function_and_param(tmp_path: Path, functions: str, message: str) -> None:
    src = f"""
        local driver_helper = require "driver_helper"
        local f = function() end
        local driver = driver_helper.init {{ name = "bad", functions = {{ {functions} }} }}
        return driver
    """
    with pytest.raises(DriverLoadError) as e:
        load_runtime(tmp_path, src)
    assert message in str(e.value)
    assert "init.lua:4:" in str(e.value)   # the position of the template in the entry chunk


@pytest.mark.parametrize("extra, message", [
    ('security = { support = { "nope" } }', 'template.security.support names "nope", which is not in template.functions'),
    ('security = { root = { "f1" } }', "template.security.root is not a level"),
    ('implements = "Powerable"', "template.implements must be a list of names"),
    ('implements = { 5 }', "template.implements[1] must be a string"),
    ('requirements = { Display = "Powerable" }', "template.requirements.Display must be a list of names"),
])
def test_bad_security_implements_requirements(tmp_path: Path, extra: str, message: str) -> None:
    src = f"""
        local driver_helper = require "driver_helper"
        local driver = driver_helper.init {{ name = "bad", functions = {{ f1 = {{ handler = function() end }} }}, {extra} }}
        return driver
    """
    with pytest.raises(DriverLoadError) as e:
        load_runtime(tmp_path, src)
    assert message in str(e.value)
    assert "init.lua:3:" in str(e.value)


# -- argument binding (pure) ---------------------------------------------------------------

def fn_of(params: dict[str, list[Any]], name: str = "f") -> Function:
    doc = {"functions": {name: params}, "implements": [], "requirements": {}, "security": {}}
    return Interface(orjson.dumps(doc).decode()).functions[name]


def bad_args(fn: Function, args: Any) -> str:
    with pytest.raises(ExecError) as e:
        bind_args(fn, args)
    assert e.value.code == "bad_args"
    return e.value.message


def test_bind_args_named_positional_defaults_and_messages() -> None:
    add = fn_of({"a": ["Int32"], "b": ["Int32", 200]}, "future_add")
    assert bind_args(add, {"a": 1}) == {"a": 1, "b": 200}
    assert bind_args(add, [1, 2]) == {"a": 1, "b": 2}
    assert bind_args(add, [1]) == {"a": 1, "b": 200}
    assert bind_args(add, {"a": 3.0, "b": None}) == {"a": 3, "b": 200}   # integral float, null -> default
    assert bad_args(add, {}) == "future_add: missing argument 'a' (Int32)"
    assert bad_args(add, [1, 2, 3]) == "future_add takes 2 arguments (a, b), got 3"
    assert bad_args(add, {"a": 1, "c": 2}) == "future_add has no parameter 'c' (parameters: a, b)"
    assert bad_args(add, {"a": "1"}) == "future_add: argument 'a' must be Int32 (-2147483648..2147483647), got string \"1\""
    assert bad_args(add, {"a": 2**31}) == ("future_add: argument 'a' must be Int32 (-2147483648..2147483647), "
                                           "got number 2147483648")
    assert bad_args(add, {"a": True}).endswith("got boolean true")
    assert bad_args(add, {"a": 1.5}).endswith("got number 1.5")
    assert bad_args(add, "1, 2") == ('args must be an object of named arguments or an array of positional '
                                     'arguments, got string "1, 2"')
    task = fn_of({"name": ["String|Int32"]}, "perform_task")
    assert bind_args(task, ["x"]) == {"name": "x"}
    assert bind_args(task, [7]) == {"name": 7}
    assert bad_args(task, [[1]]) == "perform_task: argument 'name' must be String|Int32, got array of 1 item"
    assert bind_args(fn_of({}), None) == {}
    # what Lua cannot hold is refused here, not lost on the way
    assert bad_args(fn_of({"x": ["JSON"]}), [[2**64]]) == ("f: argument 'x' holds an integer outside "
                                                           "-2^63..2^63-1 or is nested deeper than 64 levels")
    assert bind_args(fn_of({"x": ["Float64"]}), [10**30]) == {"x": 1e30}


KINDS = {
    "Bool": st.booleans(),
    "Int32": st.integers(-2**31, 2**31 - 1),
    "Int64": st.integers(-2**63, 2**63 - 1),
    "Float64": st.floats(allow_nan=False, allow_infinity=False) | st.integers(-2**53, 2**53),
    "String": st.text(max_size=20),
    "Array": st.lists(st.integers(-2**63, 2**63 - 1), max_size=3),
    "Object": st.dictionaries(st.text(max_size=5), st.integers(-2**63, 2**63 - 1), max_size=3),
}
ANY_JSON = st.recursive(st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.text(max_size=8)
                        | st.floats(allow_nan=False, allow_infinity=False),
                        lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=5), c, max_size=3),
                        max_leaves=8)


def _fits(kind: str, v: Any) -> bool:
    if kind == "Bool":
        return isinstance(v, bool)
    if isinstance(v, bool):
        return False
    if kind in ("Int32", "Int64"):
        bits = 31 if kind == "Int32" else 63
        return isinstance(v, (int, float)) and float(v).is_integer() and -2**bits <= v < 2**bits
    if kind == "Float64":
        return isinstance(v, (int, float)) and math.isfinite(v)
    if kind == "String":
        return isinstance(v, str)
    if kind == "Array":
        return isinstance(v, list) or v == {}
    if kind == "Object":
        return isinstance(v, dict) or v == []
    return True


@settings(max_examples=300, deadline=None)
@given(kind=st.sampled_from(sorted(KINDS)), value=ANY_JSON)
def test_type_checks_accept_exactly_their_values(kind: str, value: Any) -> None:
    fn = fn_of({"x": [kind]})
    if _fits(kind, value):
        assert bind_args(fn, {"x": value}) == {"x": value}
    else:
        assert f"argument 'x' must be {kind}" in bad_args(fn, {"x": value})


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_generated_values_of_each_type_pass(data: st.DataObject) -> None:
    kind = data.draw(st.sampled_from(sorted(KINDS)))
    value = data.draw(KINDS[kind])
    assert bind_args(fn_of({"x": [kind]}), [value]) == {"x": value}


# -- exec through a hub: API and Lua callers -----------------------------------------------

TARGET = """
    local driver_helper = require "driver_helper"
    local busy = 0
    return driver_helper.init {
      name = "target",
      functions = {
        add = { params = { { "a", "Int32" }, { "b", "Int32", 200 } },
                handler = function(d, device, args) return args.a + args.b end },
        echo = { params = { value = { "JSON" } }, handler = function(d, device, args) return args.value end },
        whoami = { handler = function(d, device) return { id = device.id, label = device.label } end },
        boom = { handler = function() error("kaput: the lamp is broken") end },
        bad_result = { handler = function() return { f = print } end },
        spin = { handler = function() while true do end end },
        nap = { params = { s = { "Float64" } }, timeout = 0.3,
                handler = function(d, device, args) driver_helper.sleep(args.s) return "awake" end },
        reset = { security = "administrator", handler = function() return "reset" end },
        tune = { security = "support", handler = function() return "tuned" end },
      },
    }
"""

CALLER = """
    local driver_helper = require "driver_helper"
    return driver_helper.init {
      name = "caller",
      functions = {
        try = {
          params = { system = { "String" }, module = { "String" }, index = { "Int32", 1 },
                     fn = { "String" }, args = { "JSON", {} } },
          handler = function(d, device, a)
            local target = d:system(a.system):get(a.module, a.index)
            local ok, res = pcall(target.call, target, a.fn, a.args)
            if ok then return { ok = true, result = res } end
            return { ok = false, err = res }
          end,
        },
        pass_function = {
          handler = function(d)
            local t = d:system("s1"):get("Display_1")
            local ok, err = pcall(t.call, t, "echo", { value = print })
            return err
          end,
        },
      },
    }
"""


def hub_config(tmp_path: Path, *, cpu_limit: float = 1.0) -> Path:
    write_driver(tmp_path, "target", TARGET)
    write_driver(tmp_path, "caller", CALLER)
    return write_config(tmp_path / "hub.toml", f"""
        [api]
        exec_timeout = 5

        [[drivers]]
        id = "target"
        path = "target"
        cpu_limit = {cpu_limit}
        [[drivers.devices]]
        id = "t1"
        label = "Target one"
        system = "s1"
        module = "Display"
        index = 1

        [[drivers]]
        id = "caller"
        path = "caller"
        [[drivers.devices]]
        id = "c1"
    """)


def http(sup: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sup.api.socket_path)))


async def post_exec(s: aiohttp.ClientSession, body: dict) -> tuple[int, Any]:
    async with s.post("http://hub/api/v1/exec", data=orjson.dumps(body)) as r:
        return r.status, orjson.loads(await r.read())


API_CASES = [
    ({"device": "nope", "function": "add", "args": [1]}, 404, "unknown_device", "no device 'nope'"),
    ({"system": "s1", "module": "Display", "index": 7, "function": "add"}, 404, "unknown_device",
     "system 's1' has no Display/7"),
    ({"system": "s9", "module": "Display", "index": 1, "function": "add"}, 404, "unknown_device", "no system 's9'"),
    ({"device": "t1", "function": "subtract"}, 404, "unknown_function", "device 't1' has no function 'subtract'"),
    ({"device": "t1", "function": "add", "args": {"a": "one"}}, 400, "bad_args",
     "add: argument 'a' must be Int32"),
    ({"device": "t1", "function": "add", "args": {"c": 1}}, 400, "bad_args", "add has no parameter 'c'"),
    ({"device": "t1", "function": "boom"}, 502, "driver_error", "init.lua:11: kaput: the lamp is broken"),
    ({"device": "t1", "function": "bad_result"}, 502, "driver_error",
     "Results of function bad_result must be JSON encodable: function: 0x"),
    ({"device": "t1", "function": "nap", "args": {"s": 5}}, 504, "timeout", "nap on 't1' did not finish within 0.3 s"),
]


def test_exec_over_http_every_error_code(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with http(sup) as s:
                assert await post_exec(s, {"device": "t1", "function": "add", "args": [2, 3]}) == (200, {"result": 5})
                assert await post_exec(s, {"system": "s1", "module": "Display", "index": 1,
                                           "function": "add", "args": {"a": 1}}) == (200, {"result": 201})
                status, doc = await post_exec(s, {"device": "t1", "function": "whoami"})
                assert doc == {"result": {"id": "t1", "label": "Target one"}}
                for body, want_status, code, text in API_CASES:
                    status, doc = await post_exec(s, body)
                    assert (status, doc["error"]["code"]) == (want_status, code), (body, doc)
                    assert text in doc["error"]["message"], (body, doc)
                # the driver survives all of that and still answers
                assert await post_exec(s, {"device": "t1", "function": "echo", "args": [[1, "x", True]]}) == \
                    (200, {"result": [1, "x", True]})

    run(main())


def test_forbidden_by_level(tmp_path: Path) -> None:
    """Levels are checked per function (the API's own callers: see test_api.py)."""

    async def main() -> None:
        async with running_hub(hub_config(tmp_path), tmp_path / "state") as (sup, cap):
            f = sup.functions
            assert await f.exec("t1", "reset", level="administrator") == '"reset"'
            assert await f.exec("t1", "tune", level="administrator") == '"tuned"'   # admin may call support
            assert await f.exec("t1", "tune", level="support") == '"tuned"'
            for fn, level, needs in (("reset", "support", "administrator"), ("reset", "none", "administrator"),
                                     ("tune", "none", "support")):
                with pytest.raises(ExecError) as e:
                    await f.exec("t1", fn, level=level)
                assert e.value.code == "forbidden"
                assert e.value.message == f"{fn} on 't1' needs the {needs} level; the caller has {level}"
            # forbidden is checked before the arguments
            with pytest.raises(ExecError) as e:
                await f.exec("t1", "reset", {"junk": 1}, level="support")
            assert e.value.code == "forbidden"

    run(main())


def test_exec_from_lua_every_error_code(tmp_path: Path) -> None:
    async def call(sup: Any, **a: Any) -> dict:
        return orjson.loads(await sup.functions.exec("c1", "try", {"system": "s1", "module": "Display", **a}))

    async def main() -> None:
        async with running_hub(hub_config(tmp_path), tmp_path / "state") as (sup, cap):
            assert await call(sup, fn="add", args=[40, 2]) == {"ok": True, "result": 42}
            assert await call(sup, fn="add", args={"a": 1}) == {"ok": True, "result": 201}
            assert await call(sup, fn="echo", args={"value": {"k": [True, 1.5]}}) == \
                {"ok": True, "result": {"k": [True, 1.5]}}
            cases = [
                (dict(index=2, fn="add"), "unknown_device: system 's1' has no Display/2 (it has: Display/1)"),
                (dict(system="s9", fn="add"), "unknown_device: no system 's9' on this hub"),
                (dict(fn="subtract"), "unknown_function: device 't1' has no function 'subtract'"),
                (dict(fn="reset"), "forbidden: reset on 't1' needs the administrator level; the caller has support"),
                (dict(fn="add", args=["x"]), "bad_args: add: argument 'a' must be Int32 (-2147483648..2147483647), "
                                             'got string "x"'),
                (dict(fn="add", args=[1, 2, 3]), "bad_args: add takes 2 arguments (a, b), got 3"),
                (dict(fn="boom"), "driver_error: boom on 't1': "),
                (dict(fn="nap", args={"s": 3}), "timeout: nap on 't1' did not finish within 0.3 s"),
            ]
            for a, want in cases:
                got = await call(sup, **a)
                assert got["ok"] is False, (a, got)
                assert want in got["err"], (a, got)
            assert "kaput: the lamp is broken" in (await call(sup, fn="boom"))["err"]
            # a Lua value JSON cannot carry is refused before anything is sent
            err = orjson.loads(await sup.functions.exec("c1", "pass_function"))
            assert err.startswith("bad_args: Arguments of echo must be JSON encodable: function: 0x")
            assert err.endswith("is of unsupported type function (at args.value)")

    run(main())


def test_handlers_are_coroutines_and_limits_give_driver_error(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(hub_config(tmp_path, cpu_limit=0.2), tmp_path / "state") as (sup, cap):
            f = sup.functions
            # two sleeping calls and a quick one run interleaved in the one driver
            t0 = asyncio.get_running_loop().time()
            results = await asyncio.gather(f.exec("t1", "nap", {"s": 0.2}), f.exec("t1", "nap", {"s": 0.2}),
                                           f.exec("t1", "add", [1, 1]))
            assert results == ['"awake"', '"awake"', "2"]
            assert asyncio.get_running_loop().time() - t0 < 0.35
            # the CPU limit aborts the handler: the caller hears it at once, not at the timeout
            t0 = asyncio.get_running_loop().time()
            with pytest.raises(ExecError) as e:
                await f.exec("t1", "spin", timeout=4)
            assert e.value.code == "driver_error" and "cpu limit exceeded" in e.value.message
            assert asyncio.get_running_loop().time() - t0 < 2
            assert await f.exec("t1", "add", [2, 2]) == "4"
            # a call pending when its driver crashes fails with driver_error, not a timeout
            pending = asyncio.ensure_future(f.exec("t1", "nap", {"s": 0.25}, timeout=3))
            await asyncio.sleep(0.05)
            sup.slots["target"].crash("test: simulated crash")
            with pytest.raises(ExecError) as e:
                await pending
            assert e.value.code == "driver_error" and "crashed before it finished" in e.value.message
            with pytest.raises(ExecError) as e:
                await f.exec("t1", "add", [1])
            assert e.value.code == "driver_error" and "is not running" in e.value.message

    run(main())


def test_interface_is_mirrored_to_redis(tmp_path: Path, redis_server: Any) -> None:
    async def main() -> None:
        cfg = hub_config(tmp_path)
        cfg.write_text(cfg.read_text() + f'\n[redis]\nurl = "{redis_server.url}"\nprefix = "hh:"\n')
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            r = redis_server.client()
            want = sup.functions.interface_of("t1").text
            for _ in range(100):
                if r.get("hh:interface/t1") == want.encode():
                    break
                await asyncio.sleep(0.05)
            assert r.get("hh:interface/t1") == want.encode()
            doc = orjson.loads(want)
            assert doc["functions"]["add"] == {"a": ["Int32"], "b": ["Int32", 200]}
            assert doc["security"] == {"support": ["tune"], "administrator": ["reset"]}
            async with http(sup) as s:
                async with s.get("http://hub/api/v1/devices/t1/metadata") as resp:
                    assert await resp.read() == want.encode()

    run(main())
