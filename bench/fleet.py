"""Fleet benchmarks (issue 15, DESIGN section 8). RESULT lines: ratio = ours / baseline.

    python bench/fleet.py [--quick]

fleet_exec: p50 latency of one cross-hub exec, ExecClient -> the owner's stream ->
    ExecServer (a trivial `run`) -> the reply list, against a bare redis-py round trip doing
    the same Redis work: XADD + BLPOP on the caller, answered by a trivial consumer doing
    XREADGROUP + LPUSH. Each side's server runs in its own process, as another hub would;
    the calls alternate between ours and the baseline in rounds, one call at a time.
    Target: ratio <= 1.5.
fleet_failover: seconds from kill -9 of a hub to its last device running elsewhere, three
    real hubs, ttl = 3 s, against the ttl (see bench_failover). Target: <= ttl + 2 s.

Starts its own redis-server on a free loopback port (never 6379).
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import orjson  # noqa: E402
import redis  # noqa: E402
import redis.asyncio as aioredis  # noqa: E402

from hubhost.fleet.execs import ExecClient, ExecServer  # noqa: E402
from hubhost.fleet.keys import FleetKeys, lease_value  # noqa: E402

KEYS = FleetKeys("bench:", "F")
OWNER = "owner"
BASE_STREAM = "bench:{base}:exec"
BASE_GROUP = "g"


def free_port() -> int:
    while True:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port != 6379:
            return port


def start_redis(tmp: Path) -> tuple[subprocess.Popen, int]:
    binary = shutil.which("redis-server")
    if binary is None:
        sys.exit("bench/fleet.py needs redis-server on PATH")
    port = free_port()
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp), "--loglevel", "warning"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    r = redis.Redis(port=port)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.ConnectionError:
            if time.monotonic() > deadline:
                sys.exit("redis-server did not start")
            time.sleep(0.02)
    r.close()
    return proc, port


def client(port: int) -> aioredis.Redis:
    return aioredis.Redis(host="127.0.0.1", port=port, decode_responses=True, socket_timeout=5)


# -- the two servers (each in its own process) -------------------------------------------------

async def serve_ours(port: int) -> None:
    r = client(port)

    async def run(device: str, function: str, args: object, level: str, timeout: float) -> str:
        return "true"

    server = ExecServer(r, KEYS, OWNER, run, lambda d: True)
    await server.serve()


async def serve_base(port: int) -> None:
    r = client(port)
    try:
        await r.xgroup_create(BASE_STREAM, BASE_GROUP, id="0", mkstream=True)
    except redis.ResponseError:
        pass
    while True:
        resp = await r.xreadgroup(BASE_GROUP, "c", {BASE_STREAM: ">"}, count=64, block=1000)
        for _stream, entries in resp or ():
            for _eid, f in entries:
                await r.lpush(f["reply"], '{"ok":true}')


# -- the callers ------------------------------------------------------------------------------

async def call_base(r: aioredis.Redis, i: int) -> None:
    reply = f"bench:{{reply:base}}:{i}"
    await r.xadd(BASE_STREAM, {"id": str(i), "device": "d1", "function": "power", "args": '{"state":true}',
                               "level": "administrator", "deadline": str(int(time.time() * 1000) + 10_000),
                               "reply": reply}, maxlen=10_000, approximate=True)
    got = await r.blpop([reply], timeout=5)
    assert got is not None, "the baseline consumer did not answer"


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


async def bench_exec(port: int, quick: bool) -> None:
    setup = redis.Redis(port=port)
    setup.set(KEYS.hub(OWNER), orjson.dumps({"id": OWNER, "ready": True}))
    setup.sadd(KEYS.hubs, OWNER)
    setup.hset(KEYS.devices, "d1", orjson.dumps({"driver": "drv", "hub": None, "needs": []}))
    setup.set(KEYS.lease("d1"), lease_value(OWNER, "tok"))
    setup.close()
    procs = [subprocess.Popen([sys.executable, __file__, "--serve", kind, "--port", str(port)])
             for kind in ("ours", "base")]
    r = client(port)
    ours_client = ExecClient(r, KEYS, "bench")
    try:
        # warm up both (and wait for the servers to be reading)
        await asyncio.wait_for(ours_client.exec_text("d1", "power", {"state": True}), 20)
        await asyncio.wait_for(call_base(r, -1), 20)
        rounds, per = (10, 200) if quick else (30, 500)
        ours: list[float] = []
        base: list[float] = []
        n = 0
        clock = time.perf_counter
        for _ in range(rounds):
            for _ in range(per):
                t = clock()
                await ours_client.exec_text("d1", "power", {"state": True})
                ours.append(clock() - t)
            for _ in range(per):
                n += 1
                t = clock()
                await call_base(r, n)
                base.append(clock() - t)
        po, pb = p50(ours), p50(base)
        print(f"RESULT fleet_exec ratio={po / pb:.2f} p50_us={po * 1e6:.0f} base_p50_us={pb * 1e6:.0f} "
              f"calls={len(ours)}", flush=True)
    finally:
        await r.aclose()
        for p in procs:
            p.kill()
            p.wait()


def bench_failover(quick: bool) -> None:
    """fleet_failover: three real `hubhost run --hub-id` processes on one redis-server, ttl
    3 s, nine movable TCP devices; kill -9 of the hub driving the most; seconds until the
    last of its devices is connected from its new owner. The baseline is the ttl itself (the
    time the dead hub's leases need to expire, which no fenced design can beat). Target:
    failover <= ttl + 2 s, i.e. ratio <= (ttl + 2) / ttl."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
    from fleetkit import failover_seconds

    ttl = 3.0
    runs = []
    for _ in range(2 if quick else 5):
        with tempfile.TemporaryDirectory() as d:
            runs.append(failover_seconds(Path(d), ttl))
    worst, med = max(runs), statistics.median(runs)
    print(f"RESULT fleet_failover ratio={worst / ttl:.2f} failover_s={worst:.2f} median_s={med:.2f} "
          f"ttl_s={ttl:g} target_s<={ttl + 2:g} runs={len(runs)}", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a run under 60 s")
    p.add_argument("--serve", choices=("ours", "base"), help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve:
        asyncio.run(serve_ours(args.port) if args.serve == "ours" else serve_base(args.port))
        return
    with tempfile.TemporaryDirectory() as d:
        proc, port = start_redis(Path(d))
        try:
            asyncio.run(bench_exec(port, args.quick))
        finally:
            proc.kill()
            proc.wait()
    bench_failover(args.quick)


if __name__ == "__main__":
    main()
