"""Benchmark: status changes mirrored to Redis (issue 4, DESIGN section 7).

    python bench/status.py [--quick] [--producer module:function]

status_distinct: 100,000 changes (1,000 devices x 100 fields) pushed through
    StatusStore.set from a producer thread until all are visible in Redis, against
    redis-py pipelining the same HSET+PUBLISH commands from Python in batches of 1,000.
    ratio = our time / baseline time (target <= 1.25).
status_hot: 1,000,000 changes to 100 fields. ratio = Redis commands executed
    (INFO commandstats delta) / changes (target <= 0.05); the final Redis state must
    equal memory exactly.

The producer is pluggable so the same figures can be taken with drivers written in
Lua: `--producer pkg.mod:func` names a callable
`func(store, devices, fields, changes)` run on its own thread, which must apply
change i as device `d{(i // fields) % devices}`, field `f{i % fields}`, JSON value
`str(i)` (see `python_producer`).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import redis  # noqa: E402

from hubhost.status.mirror import RedisMirror  # noqa: E402
from hubhost.status.store import StatusStore  # noqa: E402

Producer = Callable[[StatusStore, int, int, int], None]


def python_producer(store: StatusStore, devices: int, fields: int, changes: int) -> None:
    """Stands in for driver threads: plain StatusStore.set calls."""
    names = [f"f{j}" for j in range(fields)]
    ids = [f"d{k}" for k in range(devices)]
    set_ = store.set
    for i in range(changes):
        set_(ids[(i // fields) % devices], names[i % fields], str(i))


LUA_PRODUCER = b"""
local driver_helper = require "driver_helper"
local d = driver_helper.init { name = "bench-producer" }
d.produce = function(driver, devices, fields, changes)
  local devs = {}
  for k = 0, devices - 1 do devs[k] = driver:get_device("d" .. k) end
  local names = {}
  for j = 0, fields - 1 do names[j] = "f" .. j end
  for i = 0, changes - 1 do
    devs[math.floor(i / fields) % devices].status[names[i % fields]] = i
  end
end
return d
"""


def lua_producer(store: StatusStore, devices: int, fields: int, changes: int) -> None:
    """The real path: a Lua driver assigning device.status.<name> = i in its own runtime
    (check, JSON encoding, StatusStore.set), timed including the devices' start."""
    import tempfile

    from hubhost.cli.check import _NullPort
    from hubhost.sandbox.runtime import DeviceInfo, DriverRuntime

    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "init.lua").write_bytes(LUA_PRODUCER)
        rt = DriverRuntime("bench", Path(tmp), _NullPort(), status=store, cpu_limit=600.0)
        rt.load()
        for k in range(devices):
            rt.start_device(DeviceInfo(id=f"d{k}"), False)
        d = rt.R.driver()
        rt.call("produce", d.produce, d, devices, fields, changes)
        if rt.failures:
            raise RuntimeError(rt.failures)


def load_producer(spec: str | None) -> Producer:
    if not spec:
        return lua_producer
    module, _, func = spec.partition(":")
    return getattr(importlib.import_module(module), func or "producer")


class Server:
    """A private redis-server on a free loopback port (never 6379)."""

    def __init__(self) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            sys.exit("bench/status.py needs redis-server on PATH")
        while True:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                self.port = s.getsockname()[1]
            if self.port != 6379:
                break
        self.dir = tempfile.mkdtemp(prefix="hubhost-bench-redis-")
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.client = redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=30)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.02)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def baseline_distinct(server: Server, devices: int, fields: int, changes: int) -> float:
    """redis-py (sync) pipelines of 1,000 changes, each HSET + PUBLISH, as a plain app would."""
    server.client.flushall()
    r = redis.Redis(host="127.0.0.1", port=server.port)
    r.ping()
    start = time.perf_counter()
    pipe = r.pipeline(transaction=False)
    for i in range(changes):
        device, name, value = f"d{(i // fields) % devices}", f"f{i % fields}", str(i)
        pipe.hset(f"status/{device}", name, value)
        pipe.publish(f"status/{device}/{name}", value)
        if (i + 1) % 1000 == 0:
            pipe.execute()
    pipe.execute()
    elapsed = time.perf_counter() - start
    r.close()
    return elapsed


async def ours(server: Server, producer: Producer, devices: int, fields: int,
               changes: int) -> tuple[float, StatusStore]:
    """Producer thread -> StatusStore -> RedisMirror, until Redis has everything."""
    store = StatusStore()
    mirror = RedisMirror(store, server.url, socket_timeout=30)
    await mirror.start()
    if not await mirror.wait_synced(10):
        raise RuntimeError(f"mirror did not connect: {mirror.state()}")
    start = time.perf_counter()
    thread = threading.Thread(target=producer, args=(store, devices, fields, changes))
    thread.start()
    await asyncio.to_thread(thread.join)
    if not await mirror.wait_synced(120):
        raise RuntimeError(f"mirror did not catch up: {mirror.state()}")
    elapsed = time.perf_counter() - start
    await mirror.stop()
    return elapsed, store


def redis_matches(server: Server, store: StatusStore) -> bool:
    for device_id in store.device_ids():
        got = {k.decode(): v.decode() for k, v in
               server.client.hgetall(f"status/{device_id}").items()}
        if got != store.device(device_id):
            return False
    return True


def total_calls(server: Server) -> int:
    return sum(v["calls"] for v in server.client.info("commandstats").values())


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a run under 60 s")
    parser.add_argument("--producer", help="module:function producing the changes")
    args = parser.parse_args()
    producer = load_producer(args.producer)
    rounds = 3 if args.quick else 7
    server = Server()
    ok = True
    try:
        devices, fields = 1000, 100
        changes = devices * fields
        base_times, our_times = [], []
        for _ in range(rounds):  # interleaved, so machine noise hits both alike
            base_times.append(baseline_distinct(server, devices, fields, changes))
            server.client.flushall()
            elapsed, store = asyncio.run(ours(server, producer, devices, fields, changes))
            our_times.append(elapsed)
            if not redis_matches(server, store):
                print("status_distinct: Redis does not equal memory", file=sys.stderr)
                ok = False
        b, o = statistics.median(base_times), statistics.median(our_times)
        print(f"RESULT status_distinct ratio={o / b:.3f} ours_s={o:.3f} baseline_s={b:.3f} "
              f"changes={changes} rounds={rounds} target<=1.25 "
              f"producer={getattr(producer, '__name__', producer)}")

        hot_changes, hot_fields = 1_000_000, 100
        server.client.flushall()
        server.client.config_resetstat()
        before = total_calls(server)
        elapsed, store = asyncio.run(ours(server, producer, 1, hot_fields, hot_changes))
        commands = total_calls(server) - before - 1  # minus the INFO that measured
        exact = redis_matches(server, store) and len(store.device("d0")) == hot_fields
        ratio = commands / hot_changes
        print(f"RESULT status_hot ratio={ratio:.4f} commands={commands} changes={hot_changes} "
              f"fields={hot_fields} seconds={elapsed:.2f} exact={exact} target<=0.05")
        ok = ok and exact and ratio <= 0.05
    finally:
        server.close()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
