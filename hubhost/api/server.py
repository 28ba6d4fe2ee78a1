"""The hub's local API: HTTP and WebSocket (aiohttp) for status, metadata, exec and
subscriptions, plus config reload. `install(sup)` plugs it into a Supervisor.

Where it listens: a Unix socket (default `$RUNTIME_DIRECTORY/hubhost.sock`, else
`<state_dir>/hubhost.sock`, mode 0660: whoever may open it is trusted, so requests on it
run at administrator level unless they present a token), and optionally TCP, where every
request needs `Authorization: Bearer <token>` from `[[api.tokens]]` and gets that token's
level.

REST (JSON; errors are {"error": {"code", "message"}}):
  GET  /api/v1/health                       drivers, mirror, subscription counts
  GET  /api/v1/devices                      every device with its driver and index place
  GET  /api/v1/devices/{id}                 one device with status and interface
  GET  /api/v1/devices/{id}/status          {name: value}
  GET  /api/v1/devices/{id}/metadata        the interface document (DESIGN section 5)
  GET  /api/v1/systems[/{system}]           the system index
  POST /api/v1/exec                         {"device"|"system","module","index", "function", "args", "timeout"}
  POST /api/v1/devices/{id}/functions/{fn}  body: args (object or array)
  GET  /api/v1/devices/{id}/describe        driver, state, connection, functions (with
                                            descriptions), status and recent errors
  POST /api/v1/reload                       re-read the config and restart what changed
                                            (administrator); body {"drivers": [ids]} limits it
  GET  /api/v1/logs                         recent records: ?name=DRIVER|DEVICE&level=L&since=T
                                            &limit=N; &follow=1 streams NDJSON as they arrive
  PUT  /api/v1/drivers/{id}/log_level       {"level": "debug"} or {"level": null} (administrator)
  GET  /api/v1/ws                           WebSocket, see WsSession
  POST /api/v1/console                      {"level": L}: open the console's TCP listener if
                                            none is open and mint a one-time login URL
                                            (administrator); DELETE logs every console
                                            session out and closes a listener it opened
  GET  /console/...                         the web console (hubhost/api/console/)
  GET  /metrics                             Prometheus exposition (docs/metrics.md): the
                                            socket's administrators, the metrics token, or
                                            anyone on a loopback TCP with [api] metrics = "open"
(docs/api.md has an example of each.)

Exec errors map to HTTP statuses: unknown_device/unknown_function 404, forbidden 403,
bad_args 400, driver_error 502, timeout 504 (the hub is a gateway to its drivers).
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import socket
import stat
import weakref
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable

import orjson
from aiohttp import WSMsgType, web

from hubhost.functions import LEVELS, ExecError, FunctionHost, SystemRef
from hubhost.status.subscriptions import Subscriptions

__all__ = ["ApiSettings", "ApiServer", "install", "reload_config", "default_socket_path",
           "bind_unix", "short_unix_path"]

log = logging.getLogger("hubhost.api.server")


class _OneLineBadRequests(logging.Filter):
    """aiohttp logs a malformed request (an oversized header, a WebSocket frame on a plain
    connection) as an ERROR with a traceback: anyone who can reach the API could fill the
    journal that way. Such a record becomes one WARNING line naming the problem."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and record.exc_info[1] is not None:
            exc = record.exc_info[1]
            record.msg = "API: refused a malformed request: %s: %s"
            record.args = (type(exc).__name__, str(exc).splitlines()[0][:300] if str(exc) else "")
            record.exc_info = None
            record.exc_text = None
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


logging.getLogger("aiohttp.server").addFilter(_OneLineBadRequests())

MAX_BODY = 1024 * 1024
MAX_WS_BACKLOG = 10_000          # queued messages before a slow WebSocket client is dropped
MAX_WS_BACKLOG_BYTES = 8 << 20   # or queued bytes, whichever comes first
MAX_WS_CALLS = 64                # exec requests in flight per WebSocket
MAX_WS_WATCHES = 64              # watch_device / watch_hub / watch_logs per WebSocket
HUB_PUSH_INTERVAL = 1.0          # seconds between checks of the hub document (watch_hub)
HTTP_STATUS = {"unknown_device": 404, "unknown_function": 404, "forbidden": 403, "bad_args": 400,
               "driver_error": 502, "timeout": 504}
JSON_TYPE = "application/json"
LEVEL = web.RequestKey("level", str)     # the caller's security level, set by the middleware
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
PUBLIC_PATHS = frozenset({"/console/login"})   # and /console/static/: no session needed


# -- settings and sockets -------------------------------------------------------------------

def default_socket_path(state_dir: Path) -> Path:
    """$RUNTIME_DIRECTORY/hubhost.sock under systemd, else <state_dir>/hubhost.sock."""
    rt = os.environ.get("RUNTIME_DIRECTORY")
    if rt:
        return Path(rt.split(":")[0]) / "hubhost.sock"
    return Path(state_dir) / "hubhost.sock"


@dataclass
class ApiSettings:
    """The [api] table, normalised by config.py (an empty table means all defaults)."""

    socket: Path
    enabled: bool = True
    socket_mode: int = 0o660
    tcp: tuple[str, int] | None = None
    tokens: dict[str, str] = field(default_factory=dict)       # token -> level
    exec_timeout: float = 10.0
    driver_level: str = "support"
    driver_levels: dict[str, str] = field(default_factory=dict)
    metrics: str = "token"                 # GET /metrics on TCP: "token" | "open" | "off"
    metrics_token: str | None = None       # a token that reads /metrics and nothing else
    console_tcp: tuple[str, int] = ("127.0.0.1", 0)   # where `hubhost console` listens without tcp

    @classmethod
    def from_config(cls, api: dict[str, Any], state_dir: Path) -> "ApiSettings":
        return cls(
            socket=Path(api["socket"]) if api.get("socket") else default_socket_path(state_dir),
            enabled=api.get("enabled", True),
            socket_mode=api.get("socket_mode", 0o660),
            tcp=tuple(api["tcp"]) if api.get("tcp") else None,  # type: ignore[arg-type]
            tokens={t["token"]: t["level"] for t in api.get("tokens", [])},
            exec_timeout=api.get("exec_timeout", 10.0),
            driver_level=api.get("driver_level", "support"),
            driver_levels=dict(api.get("driver_levels", {})),
            metrics=api.get("metrics", "token"),
            metrics_token=api.get("metrics_token"),
            console_tcp=tuple(api.get("console_tcp") or ("127.0.0.1", 0)),  # type: ignore[arg-type]
        )


