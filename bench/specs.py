"""Benchmark: Lua specs, under `hubhost test` and through the pytest plugin (issues 6 and 14,
DESIGN section 7).

    python bench/specs.py [--quick]

specs_startup: `hubhost test` on a driver folder with one spec file of 50 `it` blocks,
    against `luajit` running the same file with a minimal busted-like runner written for
    this bench (describe/it/hooks, assert.are.equal/is_true; no sandbox, no reporting
    beyond a count). Fresh processes, wall time end to end, best of N rounds alternating.
    ratio = hubhost test / luajit (issue 14 target <= 5, and <= 0.5 s absolute). Needs
    Debian's `luajit` package (`apt-get install luajit`): without it the line says so.
specs_2000: one spec file with 2,000 trivial `it` blocks, run by pytest through the hubhost
    plugin, against pytest running 2,000 trivial Python test functions from one module.
    Both are fresh `python -m pytest` processes timed end to end (wall time, best of N
    rounds, alternating, after one warm-up run of each so the Python module's rewritten
    bytecode is cached as in everyday use). ratio = spec run / Python run (target <= 1).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
N = 2000


def write_cases(folder: Path, n: int) -> tuple[Path, Path]:
    spec = folder / "lua" / "trivial_spec.lua"
    spec.parent.mkdir(parents=True)
    lines = ['describe("trivial", function()']
    lines += [f'  it("case {i}", function() assert.is_true(true) end)' for i in range(n)]
    lines.append("end)")
    spec.write_text("\n".join(lines) + "\n")
    py = folder / "py" / "test_trivial.py"
    py.parent.mkdir(parents=True)
    py.write_text("".join(f"def test_case_{i}():\n    assert True\n\n" for i in range(n)))
    return spec, py


def run_pytest(target: Path, expect: int) -> float:
    # Same options for both: quiet, no cache plugin, no inherited addopts, and without
    # hypothesis' plugin (its summary hook imports hypothesis: a second of noise in both).
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:hypothesispytest",
           "-o", "addopts=", "--rootdir", str(target.parent), str(target)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=target.parent, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or f"{expect} passed" not in proc.stdout:
        raise SystemExit(f"pytest run failed for {target}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


# The baseline runner: busted's DSL at its simplest, so the figure is "what running these
# 50 tests costs in plain LuaJIT", start-up included.
MINI_BUSTED = r"""
local passed, failed = 0, 0
local stack = { { before = {}, after = {} } }
local function eq(a, b, msg) if a ~= b then error(msg or ("expected " .. tostring(a) .. ", got " .. tostring(b)), 2) end end
assert = setmetatable({
  are = { equal = eq, same = eq }, is_true = function(v) eq(true, v) end,
  equals = eq, same = eq,
}, { __call = function(_, v, m) if not v then error(m or "assertion failed!", 2) end return v end })
function before_each(f) table.insert(stack[#stack].before, f) end
function after_each(f) table.insert(stack[#stack].after, f) end
function describe(name, body)
  stack[#stack + 1] = { before = {}, after = {} }
  body()
  stack[#stack] = nil
end
function it(name, fn)
  for i = 1, #stack do for _, h in ipairs(stack[i].before) do h() end end
  local ok, err = pcall(fn)
  for i = #stack, 1, -1 do for _, h in ipairs(stack[i].after) do h() end end
  if ok then passed = passed + 1 else failed = failed + 1; print(name .. ": " .. tostring(err)) end
end
dofile(arg[1])
print(passed .. " passed, " .. failed .. " failed")
os.exit(failed == 0 and 0 or 1)
"""


def write_startup_case(folder: Path, n: int = 50) -> Path:
    driver = folder / "startup_driver"
    (driver / "spec").mkdir(parents=True)
    (driver / "init.lua").write_text('return { name = "startup" }\n')
    lines = ['describe("startup", function()', "  local x", "  before_each(function() x = 1 end)"]
    lines += [f'  it("case {i}", function() assert.are.equal(1, x); assert.is_true({i} >= 0) end)'
              for i in range(n)]
    lines.append("end)")
    (driver / "spec" / "startup_spec.lua").write_text("\n".join(lines) + "\n")
    (folder / "mini_busted.lua").write_text(MINI_BUSTED)
    return driver


def timed(cmd: list[str], cwd: Path, expect: str) -> float:
    env = {k: v for k, v in os.environ.items() if k != "PYTEST_ADDOPTS"}
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, env=env)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0 or expect not in proc.stdout:
        raise SystemExit(f"run failed: {cmd}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    return elapsed


def bench_startup(rounds: int) -> None:
    luajit = shutil.which("luajit")
    if luajit is None:
        print("RESULT specs_startup ratio=nan luajit missing: install Debian's luajit package "
              "(apt-get install luajit) for the baseline")
        return
    with tempfile.TemporaryDirectory(prefix="hubhost-bench-startup-") as tmp:
        driver = write_startup_case(Path(tmp))
        spec = driver / "spec" / "startup_spec.lua"
        ours_cmd = [sys.executable, "-m", "hubhost", "test", str(driver)]
        base_cmd = [luajit, str(Path(tmp) / "mini_busted.lua"), str(spec)]
        timed(ours_cmd, Path(tmp), "50 passed")  # warm up: page cache, .pyc files
        timed(base_cmd, Path(tmp), "50 passed")
        # the floor under any Python tool: the interpreter starting and importing lupa
        floor_cmd = [sys.executable, "-c", "import lupa.luajit21; print('50 passed')"]
        ours_t, base_t, floor_t = [], [], []
        for _ in range(rounds):
            ours_t.append(timed(ours_cmd, Path(tmp), "50 passed"))
            base_t.append(timed(base_cmd, Path(tmp), "50 passed"))
            floor_t.append(timed(floor_cmd, Path(tmp), "50 passed"))
    ours, base, floor = min(ours_t), min(base_t), min(floor_t)
    print(f"RESULT specs_startup ratio={ours / base:.2f} hubhost_test={ours:.3f}s luajit={base:.3f}s "
          f"python_and_lupa_alone={floor:.3f}s tests=50 rounds={rounds} "
          f"(best of each, wall time; targets ratio<=5, hubhost_test<=0.5s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (well under 60 s)")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
    bench_startup(3 if args.quick else 10)
    with tempfile.TemporaryDirectory(prefix="hubhost-bench-specs-") as tmp:
        spec, py = write_cases(Path(tmp), N)
        run_pytest(py, N)  # warm up: page cache, and the test module's rewritten .pyc
        run_pytest(spec, N)
        lua_times, py_times = [], []
        for _ in range(rounds):
            lua_times.append(run_pytest(spec, N))
            py_times.append(run_pytest(py, N))
    ours, base = min(lua_times), min(py_times)
    print(f"RESULT specs_2000 ratio={ours / base:.2f} lua_specs={ours:.3f}s "
          f"python_tests={base:.3f}s tests={N} rounds={rounds} (best of each, wall time)")


if __name__ == "__main__":
    main()
