"""The hub's local API over real sockets: REST, WebSocket, security, bad input, fuzzing,
and the CLI that talks to it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any, Iterator

import aiohttp
import orjson
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from hubhost.cli import main as cli
from hubhost.api.server import bind_unix
from hubutil import run, running_hub, write_config, write_driver

SUPPORT_TOKEN = "support-token-0123456789"
ADMIN_TOKEN = "admin-token-0123456789ab"
NONE_TOKEN = "none-token-0123456789abc"

LAMP = """
    local driver_helper = require "driver_helper"
    return driver_helper.init {
      name = "lamp",
      lifecycle = { init = function(driver, device) device.status.power = false end },
      functions = {
        power = { params = { state = { "Bool" } },
                  handler = function(d, device, args) device.status.power = args.state return args.state end },
        echo = { params = { value = { "JSON", "none" } }, handler = function(d, device, args) return args.value end },
        add = { params = { { "a", "Int32" }, { "b", "Int32", 200 } },
                handler = function(d, device, args) return args.a + args.b end },
        tune = { security = "support", handler = function() return "tuned" end },
        reset = { security = "administrator", handler = function() return "reset" end },
      },
      implements = { "Powerable" },
    }
"""


def lamp_config(tmp_path: Path, api: str = "") -> Path:
    write_driver(tmp_path, "lamp", LAMP)
    return write_config(tmp_path / "hub.toml", f"""
        hub_id = "testhub"
        [api]
        {api}

        [[drivers]]
        id = "lamps"
        path = "lamp"
        [[drivers.devices]]
        id = "l1"
        label = "Desk lamp"
        system = "office"
        module = "Lamp"
        index = 1
        [[drivers.devices]]
        id = "l2"
        system = "office"
        module = "Lamp"
        index = 2
    """)


TCP_API = f"""
        tcp = "127.0.0.1:0"
        [[api.tokens]]
        token = "{SUPPORT_TOKEN}"
        level = "support"
        [[api.tokens]]
        token = "{ADMIN_TOKEN}"
        level = "administrator"
        [[api.tokens]]
        token = "{NONE_TOKEN}"
        level = "none"
