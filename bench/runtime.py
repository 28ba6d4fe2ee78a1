"""Runtime benchmarks (issue 2): event dispatch and per-driver footprint.

RESULT lines (DESIGN section 7): ratio = ours / baseline for the same work in this run.
- dispatch: events from the supervisor's loop into a trivial Lua handler on the driver's
  thread (coroutine per event, CPU budget armed), vs a bare lupa call loop. Target <= 20.
- footprint: RSS per idle driver instance with 200 instances (target <= 512 KiB) and the
  wall time to start them (target <= 2 s), vs 200 bare closed lupa runtimes.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lupa.luajit21 as lupa  # noqa: E402

from hubhost import config as config_mod  # noqa: E402
from hubhost.supervisor.supervisor import Supervisor  # noqa: E402

TRIVIAL = """
local driver_helper = require "driver_helper"
local n = 0
local d = driver_helper.init { name = "bench" }
d.handle = function(driver, x) n = n + 1 end
d.count = function() return n end
return d
"""


def rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def bench_dispatch(n: int, tmp: Path) -> None:
    d = tmp / "bench"
    d.mkdir()
    (d / "init.lua").write_text(TRIVIAL)
    cfg = config_mod.parse({"drivers": [{"id": "bench", "path": str(d)}]}, base=tmp)

    async def ours() -> float:
        sup = Supervisor(cfg, tmp / "state")
        await sup.start()
        slot = sup.slots["bench"]
        rt, actor = slot.rt, slot.actor
        assert rt is not None and actor is not None
        handler = rt.R.driver().handle
        done = asyncio.get_running_loop().create_future()
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        rt_dispatch = rt.dispatch_batch
        batch = 256
        for start in range(0, n, batch):
            actor.post(rt_dispatch, b"bench", handler, min(batch, n - start))
        actor.post(lambda: loop.call_soon_threadsafe(done.set_result, None))
        await done
        elapsed = time.perf_counter() - t0
        count = rt.R.driver().count()
        assert count == n, (count, n)
        await sup.stop()
        return elapsed

    t_ours = asyncio.run(ours())

    bare = lupa.LuaRuntime(register_eval=False, register_builtins=False)
    f = bare.eval("function(x) end")
    t0 = time.perf_counter()
    for i in range(n):
        f(i)
    t_base = time.perf_counter() - t0
    print(f"RESULT dispatch ratio={t_ours / t_base:.2f} ours_us_per_event={t_ours / n * 1e6:.3f} "
          f"bare_us_per_call={t_base / n * 1e6:.3f} events={n} target<=20")


def bench_footprint(count: int, tmp: Path) -> None:
    d = tmp / "idle"
    d.mkdir()
    (d / "init.lua").write_text(textwrap.dedent("""
        local driver_helper = require "driver_helper"
        return driver_helper.init { name = "idle" }
    """))
    cfg = config_mod.parse({"drivers": [{"id": f"idle{i}", "path": str(d)} for i in range(count)]}, base=tmp)

    gc.collect()
    base0 = rss_kib()
    t0 = time.perf_counter()
    bare = [lupa.LuaRuntime(register_eval=False, register_builtins=False) for _ in range(count)]
    for r in bare:
        r.execute("local x = {} for i = 1, 10 do x[i] = i end")
    t_bare = time.perf_counter() - t0
    bare_kib = (rss_kib() - base0) / count
    del bare
    gc.collect()

    async def ours() -> tuple[float, float]:
        sup = Supervisor(cfg, tmp / "state")
        gc.collect()
        r0 = rss_kib()
        t0 = time.perf_counter()
        await sup.start()
        elapsed = time.perf_counter() - t0
        await asyncio.sleep(0.2)
        gc.collect()
        per = (rss_kib() - r0) / count
        running = sum(1 for s in sup.slots.values() if s.state == "running")
        assert running == count, running
        await sup.stop()
        return elapsed, per

    t_ours, kib = asyncio.run(ours())
    print(f"RESULT footprint_rss ratio={kib / max(bare_kib, 1):.2f} kib_per_driver={kib:.0f} "
          f"bare_runtime_kib={bare_kib:.0f} drivers={count} target_kib<=512")
    print(f"RESULT footprint_start ratio={t_ours / t_bare:.2f} start_s={t_ours:.3f} "
          f"bare_s={t_bare:.3f} drivers={count} target_s<=2")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 100_000 if args.quick else 500_000
    with tempfile.TemporaryDirectory() as tmp:
        bench_dispatch(n, Path(tmp))
    with tempfile.TemporaryDirectory() as tmp:
        bench_footprint(200, Path(tmp))


if __name__ == "__main__":
    main()
