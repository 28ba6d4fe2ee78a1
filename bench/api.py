"""API benchmarks (issue 7). RESULT lines (DESIGN section 7): ratio = ours / baseline.

- exec: round trip of `POST /api/v1/exec` over the hub's Unix socket to a trivial Lua
  function (validation, the hop to the driver's worker process, a handler coroutine, the
  JSON result back), p50 and p99, against a bare aiohttp handler on the same kind of socket
  that reads the body and returns a constant. Target: p50 ratio <= 2.
- exec_vs_process_hop: ours against an aiohttp handler that makes only the round trip to a
  bare echo process over a socketpair (the process boundary every exec crosses by design):
  our cost beyond the hop.
- fanout: one status change delivered to 100 WebSocket subscribers (indirect
  subscriptions through the system index), time from the change until the last client
  has it, against a bare aiohttp server sending one message to the same 100 sockets.
  Target: p50 ratio <= 2.
- metrics_scrape: `GET /metrics` of a hub with 200 devices (auth, the collector reading the
  supervisor, rendering) over its Unix socket, against a bare aiohttp handler on the same
  kind of socket that renders a prometheus_client registry holding the same series as
  ordinary Gauge/Counter/Histogram objects (rendering the registry alone). Target: p50
  ratio <= 1.5 (issue 16). `metrics_scrape_vs_render` compares the same scrapes with
  rendering that registry in-process, without any HTTP (the strictest reading).

- console_status_latency: a status change applied by the supervisor (`StatusStore.set`,
  where a driver's change lands) until it arrives over the console's WebSocket: a browser-like
  client logged in with a one-time token (session cookie, Origin) on the loopback TCP
  listener `hubhost console` opens, following the device with `watch_device`. Baseline: a
  bare aiohttp WebSocket on loopback TCP fed straight from a StatusStore listener of the
  same hub. Target: p50 ratio <= 1.5 (issue 16).

Both servers run in one event loop; the clients run in a separate process and alternate
between ours and the baseline in small blocks, so both see the same machine load.
`python bench/api.py [--quick]`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parent.parent))

DRIVER = """
local driver_helper = require "driver_helper"
return driver_helper.init {
  name = "bench",
  functions = { nop = { params = { x = { "Int32", 0 } }, handler = function(d, device, args) return args.x end } },
}
"""

CONFIG = """
[[drivers]]
id = "bench"
path = "bench"
[[drivers.devices]]
id = "d1"
system = "s1"
module = "Display"
index = 1
"""

EXEC_BODY = b'{"device":"d1","function":"nop","args":{"x":1}}'
SUBSCRIBERS = 100


def quantile(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def result(name: str, ours: list[float], base: list[float]) -> None:
    p50o, p50b = statistics.median(ours), statistics.median(base)
    p99o, p99b = quantile(ours, 0.99), quantile(base, 0.99)
    print(f"RESULT {name} ratio={p50o / p50b:.2f} p50_us={p50o * 1e6:.0f} base_p50_us={p50b * 1e6:.0f} "
          f"p99_us={p99o * 1e6:.0f} base_p99_us={p99b * 1e6:.0f} p99_ratio={p99o / p99b:.2f} n={len(ours)}",
          flush=True)


# -- clients (run in a child process) --------------------------------------------------------
# Ours and the baseline are measured in alternating blocks by one client, so both see the
# same machine load (other work on a shared 2-core box shifts absolute times a lot).

BLOCK = 50


def _http_exec(s: socket.socket, req: bytes, buf: bytes) -> bytes:
    s.sendall(req)
    while True:
        head_end = buf.find(b"\r\n\r\n")
        if head_end >= 0:
            head = buf[:head_end].lower()
            k = head.index(b"content-length:") + 15
            length = int(head[k:].split(b"\r\n", 1)[0])
            total = head_end + 4 + length
            if len(buf) >= total:
                if not buf.startswith(b"HTTP/1.1 200"):
                    raise SystemExit(f"bad answer: {buf[:200]!r}")
                return buf[total:]
        buf += s.recv(65536)


def client_exec(targets: list[tuple[str, str]], n: int, method: str = "POST") -> None:
    """Sequential keep-alive requests over raw sockets, one per (socket, url) target, in
    rotating blocks; prints every target's latencies as JSON."""
    socks, reqs = [], []
    for path, url in targets:
        s = socket.socket(socket.AF_UNIX)
        s.connect(path)
        socks.append(s)
        if method == "GET":
            reqs.append(b"GET %s HTTP/1.1\r\nHost: hub\r\n\r\n" % url.encode())
            continue
        reqs.append((b"POST %s HTTP/1.1\r\nHost: hub\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n" % (url.encode(), len(EXEC_BODY))) + EXEC_BODY)
    k = len(targets)
    times: list[list[float]] = [[] for _ in range(k)]
    bufs = [b""] * k
    perf = time.perf_counter
    for block in range(n // BLOCK):
        for j in range(k):
            side = (block + j) % k
            s, req, out = socks[side], reqs[side], times[side]
            for _ in range(BLOCK):
                t0 = perf()
                bufs[side] = _http_exec(s, req, bufs[side])
                out.append(perf() - t0)
    warm = len(times[0]) // 10
    print(json.dumps([t[warm:] for t in times]), flush=True)


async def client_console(login_url: str, origin: str, base_url: str, rounds: int) -> None:
    """One console client (logged in like a browser) and one bare client; each round the
    parent changes the status behind one of them and this reports the arrival time."""
    import aiohttp

    session = aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True))   # unsafe: IP hosts
    async with session.get(login_url) as r:
        assert r.status == 200, r.status
    ours = await session.ws_connect(origin + "/api/v1/ws", origin=origin)
    await ours.send_str('{"id":1,"type":"watch_device","device":"d1"}')
    assert json.loads((await ours.receive()).data)["type"] == "success"
    await ours.receive()        # the current value
    base = await session.ws_connect(base_url)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    socks = (ours, base)
    for _ in range(rounds * 2):
        side = int((await reader.readline()).strip())
        msg = await socks[side].receive()
        print(f"done {time.monotonic()!r} {len(msg.data)}", flush=True)
    await ours.close()
    await base.close()
    await session.close()


