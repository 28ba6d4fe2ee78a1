"""sd_notify for systemd services, in the standard library only.

Why not libsystemd or a PyPI package: the protocol is a few text lines in one
AF_UNIX datagram, and hubs should not need a C library for it. systemd tells the
service where to send in ``$NOTIFY_SOCKET`` (a path, or ``@name`` for an abstract
socket) and how often to ping the watchdog in ``$WATCHDOG_USEC``/``$WATCHDOG_PID``.

Sending never raises into the caller: a hub must not crash because systemd (or a
test reading the socket) went away. The first failure of an outage is logged as a
warning, the rest at debug level until a send succeeds again.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
import time
from collections.abc import Mapping

__all__ = ["Notifier", "watchdog_interval", "watchdog_loop"]

log = logging.getLogger("hubhost.supervisor.sdnotify")

#: How long one send may wait for room in a full receiver queue before the
#: message is dropped (Linux queues only ``net.unix.max_dgram_qlen`` datagrams).
DEFAULT_SEND_TIMEOUT = 1.0


def _socket_address(value: str) -> str:
    """Turn a ``$NOTIFY_SOCKET`` value into an AF_UNIX address (``@`` = abstract)."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(
        f"NOTIFY_SOCKET={value!r} is not supported: expected an absolute path or an "
        "abstract name starting with '@'"
    )


def watchdog_interval(environ: Mapping[str, str] | None = None) -> float | None:
    """Seconds between watchdog pings (half of ``$WATCHDOG_USEC``), or None.

    None when systemd asked for no watchdog, when ``$WATCHDOG_PID`` names another
    process (the variables were inherited, the watchdog is not ours), or when the
    value is not a positive integer (logged).
    """
    env = os.environ if environ is None else environ
    raw = env.get("WATCHDOG_USEC")
    if not raw:
        return None
    pid = env.get("WATCHDOG_PID")
    if pid:
        try:
            if int(pid) != os.getpid():
                return None
        except ValueError:
            log.warning("ignoring WATCHDOG_PID=%r: not a process id", pid)
            return None
    try:
        usec = int(raw)
    except ValueError:
        usec = 0
    if usec <= 0:
        log.warning("ignoring WATCHDOG_USEC=%r: not a positive number of microseconds", raw)
        return None
    return usec / 2_000_000


class Notifier:
    """Sends sd_notify messages; every method is a no-op when there is no socket."""

    def __init__(
        self,
        address: str | None,
        *,
        watchdog: float | None = None,
        send_timeout: float = DEFAULT_SEND_TIMEOUT,
    ) -> None:
        """``address`` is a ``$NOTIFY_SOCKET`` value (path or ``@abstract``) or None.

        ``watchdog`` is the ping interval in seconds that ``watchdog_interval()``
        returns (None: no watchdog requested).
        """
        self._address: str | None = None
        if address:
            try:
                self._address = _socket_address(address)
            except ValueError as exc:
                log.warning("sd_notify disabled: %s", exc)
        self._watchdog = watchdog
        self._send_timeout = send_timeout
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()
        self._failing = False

    @classmethod
    def from_env(
        cls, environ: Mapping[str, str] | None = None, *, unset: bool = False
    ) -> Notifier:
        """Build from ``$NOTIFY_SOCKET``/``$WATCHDOG_USEC``/``$WATCHDOG_PID``.

        ``unset=True`` removes those variables from ``os.environ`` afterwards so
        child processes do not try to notify on our behalf (systemd would reject
        them with NotifyAccess=main and log a warning for each message).
        """
        env = os.environ if environ is None else environ
        notifier = cls(env.get("NOTIFY_SOCKET") or None, watchdog=watchdog_interval(env))
        if unset:
            for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
                os.environ.pop(name, None)
        return notifier

    @property
    def enabled(self) -> bool:
        """True when messages go somewhere (we run under systemd or a test socket)."""
        return self._address is not None

    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the period), None if not asked for."""
        return self._watchdog if self.enabled else None

    def notify(self, *lines: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; True if it was sent.

        Raises ValueError only for a malformed line (a bug in the caller, not a
        send failure): a line needs ``=`` and must not contain a newline.
        """
        for line in lines:
            if "\n" in line or "=" not in line:
                raise ValueError(
                    f"sd_notify line {line!r} rejected: must be KEY=VALUE on one line"
                )
        if self._address is None or not lines:
            return False
        payload = "\n".join(lines).encode("utf-8")
        try:
            with self._lock:
                if self._sock is None:
                    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                    sock.settimeout(self._send_timeout)
                    self._sock = sock
                self._sock.sendto(payload, self._address)
        except OSError as exc:
            self._report(exc, lines)
            return False
        if self._failing:
            log.info("sd_notify: sending to %s works again", self._shown_address())
            self._failing = False
        return True

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup (or a reload) is complete."""
        return self.notify("READY=1", *self._status_lines(status))

    def reloading(self, status: str | None = None) -> bool:
        """RELOADING=1 with MONOTONIC_USEC= (systemd 253+ uses it to order the reload)."""
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(
            "RELOADING=1", f"MONOTONIC_USEC={now_usec}", *self._status_lines(status)
        )

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1: shutdown has begun."""
        return self.notify("STOPPING=1", *self._status_lines(status))

    def status(self, text: str) -> bool:
        """STATUS=<text>, shown by ``systemctl status``; newlines become spaces."""
        return self.notify(*self._status_lines(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the service is alive."""
        return self.notify("WATCHDOG=1")

    def extend_timeout(self, seconds: float) -> bool:
        """EXTEND_TIMEOUT_USEC=: ask for more time to start or stop."""
        return self.notify(f"EXTEND_TIMEOUT_USEC={max(0, int(seconds * 1_000_000))}")

    def close(self) -> None:
        """Close the socket; later messages open a new one."""
        with self._lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None

    def __enter__(self) -> Notifier:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @staticmethod
    def _status_lines(text: str | None) -> tuple[str, ...]:
        if text is None:
            return ()
        return ("STATUS=" + " ".join(text.splitlines()),)

    def _shown_address(self) -> str:
        address = self._address or ""
        return "@" + address[1:] if address.startswith("\0") else address

    def _report(self, exc: OSError, lines: tuple[str, ...]) -> None:
        """Log the first failure of an outage loudly, the rest quietly."""
        first = lines[0] if lines else ""
        if self._failing:
            log.debug("sd_notify: %s not sent to %s: %s", first, self._shown_address(), exc)
            return
        self._failing = True
        log.warning(
            "sd_notify: %s not sent to %s: %s (further failures logged at debug level)",
            first,
            self._shown_address(),
            exc,
        )


async def watchdog_loop(notifier: Notifier, interval: float | None = None) -> None:
    """Ping WATCHDOG=1 every ``interval`` seconds from the running event loop.

    The pings come from the loop itself, not a thread, on purpose: if the loop
    stalls, the pings stop and systemd's watchdog restarts the hub. After a stall
    it pings once and then keeps the period, without a burst of catch-up pings.
    ``interval`` defaults to ``notifier.watchdog_interval()``; returns at once if
    there is no watchdog. Cancel the task to stop it.
    """
    if interval is None:
        interval = notifier.watchdog_interval()
    if interval is None or not notifier.enabled:
        return
    if interval <= 0:
        raise ValueError(f"watchdog interval {interval!r} rejected: must be > 0 seconds")
    loop = asyncio.get_running_loop()
    next_at = loop.time()
    while True:
        notifier.watchdog()
        next_at += interval
        now = loop.time()
        if next_at <= now:  # we were stalled: restart the schedule from now
            next_at = now + interval
        await asyncio.sleep(next_at - now)
