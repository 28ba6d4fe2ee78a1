"""sd_notify against real AF_UNIX datagram sockets made by the test.

Each test plays systemd: it binds the socket, hands its address to the Notifier the
way systemd does (environment variables) and checks the exact bytes that arrive.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from hubhost.supervisor.sdnotify import Notifier, watchdog_interval, watchdog_loop


class Receiver:
    """A bound datagram socket plus a thread that timestamps every message."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value
        self.messages: list[tuple[float, str]] = []
        self._stop = False
        self._thread = threading.Thread(target=self._drain, daemon=True)
        self.sock.settimeout(0.05)
        self._thread.start()

    def _drain(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            self.messages.append((time.monotonic(), data.decode()))

    def wait_for(self, count: int, timeout: float = 5.0) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.messages) < count and time.monotonic() < deadline:
            time.sleep(0.005)
        return [text for _, text in self.messages]

    def close(self) -> None:
        self._stop = True
        self._thread.join(timeout=2)
        self.sock.close()


@pytest.fixture
def path_receiver(tmp_path: Path) -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    path = str(tmp_path / "notify.sock")
    sock.bind(path)
    receiver = Receiver(sock, path)
    yield receiver
    receiver.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    name = f"hubhost-test-{uuid.uuid4().hex}"
    sock.bind("\0" + name)
    receiver = Receiver(sock, "@" + name)
    yield receiver
    receiver.close()


@pytest.mark.parametrize("receiver_name", ["path_receiver", "abstract_receiver"])
def test_messages_arrive_exactly(receiver_name: str, request: pytest.FixtureRequest) -> None:
    receiver: Receiver = request.getfixturevalue(receiver_name)
    notifier = Notifier.from_env({"NOTIFY_SOCKET": receiver.env_value})
    assert notifier.enabled
    assert notifier.ready("2 drivers running, 0 failed, 0 restarting; redis: off")
    assert notifier.status("line one\nline two")
    assert notifier.watchdog()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.stopping()
    assert notifier.notify("EXTEND_TIMEOUT_USEC=5000000", "STATUS=x")
    got = receiver.wait_for(6)
    notifier.close()
    assert got[:3] == [
        "READY=1\nSTATUS=2 drivers running, 0 failed, 0 restarting; redis: off",
        "STATUS=line one line two",
        "WATCHDOG=1",
    ]
    reload_lines = got[3].split("\n")
    assert reload_lines[0] == "RELOADING=1"
    key, _, usec = reload_lines[1].partition("=")
    assert key == "MONOTONIC_USEC" and before <= int(usec) <= after
    assert got[4:] == ["STOPPING=1", "EXTEND_TIMEOUT_USEC=5000000\nSTATUS=x"]