"""


def unix_session(sup: Any) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sup.api.socket_path)))


async def call(s: aiohttp.ClientSession, method: str, path: str, body: Any = None, *,
               base: str = "http://hub", raw: bytes | None = None, **kw: Any) -> tuple[int, Any]:
    data = raw if raw is not None else (orjson.dumps(body) if body is not None else None)
    async with s.request(method, base + path, data=data, **kw) as r:
        text = await r.read()
        return r.status, orjson.loads(text) if text else None


# -- REST ----------------------------------------------------------------------------------

def test_rest_devices_status_metadata_systems_health(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(lamp_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix_session(sup) as s:
                status, devices = await call(s, "GET", "/api/v1/devices")
                assert status == 200
                assert devices == [
                    {"id": "l1", "label": "Desk lamp", "driver": "lamps", "state": "running",
                     "system": "office", "module": "Lamp", "index": 1},
                    {"id": "l2", "label": "l2", "driver": "lamps", "state": "running",
                     "system": "office", "module": "Lamp", "index": 2},
                ]
                assert await call(s, "POST", "/api/v1/devices/l1/functions/power", {"state": True}) == \
                    (200, {"result": True})
                assert await call(s, "GET", "/api/v1/devices/l1/status") == (200, {"power": True})
                status, meta = await call(s, "GET", "/api/v1/devices/l1/metadata")
                assert meta["functions"]["add"] == {"a": ["Int32"], "b": ["Int32", 200]}
                assert meta["implements"] == ["Powerable"]
                assert meta["security"] == {"support": ["tune"], "administrator": ["reset"]}
                status, one = await call(s, "GET", "/api/v1/devices/l1")
                assert one["status"] == {"power": True} and one["interface"] == meta and one["label"] == "Desk lamp"
                assert await call(s, "GET", "/api/v1/systems") == \
                    (200, {"office": {"Lamp/1": "l1", "Lamp/2": "l2"}})
                assert await call(s, "GET", "/api/v1/systems/office") == (200, {"Lamp/1": "l1", "Lamp/2": "l2"})
                status, err = await call(s, "GET", "/api/v1/systems/attic")
                assert status == 404 and err["error"]["code"] == "unknown_device"
                status, err = await call(s, "GET", "/api/v1/devices/l9/status")
                assert (status, err["error"]["code"]) == (404, "unknown_device")
                status, health = await call(s, "GET", "/api/v1/health")
                assert health["hub"] == "testhub" and health["counts"]["running"] == 1
                assert health["drivers"]["lamps"]["state"] == "running" and health["mirror"] is None
                # positional args through the device route
                assert await call(s, "POST", "/api/v1/devices/l2/functions/add", [1, 2]) == (200, {"result": 3})

    run(main())


def test_bad_requests_get_clear_json_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(lamp_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix_session(sup) as s:
                cases = [
                    (("POST", "/api/v1/exec"), {"raw": b"{not json"}, 400, "bad_request", "body is not valid JSON"),
                    (("POST", "/api/v1/exec"), {"body": [1, 2]}, 400, "bad_request", "body must be a JSON object"),
                    (("POST", "/api/v1/exec"), {"body": {"device": "l1", "function": 5}}, 400, "bad_request",
                     "'function' must be a non-empty string, got 5"),
                    (("POST", "/api/v1/exec"), {"body": {"function": "power"}}, 400, "bad_request",
                     'give the target as "device"'),
                    (("POST", "/api/v1/exec"), {"body": {"system": "office", "module": "Lamp", "index": "one",
                                                         "function": "power"}}, 400, "bad_request",
                     "'index' must be a positive integer, got \"one\""),
                    (("POST", "/api/v1/exec"), {"body": {"device": "l1", "function": "echo", "timeout": -1}},
                     400, "bad_request", "'timeout' must be a number of seconds"),
                    (("POST", "/api/v1/exec"), {"raw": b"[" * 10 + b"1" + b"]" * 10 + b" " * (1024 * 1024)},
                     413, "too_large", "larger than 1048576 bytes"),
                    (("GET", "/api/v1/nothing"), {}, 404, "not_found", "Not Found"),
                    (("DELETE", "/api/v1/devices"), {}, 405, "method_not_allowed", "Method Not Allowed"),
                    (("POST", "/api/v1/devices/l1/functions/power"), {"body": {"state": "on"}}, 400, "bad_args",
                     "power: argument 'state' must be Bool, got string \"on\""),
                ]
                for (method, path), kw, want_status, code, text in cases:
                    status, doc = await call(s, method, path, kw.get("body"), raw=kw.get("raw"))
                    assert (status, doc["error"]["code"]) == (want_status, code), (path, kw, doc)
                    assert text in doc["error"]["message"], (path, kw, doc)
                assert await call(s, "POST", "/api/v1/devices/l1/functions/echo", {"value": "still fine"}) == \
                    (200, {"result": "still fine"})
            assert cap.errors() == []

    run(main())


# -- security ------------------------------------------------------------------------------

def test_tcp_needs_tokens_and_levels_apply(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(lamp_config(tmp_path, TCP_API), tmp_path / "state") as (sup, cap):
            base = f"http://127.0.0.1:{sup.api.tcp_port}"
            async with aiohttp.ClientSession() as s:
                def auth(token: str) -> dict[str, dict[str, str]]:
                    return {"headers": {"Authorization": f"Bearer {token}"}}

                for kw in ({}, auth("wrong-token-0123456789"), {"headers": {"Authorization": SUPPORT_TOKEN}}):
                    status, doc = await call(s, "GET", "/api/v1/devices", base=base, **kw)
                    assert (status, doc["error"]["code"]) == (401, "unauthorized"), kw
                status, doc = await call(s, "POST", "/api/v1/exec", {"device": "l1", "function": "power",
                                                                     "args": [True]}, base=base)
                assert status == 401 and "bearer token is required" in doc["error"]["message"]
                assert sup.status.get("l1", "power") == "false"          # nothing ran
                # a support token: support functions yes, administrator functions no
                exec_reset = {"device": "l1", "function": "reset"}
                status, doc = await call(s, "POST", "/api/v1/exec", exec_reset, base=base, **auth(SUPPORT_TOKEN))
                assert (status, doc["error"]["code"]) == (403, "forbidden")
                assert doc["error"]["message"] == "reset on 'l1' needs the administrator level; the caller has support"
                assert await call(s, "POST", "/api/v1/exec", {"device": "l1", "function": "tune"}, base=base,
                                  **auth(SUPPORT_TOKEN)) == (200, {"result": "tuned"})
                assert await call(s, "POST", "/api/v1/exec", exec_reset, base=base, **auth(ADMIN_TOKEN)) == \
                    (200, {"result": "reset"})
                status, doc = await call(s, "POST", "/api/v1/exec", {"device": "l1", "function": "tune"},
                                         base=base, **auth(NONE_TOKEN))
                assert (status, doc["error"]["code"]) == (403, "forbidden")
                assert await call(s, "POST", "/api/v1/exec", {"device": "l1", "function": "power", "args": [True]},
                                  base=base, **auth(NONE_TOKEN)) == (200, {"result": True})
                # reload is an administrator action too
                status, doc = await call(s, "POST", "/api/v1/reload", base=base, **auth(SUPPORT_TOKEN))
                assert status == 403
                # WebSocket on TCP: refused without a token; a support token cannot exec reset
                with pytest.raises(aiohttp.WSServerHandshakeError) as e:
                    await s.ws_connect(base + "/api/v1/ws")
                assert e.value.status == 401
                async with s.ws_connect(base + "/api/v1/ws", **auth(SUPPORT_TOKEN)) as ws:
                    await ws.send_json({"id": "r", "type": "exec", "device": "l1", "function": "reset"})
                    reply = await ws.receive_json(timeout=5)
                    assert reply["id"] == "r" and reply["code"] == "forbidden"
            # the Unix socket needs no token and is administrator
            async with unix_session(sup) as s:
                assert await call(s, "POST", "/api/v1/exec", exec_reset) == (200, {"result": "reset"})
                status, doc = await call(s, "POST", "/api/v1/exec", exec_reset,
                                         headers={"Authorization": f"Bearer {SUPPORT_TOKEN}"})
                assert status == 403    # a token on the socket lowers the level to the token's

    run(main())


def test_unix_socket_mode_and_default_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    async def main(cfg: Path, state: Path) -> Path:
        async with running_hub(cfg, state) as (sup, cap):
            path = sup.api.socket_path
            mode = stat.S_IMODE(os.stat(path).st_mode)
            assert stat.S_ISSOCK(os.stat(path).st_mode) and mode == 0o660
            async with unix_session(sup) as s:
                assert (await call(s, "GET", "/api/v1/health"))[0] == 200
        assert not path.exists()   # removed at shutdown
        return path

    monkeypatch.delenv("RUNTIME_DIRECTORY", raising=False)
    cfg = lamp_config(tmp_path)
    assert run(main(cfg, tmp_path / "state")) == tmp_path / "state" / "hubhost.sock"
    runtime = tmp_path / "run"
    runtime.mkdir()
    monkeypatch.setenv("RUNTIME_DIRECTORY", str(runtime))
    assert run(main(cfg, tmp_path / "state")) == runtime / "hubhost.sock"
    # a configured socket with a stricter mode, in a folder whose path is too long for AF_UNIX
    deep = tmp_path / ("d" * 60) / ("e" * 60)
    deep.mkdir(parents=True)
    cfg = lamp_config(tmp_path, f'socket = "{deep}/api.sock"\nsocket_mode = "0600"')
    assert len(str(deep / "api.sock")) > 108
    path = deep / "api.sock"

    async def strict() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            assert sup.api.socket_path == path
            assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
            from hubhost.api.client import ApiClient
            async with ApiClient(path) as c:
                assert (await c.get("/api/v1/systems"))["office"]["Lamp/1"] == "l1"

    run(strict())


def test_stale_socket_is_replaced_and_a_live_one_is_not(tmp_path: Path) -> None:
    path = tmp_path / "api.sock"
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(str(path))
    stale.close()                       # the file stays, nobody listens: like after a crash
    sock = bind_unix(path, 0o660)       # replaced
    try:
        with pytest.raises(OSError, match="another process is serving the API"):
            bind_unix(path, 0o660)
    finally:
        sock.close()
    path.unlink()
    path.write_text("not a socket")
    with pytest.raises(OSError, match="exists and is not a socket"):
        bind_unix(path, 0o660)


# -- WebSocket -----------------------------------------------------------------------------

async def until(pred: Any, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not pred():
        if loop.time() > end:
            raise AssertionError("condition not met in time")
        await asyncio.sleep(0.01)


def test_websocket_bind_notify_unbind_exec(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(lamp_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix_session(sup) as s, s.ws_connect("http://hub/api/v1/ws") as ws:
                await ws.send_json({"id": 1, "type": "bind", "sys": "office", "mod": "Lamp", "index": 1,
                                    "name": "power"})
                reply = await ws.receive_json(timeout=5)
                assert reply["id"] == 1 and reply["type"] == "success"
                ref = reply["ref"]
                meta = {"sys": "office", "mod": "Lamp", "index": 1, "name": "power"}
                assert await ws.receive_json(timeout=5) == {"type": "notify", "ref": ref, "meta": meta, "value": False}
                await ws.send_json({"id": "x2", "type": "exec", "device": "l1", "function": "power", "args": [True]})
                got = [await ws.receive_json(timeout=5), await ws.receive_json(timeout=5)]
                assert {"type": "notify", "ref": ref, "meta": meta, "value": True} in got
                assert {"id": "x2", "type": "success", "result": True} in got
                await ws.send_json({"id": 3, "type": "exec", "sys": "office", "mod": "Lamp", "index": 2,
                                    "function": "add", "args": {"a": 1, "b": 2}})
                assert await ws.receive_json(timeout=5) == {"id": 3, "type": "success", "result": 3}
                await ws.send_json({"id": 4, "type": "exec", "device": "l1", "function": "add", "args": ["x"]})
                err = await ws.receive_json(timeout=5)
                assert err["id"] == 4 and err["code"] == "bad_args" and "argument 'a' must be Int32" in err["message"]
                assert sup.subscriptions.count() == 1
                await ws.send_json({"id": 5, "type": "unbind", "ref": ref})
                assert await ws.receive_json(timeout=5) == {"id": 5, "type": "success"}
                assert sup.subscriptions.count() == 0
                await ws.send_json({"id": 6, "type": "unbind", "ref": ref})
                assert (await ws.receive_json(timeout=5))["code"] == "unknown_ref"
                # malformed and unknown messages: an error each, and the connection stays usable
                await ws.send_str("{nope")
                assert (await ws.receive_json(timeout=5))["code"] == "bad_request"
                await ws.send_json({"id": 7, "type": "frobnicate"})
                e = await ws.receive_json(timeout=5)
                assert e["id"] == 7 and e["message"] == ("unknown message type 'frobnicate' (bind, unbind, exec, ping, "
                                                    "watch_device, watch_hub, watch_logs)")
                await ws.send_json({"id": [1], "type": "ping"})
                assert (await ws.receive_json(timeout=5))["message"] == '"id" must be a number or a string'
                await ws.send_json({"id": 8, "type": "bind", "sys": "office", "mod": "Lamp", "name": 5})
                assert "'name' must be a non-empty string" in (await ws.receive_json(timeout=5))["message"]
                await ws.send_bytes(b"\x00\x01")
                assert (await ws.receive_json(timeout=5))["code"] == "bad_request"
                await ws.send_json({"id": 9, "type": "ping"})
                assert await ws.receive_json(timeout=5) == {"id": 9, "type": "success"}

    run(main())


def test_websocket_closed_without_unbind_leaves_no_subscription(tmp_path: Path) -> None:
    async def main() -> None:
        async with running_hub(lamp_config(tmp_path), tmp_path / "state") as (sup, cap):
            async with unix_session(sup) as s:
                clients = [await s.ws_connect("http://hub/api/v1/ws") for _ in range(5)]
                for i, ws in enumerate(clients):
                    for name in ("unset1", "unset2", "unset3"):
                        await ws.send_json({"id": name, "type": "bind", "sys": "office", "mod": "Lamp",
                                            "index": 1 + i % 2, "name": name})
                        assert (await ws.receive_json(timeout=5))["type"] == "success"
                assert sup.subscriptions.count() == 15 and len(sup.api.sessions) == 5
                # two close politely, two vanish (transport aborted), one stays
                await clients[0].close()
                await clients[1].close()
                for ws in clients[2:4]:
                    ws._response.connection.transport.abort()   # noqa: SLF001 - a client that just dies
                await until(lambda: sup.subscriptions.count() == 3)
                await until(lambda: len(sup.api.sessions) == 1)
                # the survivor (bound to Lamp/1) still gets changes
                await call(s, "POST", "/api/v1/devices/l1/functions/echo", {"value": 1})
                await sup.functions.exec("l1", "power", [True])
                sup.status.set("l1", "unset2", '"hello"')
                assert (await clients[4].receive_json(timeout=5))["value"] == "hello"
                await clients[4].close()
                await until(lambda: sup.subscriptions.count() == 0)
            assert sup.functions.lua_subscription_count() == 0

    run(main())


# -- fuzzing -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def fuzz_hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[asyncio.AbstractEventLoop, Any, aiohttp.ClientSession]]:
    tmp = tmp_path_factory.mktemp("fuzz")
    loop = asyncio.new_event_loop()
    cm = running_hub(lamp_config(tmp), tmp / "state")
    sup, cap = loop.run_until_complete(cm.__aenter__())
    session = loop.run_until_complete(_make_session(sup))
    try:
        yield loop, sup, session
    finally:
        loop.run_until_complete(session.close())
        loop.run_until_complete(cm.__aexit__(None, None, None))
        loop.close()


async def _make_session(sup: Any) -> aiohttp.ClientSession:
    return unix_session(sup)


def _dumps(v: Any) -> bytes:
    """JSON bytes, big integers included (orjson stops at 64 bits; clients may not)."""
    return json.dumps(v).encode()


JSONS = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=10),
    lambda c: st.lists(c, max_size=4) | st.dictionaries(st.text(max_size=8), c, max_size=4), max_leaves=10)
SEGMENT = st.sampled_from(["l1", "l2", "nope", "", "..", "%00", "l1%2Fstatus"]) | st.text(
    alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12).map(lambda t: t.replace("/", "%2F"))
FUNCTION = st.sampled_from(["power", "echo", "add", "tune", "reset", "nope"]) | st.text(max_size=8)
EXEC_BODY = st.fixed_dictionaries({}, optional={
    "device": st.sampled_from(["l1", "l2", "zz"]) | JSONS, "function": FUNCTION | JSONS, "args": JSONS,
    "system": st.just("office") | JSONS, "module": st.just("Lamp") | JSONS, "index": st.integers(-2, 3) | JSONS,
    "timeout": st.floats(0.5, 5) | JSONS,
})


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(method=st.sampled_from(["GET", "POST", "PUT", "DELETE"]),
       path=st.builds(lambda tpl, a, b: tpl.format(a=a, b=b), st.sampled_from([
           "/api/v1/devices", "/api/v1/devices/{a}", "/api/v1/devices/{a}/status", "/api/v1/devices/{a}/metadata",
           "/api/v1/devices/{a}/functions/{b}", "/api/v1/systems/{a}", "/api/v1/exec", "/api/v1/{a}", "/{a}/{b}"]),
           SEGMENT, SEGMENT),
       body=st.none() | JSONS.map(_dumps) | EXEC_BODY.map(_dumps) | st.binary(max_size=40),
       auth=st.none() | st.sampled_from(["Bearer", "Bearer ", "Basic abc", f"Bearer {SUPPORT_TOKEN}", "Bearer \u00e9"]))
def test_fuzz_rest(fuzz_hub: Any, method: str, path: str, body: bytes | None, auth: str | None) -> None:
    loop, sup, session = fuzz_hub
    headers = {"Authorization": auth} if auth is not None else {}

    async def go() -> tuple[int, bytes]:
        async with session.request(method, "http://hub" + path, data=body, headers=headers) as r:
            return r.status, await r.read()

    try:
        status, raw = loop.run_until_complete(go())
    except ValueError:
        return   # aiohttp refused to send that header or URL: nothing reached the hub
    assert status < 500, (method, path, body, raw)
    if status >= 400:
        assert "error" in orjson.loads(raw)


WS_MESSAGE = (
    JSONS.map(lambda v: _dumps(v).decode())
    | st.text(max_size=30)
    | st.fixed_dictionaries({"type": st.sampled_from(["bind", "unbind", "exec", "ping", "nope"]) | JSONS},
                            optional={"id": JSONS, "sys": st.just("office") | JSONS, "mod": st.just("Lamp") | JSONS,
                                      "index": st.integers(0, 3) | JSONS, "name": st.just("power") | JSONS,
                                      "ref": st.integers(0, 5) | JSONS, "device": st.just("l1") | JSONS,
                                      "function": FUNCTION, "args": JSONS,
                                      "timeout": st.floats(0.5, 5) | JSONS}).map(lambda d: _dumps(d).decode())
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(messages=st.lists(WS_MESSAGE, min_size=1, max_size=6))
def test_fuzz_websocket(fuzz_hub: Any, messages: list[str]) -> None:
    loop, sup, session = fuzz_hub

    async def go() -> None:
        async with session.ws_connect("http://hub/api/v1/ws") as ws:
            for m in messages:
                await ws.send_str(m)
            await ws.send_json({"id": "fuzz-end", "type": "ping"})
            while True:   # everything before the ping was handled when its reply arrives
                msg = await ws.receive(timeout=10)
                assert msg.type == aiohttp.WSMsgType.TEXT, (messages, msg)
                doc = orjson.loads(msg.data)
                assert doc.get("type") in ("success", "error", "notify"), doc
                if doc.get("code") in ("driver_error", "internal"):
                    raise AssertionError(doc)
                if doc.get("id") == "fuzz-end":
                    break

    loop.run_until_complete(go())


def test_fuzzed_hub_is_healthy_afterwards(fuzz_hub: Any) -> None:
    loop, sup, session = fuzz_hub

    async def go() -> None:
        await until(lambda: sup.subscriptions.count() == 0 and not sup.api.sessions)
        assert (await call(session, "GET", "/api/v1/health"))[0] == 200
        assert await call(session, "POST", "/api/v1/devices/l1/functions/add", [20, 22]) == (200, {"result": 42})
        assert sup.slots["lamps"].state == "running" and sup.slots["lamps"].restarts == 0

    loop.run_until_complete(go())


# -- CLI -----------------------------------------------------------------------------------

async def run_cli(*argv: str) -> tuple[int, str, str]:
    """hubhost's own main() in a thread (it runs its own event loop), output captured."""
    out, err = io.StringIO(), io.StringIO()

    def go() -> int:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            return cli.main(list(argv))

    code = await asyncio.to_thread(go)
    return code, out.getvalue(), err.getvalue()


