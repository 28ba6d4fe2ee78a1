"""A real `hubhost run` under a test-made NOTIFY_SOCKET, as systemd would run it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hubutil import write_config, write_driver


class Listener:
    """A datagram socket standing in for systemd's notify socket."""

    def __init__(self, tmp_path: Path, abstract: bool) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            name = f"hubhost-test-{os.getpid()}-{time.monotonic_ns()}"
            self.sock.bind("\0" + name)
            self.address = "@" + name
        else:
            path = tmp_path / "notify.sock"
            self.sock.bind(str(path))
            self.address = str(path)
        self.sock.settimeout(0.1)
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except socket.timeout:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def times(self, line: str) -> list[float]:
        return [t for t, m in self.messages if line in m.split("\n")]

    def close(self) -> None:
        self._stop = True
        self._t.join(1)
        self.sock.close()


def _start(tmp_path: Path, listener: Listener, **env_extra: str) -> tuple[subprocess.Popen, list[tuple[float, str]]]:
    write_driver(tmp_path, "slow", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init {
          name = "slow",
          lifecycle = { init = function(driver, device)
            local t = os.clock() while os.clock() - t < 0.4 do end
            log.info("INIT DONE", device.id)
          end },
        }
    """)
    write_driver(tmp_path, "broken", "error('broken driver')")
    cfg = write_config(tmp_path / "hub.toml", """
        [[drivers]]
        id = "slow"
        path = "slow"
        [[drivers.devices]]
        id = "s1"
        [[drivers]]
        id = "broken"
        path = "broken"
    """)
    env = dict(os.environ, NOTIFY_SOCKET=listener.address, **env_extra)
    p = subprocess.Popen([sys.executable, "-m", "hubhost", "run", "--config", str(cfg),
                          "--state-dir", str(tmp_path / "state")],
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    lines: list[tuple[float, str]] = []

    def read() -> None:
        for line in p.stdout:
            lines.append((time.monotonic(), line))

    threading.Thread(target=read, daemon=True).start()
    return p, lines


@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_ready_status_watchdog_stopping_in_order(tmp_path: Path, abstract: bool) -> None:
    listener = Listener(tmp_path, abstract)
    p, lines = _start(tmp_path, listener, WATCHDOG_USEC="400000")
    try:
        deadline = time.monotonic() + 15
        while not listener.times("READY=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        ready = listener.times("READY=1")
        assert ready, listener.messages
        init_done = [t for t, line in lines if "INIT DONE s1" in line]
        assert init_done and init_done[0] < ready[0], "READY=1 before every driver had started"
        first = next(m for t, m in listener.messages if "READY=1" in m)
        assert "STATUS=1 drivers running, 1 failed, 0 restarting; redis: off" in first
        time.sleep(2.0)
        pings = [t for t in listener.times("WATCHDOG=1") if t > ready[0]]
        assert 7 <= len(pings) <= 14, len(pings)  # every 0.2 s (half of 0.4 s)
        p.send_signal(signal.SIGTERM)
        assert p.wait(12) == 0
        stopping = listener.times("STOPPING=1")
        assert stopping and stopping[0] > ready[0]
        order = [m.split("\n")[0] for _, m in listener.messages if not m.startswith("WATCHDOG")]
        assert order[0].startswith("READY=1") and order[-1].startswith("STOPPING=1")
    finally:
        if p.poll() is None:
            p.kill()
        listener.close()


def test_stalled_event_loop_stops_watchdog_pings(tmp_path: Path) -> None:
    listener = Listener(tmp_path, abstract=False)
    p, lines = _start(tmp_path, listener, WATCHDOG_USEC="400000", HUBHOST_DEBUG_STALL="1")
    try:
        deadline = time.monotonic() + 15
        while not listener.times("READY=1") and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.6)
        t_stall = time.monotonic()
        p.send_signal(signal.SIGUSR2)
        time.sleep(3.6)
        during = [t for t in listener.times("WATCHDOG=1") if t_stall + 0.3 < t < t_stall + 2.9]
        assert during == [], "pings continued while the event loop was stalled"
        after = [t for t in listener.times("WATCHDOG=1") if t > t_stall + 3.0]
        assert after, "pings did not resume after the stall"
        p.send_signal(signal.SIGTERM)
        assert p.wait(12) == 0
    finally:
        if p.poll() is None:
            p.kill()
        listener.close()
