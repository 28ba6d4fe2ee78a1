"""CLI commands that talk to a running hub over its local API (hubhost/api.py):
`hubhost status [DEVICE]`, `hubhost exec DEVICE FUNCTION [name=value ...]`,
`hubhost watch SYSTEM MODULE INDEX STATUS`, `hubhost ls`, `hubhost reload`.

The hub is found at --socket, else the socket named by --config's [api], else
$RUNTIME_DIRECTORY/hubhost.sock, /run/hubhost/hubhost.sock (the systemd unit) or
<state dir>/hubhost.sock. --url http://host:port uses TCP instead (with --token or
$HUBHOST_TOKEN).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from pathlib import Path
from typing import Any, AsyncIterator

import aiohttp
import orjson

from hubhost import paths

__all__ = ["ApiClient", "ApiError", "add_commands", "find_socket", "parse_assignment"]

SYSTEMD_SOCKET = Path("/run/hubhost/hubhost.sock")


class ApiError(Exception):
    """An error answer of the API: code and message as the hub sent them."""

    def __init__(self, code: str, message: str, status: int = 0) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.status = status


class ApiClient:
    """A small async client of the hub's API (Unix socket or TCP)."""

    def __init__(self, socket_path: Path | str | None = None, *, url: str | None = None,
                 token: str | None = None) -> None:
        self._fd: int | None = None
        if url:
            self.base = url.rstrip("/")
            connector: aiohttp.BaseConnector = aiohttp.TCPConnector()
        else:
            from hubhost.api.server import short_unix_path

            path, self._fd = short_unix_path(Path(socket_path or find_socket()))
            self.base = "http://hubhost"
            connector = aiohttp.UnixConnector(path=path)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.session = aiohttp.ClientSession(connector=connector, headers=headers,
                                             timeout=aiohttp.ClientTimeout(total=None, sock_connect=5))

    async def close(self) -> None:
        await self.session.close()
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    async def __aenter__(self) -> "ApiClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        await self.close()

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        data = orjson.dumps(body) if body is not None else None
        async with self.session.request(method, self.base + path, data=data,
                                        headers={"Content-Type": "application/json"}) as r:
            raw = await r.read()
        try:
            doc = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            raise ApiError("bad_response", f"HTTP {r.status}: {raw[:200]!r}", r.status) from None
        if r.status >= 400:
            err = doc.get("error", {}) if isinstance(doc, dict) else {}
            raise ApiError(err.get("code", f"http_{r.status}"), err.get("message", raw.decode(errors="replace")),
                           r.status)
        return doc

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def exec(self, device: str, function: str, args: Any = None, timeout: float | None = None) -> Any:
        body: dict[str, Any] = {"device": device, "function": function, "args": args}
        if timeout is not None:
            body["timeout"] = timeout
        return (await self.request("POST", "/api/v1/exec", body))["result"]

    async def watch(self, system: str, module: str, index: int, status: str) -> AsyncIterator[Any]:
        """Yield the current value and every change of one indirect status."""
        async with self.session.ws_connect(self.base + "/api/v1/ws") as ws:
            await ws.send_str(orjson.dumps({"id": 1, "type": "bind", "sys": system, "mod": module,
                                            "index": index, "name": status}).decode())
            async for msg in ws:
                if msg.type != aiohttp.WSMsgType.TEXT:
                    break
                doc = orjson.loads(msg.data)
                if doc.get("type") == "error":
                    raise ApiError(doc.get("code", "error"), doc.get("message", ""))
                if doc.get("type") == "notify":
                    yield doc["value"]


def find_socket(socket_arg: str | None = None, config_arg: str | None = None,
                state_dir_arg: str | None = None) -> Path:
    """Where the hub's API socket is (see the module docstring for the order)."""
    if socket_arg:
        return Path(socket_arg)
    from hubhost.api.server import default_socket_path

    if config_arg:
        from hubhost import config as config_mod

        cfg = config_mod.load(config_arg)
        if cfg.api.get("socket"):
            return Path(cfg.api["socket"])
        return default_socket_path(paths.state_dir(state_dir_arg, cfg.state_dir))
    if os.environ.get("RUNTIME_DIRECTORY") or state_dir_arg:
        return default_socket_path(paths.state_dir(state_dir_arg))
    if SYSTEMD_SOCKET.exists():
        return SYSTEMD_SOCKET
    return default_socket_path(paths.state_dir())


def parse_assignment(text: str) -> tuple[str, Any]:
    """`name=value`: the value as JSON when it parses (true, 3, [1,2], "x"), else as text."""
    name, sep, value = text.partition("=")
    if not sep or not name:
        raise ValueError(f"argument {text!r} must look like name=value")
    try:
        return name, orjson.loads(value)
    except orjson.JSONDecodeError:
        return name, value


# -- commands -------------------------------------------------------------------------------