async def client_fanout(ours_path: str, base_path: str, rounds: int) -> None:
    """100 WebSocket clients on each server. Each round the server changes something
    (ours first or the baseline first, alternating); the client reports when the last of
    the 100 sockets has the message."""
    import aiohttp

    sessions, groups = [], []
    for path, bind in ((ours_path, True), (base_path, False)):
        session = aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=path, limit=0))
        sessions.append(session)
        wss = [await session.ws_connect("http://hub/api/v1/ws") for _ in range(SUBSCRIBERS)]
        if bind:
            for ws in wss:
                await ws.send_str('{"id":1,"type":"bind","sys":"s1","mod":"Display","index":1,"name":"power"}')
                assert json.loads((await ws.receive()).data)["type"] == "success"
                await ws.receive()    # the current value
        groups.append(wss)
    print("ready", flush=True)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    for _ in range(rounds * 2):
        side = int((await reader.readline()).strip())
        await asyncio.gather(*(ws.receive() for ws in groups[side]))
        print(f"done {time.monotonic()!r}", flush=True)
    for wss in groups:
        for ws in wss:
            await ws.close()
    for session in sessions:
        await session.close()


# -- servers ------------------------------------------------------------------------------

ECHO_CHILD = """
import socket, sys
s = socket.socket(fileno=int(sys.argv[1]))
f = s.makefile("rb")
while True:
    head = f.read(4)
    if len(head) < 4:
        break
    s.sendall(head + f.read(int.from_bytes(head, "big")))
"""