_UNIX_MAX = 100   # sun_path holds 108 bytes; keep a margin


def short_unix_path(path: Path) -> tuple[str, int | None]:
    """A path short enough for AF_UNIX: long ones go through /proc/self/fd/<dir fd>/name.
    Returns (path, fd to close once bound or connected)."""
    text = str(path)
    if len(text.encode()) <= _UNIX_MAX:
        return text, None
    fd = os.open(path.parent, os.O_PATH | os.O_DIRECTORY)
    return f"/proc/self/fd/{fd}/{path.name}", fd


def bind_unix(path: Path, mode: int) -> socket.socket:
    """A listening Unix socket with `mode` set before it accepts anyone. A stale socket
    file is replaced; one a live process answers on is an error."""
    path.parent.mkdir(parents=True, exist_ok=True)
    addr, fd = short_unix_path(path)
    try:
        if path.exists() or path.is_symlink():
            if not stat.S_ISSOCK(path.lstat().st_mode):
                raise OSError(f"{path} exists and is not a socket; refusing to replace it")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(addr)
            except OSError:
                path.unlink()          # nobody listens: left over from a crash
            else:
                raise OSError(f"{path}: another process is serving the API on this socket")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(addr)
            os.chmod(path, mode)        # before listen(): no one can connect yet
            sock.listen(128)
        except BaseException:
            sock.close()
            raise
        sock.setblocking(False)
        return sock
    finally:
        if fd is not None:
            os.close(fd)


# -- helpers --------------------------------------------------------------------------------

class _BadRequest(Exception):
    def __init__(self, message: str, code: str = "bad_request") -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _error_body(code: str, message: str) -> bytes:
    return orjson.dumps({"error": {"code": code, "message": message}})


def _json_response(body: bytes | str, status: int = 200) -> web.Response:
    if isinstance(body, str):
        body = body.encode()
    return web.Response(body=body, status=status, content_type=JSON_TYPE)


def _need_str(obj: dict, key: str, *, optional: bool = False) -> str | None:
    v = obj.get(key)
    if v is None and optional:
        return None
    if not isinstance(v, str) or not v:
        raise _BadRequest(f"'{key}' must be a non-empty string, got {orjson.dumps(v).decode()[:60]}")
    return v


def _need_index(obj: dict, key: str = "index") -> int:
    v = obj.get(key, 1)
    if isinstance(v, bool) or not isinstance(v, int) or not 1 <= v <= 2**31:
        raise _BadRequest(f"'{key}' must be a positive integer, got {orjson.dumps(v).decode()[:60]}")
    return v


def _need_timeout(obj: dict) -> float | None:
    v = obj.get("timeout")
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 < v <= 3600:
        raise _BadRequest(f"'timeout' must be a number of seconds in (0, 3600], got {orjson.dumps(v).decode()[:60]}")
    return float(v)


def _target(obj: dict) -> str | SystemRef:
    """{"device": id} or {"system"/"sys", "module"/"mod", "index"} -> exec target."""
    if "device" in obj:
        return _need_str(obj, "device")  # type: ignore[return-value]
    sys_key = "system" if "system" in obj else "sys"
    mod_key = "module" if "module" in obj else "mod"
    if sys_key not in obj:
        raise _BadRequest("give the target as \"device\", or as \"system\", \"module\" and \"index\"")
    return SystemRef(_need_str(obj, sys_key), _need_str(obj, mod_key), _need_index(obj))  # type: ignore[arg-type]


# -- the server -----------------------------------------------------------------------------

