"""The console's pages: hub, device, logs, datastore, and the login that turns a one-time
token into a session cookie.

Everything a driver made (labels, status names and values, log text, function names and
descriptions, datastore keys and values) reaches the page through Jinja2 with autoescape
on, and through the script only as textContent; the Content-Security-Policy allows no
inline script at all, so a driver's text cannot run even if an escape were missed.
What a page offers follows the session's level (the API checks the same again).
"""

from __future__ import annotations

import asyncio
import logging
from importlib import resources
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from hubhost.api.console.sessions import COOKIE, SESSION_TTL, ConsoleLogins, Session
from hubhost.api.console.summary import WorkerUsage, hub_summary
from hubhost.functions import LEVELS

if TYPE_CHECKING:
    from hubhost.api.server import ApiServer

__all__ = ["Console", "SECURITY_HEADERS"]

log = logging.getLogger("hubhost.api.console")

SECURITY_HEADERS = {
    "Content-Security-Policy": ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
                                "connect-src 'self'; form-action 'self'; base-uri 'none'; "
                                "frame-ancestors 'none'"),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",      # the login URL's token never leaves in a Referer (and
                                          # no-referrer would make form POSTs say Origin: null)
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
}
STATIC = {"console.js": "text/javascript", "console.css": "text/css", "favicon.svg": "image/svg+xml"}
LOG_LEVELS = ("trace", "debug", "info", "warn", "error")
RECENT_LOGS = 300             # records on the logs page when it loads
DEVICE_LOGS = 50              # records of one device on its page


def _json_text(v: Any) -> str:
    """A value as JSON text (not marked safe: autoescape escapes it like any other text)."""
    return orjson.dumps(v, default=str).decode()


def _input_kind(type_text: str) -> str:
    """Which input a parameter gets: bool (a select), int, float, string, json (textarea
    for Array/Object/JSON) or any (a union: JSON if it parses, else the text)."""
    alts = [a.strip() for a in type_text.split("|")]
    if len(alts) > 1:
        return "any"
    return {"Bool": "bool", "Int32": "int", "Int64": "int", "Float64": "float",
            "String": "string"}.get(alts[0], "json")


