"""`hubhost doctor` finds each problem it claims to detect, against real files, ptys and ports."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from hubutil import write_config, write_driver


def _doctor(cfg: Path, state: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubhost", "doctor", "--config", str(cfg),
                           "--state-dir", str(state)], capture_output=True, text=True, timeout=60)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_healthy_hub_passes(tmp_path: Path) -> None:
    master, slave = os.openpty()
    write_driver(tmp_path, "d", "return require('driver_helper').init { name = 'd' }")
    cfg = write_config(tmp_path / "hub.toml", f"""
        [[drivers]]
        id = "d"
        path = "d"
        [[drivers.devices]]
        id = "proj"
        transport = "serial"
        port = "{os.ttyname(slave)}"
    """)
    r = _doctor(cfg, tmp_path / "state")
    os.close(master)
    os.close(slave)
    assert r.returncode == 0, r.stdout
    assert "OK   config:" in r.stdout and "OK   driver d:" in r.stdout
    assert "OK   state dir:" in r.stdout and "OK   serial proj:" in r.stdout


def test_each_failure_is_reported(tmp_path: Path) -> None:
    write_driver(tmp_path, "broken", "local x = \n")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    cfg = write_config(tmp_path / "hub.toml", f"""
        [redis]
        url = "redis://127.0.0.1:{_free_port()}/0"
        connect_timeout = 0.5
        [[drivers]]
        id = "broken"
        path = "broken"
        [[drivers.devices]]
        id = "proj"
        transport = "serial"
        port = "/dev/ttyUSB-does-not-exist"
    """)
    r = _doctor(cfg, blocker / "state")
    out = r.stdout
    assert r.returncode == 1
    assert "FAIL driver broken:" in out and "init.lua:2:" in out
    assert "FAIL state dir:" in out and "not writable" in out
    assert "FAIL serial proj: /dev/ttyUSB-does-not-exist does not exist" in out
    assert "FAIL redis:" in out and "unreachable" in out
    assert all("(hint: " in line for line in out.splitlines() if line.startswith("FAIL"))


def test_bad_config_fails_with_the_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "hub.toml", "flush_interval = 'soon'\n")
    r = _doctor(cfg, tmp_path / "state")
    assert r.returncode == 1 and "FAIL config:" in r.stdout and "flush_interval" in r.stdout
