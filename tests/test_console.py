"""The hub console (issue 16) in a real headless browser: Playwright driving Debian's
chromium against real `hubhost run` processes (the demo hub, and a hub with a hostile
driver), logged in with the URL the real `hubhost console` command prints.

One browser and one hub of each kind per module, so the file stays fast. Screenshots of
each page go to the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

import aiohttp
import pytest

from hubproc import HubProcess
from hubutil import write_config, write_driver

CHROMIUM = os.environ.get("HUBHOST_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
REQUIRED = bool(os.environ.get("CI") or os.environ.get("HUBHOST_REQUIRE_BROWSER"))
LIVE_DEADLINE = 1.0     # seconds from a status change in the hub to the page showing it

# Driver text that would run as script if any page put it into HTML unescaped.
EVIL = '<script>window.__xss=1</script>"><img src=x onerror="window.__xss=2">'
EVIL_LUA = EVIL.replace("\\", "\\\\").replace('"', '\\"')

PROBE = f"""
    local driver_helper = require "driver_helper"
    local EVIL = "{EVIL_LUA}"
    return driver_helper.init {{
      name = "probe",
      lifecycle = {{
        init = function(driver, device)
          device.status.connected = true
          device.status.note = EVIL
          device.status[EVIL] = 1
          device.log.warn(EVIL)
          driver.datastore.saved = {{ [EVIL] = EVIL, list = {{ 1, 2, EVIL }} }}
        end,
      }},
      functions = {{
        shout = {{ description = EVIL, params = {{ text = {{ "String", description = EVIL }} }},
                  handler = function(d, device, args)
                    device.status.note = args.text
                    device.log.info("shout: " .. args.text)
                    return args.text
                  end }},
        wipe = {{ security = "administrator", handler = function() return "wiped" end }},
        echo = {{ handler = function() return EVIL end }},
      }},
    }}
"""


# -- fixtures ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if REQUIRED:
            raise
        pytest.skip("playwright is not installed (pip install -e '.[test]'); the console tests need it")
    if not os.path.exists(CHROMIUM):
        if REQUIRED:
            raise AssertionError(f"no chromium at {CHROMIUM} (apt-get install chromium); CI requires it")
        pytest.skip(f"no chromium browser at {CHROMIUM} (apt-get install chromium)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield b
        finally:
            b.close()


def _start(hub: HubProcess) -> HubProcess:
    try:
        hub.wait_for("started:", timeout=30)
        hub.wait_api()
    except BaseException:
        hub.kill()
        raise
    return hub


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubProcess]:
    hub = _start(HubProcess(None, tmp_path_factory.mktemp("demo"), "--demo"))
    yield hub
    hub.stop()


class Hostile:
    def __init__(self, hub: HubProcess, before: list[tuple[str, int]], url: str,
                 after: list[tuple[str, int]]) -> None:
        self.hub, self.before, self.url, self.after = hub, before, url, after


@pytest.fixture(scope="module")
def hostile(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Hostile]:
    """A hub whose driver puts script-like text everywhere it can; the TCP listeners of its
    processes are recorded before and after its first `hubhost console`."""
    root = tmp_path_factory.mktemp("hostile")
    write_driver(root, "probe", PROBE)
    cfg = write_config(root / "hub.toml", f"""
        hub_id = "hostile"
        [[drivers]]
        id = "probes"
        path = "probe"
        flush_interval = 0.2
        [[drivers.devices]]
        id = "p1"
        label = {json.dumps(EVIL)}
    """)
    hub = _start(HubProcess(cfg, root / "state"))
    try:
        before = tcp_listeners(hub)
        url = console_url(hub, "administrator")
        after = tcp_listeners(hub)
    except BaseException:
        hub.kill()
        raise
    yield Hostile(hub, before, url, after)
    hub.stop()


# -- helpers ------------------------------------------------------------------------------

def console_url(hub: HubProcess, level: str = "administrator") -> str:
    """Run the real `hubhost console` against the hub and take the URL it prints."""
    out = subprocess.run([sys.executable, "-m", "hubhost", "console", "--socket", str(hub.state / "hubhost.sock"),
                          "--level", level], capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    m = re.fullmatch(r"(http://\S+/console/login\?token=\S+)\n", out.stdout)
    assert m, f"no login URL in the output of hubhost console: {out.stdout!r} {out.stderr!r}"
    return m.group(1)


def origin_of(url: str) -> str:
    u = urlsplit(url)
    return f"{u.scheme}://{u.netloc}"


def tcp_listeners(hub: HubProcess) -> list[tuple[str, int]]:
    """Listening TCP sockets held by the hub or any process under it, from /proc."""
    inodes = set()
    for pid in hub.tree():
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                try:
                    target = os.readlink(f"/proc/{pid}/fd/{fd}")
                except OSError:
                    continue
                if target.startswith("socket:["):
                    inodes.add(target[8:-1])
        except OSError:
            continue
    found = []
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                cols = line.split()
                if cols[3] == "0A" and cols[9] in inodes:      # LISTEN
                    addr, port = cols[1].rsplit(":", 1)
                    found.append((addr, int(port, 16)))
    return found


def login(browser: Any, url: str, tmp_path: Path | None = None) -> tuple[Any, Any]:
    """A fresh browser context logged in with `url`; returns (context, page on the hub page).
    The page's Content-Security-Policy is bypassed: the test's own probes need eval, and the
    escaping must hold without that second line of defence anyway."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 900}, bypass_csp=True)
    page = ctx.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors      # type: ignore[attr-defined]
    resp = page.goto(url)
    assert resp is not None and "script-src 'self'" in resp.headers.get("content-security-policy", "")
    page.wait_for_url("**/console/", timeout=5000)
    return ctx, page