def test_from_os_environ_and_unset(
    path_receiver: Receiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", path_receiver.env_value)
    monkeypatch.setenv("WATCHDOG_USEC", "3000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    notifier = Notifier.from_env(unset=True)
    assert "NOTIFY_SOCKET" not in os.environ and "WATCHDOG_USEC" not in os.environ
    assert notifier.watchdog_interval() == 1.5
    assert notifier.ready()
    assert path_receiver.wait_for(1) == ["READY=1"]
    notifier.close()


def test_no_socket_is_a_silent_noop() -> None:
    notifier = Notifier.from_env({"WATCHDOG_USEC": "1000000"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert notifier.watchdog_interval() is None


def test_watchdog_interval_from_env() -> None:
    assert watchdog_interval({}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "200000"}) == 0.1
    mine = {"WATCHDOG_USEC": "200000", "WATCHDOG_PID": str(os.getpid())}
    assert watchdog_interval(mine) == 0.1
    # Inherited from a parent: the watchdog belongs to another process.
    assert watchdog_interval({"WATCHDOG_USEC": "200000", "WATCHDOG_PID": "1"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "0"}) is None
    assert watchdog_interval({"WATCHDOG_USEC": "soon"}) is None


def test_malformed_line_is_rejected_before_sending(path_receiver: Receiver) -> None:
    notifier = Notifier(path_receiver.env_value)
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.notify("READY=1", "STATUS=a\nWATCHDOG=1")
    with pytest.raises(ValueError, match="KEY=VALUE"):
        notifier.notify("READY")
    notifier.watchdog()
    assert path_receiver.wait_for(1) == ["WATCHDOG=1"]
    notifier.close()


def test_send_errors_never_raise_and_log_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    gone = str(tmp_path / "nobody-listens.sock")
    notifier = Notifier(gone)
    caplog.set_level(logging.DEBUG, logger="hubhost.supervisor.sdnotify")
    assert notifier.watchdog() is False
    assert notifier.watchdog() is False
    assert notifier.status("still alive") is False
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and gone in warnings[0].getMessage()
    # Once the socket exists again, messages flow and recovery is logged.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(gone)
    sock.settimeout(2)
    try:
        assert notifier.ready() is True
        assert sock.recv(100) == b"READY=1"
    finally:
        sock.close()
        notifier.close()
    assert any("works again" in r.getMessage() for r in caplog.records)


def test_unsupported_socket_kind_disables_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": "vsock:2:1234"})
    assert not notifier.enabled
    assert notifier.ready() is False
    assert any("vsock:2:1234" in r.getMessage() for r in caplog.records)


def _run_watchdog(notifier: Notifier, seconds: float, stall: tuple[float, float] | None):
    """Run watchdog_loop for ``seconds``; optionally block the loop during ``stall``.

    Returns the monotonic times at which the stall began and ended (or None).
    """
    marks: dict[str, float] = {}

    def block(duration: float) -> None:
        marks["start"] = time.monotonic()
        time.sleep(duration)  # deliberately stalls the event loop
        marks["end"] = time.monotonic()

    async def main() -> None:
        task = asyncio.create_task(watchdog_loop(notifier))
        if stall is not None:
            asyncio.get_running_loop().call_later(stall[0], block, stall[1])
        await asyncio.sleep(seconds)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    return (marks["start"], marks["end"]) if stall is not None else None


def test_watchdog_loop_pings_at_half_the_period(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "200000"}
    notifier = Notifier.from_env(env)
    assert notifier.watchdog_interval() == 0.1
    started = time.monotonic()
    _run_watchdog(notifier, 1.0, stall=None)
    elapsed = time.monotonic() - started
    time.sleep(0.1)  # let the receiver thread drain the socket
    pings = [t for t, text in path_receiver.messages if text == "WATCHDOG=1"]
    notifier.close()
    # One ping at start plus one per 0.1 s: about 10 in 1 s. Scheduling noise on a
    # busy machine may lose one or two, never add many.
    expected = int(elapsed / 0.1) + 1
    assert 8 <= len(pings) <= expected + 1, (len(pings), elapsed)
    gaps = [b - a for a, b in zip(pings, pings[1:])]
    assert sum(gaps) / len(gaps) == pytest.approx(0.1, abs=0.03)


def test_stalled_loop_stops_the_pings(path_receiver: Receiver) -> None:
    env = {"NOTIFY_SOCKET": path_receiver.env_value, "WATCHDOG_USEC": "200000"}
    notifier = Notifier.from_env(env)
    start, end = _run_watchdog(notifier, 1.4, stall=(0.3, 0.7))
    time.sleep(0.1)
    pings = [t for t, text in path_receiver.messages if text == "WATCHDOG=1"]
    notifier.close()
    # A ping sent just before the stall may be timestamped a moment after it began.
    during = [t for t in pings if start + 0.05 < t < end]
    assert during == [], f"{len(during)} pings while the loop was blocked"
    assert any(t < start for t in pings), "no pings before the stall"
    after = [t for t in pings if t >= end]
    # Pings resume once the loop runs again, without a catch-up burst.
    assert 2 <= len(after) <= 6, len(after)
    assert min(after) - end < 0.1


def test_watchdog_loop_returns_when_not_requested(path_receiver: Receiver) -> None:
    notifier = Notifier.from_env({"NOTIFY_SOCKET": path_receiver.env_value})

    async def main() -> None:
        await asyncio.wait_for(watchdog_loop(notifier), timeout=1)

    asyncio.run(main())
    time.sleep(0.05)
    assert path_receiver.messages == []
    notifier.close()