class ApiServer:
    """The aiohttp application and its sites (Unix socket, optional TCP)."""

    def __init__(self, sup: Any, functions: FunctionHost, subs: Subscriptions, settings: ApiSettings) -> None:
        self.sup = sup
        self.functions = functions
        self.subs = subs
        self.settings = settings
        self.sessions: set[WsSession] = set()
        self.runner: web.AppRunner | None = None
        self.tcp_port: int | None = None
        self.tcp_host: str | None = None
        self.socket_path: Path | None = None
        self._console_site: web.BaseSite | None = None   # the listener `hubhost console` opened
        from hubhost.api.console import Console
        from hubhost.status.devicewatch import DeviceWatches

        self.console = Console(self)
        self.watches = DeviceWatches(sup.status)
        self.app = self._make_app()
        self._metrics: Any = None   # hubhost.api.metrics.HubMetrics, made at the first scrape

    def _make_app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_BODY, middlewares=[self._middleware])
        r = app.router
        r.add_get("/api/v1/health", self.health)
        r.add_get("/api/v1/devices", self.devices)
        r.add_get("/api/v1/devices/{id}", self.device)
        r.add_get("/api/v1/devices/{id}/status", self.device_status)
        r.add_get("/api/v1/devices/{id}/metadata", self.device_metadata)
        r.add_get("/api/v1/systems", self.systems)
        r.add_get("/api/v1/systems/{system}", self.system)
        r.add_post("/api/v1/exec", self.exec)
        r.add_post("/api/v1/devices/{id}/functions/{fn}", self.exec_device)
        r.add_post("/api/v1/reload", self.reload)
        r.add_get("/api/v1/devices/{id}/describe", self.describe)
        r.add_get("/api/v1/logs", self.logs)
        r.add_put("/api/v1/drivers/{id}/log_level", self.set_log_level)
        r.add_get("/api/v1/ws", self.websocket)
        r.add_get("/metrics", self.metrics)
        r.add_post("/api/v1/console", self.console_open)
        r.add_delete("/api/v1/console", self.console_close)
        self.console.add_routes(r)
        return app

    # -- life ----------------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        self.runner = web.AppRunner(self.app, handle_signals=False, access_log=None,
                                    shutdown_timeout=1.0)
        await self.runner.setup()
        sock = bind_unix(s.socket, s.socket_mode)
        self.socket_path = s.socket
        await web.SockSite(self.runner, sock).start()
        log.info("API listening on %s (mode %o)", s.socket, s.socket_mode)
        if s.tcp:
            host, port = s.tcp
            tcp = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
            tcp.setblocking(False)
            self.tcp_port = tcp.getsockname()[1]     # port 0 in the config: the one we got
            self.tcp_host = host
            await web.SockSite(self.runner, tcp).start()
            log.info("API listening on %s:%d (bearer tokens)", host, self.tcp_port)

    async def open_console_listener(self) -> tuple[str, int, bool]:
        """The TCP listener the console is served on: [api] tcp when configured, else one
        opened now on [api] console_tcp (loopback). Returns (host, port, opened now)."""
        if self.tcp_port is not None:
            return self.tcp_host or "127.0.0.1", self.tcp_port, False
        if self.runner is None:
            raise OSError("the API is not running")
        host, port = self.settings.console_tcp
        tcp = socket.create_server((host, port), family=socket.AF_INET6 if ":" in host else socket.AF_INET)
        tcp.setblocking(False)
        site = web.SockSite(self.runner, tcp)
        await site.start()
        self._console_site = site
        self.tcp_host, self.tcp_port = host, tcp.getsockname()[1]
        log.info("API listening on %s:%d for the console (asked by `hubhost console`)", host, self.tcp_port)
        return host, self.tcp_port, True

    async def close_console_listener(self) -> bool:
        """Close the listener `hubhost console` opened (a configured [api] tcp stays)."""
        site, self._console_site = self._console_site, None
        if site is None:
            return False
        await site.stop()
        log.info("API: console listener on %s:%s closed", self.tcp_host, self.tcp_port)
        self.tcp_host = self.tcp_port = None
        return True

    async def stop(self) -> None:
        for session in list(self.sessions):
            await session.close(1001, "hub stopping")
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None
        if self.socket_path is not None:
            try:
                self.socket_path.unlink()
            except FileNotFoundError:
                pass
            self.socket_path = None

    # -- auth and errors -----------------------------------------------------------------
    @staticmethod
    def _on_unix(request: web.Request) -> bool:
        transport = request.transport
        sock = transport.get_extra_info("socket") if transport is not None else None
        return sock is not None and sock.family == socket.AF_UNIX

    def _bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization")
        if header is None:
            return None
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise web.HTTPUnauthorized(reason="malformed Authorization header (want: Bearer <token>)")
        return token.strip()

    def _is_metrics_token(self, token: str | None) -> bool:
        known = self.settings.metrics_token
        return token is not None and known is not None and hmac.compare_digest(known.encode(), token.encode())

    def metrics_level(self, request: web.Request) -> str:
        """Who may read GET /metrics: the metrics token anywhere; on the socket an
        administrator; on TCP an administrator token ([api] metrics = "token"), anyone
        (metrics = "open", a loopback listener) or no one (metrics = "off")."""
        token = self._bearer(request)
        if self._is_metrics_token(token):
            return "none"
        if not self._on_unix(request):
            mode = self.settings.metrics
            if mode == "off":
                raise web.HTTPNotFound(reason="/metrics is off on TCP ([api] metrics = \"off\")")
            if mode == "open":
                return "none"
            if token is None:
                raise web.HTTPUnauthorized(reason="/metrics on TCP needs a bearer token ([api] metrics_token, "
                                                  "or an administrator token)")
        level = self.level_for(request)
        if LEVELS[level] < LEVELS["administrator"]:
            raise web.HTTPForbidden(reason="/metrics needs the metrics token or the administrator level")
        return level

    def level_for(self, request: web.Request) -> str:
        """The caller's level: its token's, administrator on the Unix socket, or the level
        of its console session (cookie; state-changing requests and WebSocket handshakes
        must then come from the console's own origin)."""
        token = self._bearer(request)
        if token is not None:
            if self._is_metrics_token(token):
                raise web.HTTPForbidden(reason="the metrics token reads GET /metrics only")
            for known, level in self.settings.tokens.items():
                if hmac.compare_digest(known.encode(), token.encode()):
                    return level
            raise web.HTTPUnauthorized(reason="unknown token")
        if self._on_unix(request):
            return "administrator"
        session = self.console.session_of(request)
        if session is not None:
            self._check_origin(request)
            return session.level
        raise web.HTTPUnauthorized(reason="a bearer token is required on TCP (Authorization: Bearer <token>), "
                                          "or a console session (`hubhost console` prints a login URL)")

    @staticmethod
    def _check_origin(request: web.Request) -> None:
        """A cookie rides along with requests other sites make: refuse state-changing ones
        (and WebSocket handshakes) unless the browser says they come from the console's own
        page. The cookie only goes to the host that set it, so the Host header names it."""
        if request.method in SAFE_METHODS and request.headers.get("Upgrade", "").lower() != "websocket":
            return
        own = f"{request.scheme}://{request.host}"
        origin = request.headers.get("Origin")
        if origin != own:
            raise web.HTTPForbidden(reason=f"cross-origin request refused: Origin {origin!r} is not the "
                                           f"console's own ({own})")

    @web.middleware
    async def _middleware(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            if request.path == "/metrics":
                request[LEVEL] = self.metrics_level(request)
            elif request.path in PUBLIC_PATHS or request.path.startswith("/console/static/"):
                request[LEVEL] = "none"
            else:
                request[LEVEL] = self.level_for(request)
            return await handler(request)
        except ExecError as e:
            if request.path.startswith("/console/"):
                return self.console.error_page(HTTP_STATUS.get(e.code, 400), e.message)
            return _json_response(_error_body(e.code, e.message), HTTP_STATUS.get(e.code, 400))
        except _BadRequest as e:
            return _json_response(_error_body(e.code, e.message), 400)
        except web.HTTPException as e:
            if e.status < 400:
                raise
            code = {401: "unauthorized", 403: "forbidden", 404: "not_found", 405: "method_not_allowed",
                    413: "too_large"}.get(e.status, "bad_request")
            message = e.reason or e.text or code
            if e.status == 413:
                message = f"request body is larger than {MAX_BODY} bytes"
            if request.path.startswith("/console/"):
                return self.console.error_page(e.status, message)
            resp = _json_response(_error_body(code, message), e.status)
            if e.status == 401:
                resp.headers["WWW-Authenticate"] = 'Bearer realm="hubhost"'
            return resp
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("API: %s %s failed", request.method, request.path)
            return _json_response(_error_body("internal", "internal error (logged on the hub)"), 500)

    async def _body(self, request: web.Request, *, default: Any = None) -> Any:
        raw = await request.read()
        if not raw.strip():
            return default
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise _BadRequest(f"body is not valid JSON: {e}") from None

    # -- REST ----------------------------------------------------------------------------
    def _device_entry(self, slot: Any, dev: Any) -> dict[str, Any]:
        return {"id": dev.id, "label": dev.label, "driver": slot.id, "state": slot.state,
                "system": dev.system, "module": dev.module, "index": dev.index}

    def _find(self, device_id: str) -> tuple[Any, Any]:
        slot = self.functions.device_slot(device_id)
        if slot is None:
            raise ExecError("unknown_device", f"no device {device_id!r} on this hub")
        dev = next(d for d in slot.cfg.devices if d.id == device_id)
        return slot, dev

    def _status_text(self, device_id: str) -> str:
        fields = self.sup.status.device(device_id)
        return "{" + ",".join(f"{orjson.dumps(k).decode()}:{v}" for k, v in fields.items()) + "}"

    def _interface_text(self, device_id: str) -> str:
        iface = self.functions.interface_of(device_id)
        return iface.text if iface is not None else "null"

    async def health(self, request: web.Request) -> web.Response:
        mirror = getattr(self.sup, "mirror", None)
        body = {
            "hub": self.sup.config.hub_id,
            "counts": self.sup.counts(),
            "drivers": {s.id: {"state": s.state, "restarts": s.restarts, "last_error": s.last_error,
                               "condition": condition(s)}
                        for s in self.sup.slots.values()},
            "mirror": mirror.state() if mirror is not None else None,
            "subscriptions": self.subs.count(),
            "websockets": len(self.sessions),
        }
        return _json_response(orjson.dumps(body, default=str))

    async def devices(self, request: web.Request) -> web.Response:
        out = [self._device_entry(slot, dev) for slot in self.sup.slots.values() for dev in slot.cfg.devices]
        return _json_response(orjson.dumps(out))

    async def device(self, request: web.Request) -> web.Response:
        slot, dev = self._find(request.match_info["id"])
        entry = orjson.dumps(self._device_entry(slot, dev)).decode()
        return _json_response(entry[:-1] + ',"status":' + self._status_text(dev.id) +
                              ',"interface":' + self._interface_text(dev.id) + "}")

    async def device_status(self, request: web.Request) -> web.Response:
        device_id = request.match_info["id"]
        fleet = getattr(self.sup, "fleet", None)
        if fleet is not None and device_id in fleet.driver_of and self.functions.device_slot(device_id) is None:
            return _json_response(self._status_text(device_id))   # driven elsewhere: the replica
        _, dev = self._find(device_id)
        return _json_response(self._status_text(dev.id))

    async def device_metadata(self, request: web.Request) -> web.Response:
        _, dev = self._find(request.match_info["id"])
        return _json_response(self._interface_text(dev.id))

    async def systems(self, request: web.Request) -> web.Response:
        return _json_response(orjson.dumps(self.subs.index))

    async def system(self, request: web.Request) -> web.Response:
        system_id = request.match_info["system"]
        mapping = self.subs.index.get(system_id)
        if mapping is None:
            raise ExecError("unknown_device", f"no system {system_id!r} on this hub")
        return _json_response(orjson.dumps(mapping))

    async def exec(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if not isinstance(body, dict):
            raise _BadRequest("body must be a JSON object with the target, \"function\" and \"args\"")
        fn = _need_str(body, "function")
        result = await self.functions.exec(_target(body), fn, body.get("args"),  # type: ignore[arg-type]
                                           level=request[LEVEL], timeout=_need_timeout(body))
        return _json_response('{"result":' + result + "}")

    async def exec_device(self, request: web.Request) -> web.Response:
        args = await self._body(request)
        timeout = None
        if "timeout" in request.query:
            try:
                timeout = _need_timeout({"timeout": float(request.query["timeout"])})
            except ValueError:
                raise _BadRequest("query parameter timeout must be a number of seconds") from None
        result = await self.functions.exec(request.match_info["id"], request.match_info["fn"], args,
                                           level=request[LEVEL], timeout=timeout)
        return _json_response('{"result":' + result + "}")

    async def reload(self, request: web.Request) -> web.Response:
        if LEVELS[request[LEVEL]] < LEVELS["administrator"]:
            raise ExecError("forbidden", "reloading the config needs the administrator level")
        body = await self._body(request, default={})
        only = body.get("drivers") if isinstance(body, dict) else None
        if only is not None and (not isinstance(only, list) or not all(isinstance(x, str) for x in only)):
            raise _BadRequest("'drivers' must be a list of driver ids")
        try:
            report = await reload_config(self.sup, only=set(only) if only else None)
        except ConfigReloadError as e:
            return _json_response(_error_body("bad_config", str(e)), 400)
        reasons = report.pop("reasons", {})
        return _json_response(orjson.dumps({"reloaded": report, "reasons": reasons}))

    def _logs_filter(self, request: web.Request) -> Any:
        from hubhost.logs import level_of
        from hubhost.supervisor.logring import Filter

        q = request.query
        name = q.get("name")
        drivers, device = None, None
        if name:
            if name in self.sup.slots:
                drivers = frozenset([name])
            else:
                slot = self.functions.device_slot(name)
                if slot is None:
                    raise ExecError("unknown_device", f"no driver or device {name!r} on this hub (drivers: "
                                    f"{', '.join(self.sup.slots) or 'none'})")
                drivers, device = frozenset([slot.id]), name
        try:
            since = float(q.get("since", 0) or 0)
        except ValueError:
            raise _BadRequest("since must be UTC seconds since the epoch") from None
        return Filter(drivers, device, level_of(q["level"]) if q.get("level") else 0, since)

    def log_filter(self, driver: str | None, device: str | None, level: str | None) -> Any:
        """A log filter by driver, device and level (each optional), the names checked."""
        from hubhost.logs import level_of
        from hubhost.supervisor.logring import Filter

        drivers = None
        if driver:
            if driver not in self.sup.slots:
                raise ExecError("unknown_device", f"no driver {driver!r} on this hub (drivers: "
                                f"{', '.join(self.sup.slots) or 'none'})")
            drivers = frozenset([driver])
        if device:
            slot = self.functions.device_slot(device)
            if slot is None:
                raise ExecError("unknown_device", f"no device {device!r} on this hub")
            if drivers is not None and slot.id not in drivers:
                drivers = frozenset()      # a device of another driver: nothing matches
            else:
                drivers = frozenset([slot.id])
        if level and level.lower() not in ("trace", "debug", "info", "warn", "warning", "error", "critical"):
            raise _BadRequest(f"level must be one of trace, debug, info, warn, error; got {level!r}")
        lvl = level_of(level) if level else 0
        return Filter(drivers, device or None, lvl)

    async def logs(self, request: web.Request) -> web.StreamResponse:
        match = self._logs_filter(request)
        try:
            limit = int(request.query.get("limit", 200))
        except ValueError:
            raise _BadRequest("limit must be an integer") from None
        ring = self.sup.logs
        recent = ring.recent(match, limit)
        if request.query.get("follow") not in ("1", "true", "yes"):
            return _json_response(orjson.dumps([e.to_json() for e in recent]))
        resp = web.StreamResponse(headers={"Content-Type": "application/x-ndjson"})
        await resp.prepare(request)
        f = ring.follow(match)
        try:
            for e in recent:
                await resp.write(orjson.dumps(e.to_json()) + b"\n")
            while True:
                try:
                    item = await asyncio.wait_for(f.queue.get(), 15.0)
                except asyncio.TimeoutError:
                    await resp.write(b"{}\n")      # keep-alive: tells a gone client apart
                    continue
                if isinstance(item, int):
                    await resp.write(orjson.dumps({"missed": item}) + b"\n")
                else:
                    await resp.write(orjson.dumps(item.to_json()) + b"\n")
        except ConnectionError:
            pass              # the follower went away (Ctrl-C on `hubhost logs -f`)
        finally:
            ring.unfollow(f)
        return resp

    async def set_log_level(self, request: web.Request) -> web.Response:
        from hubhost.config import LOG_LEVELS
        from hubhost.supervisor.logring import level_name

        if LEVELS[request[LEVEL]] < LEVELS["administrator"]:
            raise ExecError("forbidden", "changing a driver's log level needs the administrator level")
        did = request.match_info["id"]
        if did not in self.sup.slots:
            raise ExecError("unknown_device", f"no driver {did!r} on this hub")
        body = await self._body(request, default={})
        level = body.get("level") if isinstance(body, dict) else None
        if level is not None and (not isinstance(level, str) or level.lower() not in LOG_LEVELS):
            raise _BadRequest(f"level must be one of {', '.join(LOG_LEVELS)} or null, got {level!r}")
        got = self.sup.set_driver_level(did, level.lower() if level else None)
        log.info("[%s] log level set to %s through the API", did, level_name(got) if got is not None
                 else "the hub's")
        return _json_response(orjson.dumps({"driver": did, "level": level_name(got) if got is not None else None}))

    async def describe(self, request: web.Request) -> web.Response:
        from hubhost.supervisor.logring import Filter

        slot, dev = self._find(request.match_info["id"])
        iface = self.functions.interface_of(dev.id)
        doc = iface.doc if iface is not None else None
        errors = self.sup.logs.recent(Filter(frozenset([slot.id]), None, logging.WARNING), 10)
        errors = [e for e in errors if e.device in (None, dev.id)]
        body = {
            "device": self._device_entry(slot, dev),
            "driver": {"id": slot.id, "name": slot.name, "path": str(slot.cfg.path), "state": slot.state,
                       "condition": condition(slot), "restarts": slot.restarts,
                       "last_error": slot.last_error},
            "transport": {"kind": dev.transport, **{k: v for k, v in dev.transport_settings.items()}}
                         if dev.transport else None,
            "status": orjson.loads(self._status_text(dev.id)),
            "interface": doc,
            "recent_errors": [e.to_json() for e in errors],
        }
        return _json_response(orjson.dumps(body, default=str))

    async def metrics(self, request: web.Request) -> web.Response:
        """The Prometheus exposition of the hub (docs/metrics.md), read at scrape time."""
        if self._metrics is None:
            from hubhost.api.metrics import HubMetrics
            self._metrics = HubMetrics(self.sup)
        body, content_type = self._metrics.render(request.headers.get("Accept"))
        resp = web.Response(body=body)
        resp.headers["Content-Type"] = content_type
        return resp

    async def console_open(self, request: web.Request) -> web.Response:
        """`hubhost console`: make sure a TCP listener is open and mint a one-time login URL
        for a session of the asked level (at most the caller's own)."""
        caller = request[LEVEL]
        if LEVELS[caller] < LEVELS["administrator"]:
            raise ExecError("forbidden", "opening the console needs the administrator level")
        body = await self._body(request, default={})
        level = body.get("level", "administrator") if isinstance(body, dict) else None
        if level not in LEVELS:
            raise _BadRequest(f"'level' must be one of {', '.join(LEVELS)}, got {orjson.dumps(level).decode()[:60]}")
        try:
            host, port, opened = await self.open_console_listener()
        except OSError as e:
            host, port = self.settings.console_tcp
            return _json_response(_error_body("listen_failed", f"cannot listen on {host}:{port} for the "
                                              f"console: {e.strerror or e}"), 500)
        token, ttl = self.console.logins.mint(level)
        shown = "127.0.0.1" if host in ("", "0.0.0.0") else "::1" if host == "::" else host
        if ":" in shown:
            shown = f"[{shown}]"
        base = f"http://{shown}:{port}"
        return _json_response(orjson.dumps({
            "url": f"{base}/console/login?token={token}", "origin": base, "level": level,
            "expires_in": ttl, "listener": "opened" if opened else "open",
            "configured": self._console_site is None}))

    async def console_close(self, request: web.Request) -> web.Response:
        if LEVELS[request[LEVEL]] < LEVELS["administrator"]:
            raise ExecError("forbidden", "closing the console needs the administrator level")
        ended = self.console.logins.counts()["sessions"]
        self.console.logins.clear()
        for session in [s for s in self.sessions if s.cookie is not None]:
            await session.close(1008, "console closed")
        closed = await self.close_console_listener()
        return _json_response(orjson.dumps({"sessions_ended": ended, "listener_closed": closed}))

    async def websocket(self, request: web.Request) -> web.StreamResponse:
        ws = web.WebSocketResponse(max_msg_size=MAX_BODY, heartbeat=30.0)
        await ws.prepare(request)
        session = WsSession(self, ws, request[LEVEL], request.transport)
        if not request.headers.get("Authorization") and not self._on_unix(request):
            session.cookie = self.console.cookie_of(request)
        self.sessions.add(session)
        try:
            await session.run()
        finally:
            self.sessions.discard(session)
            await session.close()
        return ws


# -- WebSocket ------------------------------------------------------------------------------

class WsSession:
    """One WebSocket client. Requests are JSON objects with an "id" (echoed in the reply)
    and a "type":

      {"id": 1, "type": "bind", "sys": "s1", "mod": "Display", "index": 1, "name": "power"}
          -> {"id": 1, "type": "success", "ref": 7}, then for the current value and every
             change: {"type": "notify", "ref": 7, "value": <JSON>, "meta": {sys, mod, index, name}}
      {"id": 2, "type": "unbind", "ref": 7}                -> {"id": 2, "type": "success"}
      {"id": 3, "type": "exec", "device": "d1" | "sys"/"mod"/"index", "function": "power",
       "args": {...} | [...], "timeout": 5}                -> {"id": 3, "type": "success", "result": <JSON>}
      {"id": 4, "type": "ping"}                            -> {"id": 4, "type": "success"}

    What the console's pages follow (any client may):

      {"id": 5, "type": "watch_device", "device": "d1"}   -> {"id": 5, "type": "success", "ref": 8},
          then every field now and each change: {"type": "status", "ref": 8, "device": "d1",
          "name": "power", "value": <JSON, null when the field was removed>}
      {"id": 6, "type": "watch_hub"}                      -> {..., "ref": 9}, then the hub page's
          document (hubhost/api/console/summary.py) now and whenever it changes (checked once a
          second): {"type": "hub", "ref": 9, "hub": {...}}
      {"id": 7, "type": "watch_logs", "driver": D, "device": V, "level": "warn"}  (each optional)
          -> {..., "ref": 10}, then each new record: {"type": "log", "ref": 10, "entry": {...}}
          or {"type": "log", "ref": 10, "missed": N} when this client fell behind
      unbind with the ref ends any of them.

    Failures: {"id": ..., "type": "error", "code": ..., "message": ...}. Closing the socket
    drops all of its subscriptions. Messages go out in order through one writer task; a
    client that falls MAX_WS_BACKLOG messages behind is disconnected.
    """

    def __init__(self, server: ApiServer, ws: web.WebSocketResponse, level: str,
                 transport: asyncio.Transport | None = None) -> None:
        self.server = server
        self.ws = ws
        self.transport = transport
        self.level = level
        self.subscriber = server.subs.subscriber()
        self.out: deque[str] = deque()
        self.queued = 0                  # bytes in `out`
        self.wake = asyncio.Event()
        self.calls: set[asyncio.Task] = set()
        self.closed = False
        self.cookie: str | None = None   # the console session's cookie, when it authenticated
        self.watches: dict[int, Callable[[], None]] = {}   # ref -> stop (watch_* requests)
        self.writer = asyncio.get_running_loop().create_task(self._write())

    # -- output --------------------------------------------------------------------------
    def send(self, text: str) -> None:
        if self.closed:
            return
        out = self.out
        out.append(text)
        self.queued += len(text)
        if len(out) > MAX_WS_BACKLOG or self.queued > MAX_WS_BACKLOG_BYTES:
            n, size = len(out), self.queued
            out.clear()
            self.queued = 0
            self.closed = True
            if n > MAX_WS_BACKLOG:
                log.warning("API: WebSocket client fell %d messages behind; disconnecting it", MAX_WS_BACKLOG)
            else:
                log.warning("API: WebSocket client fell %d KiB behind (%d messages); disconnecting it",
                            size >> 10, n)
            # a close handshake would queue behind the backlog: cut the connection instead
            self.writer.cancel()
            if self.transport is not None:
                self.transport.abort()
            return
        self.wake.set()

    async def _write(self) -> None:
        out, ws, wake = self.out, self.ws, self.wake
        try:
            while True:
                await wake.wait()
                wake.clear()
                while out:
                    text = out.popleft()
                    self.queued -= len(text)
                    await ws.send_str(text)
        except (ConnectionError, RuntimeError, asyncio.CancelledError):
            pass
        except Exception:  # noqa: BLE001 - a broken client must not take anything else down
            log.debug("API: WebSocket writer stopped", exc_info=True)

    def reply(self, rid: Any, **fields: Any) -> None:
        self.send(orjson.dumps({"id": rid, "type": "success", **fields}).decode())

    def error(self, rid: Any, code: str, message: str) -> None:
        self.send(orjson.dumps({"id": rid, "type": "error", "code": code, "message": message}).decode())

    # -- input ---------------------------------------------------------------------------
    async def run(self) -> None:
        async for msg in self.ws:
            if msg.type == WSMsgType.TEXT:
                self.handle(msg.data)
            elif msg.type == WSMsgType.BINARY:
                self.error(None, "bad_request", "binary messages are not understood; send JSON text")
            else:
                break

    def handle(self, text: str) -> None:
        try:
            req = orjson.loads(text)
        except orjson.JSONDecodeError as e:
            return self.error(None, "bad_request", f"message is not valid JSON: {e}")
        if not isinstance(req, dict):
            return self.error(None, "bad_request", "a message must be a JSON object with \"id\" and \"type\"")
        rid = req.get("id")
        if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (int, str))):
            return self.error(None, "bad_request", "\"id\" must be a number or a string")
        kind = req.get("type")
        try:
            if kind == "bind":
                self.bind(rid, req)
            elif kind == "unbind":
                self.unbind(rid, req)
            elif kind == "exec":
                self.exec(rid, req)
            elif kind == "ping":
                self.reply(rid)
            elif kind == "watch_device":
                self.watch_device(rid, req)
            elif kind == "watch_hub":
                self.watch_hub(rid)
            elif kind == "watch_logs":
                self.watch_logs(rid, req)
            else:
                self.error(rid, "bad_request", f"unknown message type {kind!r} (bind, unbind, exec, ping, "
                                               "watch_device, watch_hub, watch_logs)")
        except _BadRequest as e:
            self.error(rid, e.code, e.message)
        except ExecError as e:
            self.error(rid, e.code, e.message)

    def bind(self, rid: Any, req: dict) -> None:
        system, module = _need_str(req, "sys"), _need_str(req, "mod")
        index, name = _need_index(req), _need_str(req, "name")
        ref = self.server.subs.new_ref()
        meta = orjson.dumps({"sys": system, "mod": module, "index": index, "name": name}).decode()
        head = '{"type":"notify","ref":' + str(ref) + ',"meta":' + meta + ',"value":'
        send = self.send
        self.reply(rid, ref=ref)   # the reply goes out before the first value
        self.subscriber.subscribe(system, module, index, name,  # type: ignore[arg-type]
                                  lambda _ref, value: send(head + value + "}"), ref=ref)

    def unbind(self, rid: Any, req: dict) -> None:
        ref = req.get("ref")
        if isinstance(ref, bool) or not isinstance(ref, int):
            raise _BadRequest("unbind needs the \"ref\" returned by bind (an integer)")
        stop = self.watches.pop(ref, None)
        if stop is not None:
            stop()
        elif not self.subscriber.unsubscribe(ref):
            raise _BadRequest(f"no subscription {ref} on this connection", code="unknown_ref")
        self.reply(rid)

    def _watch_limit(self) -> None:
        if len(self.watches) >= MAX_WS_WATCHES:
            raise _BadRequest(f"too many watches on this connection (max {MAX_WS_WATCHES})", code="busy")

    def watch_device(self, rid: Any, req: dict) -> None:
        device = _need_str(req, "device")
        if self.server.functions.device_slot(device) is None:
            raise ExecError("unknown_device", f"no device {device!r} on this hub")
        self._watch_limit()
        ref = self.server.subs.new_ref()
        head = '{"type":"status","ref":' + str(ref) + ',"device":' + orjson.dumps(device).decode() + ',"name":'
        send = self.send

        def changed(_device: str, name: str, value: str | None) -> None:
            send(head + orjson.dumps(name).decode() + ',"value":' + (value or "null") + "}")

        inner, now = self.server.watches.watch(device, changed)   # type: ignore[arg-type]
        self.watches[ref] = lambda: self.server.watches.unwatch(inner)
        self.reply(rid, ref=ref)
        for name, value in now.items():
            changed(device, name, value)

    def watch_hub(self, rid: Any) -> None:
        from hubhost.api.console.summary import WorkerUsage, hub_summary

        self._watch_limit()
        ref = self.server.subs.new_ref()
        usage = WorkerUsage()

        async def push() -> None:
            last = b""
            while True:
                doc = orjson.dumps(hub_summary(self.server.sup, usage), default=str)
                if doc != last:
                    last = doc
                    self.send('{"type":"hub","ref":' + str(ref) + ',"hub":' + doc.decode() + "}")
                await asyncio.sleep(HUB_PUSH_INTERVAL)

        self.reply(rid, ref=ref)
        task = asyncio.get_running_loop().create_task(push())
        self.watches[ref] = task.cancel

    def watch_logs(self, rid: Any, req: dict) -> None:
        match = self.server.log_filter(_need_str(req, "driver", optional=True),
                                       _need_str(req, "device", optional=True),
                                       _need_str(req, "level", optional=True))
        self._watch_limit()
        ref = self.server.subs.new_ref()
        ring = self.server.sup.logs
        follower = ring.follow(match)
        head = '{"type":"log","ref":' + str(ref) + ','

        async def forward() -> None:
            try:
                while True:
                    item = await follower.queue.get()
                    if isinstance(item, int):
                        self.send(head + '"missed":' + str(item) + "}")
                    else:
                        self.send(head + '"entry":' + orjson.dumps(item.to_json()).decode() + "}")
            finally:
                ring.unfollow(follower)

        self.reply(rid, ref=ref)
        task = asyncio.get_running_loop().create_task(forward())
        self.watches[ref] = task.cancel

    def exec(self, rid: Any, req: dict) -> None:
        fn = _need_str(req, "function")
        target = _target(req)
        timeout = _need_timeout(req)
        if len(self.calls) >= MAX_WS_CALLS:
            raise _BadRequest(f"too many calls in flight on this connection (max {MAX_WS_CALLS})", code="busy")
        task = asyncio.get_running_loop().create_task(self._exec(rid, target, fn, req.get("args"), timeout))
        self.calls.add(task)
        task.add_done_callback(self.calls.discard)

    async def _exec(self, rid: Any, target: Any, fn: str, args: Any, timeout: float | None) -> None:
        try:
            result = await self.server.functions.exec(target, fn, args, level=self.level, timeout=timeout)
        except ExecError as e:
            return self.error(rid, e.code, e.message)
        self.send('{"id":' + orjson.dumps(rid).decode() + ',"type":"success","result":' + result + "}")

    async def close(self, code: int = 1000, message: str = "") -> None:
        self.closed = True
        self.subscriber.terminate()
        for stop in list(self.watches.values()):
            stop()
        self.watches.clear()
        for t in list(self.calls):
            t.cancel()
        self.writer.cancel()
        if not self.ws.closed:
            try:
                await self.ws.close(code=code, message=message.encode())
            except Exception:  # noqa: BLE001 - the peer may be gone already
                pass