async def baseline_app(sock_path: Path) -> tuple[Any, list[Any]]:
    from aiohttp import web

    wss: list[Any] = []

    async def exec_handler(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(body=b'{"result":1}', content_type="application/json")

    # a bare process hop: a child that echoes each length-prefixed message, and nothing else
    ours_end, child_end = socket.socketpair()
    echo = subprocess.Popen([sys.executable, "-c", ECHO_CHILD, str(child_end.fileno())],
                            pass_fds=[child_end.fileno()])
    child_end.close()
    hop_reader, hop_writer = await asyncio.open_unix_connection(sock=ours_end)
    hop_lock = asyncio.Lock()

    async def exec_hop_handler(request: web.Request) -> web.Response:
        await request.read()
        async with hop_lock:
            hop_writer.write(b"\x00\x00\x00\x0c" + b'{"result":1}')
            n = int.from_bytes(await hop_reader.readexactly(4), "big")
            body = await hop_reader.readexactly(n)
        return web.Response(body=body, content_type="application/json")

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        wss.append(ws)
        async for _ in ws:
            pass
        return ws

    metrics_registry: list[Any] = []     # filled by bench_metrics (the same series as the hub's)

    async def metrics_handler(request: web.Request) -> web.Response:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
        resp = web.Response(body=generate_latest(metrics_registry[0]))
        resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
        return resp

    app = web.Application()
    app["metrics_registry"] = metrics_registry
    app.router.add_get("/metrics", metrics_handler)
    app.router.add_post("/api/v1/exec", exec_handler)
    app.router.add_post("/api/v1/exec_hop", exec_hop_handler)
    app.router.add_get("/api/v1/ws", ws_handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.UnixSite(runner, str(sock_path)).start()
    return runner, wss


async def start_hub(tmp: Path, config: str = CONFIG, name: str = "hub") -> Any:
    from hubhost import config as config_mod
    from hubhost.hub import install_parts
    from hubhost.supervisor.supervisor import Supervisor

    (tmp / "bench").mkdir(exist_ok=True)
    (tmp / "bench" / "init.lua").write_text(textwrap.dedent(DRIVER))
    cfg_path = tmp / f"{name}.toml"
    cfg_path.write_text(config + f'\n[api]\nsocket = "{tmp / (name + ".sock")}"\n')
    sup = Supervisor(config_mod.load(cfg_path), tmp / f"state-{name}")
    install_parts(sup)
    await sup.start()
    return sup


async def spawn_client(*args: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(sys.executable, str(HERE), "--client", *args,
                                                stdin=subprocess.PIPE, stdout=subprocess.PIPE)


async def bench_exec(sup: Any, base_sock: Path, n: int) -> None:
    targets = [(str(sup.api.socket_path), "/api/v1/exec"), (str(base_sock), "/api/v1/exec"),
               (str(base_sock), "/api/v1/exec_hop")]
    proc = await spawn_client("exec", json.dumps(targets), str(n))
    out, _ = await proc.communicate()
    if proc.returncode:
        raise SystemExit("exec client failed")
    ours, base, hop = json.loads(out)
    result("exec", ours, base)
    # the same, against a handler that only makes the round trip to a driver-like thread
    # that every exec needs (DESIGN section 2: a thread per driver): what is left is ours
    result("exec_vs_process_hop", ours, hop)


async def bench_fanout(sup: Any, base_sock: Path, wss: list[Any], rounds: int) -> None:
    payload = ('{"type":"notify","ref":1,"meta":{"sys":"s1","mod":"Display","index":1,"name":"power"},'
               '"value":%d}')
    sup.status.set("d1", "power", "0")
    proc = await spawn_client("fanout", str(sup.api.socket_path), str(base_sock), str(rounds))
    assert proc.stdout is not None and proc.stdin is not None
    line = await proc.stdout.readline()
    assert line.strip() == b"ready", line
    await asyncio.sleep(0.2)
    times: list[list[float]] = [[], []]
    for i in range(rounds):
        for side in (i % 2, 1 - i % 2):
            proc.stdin.write(b"%d\n" % side)
            await proc.stdin.drain()
            await asyncio.sleep(0.005)   # the client is waiting on its sockets now
            t0 = time.monotonic()
            if side == 0:
                sup.status.set("d1", "power", str(i + 1))
            else:
                text = payload % i
                for ws in wss:
                    await ws.send_str(text)
            line = await proc.stdout.readline()
            times[side].append(float(line.split()[1]) - t0)
    await proc.wait()
    warm = rounds // 10
    result("fanout", times[0][warm:], times[1][warm:])


async def bench_console(sup: Any, rounds: int) -> None:
    from aiohttp import web

    # the baseline: a bare WebSocket on loopback TCP, fed by a listener on the hub's store
    base_wss: list[Any] = []

    async def ws_handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        base_wss.append(ws)
        async for _ in ws:
            pass
        return ws

    def on_change(device_id: str, name: str, value: str | None) -> None:
        if device_id == "d2":
            text = ('{"type":"status","ref":1,"device":"d2","name":' + json.dumps(name) +
                    ',"value":' + (value or "null") + "}")
            for ws in base_wss:
                asyncio.ensure_future(ws.send_str(text))

    app = web.Application()
    app.router.add_get("/ws", ws_handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    tcp = socket.create_server(("127.0.0.1", 0))
    site = web.SockSite(runner, tcp)
    await site.start()
    base_url = f"http://127.0.0.1:{tcp.getsockname()[1]}/ws"
    unlisten = sup.status.add_listener(on_change)
    # ours: what `hubhost console` does (listener, one-time token), then a real login
    host, port, _ = await sup.api.open_console_listener()
    token, _ = sup.api.console.logins.mint("support")
    origin = f"http://{host}:{port}"
    sup.status.set("d1", "power", "0")
    proc = await spawn_client("console", f"{origin}/console/login?token={token}", origin, base_url, str(rounds))
    assert proc.stdout is not None and proc.stdin is not None
    try:
        line = await proc.stdout.readline()
        assert line.strip() == b"ready", line
        await asyncio.sleep(0.2)
        times: list[list[float]] = [[], []]
        for i in range(rounds):
            for side in (i % 2, 1 - i % 2):
                proc.stdin.write(b"%d\n" % side)
                await proc.stdin.drain()
                await asyncio.sleep(0.005)   # the client is waiting on its socket now
                t0 = time.monotonic()
                sup.status.set("d1" if side == 0 else "d2", "power", str(i + 1))
                line = await proc.stdout.readline()
                times[side].append(float(line.split()[1]) - t0)
        await proc.wait()
    finally:
        unlisten()
        await runner.cleanup()
    warm = rounds // 10
    result("console_status_latency", times[0][warm:], times[1][warm:])


METRICS_DEVICES = 200
METRICS_CONFIG = """
[[drivers]]
id = "bench"
path = "bench"
""" + "".join(f"""
[[drivers.devices]]
id = "m{i}"
system = "s1"
module = "Thing"
index = {i}
""" for i in range(1, METRICS_DEVICES + 1))


def same_series_registry(text: str) -> Any:
    """A prometheus_client registry of ordinary metric objects with the series of `text`
    (the hub's /metrics): what an application instrumented the usual way would render."""
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
    from prometheus_client.parser import text_string_to_metric_families

    from hubhost import metrics as hm

    reg = CollectorRegistry()
    for fam in text_string_to_metric_families(text):
        samples = [x for x in fam.samples if not x.name.endswith("_created")]
        if fam.type == "histogram":
            labelnames = sorted({k for x in samples for k in x.labels if k != "le"})
            bounds = hm.FLUSH_BUCKETS if "flush" in fam.name else hm.HANDLER_BUCKETS
            h = Histogram(fam.name, fam.documentation, labelnames, registry=reg, buckets=bounds)
            for x in samples:
                if x.name.endswith("_count"):
                    child = h.labels(**x.labels) if labelnames else h
                    child.observe(0.001)
            continue
        kind = Counter if fam.type == "counter" else Gauge
        labelnames = sorted({k for x in samples for k in x.labels})
        m = kind(fam.name, fam.documentation, labelnames, registry=reg)
        for x in samples:
            child = m.labels(**x.labels) if labelnames else m
            if kind is Counter:
                child.inc(x.value)
            else:
                child.set(x.value)
    return reg


async def bench_metrics(tmp: Path, base_sock: Path, runner: Any, n: int) -> None:
    import aiohttp

    sup = await start_hub(tmp, METRICS_CONFIG, "metrics")
    try:
        await asyncio.sleep(1.5)     # the worker's first stats and memory report
        async with aiohttp.ClientSession(connector=aiohttp.UnixConnector(path=str(sup.api.socket_path))) as s:
            async with s.get("http://hub/metrics") as r:
                assert r.status == 200, r.status
                text = await r.text()
        runner.app["metrics_registry"].append(same_series_registry(text))
        series = sum(1 for line in text.splitlines() if line and not line.startswith("#"))
        targets = [(str(sup.api.socket_path), "/metrics"), (str(base_sock), "/metrics")]
        proc = await spawn_client("scrape", json.dumps(targets), str(n))
        out, _ = await proc.communicate()
        if proc.returncode:
            raise SystemExit("scrape client failed")
        ours, base = json.loads(out)
        result("metrics_scrape", ours, base)
        # stricter: against the render alone, in this process, no HTTP at all
        from prometheus_client import generate_latest
        reg = runner.app["metrics_registry"][0]
        render = []
        for _ in range(len(ours)):
            t0 = time.perf_counter()
            generate_latest(reg)
            render.append(time.perf_counter() - t0)
        result("metrics_scrape_vs_render", ours, render)
        print(f"# metrics_scrape: {METRICS_DEVICES} devices, {series} series, {len(text)} bytes", flush=True)
    finally:
        await sup.stop()


async def bench_all(tmp: Path, quick: bool, only: str | None = None) -> None:
    base_sock = tmp / "base.sock"
    runner, wss = await baseline_app(base_sock)
    try:
        if only in (None, "exec", "fanout", "console_status_latency"):
            sup = await start_hub(tmp)
            try:
                if only in (None, "exec"):
                    await bench_exec(sup, base_sock, 4000 if quick else 20000)
                if only in (None, "fanout"):
                    await bench_fanout(sup, base_sock, wss, 100 if quick else 500)
                if only in (None, "console_status_latency"):
                    await bench_console(sup, 300 if quick else 2000)
            finally:
                await sup.stop()
        if only in (None, "metrics_scrape"):
            await bench_metrics(tmp, base_sock, runner, 1000 if quick else 5000)
    finally:
        await runner.cleanup()


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--client":
        kind = sys.argv[2]
        if kind == "exec":
            client_exec([tuple(t) for t in json.loads(sys.argv[3])], int(sys.argv[4]))
        elif kind == "scrape":
            client_exec([tuple(t) for t in json.loads(sys.argv[3])], int(sys.argv[4]), "GET")
        elif kind == "console":
            asyncio.run(client_console(sys.argv[3], sys.argv[4], sys.argv[5], int(sys.argv[6])))
        else:
            asyncio.run(client_fanout(sys.argv[3], sys.argv[4], int(sys.argv[5])))
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a run under 60 s")
    p.add_argument("--only", choices=("exec", "fanout", "metrics_scrape", "console_status_latency"), help="one benchmark")
    args = p.parse_args()
    import logging

    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="hhb") as d:
        asyncio.run(bench_all(Path(d), args.quick, args.only))


if __name__ == "__main__":
    os.environ.pop("NOTIFY_SOCKET", None)
    main()