class Console:
    """Routes, templates and logins of the console of one ApiServer."""

    def __init__(self, server: "ApiServer") -> None:
        self.server = server
        self.logins = ConsoleLogins()
        self.usage = WorkerUsage()
        self._env: Any = None
        self._static: dict[str, bytes] = {}

    def add_routes(self, r: web.UrlDispatcher) -> None:
        r.add_get("/console", self.to_hub)
        r.add_get("/console/", self.hub_page)
        r.add_get("/console/login", self.login)
        r.add_post("/console/logout", self.logout)
        r.add_get("/console/devices/{id}", self.device_page)
        r.add_get("/console/logs", self.logs_page)
        r.add_get("/console/datastore/{driver}", self.datastore_page)
        r.add_get("/console/static/{name}", self.static)

    # -- sessions ------------------------------------------------------------------------
    @staticmethod
    def cookie_of(request: web.Request) -> str | None:
        return request.cookies.get(COOKIE)

    def session_of(self, request: web.Request) -> Session | None:
        return self.logins.session(self.cookie_of(request))

    async def login(self, request: web.Request) -> web.Response:
        """GET /console/login?token=...: the token works once. The answer sets the cookie
        and moves on with a same-site refresh: a SameSite=Strict cookie set in answer to
        a link followed from elsewhere (a chat, a mail) would not ride on a redirect."""
        got = self.logins.redeem(request.query.get("token", ""))
        if got is None:
            return self.error_page(403, "This login link is not valid: it was used already, has expired "
                                        "or was never issued. A link works once, for a few minutes; run "
                                        "`hubhost console` on the hub again for a new one.")
        sid, session = got
        log.info("console: a %s session logged in from %s", session.level, request.remote or "?")
        resp = self.page(request, "login.html", status=200, level=session.level)
        resp.set_cookie(COOKIE, sid, httponly=True, samesite="Strict", path="/", max_age=int(SESSION_TTL),
                        secure=request.secure)
        return resp

    async def logout(self, request: web.Request) -> web.Response:
        cookie = self.cookie_of(request)
        self.logins.logout(cookie)
        for ws in [s for s in self.server.sessions if s.cookie is not None and s.cookie == cookie]:
            await ws.close(1008, "logged out")
        resp = self.error_page(200, "Logged out. Run `hubhost console` on the hub to log in again.")
        resp.del_cookie(COOKIE, path="/")
        return resp

    # -- rendering -----------------------------------------------------------------------
    @property
    def env(self) -> Any:
        if self._env is None:
            import jinja2

            env = jinja2.Environment(loader=jinja2.PackageLoader("hubhost.api.console", "templates"),
                                     autoescape=True, undefined=jinja2.StrictUndefined,
                                     trim_blocks=True, lstrip_blocks=True)
            env.filters["json_text"] = _json_text
            env.filters["bytes"] = _bytes
            env.filters["clock"] = _clock
            self._env = env
        return self._env

    def page(self, request: web.Request | None, template: str, *, status: int = 200, **ctx: Any) -> web.Response:
        level = ctx.pop("level", "none")
        html = self.env.get_template(template).render(
            level=level, is_admin=LEVELS.get(level, 0) >= LEVELS["administrator"],
            hub_id=self.server.sup.config.hub_id, **ctx)
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8",
                            headers=SECURITY_HEADERS)

    def error_page(self, status: int, message: str) -> web.Response:
        return self.page(None, "message.html", status=status, message=message, level="none")

    def _level(self, request: web.Request) -> str:
        from hubhost.api.server import LEVEL

        return request[LEVEL]

    # -- pages ---------------------------------------------------------------------------
    async def to_hub(self, request: web.Request) -> web.Response:
        raise web.HTTPFound("/console/")

    async def hub_page(self, request: web.Request) -> web.Response:
        summary = hub_summary(self.server.sup, self.usage)
        return self.page(request, "hub.html", level=self._level(request), hub=summary,
                         log_levels=LOG_LEVELS, hub_json=_json_text(summary))

    async def device_page(self, request: web.Request) -> web.Response:
        from hubhost.supervisor.logring import Filter

        server = self.server
        slot, dev = server._find(request.match_info["id"])
        level = self._level(request)
        iface = server.functions.interface_of(dev.id)
        doc = iface.doc if iface is not None else {}
        descs = doc.get("descriptions") or {}
        functions = []
        for name, params in (doc.get("functions") or {}).items():
            fn = iface.functions.get(name) if iface is not None else None
            fn_level = fn.level if fn is not None else "none"
            d = descs.get(name) or {}
            ps = []
            for pname, spec in params.items():
                has_default = len(spec) > 1
                default = spec[1] if has_default else None
                kind = _input_kind(spec[0])
                if not has_default or default is None:
                    shown = ""
                elif kind == "string" and isinstance(default, str):
                    shown = default
                else:
                    shown = _json_text(default)
                ps.append({"name": pname, "type": spec[0], "kind": kind, "required": not has_default,
                           "default": shown, "default_bool": default if isinstance(default, bool) else None,
                           "description": (d.get("params") or {}).get(pname)})
            functions.append({"name": name, "params": ps, "level": fn_level, "description": d.get("description"),
                              "allowed": LEVELS[level] >= LEVELS.get(fn_level, 0)})
        fields = server.sup.status.device(dev.id)
        status = [{"name": k, "value": v} for k, v in sorted(fields.items())]
        connected = fields.get("connected")
        logs = server.sup.logs.recent(Filter(frozenset([slot.id]), dev.id), DEVICE_LOGS)
        transport = ({"kind": dev.transport, **dev.transport_settings} if dev.transport else None)
        from hubhost.api.server import condition

        return self.page(request, "device.html", level=level, device=dev, driver=slot,
                         condition=condition(slot), functions=functions, fields=status,
                         connected={"true": True, "false": False}.get(connected or ""),
                         transport=transport, logs=[e.to_json() for e in logs])

    async def logs_page(self, request: web.Request) -> web.Response:
        q = request.query
        driver, device, lvl = q.get("driver") or None, q.get("device") or None, q.get("level") or None
        match = self.server.log_filter(driver, device, lvl)
        entries = self.server.sup.logs.recent(match, RECENT_LOGS)
        sup = self.server.sup
        return self.page(request, "logs.html", level=self._level(request), entries=[e.to_json() for e in entries],
                         drivers=list(sup.slots), devices=[d.id for s in sup.slots.values() for d in s.cfg.devices],
                         log_levels=LOG_LEVELS, f_driver=driver or "", f_device=device or "", f_level=lvl or "")

    async def datastore_page(self, request: web.Request) -> web.Response:
        from hubhost.functions import ExecError
        from hubhost.state.datastore import read_store_file

        level = self._level(request)
        if LEVELS[level] < LEVELS["support"]:
            raise ExecError("forbidden", "reading a driver's datastore needs the support level")
        did = request.match_info["driver"]
        slot = self.server.sup.slots.get(did)
        if slot is None:
            raise ExecError("unknown_device", f"no driver {did!r} on this hub")
        data, problem = None, None
        try:
            data = await asyncio.to_thread(read_store_file, slot.state_dir)
        except (OSError, ValueError) as e:     # StoreUnreadable is a ValueError or OSError kind
            problem = str(e)
        except Exception as e:  # noqa: BLE001 - the page says what is wrong with the file
            problem = f"{type(e).__name__}: {e}"
        return self.page(request, "datastore.html", level=level, driver=slot, data=data, problem=problem)

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        kind = STATIC.get(name)
        if kind is None:
            raise web.HTTPNotFound(reason=f"no console file {name!r}")
        body = self._static.get(name)
        if body is None:
            body = self._static[name] = resources.files("hubhost.api.console").joinpath("static", name).read_bytes()
        return web.Response(body=body, content_type=kind, charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"})


def _bytes(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def _clock(t: float) -> str:
    import time

    return time.strftime("%H:%M:%S", time.localtime(t)) + f".{int(t % 1 * 1000):03d}"