# -- config reload --------------------------------------------------------------------------

class ConfigReloadError(Exception):
    """The new config was refused; the running one stays."""


_reload_locks: "weakref.WeakKeyDictionary[Any, asyncio.Lock]" = weakref.WeakKeyDictionary()


def condition(slot: Any) -> str:
    """The state `hubhost status` shows and counts (the same word in rows and summary):
    a driver that restarts because it never got going is "failed"."""
    if slot.state == "restarting" and slot.failed_boot:
        return "failed"
    return slot.state


async def reload_config(sup: Any, only: set[str] | None = None) -> dict[str, Any]:
    """Re-read the hub's config file and apply it (SIGHUP, `hubhost reload`, POST /reload):
    drivers whose config or Lua files changed, or that failed, restart (see apply_config)."""
    from hubhost import config as config_mod
    from hubhost.hub import device_systems

    lock = _reload_locks.setdefault(sup, asyncio.Lock())
    async with lock:
        if sup.config.source is None:
            raise ConfigReloadError("this hub was not started from a config file")
        try:
            new = config_mod.load(sup.config.source)
        except config_mod.ConfigError as e:
            log.error("config reload refused, keeping the running config: %s", e)
            raise ConfigReloadError(str(e)) from None
        if sup.config.given_hub_id:
            new.hub_id = new.given_hub_id = sup.config.given_hub_id
        fleet = getattr(sup, "fleet", None)
        if fleet is not None:
            new = fleet.reloaded(new)    # the full config stays the fleet's; this hub's view
        for key in ("redis", "api", "hub_id", "state_dir"):
            if getattr(new, key) != getattr(sup.config, key):
                log.warning("config reload: %s changed; that takes effect at the next start", key)
                setattr(new, key, getattr(sup.config, key))
        old_systems = set(device_systems(sup.config))
        try:
            if fleet is not None:
                async with fleet.apply_lock:
                    report = await sup.apply_config(new, only=only)
            else:
                report = await sup.apply_config(new, only=only)
        except KeyError as e:
            raise ConfigReloadError(str(e.args[0])) from None
        logs = getattr(sup, "logs", None)
        if logs is not None:
            logs.forget(sup.slots)
        systems = device_systems(fleet.full if fleet is not None else new)
        functions: FunctionHost | None = getattr(sup, "functions", None)
        if functions is not None:
            functions.rebuild()
        subs: Subscriptions | None = getattr(sup, "subscriptions", None)
        if subs is not None:
            subs.set_index(systems)
        mirror = getattr(sup, "mirror", None)
        if mirror is not None:
            mirror.set_devices([dev.id for d in new.drivers for dev in d.devices])
        if mirror is not None and fleet is None:   # in a fleet, each index has one builder
            for system_id, mapping in systems.items():
                mirror.set_system_index(system_id, mapping)
            for system_id in old_systems - set(systems):
                mirror.remove_system(system_id)
        log.info("config reloaded from %s: %s", sup.config.source,
                 "; ".join(f"{k} {', '.join(v)}" for k, v in report.items()
                           if v and k not in ("kept", "reasons")) or "no driver changes")
        return report


