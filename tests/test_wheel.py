"""`pip install .` (not -e) must give a working `hubhost run --demo`: the Lua library and the
demo drivers travel inside the wheel."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_wheel_installs_and_runs_the_demo(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "build", "--wheel", "--outdir", str(dist), str(ROOT)],
                   check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("hubhost-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "hubhost/_lua/driver_helper.lua" in names and "hubhost/sandbox/sandbox.lua" in names and "hubhost/devices/devicelink.lua" in names
    assert "hubhost/_drivers/demo.toml" in names
    # the console's templates and static files (hubhost/api/console/) are package data
    assert {"hubhost/api/console/templates/hub.html", "hubhost/api/console/static/console.js",
            "hubhost/api/console/static/console.css"} <= set(names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q", str(wheel)]
    r = subprocess.run(pip, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]

    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    p = subprocess.Popen([str(venv / "bin" / "hubhost"), "run", "--demo", "--state-dir", str(tmp_path / "state")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=tmp_path, env=env)
    try:
        time.sleep(4)
        p.send_signal(signal.SIGINT)
        out, _ = p.communicate(timeout=15)
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0, out
    assert "drivers running" in out and "Traceback" not in out, out
    assert "thermostat ready" in out