def test_cli_status_exec_watch_ls(tmp_path: Path) -> None:
    async def main() -> None:
        state = tmp_path / "state"
        async with running_hub(lamp_config(tmp_path), state) as (sup, cap):
            where = ["--state-dir", str(state)]
            code, out, _ = await run_cli("ls", *where)
            assert code == 0
            assert out.splitlines() == ["DEVICE  DRIVER  STATE    SYSTEM  MODULE",
                                        "l1      lamps   running  office  Lamp/1",
                                        "l2      lamps   running  office  Lamp/2"]
            code, out, _ = await run_cli("status", *where)
            assert code == 0 and "hub testhub: 1 drivers running, 0 failed" in out and "redis: not configured" in out
            # watch runs as a real process (stdout redirection is per process)
            watcher = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hubhost", "watch", "office", "Lamp", "1", "power", "--count", "2", *where,
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            await until(lambda: sup.subscriptions.count() == 1, timeout=20)
            code, out, _ = await run_cli("exec", "l1", "power", "state=true", *where)
            assert (code, out) == (0, "true\n")
            out_b, err_b = await asyncio.wait_for(watcher.communicate(), 10)
            assert (watcher.returncode, out_b, err_b) == (0, b"false\ntrue\n", b"")
            code, out, _ = await run_cli("exec", "l2", "echo", 'value={"a": [1, 2]}', "--socket",
                                         str(sup.api.socket_path))
            assert orjson.loads(out) == {"a": [1, 2]}
            code, out, _ = await run_cli("exec", "l2", "echo", "value=plain text", *where)
            assert out == '"plain text"\n'
            code, out, _ = await run_cli("status", "l1", "--config", str(tmp_path / "hub.toml"),
                                         "--state-dir", str(state))
            assert (code, orjson.loads(out)) == (0, {"power": True})
            code, out, err = await run_cli("exec", "l1", "add", "a=x", *where)
            assert code == 1
            assert err == "hubhost exec: bad_args: add: argument 'a' must be Int32 (-2147483648..2147483647), " \
                          'got string "x"\n'
            code, out, err = await run_cli("exec", "l1", "add", "oops", *where)
            assert code == 2 and "must look like name=value" in err
        code, out, err = await run_cli("ls", *where)
        assert code == 3 and "cannot reach the hub's API" in err

    run(main())