async def _reload_on_signal(sup: Any) -> None:
    """SIGHUP: a refused config is already logged as one error line; nothing to raise."""
    try:
        await reload_config(sup)
    except ConfigReloadError:
        pass


# -- wiring ---------------------------------------------------------------------------------

def _indexed_config(sup: Any) -> Any:
    """The config whose systems this hub indexes: in a fleet, the shared one (a device on
    another hub is still found by system/module/index)."""
    fleet = getattr(sup, "fleet", None)
    return fleet.full if fleet is not None else sup.config


def subs_owned(sup: Any) -> list[str]:
    """Systems the running config defines (their index comes from the config, not Redis)."""
    return [dev.system for d in _indexed_config(sup).drivers for dev in d.devices if dev.system]


def install(sup: Any) -> None:
    """Plug functions, subscriptions, the API server and config reload into `sup`."""
    from hubhost.hub import device_systems

    settings = ApiSettings.from_config(sup.config.api or {}, sup.state_dir)
    subs = Subscriptions(sup.status)
    from hubhost.supervisor.routing import RoutedFunctions

    functions = RoutedFunctions(sup, subs, default_timeout=settings.exec_timeout,
                             driver_level=settings.driver_level, driver_levels=settings.driver_levels)
    functions.attach()
    subs.set_index(device_systems(_indexed_config(sup)))
    server = ApiServer(sup, functions, subs, settings)
    sup.subscriptions = subs
    sup.functions = functions
    sup.api = server
    if sup.reloader is None:
        sup.reloader = _reload_on_signal

    watcher = None
    if sup.config.redis is not None:
        from hubhost.status.mirror import Keys
        from hubhost.status.subscriptions import LookupWatcher

        watcher = LookupWatcher(subs, sup.config.redis.url, Keys(sup.config.redis.prefix),
                                lambda: set(subs_owned(sup)))

    async def start() -> None:
        subs.start(asyncio.get_running_loop())
        if watcher is not None:
            watcher.start()
        if settings.enabled:
            try:
                await server.start()
            except OSError as e:
                log.error("API not started: %s", e)

    async def stop(s: Any) -> None:
        await server.stop()
        if watcher is not None:
            await watcher.stop()
        subs.stop()

    sup.pre_start_hooks.append(start)
    sup.shutdown_hooks.append(stop)
