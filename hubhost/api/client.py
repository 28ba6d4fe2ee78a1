"""CLI commands that talk to a running hub over its local API (hubhost/api/server.py):
`hubhost status [DEVICE]`, `hubhost exec DEVICE FUNCTION [name=value ...]`,
`hubhost watch SYSTEM MODULE INDEX STATUS`, `hubhost ls`, `hubhost reload [DRIVER...]`,
`hubhost logs [DRIVER|DEVICE] [-f] [--level L] [--since T]`, `hubhost describe DEVICE`,
`hubhost log-level DRIVER LEVEL`, `hubhost console [--level L] [--open] [--close]`.

The hub is found at --socket, else the socket named by the config's [api] (--config, else
$HUBHOST_CONFIG), else $RUNTIME_DIRECTORY/hubhost.sock, /run/hubhost/hubhost.sock (the
systemd unit) or <state dir>/hubhost.sock (--state-dir, else the config's, else the
default). --url http://host:port uses TCP instead (with --token or $HUBHOST_TOKEN). When
the hub cannot be reached, the error names the socket tried and these ways to point
elsewhere.
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

    config_arg = config_arg or os.environ.get("HUBHOST_CONFIG") or None
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
        args.tried = args.url
        return ApiClient(url=args.url, token=token)
    path = find_socket(args.socket, args.config, args.state_dir)
    args.tried = str(path)
    return ApiClient(path, token=token)


WHERE_HINT = ("point at another hub with --config FILE (or HUBHOST_CONFIG=FILE), --state-dir DIR, "
              "--socket PATH or --url URL")


def _print_json(doc: Any) -> None:
    sys.stdout.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2).decode() + "\n")


async def _status(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        if args.device:
            _print_json(await c.get(f"/api/v1/devices/{args.device}/status"))
            return 0
        h = await c.get("/api/v1/health")
    print(status_text(h))
    return 0


def status_text(h: dict[str, Any]) -> str:
    """The summary is counted from the rows, so the two always agree."""
    rows = h["drivers"]
    counts = {"running": 0, "failed": 0, "restarting": 0}
    for d in rows.values():
        cond = d.get("condition") or d["state"]
        counts[cond] = counts.get(cond, 0) + 1
    summary = (f"{counts.pop('running')} drivers running, {counts.pop('failed')} failed, "
               f"{counts.pop('restarting')} restarting")
    summary += "".join(f", {n} {state}" for state, n in counts.items() if n)
    lines = [f"hub {h['hub']}: {summary}"]
    m = h.get("mirror")
    if m is None:
        lines.append("redis: not configured")
    else:
        state = "connected" if m.get("connected") else "DISCONNECTED"
        lines.append(f"redis: {state}, {m.get('pending', 0)} pending, lag {m.get('lag_seconds', 0) or 0:.3f} s"
                     + (f", last error: {m['last_error']}" if m.get("last_error") else ""))
    for did, d in rows.items():
        cond = d.get("condition") or d["state"]
        line = f"  {did}: {cond}"
        if d.get("restarts"):
            line += f" ({d['restarts']} restart{'s' if d['restarts'] != 1 else ''})"
        if d.get("last_error") and cond != "running":
            line += f" - {d['last_error']}"
        lines.append(line)
    lines.append(f"subscriptions: {h['subscriptions']} ({h['websockets']} WebSocket clients)")
    return "\n".join(lines)


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
    body = {"drivers": args.drivers} if args.drivers else None
    async with _client(args) as c:
        doc = await c.request("POST", "/api/v1/reload", body)
    report, reasons = doc["reloaded"], doc.get("reasons", {})
    changes = [f"{k}: {', '.join(v)}" for k, v in report.items() if v and k != "kept"]
    print("reloaded" + (" (" + "; ".join(changes) + ")" if changes else " (no driver changes)"))
    for did, why in reasons.items():
        print(f"  {did}: {why}")
    return 0


def _since(text: str | None) -> float:
    """--since: seconds ago ("30", "30s", "5m", "2h") or an ISO time ("2026-12-02T07:00")."""
    import re
    import time
    from datetime import datetime, timezone

    if not text:
        return 0.0
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", text)
    if m:
        return time.time() - float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    try:
        t = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"--since {text!r}: give seconds ago (30, 5m, 2h) or an ISO time "
                         "(2026-12-02T07:00)") from None
    if t.tzinfo is None:
        t = t.astimezone()          # local time, as the user reads the clock
    return t.astimezone(timezone.utc).timestamp()


def _log_line(e: dict[str, Any]) -> str:
    import time
    t = time.strftime("%H:%M:%S", time.localtime(e["time"])) + f".{int(e['time'] % 1 * 1000):03d}"
    return f"{t} {e['level']:<5} {e['text']}"


async def _logs(args: argparse.Namespace) -> int:
    from urllib.parse import urlencode

    try:
        since = _since(args.since)
    except ValueError as e:
        print(f"hubhost logs: {e}", file=sys.stderr)
        return 2
    q: dict[str, Any] = {"limit": args.lines}
    if args.name:
        q["name"] = args.name
    if args.level:
        q["level"] = args.level
    if since:
        q["since"] = since
    if args.follow:
        q["follow"] = 1
    async with _client(args) as c:
        if not args.follow:
            entries = await c.get("/api/v1/logs?" + urlencode(q))
            for e in entries:
                print(_log_line(e))
            if os.environ.get("INVOCATION_ID") or os.environ.get("JOURNAL_STREAM") or SYSTEMD_SOCKET.exists():
                is_device = bool(args.name) and any(e.get("device") == args.name for e in entries)
                print(_journal_hint(args.name, is_device), file=sys.stderr)
            return 0
        async with c.session.get(c.base + "/api/v1/logs?" + urlencode(q)) as r:
            if r.status >= 400:
                doc = orjson.loads(await r.read())
                err = doc.get("error", {})
                raise ApiError(err.get("code", "error"), err.get("message", ""), r.status)
            async for raw in r.content:
                doc = orjson.loads(raw)
                if "missed" in doc:
                    print(f"... {doc['missed']} records missed (this terminal fell behind)")
                elif doc:
                    print(_log_line(doc))
                sys.stdout.flush()
    return 0


def _journal_hint(name: str | None, is_device: bool = False) -> str:
    field = f" HUBHOST_{'DEVICE' if is_device else 'DRIVER'}={name}" if name else ""
    return (f"(older records: journalctl -u hubhost{field}; for a device: HUBHOST_DEVICE=<id>; "
            "the hub keeps only the last 1000 records per driver in memory)")


async def _describe(args: argparse.Namespace) -> int:
    async with _client(args) as c:
        doc = await c.get(f"/api/v1/devices/{args.device}/describe")
    if args.json:
        _print_json(doc)
        return 0
    print(describe_text(doc))
    return 0


def describe_text(doc: dict[str, Any]) -> str:
    """The text of `hubhost describe`. Everything in it came from a driver or the config:
    each piece is shown as one line with control characters escaped (hubhost/text.py)."""
    from hubhost.text import one_line as s

    doc = _safe_doc(doc, s)
    dev, drv = doc["device"], doc["driver"]
    out = [f"device {dev['id']} ({dev['label']})"]
    out.append(f"  driver:     {drv['id']} ({drv.get('name') or '?'}) at {drv['path']}")
    state = drv["condition"] + (f", {drv['restarts']} restarts" if drv.get("restarts") else "")
    out.append(f"  state:      {state}" + (f" - last error: {drv['last_error']}" if drv.get("last_error") else ""))
    if dev.get("system"):
        out.append(f"  index:      {dev['system']} {dev['module']}/{dev['index']}")
    status = doc.get("status") or {}
    conn = status.get("connected")
    tr = doc.get("transport")
    if tr:
        where = " ".join(f"{k}={v}" for k, v in tr.items() if k != "kind")
        out.append(f"  connection: {tr['kind']} {where}: "
                   + ("connected" if conn is True else "not connected" if conn is False else "unknown"))
    else:
        out.append("  connection: none (no transport)")
    iface = doc.get("interface") or {}
    fns = iface.get("functions") or {}
    descs = iface.get("descriptions") or {}
    levels = {n: lvl for lvl, names in (iface.get("security") or {}).items() for n in names}
    out.append("  functions:" + ("" if fns else " none"))
    for name, params in fns.items():
        d = descs.get(name) or {}
        head = f"    {name}(" + ", ".join(params) + ")"
        if name in levels:
            head += f"  [{levels[name]}]"
        if d.get("description"):
            head += f"  - {d['description']}"
        out.append(head)
        for pname, spec in params.items():
            line = f"      {pname}: {spec[0]}"
            if len(spec) > 1:
                line += f" = {orjson.dumps(spec[1]).decode()}"
            pd = (d.get("params") or {}).get(pname)
            if pd:
                line += f"  - {pd}"
            out.append(line)
    out.append("  status:" + ("" if status else " none"))
    for k, v in status.items():
        out.append(f"    {k} = {orjson.dumps(v).decode()}")
    errs = doc.get("recent_errors") or []
    out.append("  recent warnings and errors:" + ("" if errs else " none"))
    for e in errs:
        out.append("    " + _log_line(e))
    return "\n".join(out)


def _safe_doc(v: Any, s: Any) -> Any:
    """Every string (keys too) of a JSON document made one printable line."""
    if isinstance(v, str):
        return s(v)
    if isinstance(v, dict):
        return {s(k) if isinstance(k, str) else k: _safe_doc(x, s) for k, x in v.items()}
    if isinstance(v, list):
        return [_safe_doc(x, s) for x in v]
    return v


async def _log_level(args: argparse.Namespace) -> int:
    level = None if args.level in ("hub", "default", "none") else args.level
    async with _client(args) as c:
        doc = await c.request("PUT", f"/api/v1/drivers/{args.driver}/log_level", {"level": level})
    print(f"{doc['driver']}: log level {doc['level'] or 'of the hub'}")
    return 0


async def _console(args: argparse.Namespace) -> int:
    """Ask the running hub for the console: it opens its TCP listener if none is open (on
    [api] console_tcp, loopback) and mints a one-time login token of the asked level."""
    async with _client(args) as c:
        if args.close:
            doc = await c.request("DELETE", "/api/v1/console")
            print(f"console closed: {doc['sessions_ended']} session(s) logged out"
                  + (", listener closed" if doc["listener_closed"] else ""))
            return 0
        doc = await c.request("POST", "/api/v1/console", {"level": args.level})
    print(doc["url"], flush=True)
    article = "an" if doc["level"][0] in "aeiou" else "a"
    print(f"({article} {doc['level']} session; the link works once, within {doc['expires_in']:.0f} s. Open it in a "
          "browser on this machine; from elsewhere forward the port first, e.g. "
          f"ssh -L {doc['origin'].rsplit(':', 1)[1]}:127.0.0.1:{doc['origin'].rsplit(':', 1)[1]} HUB. "
          "`hubhost console --close` logs every session out.)", file=sys.stderr)
    if args.open:
        import webbrowser

        if not webbrowser.open(doc["url"]):
            print("hubhost console: no browser could be started here; open the URL above yourself",
                  file=sys.stderr)
    return 0


def _runner(fn: Any) -> Any:
    def run(args: argparse.Namespace) -> int:
        try:
            return asyncio.run(fn(args))
        except ApiError as e:
            from hubhost.text import one_line   # the message may be a driver's: one line, no escapes
            print(f"hubhost {args.command}: {e.code}: {one_line(e.message)}", file=sys.stderr)
            return 1
        except ValueError as e:          # a config that does not load (ConfigError) names itself
            print(f"hubhost {args.command}: {e}", file=sys.stderr)
            return 2
        except (aiohttp.ClientConnectionError, FileNotFoundError, ConnectionRefusedError, PermissionError) as e:
            tried = getattr(args, "tried", None)
            reason = getattr(e, "strerror", None) or str(e)
            if isinstance(e, aiohttp.ClientConnectorError) and e.os_error is not None:
                reason = e.os_error.strerror or str(e.os_error)
            print(f"hubhost {args.command}: cannot reach the hub's API at {tried or '?'} ({reason}); "
                  f"is `hubhost run` running there? {WHERE_HINT}", file=sys.stderr)
            return 3
        except aiohttp.ServerDisconnectedError:
            print(f"hubhost {args.command}: the hub closed the connection (stopping?)", file=sys.stderr)
            return 3
        except KeyboardInterrupt:
            return 130
    return run


def add_commands(sub: Any) -> None:
    """Register status, exec, watch, ls and reload on the `hubhost` parser."""
    common = argparse.ArgumentParser(add_help=False)
    g = common.add_argument_group("reaching the hub")
    g.add_argument("--socket", help="the hub's API socket")
    g.add_argument("--config", help="the hub's config (its [api] socket and state dir); default $HUBHOST_CONFIG")
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

    p = sub.add_parser("reload", parents=[common],
                       help="restart drivers whose code or config changed, retry failed ones (like SIGHUP)")
    p.add_argument("drivers", nargs="*", metavar="DRIVER",
                   help="only these drivers (restarted even when unchanged); the others keep running")
    p.set_defaults(func=_runner(_reload))

    p = sub.add_parser("logs", parents=[common], help="recent log records of the running hub, per driver")
    p.add_argument("name", nargs="?", metavar="DRIVER|DEVICE")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing records as they arrive")
    p.add_argument("--level", help="at least this level: trace, debug, info, warn, error")
    p.add_argument("--since", help="seconds ago (30, 5m, 2h) or an ISO time")
    p.add_argument("-n", "--lines", type=int, default=200, help="at most this many past records (default 200)")
    p.set_defaults(func=_runner(_logs))

    p = sub.add_parser("describe", parents=[common], help="a device: driver, state, connection, functions, status, errors")
    p.add_argument("device")
    p.add_argument("--json", action="store_true", help="the whole document as JSON")
    p.set_defaults(func=_runner(_describe))

    p = sub.add_parser("console", parents=[common],
                       help="the hub's web console: print a one-time login URL (opens a loopback listener if needed)")
    p.add_argument("--level", choices=("none", "support", "administrator"), default="administrator",
                   help="what the session may do (default administrator)")
    p.add_argument("--open", action="store_true", help="also open the URL in a browser")
    p.add_argument("--close", action="store_true",
                   help="log every console session out and close the listener `hubhost console` opened")
    p.set_defaults(func=_runner(_console))

    p = sub.add_parser("log-level", parents=[common], help="set one driver's log level at run time (no restart)")
    p.add_argument("driver")
    p.add_argument("level", help="trace, debug, info, warn, error; `hub` to follow the hub's level again")
    p.set_defaults(func=_runner(_log_level))