def test_cli_entry_point_in_a_real_process(tmp_path: Path) -> None:
    async def main() -> None:
        state = tmp_path / "state"
        async with running_hub(lamp_config(tmp_path), state) as (sup, cap):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hubhost", "exec", "l1", "add", "a=40", "b=2", "--state-dir", str(state),
                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            out, err = await proc.communicate()
            assert (proc.returncode, out, err) == (0, b"42\n", b"")

    run(main())


def _ws_frame(text: str) -> bytes:
    """A masked client text frame (RFC 6455), for a raw client that never reads."""
    payload = text.encode()
    mask = os.urandom(4)
    head = bytes([0x81, 0x80 | len(payload)]) if len(payload) < 126 else \
        bytes([0x81, 0x80 | 126]) + len(payload).to_bytes(2, "big")
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def test_a_websocket_client_that_never_reads_is_dropped(tmp_path: Path) -> None:
    """Memory stays bounded: a subscriber that stops reading is disconnected once it falls
    MAX_WS_BACKLOG messages behind, and the hub goes on serving everyone else."""
    from hubhost.api.server import MAX_WS_BACKLOG

    async def main() -> None:
        async with running_hub(lamp_config(tmp_path), tmp_path / "state") as (sup, cap):
            s = socket.socket(socket.AF_UNIX)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            s.connect(str(sup.api.socket_path))
            s.sendall(b"GET /api/v1/ws HTTP/1.1\r\nHost: hub\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
            s.settimeout(5)
            head = b""
            while b"\r\n\r\n" not in head:
                head += await asyncio.to_thread(s.recv, 1)
            assert head.startswith(b"HTTP/1.1 101")
            s.sendall(_ws_frame('{"id":1,"type":"bind","sys":"office","mod":"Lamp","index":1,"name":"power"}'))
            await until(lambda: sup.subscriptions.count() == 1)
            for i in range(MAX_WS_BACKLOG * 3):
                sup.status.set("l1", "power", f'"{"x" * 100}{i}"')
                if i % 500 == 0:
                    await asyncio.sleep(0)
                if not sup.api.sessions:
                    break
            await until(lambda: not sup.api.sessions and sup.subscriptions.count() == 0)
            assert cap.lines("fell 10000 messages behind; disconnecting it")
            s.close()
            async with unix_session(sup) as c:
                assert await call(c, "POST", "/api/v1/devices/l1/functions/add", [1, 1]) == (200, {"result": 2})

    run(main())
