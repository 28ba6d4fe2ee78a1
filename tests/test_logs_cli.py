"""Logs per driver and one CLI convention (issue 13), against a real `hubhost run`:

- `hubhost logs DRIVER -f` shows that driver only; `hubhost logs DEVICE`, --level, --since;
- `hubhost log-level DRIVER debug` takes effect at run time, without a restart;
- journald as the sink: every driver record carries HUBHOST_DRIVER= / HUBHOST_DEVICE=;
- `hubhost describe DEVICE`;
- --config / --state-dir / HUBHOST_CONFIG on the commands that reach a hub or its state, an
  unreachable hub names the socket tried, no traceback for a closed pipe or Ctrl-C, and
  the summary of `status` agrees with its rows.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import orjson
import pytest

from hubproc import HubProcess
from hubutil import write_config, write_driver

CHATTY = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init {
      name = "%(name)s",
      lifecycle = {
        init = function(driver, device)
          log.info("%(tag)s-BOOT")
          local n = 0
          driver:call_on_schedule(0.05, function()
            n = n + 1
            device.log.info("%(tag)s-INFO " .. n)
            log.debug("%(tag)s-DEBUG " .. n)
            if n %% 20 == 0 then device.log.warn("%(tag)s-WARN " .. n) end
          end, "chat")
        end,
      },
      functions = {
        power = {
          description = "turn it on or off",
          params = { on = { "Bool", description = "true for on" }, delay = { "Int32", 0 } },
          handler = function(driver, device, args) device.status.power = args.on; return args.on end,
        },
      },
    }
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("RUNTIME_DIRECTORY", "HUBHOST_CONFIG", "JOURNAL_STREAM", "NOTIFY_SOCKET", "INVOCATION_ID")}
    env.update(extra)
    return env


def _cli(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "hubhost", *args], capture_output=True, text=True,
                          env=env or _env(), timeout=timeout)


@pytest.fixture(scope="module")
def hub(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[HubProcess, Path, Path]]:
    tmp = tmp_path_factory.mktemp("logs")
    write_driver(tmp, "alpha", CHATTY % {"name": "alpha", "tag": "ALPHA"})
    write_driver(tmp, "beta", CHATTY % {"name": "beta", "tag": "BETA"})
    write_driver(tmp, "gamma", CHATTY % {"name": "gamma", "tag": "GAMMA"})
    write_driver(tmp, "broken", "error('never starts')\n")
    state = tmp / "state"
    cfg = write_config(tmp / "hub.toml", f"""
        state_dir = "{state}"
        [[drivers]]
        id = "alpha"
        path = "alpha"
        [[drivers.devices]]
        id = "a1"
        [[drivers]]
        id = "beta"
        path = "beta"
        [[drivers.devices]]
        id = "b1"
        [[drivers]]
        id = "gamma"
        path = "gamma"
        log_level = "debug"          # its own level, below the hub's
        [[drivers.devices]]
        id = "g1"
        [[drivers]]
        id = "broken"
        path = "broken"
    """)
    h = HubProcess(cfg, state)
    h.wait_api()
    h.wait_for("ALPHA-INFO 3")
    h.wait_for("BETA-INFO 3")
    try:
        yield h, cfg, state
    finally:
        h.stop()


class _Lines:
    """A CLI process whose stdout lines are read as they come."""

    def __init__(self, *args: str, env: dict[str, str] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "hubhost", *args], stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True, env=env or _env())
        self.lines: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(text in ln for ln in self.lines):
                return
            time.sleep(0.02)
        raise AssertionError(f"no line with {text!r}; got {self.lines[-10:]}")

    def interrupt(self) -> tuple[int, str]:
        self.proc.send_signal(signal.SIGINT)
        code = self.proc.wait(10)
        assert self.proc.stderr is not None
        return code, self.proc.stderr.read()


def test_logs_follow_one_driver_and_level_at_run_time(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    follow = _Lines("logs", "alpha", "-f", "--state-dir", str(state))
    try:
        follow.wait_for("ALPHA-INFO")
        n = len(follow.lines)
        deadline = time.monotonic() + 10
        while len(follow.lines) < n + 10 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert len(follow.lines) >= n + 10            # live records keep coming
        assert not [ln for ln in follow.lines if "BETA" in ln or "[beta" in ln], follow.lines
        assert not [ln for ln in follow.lines if "ALPHA-DEBUG" in ln]        # info: the hub's level

        out = _cli("log-level", "alpha", "debug", "--state-dir", str(state))
        assert out.returncode == 0 and "alpha: log level debug" in out.stdout, out
        follow.wait_for("ALPHA-DEBUG")                 # at once, without a restart
        h.wait_for("ALPHA-DEBUG")                      # the hub's own log has them too
        time.sleep(0.3)
        assert not h.find("BETA-DEBUG")                # the other driver stays at info
        assert len(h.find("ALPHA-BOOT")) == 1          # no restart
        status, health = h.api("GET", "/api/v1/health")
        assert health["drivers"]["alpha"]["restarts"] == 0
        assert not [ln for ln in follow.lines if "BETA" in ln]
        out = _cli("log-level", "alpha", "hub", "--state-dir", str(state))
        assert out.returncode == 0
    finally:
        code, err = follow.interrupt()
    assert code == 130 and "Traceback" not in err, err          # Ctrl-C: no traceback


def test_logs_by_device_level_and_since(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    h.wait_for("BETA-WARN")
    out = _cli("logs", "b1", "--level", "warn", "--state-dir", str(state))
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines and all("[beta/b1]" in ln and "warn" in ln for ln in lines), lines
    out = _cli("logs", "beta", "--since", "0.2", "--state-dir", str(state))
    recent = out.stdout.splitlines()
    old = _cli("logs", "beta", "-n", "1000", "--state-dir", str(state)).stdout.splitlines()
    assert 0 < len(recent) < len(old)
    # under systemd it says where the older records are, with the journal field to filter on
    out = _cli("logs", "beta", "--state-dir", str(state), env=_env(INVOCATION_ID="0123"))
    assert "journalctl -u hubhost HUBHOST_DRIVER=beta" in out.stderr, out.stderr
    out = _cli("logs", "nosuch", "--state-dir", str(state))
    assert out.returncode == 1 and "no driver or device 'nosuch'" in out.stderr


def test_describe_a_device(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    assert h.api("POST", "/api/v1/exec", {"device": "a1", "function": "power", "args": {"on": True}})[0] == 200
    out = _cli("describe", "a1", "--config", str(cfg))
    assert out.returncode == 0, out.stderr
    text = out.stdout
    for want in ("device a1", "driver:     alpha (alpha)", "state:      running", "connection: none",
                 "power(delay, on)  - turn it on or off", "delay: Int32 = 0", "on: Bool  - true for on",
                 "power = true", "recent warnings and errors:"):
        assert want in text, (want, text)
    h.wait_for("ALPHA-WARN")
    assert "ALPHA-WARN" in _cli("describe", "a1", "--config", str(cfg)).stdout
    doc = orjson.loads(_cli("describe", "a1", "--json", "--config", str(cfg)).stdout)
    assert doc["interface"]["descriptions"]["power"]["params"]["on"] == "true for on"


def test_status_summary_agrees_with_rows(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        out = _cli("status", "--config", str(cfg))
        assert out.returncode == 0, out.stderr
        first = out.stdout.splitlines()[0]
        rows = [ln.strip() for ln in out.stdout.splitlines() if ln.startswith("  ")]
        states = [r.split(": ", 1)[1].split(" ")[0] for r in rows]
        for word, count in (("running", states.count("running")), ("failed", states.count("failed")),
                            ("restarting", states.count("restarting"))):
            label = "drivers running" if word == "running" else word
            assert f"{count} {label}" in first, (first, rows)
        if "failed" in states:
            break
        time.sleep(0.2)
    assert "3 drivers running, 1 failed, 0 restarting" in first, out.stdout
    assert any(r.startswith("broken: failed") for r in rows), rows


def test_config_state_dir_and_env_on_every_command(hub: tuple[HubProcess, Path, Path], tmp_path: Path) -> None:
    h, cfg, state = hub
    for cmd in ("status", "ls", "exec", "watch", "reload", "logs", "describe", "log-level", "datastore", "doctor"):
        helptext = _cli(cmd, "--help").stdout
        assert "--config" in helptext and "--state-dir" in helptext, cmd
    # the config names the state dir: --config alone, or HUBHOST_CONFIG alone, reach the hub
    assert "alpha" in _cli("ls", "--config", str(cfg)).stdout
    assert "alpha" in _cli("ls", env=_env(HUBHOST_CONFIG=str(cfg))).stdout
    assert _cli("logs", "alpha", env=_env(HUBHOST_CONFIG=str(cfg))).stdout.count("ALPHA-INFO") > 0
    # datastore: --config and HUBHOST_CONFIG find the state dir as well
    h.api("POST", "/api/v1/exec", {"device": "a1", "function": "power", "args": {"on": False}})
    for args, env in ((["--config", str(cfg)], None), ([], _env(HUBHOST_CONFIG=str(cfg))),
                      (["--state-dir", str(state)], None)):
        out = _cli("datastore", "alpha", *args, env=env)
        assert out.returncode in (0, 1) and "Traceback" not in out.stderr, out
        assert out.returncode == 0 or str(state) in out.stderr, out


def test_unreachable_hub_names_the_socket_and_how_to_point_elsewhere(tmp_path: Path) -> None:
    nowhere = tmp_path / "nowhere"
    for cmd in (["status"], ["ls"], ["logs"], ["describe", "x"], ["reload"], ["exec", "d", "f"]):
        out = _cli(*cmd, "--state-dir", str(nowhere))
        assert out.returncode == 3, out
        assert f"{nowhere}/hubhost.sock" in out.stderr, out.stderr
        assert "--config" in out.stderr and "HUBHOST_CONFIG" in out.stderr and "--state-dir" in out.stderr
        assert "Traceback" not in out.stderr
    cfg = write_config(tmp_path / "hub.toml", f'state_dir = "{tmp_path / "elsewhere"}"\n')
    out = _cli("status", env=_env(HUBHOST_CONFIG=str(cfg)))
    assert out.returncode == 3 and f"{tmp_path / 'elsewhere'}/hubhost.sock" in out.stderr, out.stderr


def test_closed_pipe_gives_no_traceback(hub: tuple[HubProcess, Path, Path], tmp_path: Path) -> None:
    h, cfg, state = hub
    for args in (["doctor", "--config", str(cfg)], ["logs", "alpha", "-n", "500", "--config", str(cfg)],
                 ["status", "--config", str(cfg)]):
        r, w = os.pipe()
        proc = subprocess.Popen([sys.executable, "-m", "hubhost", *args], stdout=w, stderr=subprocess.PIPE,
                                env=_env(), text=True)
        os.close(w)
        os.close(r)          # the reader is gone before the command writes a line
        _, err = proc.communicate(timeout=60)
        assert "Traceback" not in err and "BrokenPipeError" not in err, (args, err)
        assert proc.returncode != 0


def test_journal_fields_per_driver_and_device(tmp_path: Path) -> None:
    sock_path = tmp_path / "journal.sock"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(0.5)
    write_driver(tmp_path, "alpha", CHATTY % {"name": "alpha", "tag": "ALPHA"})
    state = tmp_path / "state"
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "alpha"
        path = "alpha"
        [[drivers.devices]]
        id = "a1"
    """)
    env = _env(JOURNAL_STREAM="8:1234", HUBHOST_JOURNAL_SOCKET=str(sock_path))
    proc = subprocess.Popen([sys.executable, "-m", "hubhost", "run", "--config", str(cfg), "--state-dir",
                             str(state)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    records: list[dict[str, str]] = []
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("ALPHA-INFO" in r.get("MESSAGE", "") for r in records):
            try:
                data = sock.recv(65536)
            except socket.timeout:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            records.append(fields)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)
        sock.close()
    device_rec = next(r for r in records if "ALPHA-INFO" in r.get("MESSAGE", ""))
    assert device_rec["HUBHOST_DRIVER"] == "alpha" and device_rec["HUBHOST_DEVICE"] == "a1"
    assert device_rec["PRIORITY"] == "6" and device_rec["SYSLOG_IDENTIFIER"] == "hubhost"
    boot = next(r for r in records if "ALPHA-BOOT" in r.get("MESSAGE", ""))
    assert boot["HUBHOST_DRIVER"] == "alpha" and "HUBHOST_DEVICE" not in boot
    hub_rec = next(r for r in records if "API listening" in r.get("MESSAGE", ""))
    assert "HUBHOST_DRIVER" not in hub_rec


def test_a_follower_that_leaves_is_no_error(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    follow = _Lines("logs", "beta", "-f", "--state-dir", str(state))
    follow.wait_for("BETA-INFO")
    follow.proc.kill()
    follow.proc.wait()
    time.sleep(0.5)                                  # beta logs every 50 ms: the hub writes to a closed socket
    assert not h.find("API: GET /api/v1/logs failed")
    assert not h.find("Traceback")


def test_log_level_per_driver_in_the_config(hub: tuple[HubProcess, Path, Path]) -> None:
    h, cfg, state = hub
    h.wait_for("GAMMA-DEBUG")                 # gamma's own level: debug, the hub's: info
    assert not h.find("BETA-DEBUG")
    out = _cli("logs", "gamma", "--level", "debug", "--state-dir", str(state))
    assert "GAMMA-DEBUG" in out.stdout
