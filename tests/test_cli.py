"""The command line as an operator uses it: real subprocesses, real signals."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hubhost import __version__
from hubhost import config as config_mod

from hubutil import write_config, write_driver

HUBHOST = [sys.executable, "-m", "hubhost"]


def _run(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([*HUBHOST, *args], capture_output=True, text=True, timeout=60, **kw)


def test_version() -> None:
    r = _run("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"hubhost {__version__}"


def test_check_prints_metadata(tmp_path: Path) -> None:
    d = write_driver(tmp_path, "good", """
        local driver_helper = require "driver_helper"
        return driver_helper.init { name = "good", implements = { "Powerable" } }
    """, **{"lib/util.lua": "return {}"})
    r = _run("check", str(d))
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout)["name"] == "good"


def test_check_reports_file_and_line(tmp_path: Path) -> None:
    d = write_driver(tmp_path, "broken", "return require('driver_helper').init { name = 'b' }\n",
                     **{"lib/util.lua": "local x = \nreturn {}\n"})
    r = _run("check", str(d))
    assert r.returncode == 1
    assert "lib/util.lua:2:" in r.stdout

    d2 = write_driver(tmp_path, "runtime-broken", "local x = nil\nreturn x.y\n")
    r = _run("check", str(d2))
    assert r.returncode == 1 and "init.lua:2:" in r.stdout


def test_new_scaffolds_a_driver_that_checks(tmp_path: Path) -> None:
    r = _run("new", "my-projector", "--dir", str(tmp_path))
    assert r.returncode == 0, r.stderr
    d = tmp_path / "my-projector"
    assert (d / "init.lua").is_file() and list((d / "spec").glob("*_spec.lua"))
    assert _run("check", str(d)).returncode == 0
    # the scaffolded spec passes with the test kit, run the way an author runs it
    tested = _run("test", "-p", "no:cacheprovider", "-q", cwd=d)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    assert "3 passed" in tested.stdout
    again = _run("new", "my-projector", "--dir", str(tmp_path))
    assert again.returncode == 2 and "already exists" in again.stderr
    bad = _run("new", "Bad Name", "--dir", str(tmp_path))
    assert bad.returncode == 2 and "driver name" in bad.stderr


@pytest.mark.parametrize("toml,expected", [
    ('hub_id = 5', "hub.toml: hub_id: must be an id"),
    ('flush_interval = -1', "hub.toml: flush_interval: must be greater than 0"),
    ('log_level = "loud"', "hub.toml: log_level: must be one of"),
    ('colour = "blue"', "hub.toml: colour: unknown key"),
    ('[redis]\nurl = "http://x"', "hub.toml: redis.url: must start with redis://"),
    ('[[drivers]]\npath = "d"', "hub.toml: drivers[0].id: is required"),
    ('[[drivers]]\nid = "a"\npath = "nowhere"', "hub.toml: drivers[0].path:"),
    ('[[drivers]]\nid = "a"\npath = "d"\nmax_memory = "lots"', "hub.toml: drivers[0].max_memory: must be a size"),
    ('[[drivers]]\nid = "a"\npath = "d"\n[[drivers.devices]]\nid = "x"\nsystem = "s"\nmodule = "M"\nindex = "one"',
     "hub.toml: drivers[0].devices[0].index: must be a positive integer, got 'one'"),
    ('[[drivers]]\nid = "a"\npath = "d"\n[[drivers.devices]]\nid = "x"\n[[drivers.devices]]\nid = "x"',
     "hub.toml: drivers[0].devices[1].id: duplicate device id 'x'"),
    ('[[drivers]]\nid = "a"\npath = "d"\n[[drivers.devices]]\nid = "x"\ntransport = "carrier-pigeon"',
     "hub.toml: drivers[0].devices[0].transport: must be one of serial, tcp, udp"),
    ('this is not toml', "hub.toml: not valid TOML"),
])
def test_bad_config_is_refused_naming_file_and_key(tmp_path: Path, toml: str, expected: str) -> None:
    write_driver(tmp_path, "d", "return require('driver_helper').init { name = 'd' }")
    cfg = tmp_path / "hub.toml"
    cfg.write_text(toml)
    with pytest.raises(config_mod.ConfigError) as e:
        config_mod.load(cfg)
    assert expected in str(e.value)
    r = _run("run", "--config", str(cfg), "--state-dir", str(tmp_path / "state"))
    assert r.returncode == 2 and expected in r.stderr


def test_sigterm_runs_shutdown_and_exits_zero_within_10s(tmp_path: Path) -> None:
    write_driver(tmp_path, "d", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        local d = driver_helper.init {
          name = "d",
          lifecycle = { shutdown = function() log.info("SHUTDOWN HANDLER RAN") end },
        }
        d:call_on_schedule(0.05, function() log.info("tick") end)
        return d
    """)
    cfg = write_config(tmp_path / "hub.toml", '[[drivers]]\nid = "d"\npath = "d"\n')
    p = subprocess.Popen([*HUBHOST, "run", "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 15
        seen = ""
        while "tick" not in seen and time.monotonic() < deadline:
            seen += p.stdout.readline()
        assert "tick" in seen
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        out, _ = p.communicate(timeout=12)
        elapsed = time.monotonic() - t0
    finally:
        if p.poll() is None:
            p.kill()
    assert p.returncode == 0
    assert elapsed < 10
    assert "SHUTDOWN HANDLER RAN" in out


def test_logs_carry_journal_priorities_under_systemd(tmp_path: Path) -> None:
    write_driver(tmp_path, "d", """
        local log = require "log"
        log.error("an error line")
        log.info("an info line")
        return require('driver_helper').init { name = 'd' }
    """)
    cfg = write_config(tmp_path / "hub.toml", '[[drivers]]\nid = "d"\npath = "d"\n')
    env = dict(os.environ, JOURNAL_STREAM="8:12345")
    p = subprocess.Popen([*HUBHOST, "run", "--config", str(cfg), "--state-dir", str(tmp_path / "state")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen = []
    deadline = time.monotonic() + 30   # a SIGINT during start-up abandons it: wait for the lines
    while time.monotonic() < deadline and p.stdout is not None:
        line = p.stdout.readline()
        if not line:
            break
        seen.append(line)
        if "running" in line and "[d]" in line:
            break
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=12)
    lines = "".join(seen + [out]).splitlines()
    assert any(line.startswith("<3>") and "an error line" in line for line in lines)
    assert any(line.startswith("<6>") and "an info line" in line for line in lines)
    assert all(line.startswith("<") for line in lines if line)
    assert not any(line[3:5].isdigit() and line[5] == ":" for line in lines)  # no timestamps
