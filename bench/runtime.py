"""Runtime benchmarks (issues 2 and 11): event dispatch inside a worker, and the footprint
of driver instances behind the process boundary.

RESULT lines (DESIGN section 7): ratio = ours / baseline for the same work in this run.
- dispatch: events into a trivial Lua handler through the real worker path (the worker's
  run queue, a handler coroutine per event, CPU budget armed) in a worker process of a real
  supervisor, vs a bare lupa call loop. Target <= 20.
- footprint_pss: PSS per idle driver instance (the sum of the workers' and the zygote's
  PSS over the instances), 50 isolated instances (target <= 2 MiB) and 50 in one group
  (target <= 600 KiB), vs the RSS of a bare closed lupa runtime.
- footprint_start: wall time to start 200 isolated instances (target <= 3 s), vs creating
  200 bare closed lupa runtimes.
"""

from __future__ import annotations

import argparse
import asyncio
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
return d
"""

IDLE = """
local driver_helper = require "driver_helper"
return driver_helper.init { name = "idle" }
"""


def rss_kib(pid: str = "self") -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
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
        w = sup.slots["bench"].worker
        await w.query("dispatch", "bench", "handle", 1000)        # warm up
        best = min([await w.query("dispatch", "bench", "handle", n, timeout=120) for _ in range(3)])
        await sup.stop()
        return best

    t_ours = asyncio.run(ours())
    bare = lupa.LuaRuntime(register_eval=False, register_builtins=False)
    f = bare.eval("function(x) end")
    t_base = 1e9
    for _ in range(3):
        t0 = time.perf_counter()
        for i in range(n):
            f(i)
        t_base = min(t_base, time.perf_counter() - t0)
    print(f"RESULT dispatch ratio={t_ours / t_base:.2f} ours_us_per_event={t_ours / n * 1e6:.3f} "
          f"bare_us_per_call={t_base / n * 1e6:.3f} events={n} (best of 3, in a worker) target<=20")


def _bare(count: int) -> tuple[float, float]:
    base0 = rss_kib()
    t0 = time.perf_counter()
    bare = [lupa.LuaRuntime(register_eval=False, register_builtins=False) for _ in range(count)]
    for r in bare:
        r.execute("local x = {} for i = 1, 10 do x[i] = i end")
    elapsed = time.perf_counter() - t0
    kib = (rss_kib() - base0) / count
    del bare
    return elapsed, kib


def bench_footprint(count: int, tmp: Path, group: bool) -> float:
    d = tmp / "idle"
    d.mkdir(exist_ok=True)
    (d / "init.lua").write_text(textwrap.dedent(IDLE))
    drivers = [{"id": f"idle{i}", "path": str(d), **({"group": "all"} if group else {})} for i in range(count)]
    cfg = config_mod.parse({"drivers": drivers}, base=tmp)

    async def ours() -> tuple[float, float]:
        sup = Supervisor(cfg, tmp / f"state-{group}")
        t0 = time.perf_counter()
        await sup.start()
        elapsed = time.perf_counter() - t0
        running = sum(1 for s in sup.slots.values() if s.state == "running")
        assert running == count, running
        await asyncio.sleep(1.5)          # idle: every worker past its start-up
        pids = [w.pid for w in sup.workers.values()] + [sup.zygote.proc.pid]
        total = sum(pss_kib(p) for p in pids)
        await sup.stop()
        return elapsed, total / count

    return asyncio.run(ours())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    n = 100_000 if args.quick else 500_000
    with tempfile.TemporaryDirectory() as tmp:
        bench_dispatch(n, Path(tmp))
    _t, bare_kib = _bare(50)
    for group, target in ((False, 2048), (True, 600)):
        with tempfile.TemporaryDirectory() as tmp:
            _elapsed, kib = bench_footprint(50, Path(tmp), group)
        print(f"RESULT footprint_pss{'_grouped' if group else ''} ratio={kib / max(bare_kib, 1):.2f} "
              f"pss_kib_per_driver={kib:.0f} bare_runtime_kib={bare_kib:.0f} drivers=50 "
              f"{'one group' if group else 'one worker each'} target_kib<={target}")
    t_bare, _ = _bare(200)
    with tempfile.TemporaryDirectory() as tmp:
        t_ours, _ = bench_footprint(200, Path(tmp), False)
    print(f"RESULT footprint_start ratio={t_ours / t_bare:.2f} start_s={t_ours:.3f} "
          f"bare_s={t_bare:.3f} drivers=200 workers=200 target_s<=3")


if __name__ == "__main__":
    main()