def _client(args: argparse.Namespace) -> ApiClient:
    token = args.token or os.environ.get("HUBHOST_TOKEN")
    if args.url:
        return ApiClient(url=args.url, token=token)
    return ApiClient(find_socket(args.socket, args.config, args.state_dir), token=token)


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        if args.device:
            _print_json(await c.get(f"/api/v1/devices/{args.device}/status"))
            return 0
        h = await c.get("/api/v1/health")
        counts = h["counts"]
        print(f"hub {h['hub']}: {counts['running']} drivers running, {counts['failed']} failed, "
              f"{counts['restarting']} restarting")
        m = h.get("mirror")
        if m is None:
            print("redis: not configured")
        else:
            state = "connected" if m.get("connected") else "DISCONNECTED"
            print(f"redis: {state}, {m.get('pending', 0)} pending, lag {m.get('lag_seconds', 0) or 0:.3f} s"
                  + (f", last error: {m['last_error']}" if m.get("last_error") else ""))
        for did, d in h["drivers"].items():
            line = f"  {did}: {d['state']}"
            if d.get("restarts"):
                line += f" ({d['restarts']} restarts)"
            if d.get("last_error") and d["state"] != "running":
                line += f" - {d['last_error']}"
            print(line)
        print(f"subscriptions: {h['subscriptions']} ({h['websockets']} WebSocket clients)")
    return 0


async def _ls(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        devices = await c.get("/api/v1/devices")
    rows = [("DEVICE", "DRIVER", "STATE", "SYSTEM", "MODULE")]
    for d in devices:
        place = f"{d['module']}/{d['index']}" if d.get("module") else "-"
        rows.append((d["id"], d["driver"], d["state"], d.get("system") or "-", place))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip())
    return 0


async def _exec(args: argparse.Namespace) -> int:
    try:
        named = dict(parse_assignment(a) for a in args.args)
    except ValueError as e:
        print(f"hubhost exec: {e}", file=sys.stderr)
        return 2
    async with _client(args) as c:
        result = await c.exec(args.device, args.function, named, timeout=args.timeout)
    _print_json(result)
    return 0


async def _watch(args: argparse.Namespace) -> int:
    seen = 0
    async with _client(args) as c:
        async for value in c.watch(args.system, args.module, args.index, args.status):
            sys.stdout.write(orjson.dumps(value).decode() + "\n")
            sys.stdout.flush()
            seen += 1
            if args.count and seen >= args.count:
                break
    return 0


async def _reload(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        report = (await c.request("POST", "/api/v1/reload"))["reloaded"]
    changes = [f"{k}: {', '.join(v)}" for k, v in report.items() if v and k != "kept"]
    print("reloaded" + (" (" + "; ".join(changes) + ")" if changes else " (no driver changes)"))
    return 0


def _runner(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(fn(args))
        except ApiError as e:
            print(f"hubhost {args.command}: {e.code}: {e.message}", file=sys.stderr)
            return 1
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError) as e:
            print(f"hubhost {args.command}: cannot reach the hub's API ({e}); is `hubhost run` "
                  "running, and is --socket/--config right?", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            return 130
    return run


def add_commands(sub: Any) -> None:
    """Register status, exec, watch, ls and reload on the `hubhost` parser."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("reaching the hub")
    g.add_argument("--socket", help="the hub's API socket")
    g.add_argument("--config", help="the hub's config (its [api] socket and state dir)")
    g.add_argument("--state-dir", help="the hub's state dir (socket <state-dir>/hubhost.sock)")
    g.add_argument("--url", help="TCP API, e.g. http://127.0.0.1:8765 (needs --token)")
    g.add_argument("--token", help="bearer token (default: $HUBHOST_TOKEN)")

    p = sub.add_parser("status", parents=[common], help="hub health, or one device's status")
    p.add_argument("device", nargs="?")
    p.set_defaults(func=_runner(_status))

    p = sub.add_parser("ls", parents=[common], help="list devices")
    p.set_defaults(func=_runner(_ls))

    p = sub.add_parser("exec", parents=[common], help="call a device's function")
    p.add_argument("device")
    p.add_argument("function")
    p.add_argument("args", nargs="*", metavar="name=value", help="values are parsed as JSON when they parse")
    p.add_argument("--timeout", type=float, help="seconds (default: the function's or the hub's)")
    p.set_defaults(func=_runner(_exec))

    p = sub.add_parser("watch", parents=[common], help="print a status of a system's module as it changes")
    p.add_argument("system")
    p.add_argument("module")
    p.add_argument("index", type=int)
    p.add_argument("status")
    p.add_argument("--count", type=int, default=0, help="exit after this many values")
    p.set_defaults(func=_runner(_watch))

    p = sub.add_parser("reload", parents=[common], help="re-read the hub's config (like SIGHUP)")
    p.set_defaults(func=_runner(_reload))
