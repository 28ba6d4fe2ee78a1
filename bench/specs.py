"""Benchmark: Lua specs through the pytest plugin (issue 6, DESIGN section 7).

    python bench/specs.py [--quick]

specs_2000: one spec file with 2,000 trivial `it` blocks, run by pytest through the hubhost
    plugin, against pytest running 2,000 trivial Python test functions from one module.
    Both are fresh `python -m pytest` processes timed end to end (wall time, best of N
    rounds, alternating, after one warm-up run of each so the Python module's rewritten
    bytecode is cached as in everyday use). ratio = spec run / Python run (target <= 2).
"""

from __future__ import annotations

import argparse
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds (well under 60 s)")
    args = ap.parse_args()
    rounds = 2 if args.quick else 5
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