def wait_live(page: Any) -> None:
    page.wait_for_function("document.getElementById('live').textContent === 'live'", timeout=5000)


def session_cookie(ctx: Any) -> str:
    return next(c["value"] for c in ctx.cookies() if c["name"] == "hubhost_console")


def _run(coro: Any) -> Any:
    """Run a coroutine to the end on a thread of its own (Playwright's sync API owns this
    thread's event loop)."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result(timeout=30)


def http(method: str, url: str, *, cookie: str | None = None, origin: str | None = None,
         body: Any = None) -> tuple[int, str]:
    """One plain HTTP request outside the browser (to forge what a browser would not send)."""
    async def go() -> tuple[int, str]:
        headers = {}
        if cookie is not None:
            headers["Cookie"] = f"hubhost_console={cookie}"
        if origin is not None:
            headers["Origin"] = origin
        async with aiohttp.ClientSession() as s:
            async with s.request(method, url, headers=headers,
                                 data=json.dumps(body) if body is not None else None) as r:
                return r.status, await r.text()
    return _run(go())


def ws_handshake(url: str, *, cookie: str | None, origin: str | None) -> int:
    """The HTTP status of a WebSocket handshake (101 when accepted)."""
    async def go() -> int:
        headers = {}
        if cookie is not None:
            headers["Cookie"] = f"hubhost_console={cookie}"
        async with aiohttp.ClientSession() as s:
            try:
                async with s.ws_connect(url, headers=headers, origin=origin) as ws:
                    await ws.send_str('{"id": 1, "type": "ping"}')
                    msg = await ws.receive(timeout=5)
                    assert json.loads(msg.data)["type"] == "success"
                    return 101
            except aiohttp.WSServerHandshakeError as e:
                return e.status
    return _run(go())


def status_of(hub: HubProcess, device: str) -> dict[str, Any]:
    code, doc = hub.api("GET", f"/api/v1/devices/{device}/status")
    assert code == 200, doc
    return doc


# -- the demo hub ---------------------------------------------------------------------------

def test_login_lists_demo_drivers_and_the_token_works_once(browser: Any, demo: HubProcess, tmp_path: Path) -> None:
    url = console_url(demo)
    ctx, page = login(browser, url)
    try:
        wait_live(page)
        rows = page.eval_on_selector_all("tr[data-driver]", "rs => rs.map(r => r.dataset.driver)")
        assert sorted(rows) == ["displays", "projectors", "thermostats"]
        for did in rows:
            row = page.locator(f'tr[data-driver="{did}"]')
            assert row.locator('[data-field="condition"]').inner_text() == "running"
        assert page.locator("#session-level").inner_text() == "administrator"
        assert page.locator("button[data-action=restart]").count() == 3
        assert "not configured" in page.locator("#mirror").inner_text()
        # CPU and RSS per worker arrive over watch_hub: the CPU cell gets a percent
        page.wait_for_function("[...document.querySelectorAll('[data-field=cpu]')].every(c => c.textContent.includes('%'))",
                               timeout=5000)
        page.screenshot(path=str(tmp_path / "hub.png"), full_page=True)
        # a phone: the page fits the screen's width (no sideways scrolling)
        page.set_viewport_size({"width": 390, "height": 844})
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(tmp_path / "hub_phone.png"), full_page=True)
        assert page.errors == []
    finally:
        ctx.close()

    # the same URL again, in a browser without the session: refused, and no cookie given
    ctx2 = browser.new_context()
    try:
        page2 = ctx2.new_page()
        resp = page2.goto(url)
        assert resp is not None and resp.status == 403
        assert "used already" in page2.locator("#message").inner_text()
        assert not [c for c in ctx2.cookies() if c["name"] == "hubhost_console"]
        resp = page2.goto(origin_of(url) + "/console/")
        assert resp is not None and resp.status == 401
        page2.screenshot(path=str(tmp_path / "refused.png"))
    finally:
        ctx2.close()


def test_device_page_shows_the_drivers_status_change_without_reload(browser: Any, demo: HubProcess,
                                                                   tmp_path: Path) -> None:
    ctx, page = login(browser, console_url(demo))
    try:
        page.goto(origin_of(page.url) + "/console/devices/living-room")
        wait_live(page)
        assert page.locator("#device-label").inner_text() == "Living room"
        page.evaluate("window.__sameDocument = 1")
        cell = "document.querySelector('#status tr[data-name=temperature] .value')"
        # the thermostat driver changes `temperature` every 2 s on its own: watch the hub's
        # status over the Unix socket and time the page from the moment the change is seen
        first = status_of(demo, "living-room").get("temperature")
        deadline = time.monotonic() + 10
        while True:
            now = status_of(demo, "living-room").get("temperature")
            seen = time.monotonic()
            if now != first:
                break
            assert seen < deadline, "the thermostat's temperature did not change in 10 s"
            time.sleep(0.01)
        page.wait_for_function(f"(v) => {cell} && JSON.parse({cell}.textContent) === v", arg=now,
                               timeout=LIVE_DEADLINE * 1000)
        assert time.monotonic() - seen < LIVE_DEADLINE + 0.2
        assert page.evaluate("window.__sameDocument") == 1, "the page was reloaded"
        page.screenshot(path=str(tmp_path / "device.png"), full_page=True)
    finally:
        ctx.close()


def test_function_form_shows_bad_args_beside_the_field_and_the_result(browser: Any, demo: HubProcess,
                                                                     tmp_path: Path) -> None:
    code, doc = demo.api("POST", "/api/v1/devices/living-room/functions/set_setpoint", {"celsius": "warm"})
    assert code == 400 and doc["error"]["code"] == "bad_args"
    api_message = doc["error"]["message"]
    ctx, page = login(browser, console_url(demo))
    try:
        page.goto(origin_of(page.url) + "/console/devices/living-room")
        form = page.locator('form[data-function="set_setpoint"]')
        assert form.locator("input[name=celsius]").get_attribute("inputmode") == "decimal"
        form.locator("input[name=celsius]").fill("warm")
        form.locator("button[type=submit]").click()
        field_error = form.locator('.field[data-param="celsius"] .field-error')
        field_error.wait_for(state="visible", timeout=5000)
        assert field_error.inner_text() == api_message
        assert form.locator(".call-result").is_hidden()
        page.screenshot(path=str(tmp_path / "bad_args.png"), full_page=True)

        form.locator("input[name=celsius]").fill("22.5")
        form.locator("button[type=submit]").click()
        result = form.locator(".call-result")
        result.wait_for(state="visible", timeout=5000)
        assert json.loads(result.inner_text()) == 22.5
        assert field_error.inner_text() == ""
        page.screenshot(path=str(tmp_path / "call_result.png"), full_page=True)
    finally:
        ctx.close()


def test_logs_page_filters_by_driver(browser: Any, demo: HubProcess, tmp_path: Path) -> None:
    ctx, page = login(browser, console_url(demo))
    try:
        page.goto(origin_of(page.url) + "/console/logs")
        drivers = set(page.eval_on_selector_all("#log li", "ls => ls.map(l => l.dataset.driver)"))
        assert {"thermostats", "projectors", "displays"} <= drivers
        page.select_option("select[name=driver]", "projectors")
        page.wait_for_url("**/console/logs?*driver=projectors*", timeout=5000)
        shown = page.eval_on_selector_all("#log li", "ls => ls.map(l => [l.dataset.driver, l.textContent])")
        assert shown and all(d == "projectors" for d, _ in shown), shown
        assert all("[projectors" in text for _, text in shown)
        page.screenshot(path=str(tmp_path / "logs.png"), full_page=True)
        # level filter: nothing below warn
        page.select_option("select[name=level]", "warn")
        page.wait_for_url("**level=warn*", timeout=5000)
        levels = page.eval_on_selector_all("#log li .lvl", "ls => ls.map(l => l.textContent)")
        assert set(levels) <= {"warn", "error", "critical"}
    finally:
        ctx.close()


def test_support_session_gets_no_administrator_actions(browser: Any, demo: HubProcess, tmp_path: Path) -> None:
    ctx, page = login(browser, console_url(demo, "support"))
    try:
        wait_live(page)
        assert page.locator("#session-level").inner_text() == "support"
        assert page.locator("[data-action]").count() == 0
        assert page.locator("text=Reload config").count() == 0
        page.screenshot(path=str(tmp_path / "hub_support.png"), full_page=True)
        # the API refuses what the page does not offer, even when the page's own script asks
        forged = page.evaluate("""async () => {
            const post = await fetch('/api/v1/reload', {method: 'POST', headers: {'Content-Type': 'application/json'},
                                                         body: JSON.stringify({drivers: ['thermostats']})});
            const put = await fetch('/api/v1/drivers/thermostats/log_level', {method: 'PUT',
                headers: {'Content-Type': 'application/json'}, body: JSON.stringify({level: 'debug'})});
            return [post.status, (await post.json()).error.code, put.status];
        }""")
        assert forged == [403, "forbidden", 403]
        code, health = demo.api("GET", "/api/v1/health")
        assert health["drivers"]["thermostats"]["restarts"] == 0
    finally:
        ctx.close()


def test_requests_without_the_session_or_from_another_origin_are_refused(browser: Any, demo: HubProcess) -> None:
    ctx, page = login(browser, console_url(demo))
    try:
        base = origin_of(page.url)
        cookie = session_cookie(ctx)
        c = next(c for c in ctx.cookies() if c["name"] == "hubhost_console")
        assert c["httpOnly"] and c["sameSite"] == "Strict"
        fn = base + "/api/v1/devices/living-room/functions/set_setpoint"
        # no session
        assert http("GET", base + "/console/")[0] == 401
        assert http("GET", base + "/api/v1/health")[0] == 401
        assert http("POST", fn, origin=base, body={"celsius": 20})[0] == 401
        assert http("GET", base + "/console/", cookie="not-a-session")[0] == 401
        # the session, from another origin or without any
        assert http("POST", fn, cookie=cookie, origin="http://evil.example", body={"celsius": 20})[0] == 403
        assert http("POST", fn, cookie=cookie, body={"celsius": 20})[0] == 403
        assert http("POST", base + "/api/v1/reload", cookie=cookie, origin="http://evil.example")[0] == 403
        ws = base.replace("http:", "ws:") + "/api/v1/ws"
        assert ws_handshake(ws, cookie=cookie, origin="http://evil.example") == 403
        assert ws_handshake(ws, cookie=None, origin=base) == 401
        # ... while the same requests from the console's own origin pass
        code, text = http("POST", fn, cookie=cookie, origin=base, body={"celsius": 20})
        assert code == 200 and json.loads(text) == {"result": 20}
        assert ws_handshake(ws, cookie=cookie, origin=base) == 101
        assert http("GET", base + "/console/", cookie=cookie)[0] == 200
        # logging out ends the session
        page.click("text=Log out")
        assert page.locator("#message").inner_text().startswith("Logged out")
        assert http("GET", base + "/console/", cookie=cookie)[0] == 401
    finally:
        ctx.close()


# -- the hostile driver -------------------------------------------------------------------------

def test_no_tcp_listener_until_hubhost_console_asks(hostile: Hostile) -> None:
    assert hostile.before == [], f"the hub listened on TCP before anyone asked: {hostile.before}"
    port = urlsplit(hostile.url).port
    assert urlsplit(hostile.url).hostname == "127.0.0.1"
    assert hostile.after == [("0100007F", port)], hostile.after     # 127.0.0.1, that port only
    # a second `hubhost console` reuses the listener
    again = console_url(hostile.hub)
    assert urlsplit(again).port == port and again != hostile.url
    assert tcp_listeners(hostile.hub) == hostile.after


def _no_script_ran(page: Any) -> None:
    assert page.evaluate("window.__xss") is None, "driver text ran as script"
    assert page.locator("main img").count() == 0, "driver text became an element"


def test_driver_text_is_shown_as_text(browser: Any, hostile: Hostile, tmp_path: Path) -> None:
    ctx, page = login(browser, hostile.url)
    try:
        wait_live(page)
        assert page.locator('tr[data-driver="probes"] a', has_text=EVIL).count() == 1   # the label
        _no_script_ran(page)
        page.screenshot(path=str(tmp_path / "hostile_hub.png"), full_page=True)

        page.goto(origin_of(page.url) + "/console/devices/p1")
        wait_live(page)
        assert page.locator("#device-label").inner_text() == EVIL
        note = "document.querySelector('#status tr[data-name=note] .value').textContent"
        assert json.loads(page.evaluate(note)) == EVIL
        names = page.eval_on_selector_all("#status tr", "rs => rs.map(r => r.dataset.name)")
        assert EVIL in names
        shout = page.locator('form[data-function="shout"]')
        assert shout.locator(".description").inner_text() == EVIL
        assert shout.locator(".pdesc").inner_text() == EVIL
        assert page.locator("#log li .text", has_text=EVIL).count() >= 1
        _no_script_ran(page)

        # the same text arriving live (the script's path, textContent)
        other = EVIL + " again"
        code, _ = hostile.hub.api("POST", "/api/v1/devices/p1/functions/shout", {"text": other})
        assert code == 200
        page.wait_for_function(f"(v) => JSON.parse({note}) === v", arg=other, timeout=LIVE_DEADLINE * 1000 + 1000)
        page.locator("#log li .text", has_text="shout: " + other).wait_for(timeout=5000)
        form = page.locator('form[data-function="echo"]')
        form.locator("button[type=submit]").click()
        form.locator(".call-result").wait_for(state="visible", timeout=5000)
        assert json.loads(form.locator(".call-result").inner_text()) == EVIL
        _no_script_ran(page)
        page.screenshot(path=str(tmp_path / "hostile_device.png"), full_page=True)

        # logs page: live tail of one driver, hostile text included
        page.goto(origin_of(page.url) + "/console/logs?driver=probes")
        wait_live(page)
        third = EVIL + " live"
        hostile.hub.api("POST", "/api/v1/devices/p1/functions/shout", {"text": third})
        page.locator("#log li .text", has_text="shout: " + third).wait_for(timeout=5000)
        _no_script_ran(page)
        page.screenshot(path=str(tmp_path / "hostile_logs.png"), full_page=True)

        # datastore: keys and values as text in a collapsible tree
        store = hostile.hub.state / "drivers" / "probes" / "datastore.json"
        deadline = time.monotonic() + 10
        while not store.exists():
            assert time.monotonic() < deadline, f"{store} was not written"
            time.sleep(0.05)
        page.goto(origin_of(page.url) + "/console/datastore/probes")
        assert page.locator("#datastore details").count() >= 2
        assert page.locator("#datastore .key", has_text=EVIL).count() == 1
        vals = page.eval_on_selector_all("#datastore .val", "vs => vs.map(v => JSON.parse(v.textContent))")
        assert vals.count(EVIL) == 2 and 1 in vals
        _no_script_ran(page)
        page.screenshot(path=str(tmp_path / "datastore.png"), full_page=True)
    finally:
        ctx.close()


def test_none_level_session_sees_administrator_functions_disabled(browser: Any, hostile: Hostile) -> None:
    ctx, page = login(browser, console_url(hostile.hub, "none"))
    try:
        page.goto(origin_of(page.url) + "/console/devices/p1")
        wipe = page.locator('form[data-function="wipe"]')
        assert "needs the administrator level" in wipe.inner_text()
        assert wipe.locator("button").count() == 0
        resp = page.goto(origin_of(page.url) + "/console/datastore/probes")
        assert resp is not None and resp.status == 403      # the datastore needs support
        forged = page.evaluate("""async () => (await fetch('/api/v1/devices/p1/functions/wipe',
            {method: 'POST', headers: {'Content-Type': 'application/json'}, body: '{}'})).status""")
        assert forged == 403
    finally:
        ctx.close()


# -- without a browser ---------------------------------------------------------------------------

def test_login_tokens_work_once_expire_and_are_bounded(monkeypatch: pytest.MonkeyPatch) -> None:
    from hubhost.api.console import sessions

    clock = [1000.0]
    monkeypatch.setattr(sessions.time, "monotonic", lambda: clock[0])
    logins = sessions.ConsoleLogins(token_ttl=60, session_ttl=3600)
    token, _ = logins.mint("support")
    sid, session = logins.redeem(token)
    assert session.level == "support" and logins.session(sid) is session
    assert logins.redeem(token) is None                       # once only
    late, _ = logins.mint("none")
    clock[0] += 61
    assert logins.redeem(late) is None                        # expired
    clock[0] += 3600
    assert logins.session(sid) is None                        # the session expired too
    tokens = [logins.mint("none")[0] for _ in range(sessions.MAX_TOKENS + 5)]
    assert logins.redeem(tokens[0]) is None and logins.redeem(tokens[-1]) is not None
    with pytest.raises(ValueError, match="unknown level 'root'"):
        logins.mint("root")


def test_console_tcp_must_be_loopback(tmp_path: Path) -> None:
    from hubhost import config as config_mod

    cfg = write_config(tmp_path / "hub.toml", """
        [api]
        console_tcp = "0.0.0.0:8766"
    """)
    with pytest.raises(config_mod.ConfigError, match="api.console_tcp.*loopback"):
        config_mod.load(cfg)
    write_config(cfg, """
        [api]
        console_tcp = "127.0.0.1:8766"
    """)
    assert config_mod.load(cfg).api["console_tcp"] == ("127.0.0.1", 8766)
