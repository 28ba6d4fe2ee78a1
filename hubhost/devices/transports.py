"""Device transports on the asyncio loop: serial (pyserial), TCP and UDP.

Every kind has one shape so the runtime can treat devices alike:

* ``on_data(chunk)`` gets raw byte chunks exactly as read (framing happens later, on the
  driver's thread); ``on_connected()`` and ``on_disconnected(reason)`` bracket every
  connection, strictly in that order (connected, data..., disconnected), also for a
  deliberate ``close()`` (reason ``"closed"``).
* ``await open()`` returns after the first connect attempt (True if it connected). Failures
  and lost connections reconnect by themselves with capped, jittered exponential backoff
  until ``await close()``.
* ``send(data)`` queues bytes on the live connection or raises :class:`NotConnectedError`.

All methods and callbacks run on the loop thread; callers on other threads post with
``loop.call_soon_threadsafe``. Nothing here decodes bytes.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import random
import socket
from dataclasses import dataclass
from functools import partial
from typing import Any, Callable

import serial
import serial_asyncio_fast

DataCallback = Callable[[bytes], None]
ConnectedCallback = Callable[[], None]
DisconnectedCallback = Callable[[str], None]

_log = logging.getLogger("hubhost.devices.transports")


class TransportError(Exception):
    """A transport cannot do what was asked."""


class NotConnectedError(TransportError, ConnectionError):
    """``send`` was called while the device is not connected."""


class SendBufferFull(TransportError):
    """The device is not reading: more than ``max_write_buffer`` bytes are waiting."""


@dataclass(frozen=True)
class Backoff:
    """Reconnect delays: ``initial * factor**attempt`` capped at ``maximum``, jittered.

    Jitter removes up to ``jitter`` (a fraction) at random so that many devices that
    failed together do not retry in lockstep. A connection that lasted ``stable`` seconds
    resets the attempt counter; a flapping one keeps backing off.
    """

    initial: float = 0.1
    maximum: float = 30.0
    factor: float = 2.0
    jitter: float = 0.25
    stable: float = 5.0

    def __post_init__(self) -> None:
        for name in ("initial", "maximum", "factor", "stable"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
                raise ValueError(f"backoff: {name} must be a finite number >= 0, got {value!r}")
        if self.initial <= 0 or self.maximum < self.initial or self.factor < 1:
            raise ValueError(
                f"backoff: need 0 < initial <= maximum and factor >= 1, got {self!r}"
            )
        if not 0 <= self.jitter < 1:
            raise ValueError(f"backoff: jitter must be in [0, 1), got {self.jitter!r}")

    def delay(self, attempt: int) -> float:
        base = min(self.maximum, self.initial * self.factor ** min(attempt, 64))
        return base * (1.0 - self.jitter * random.random())


def _noop(*_args: Any) -> None:
    return None


def _describe(exc: BaseException | None) -> str:
    if exc is None:
        return "peer closed"
    text = str(exc) or type(exc).__name__
    if isinstance(exc, ConnectionRefusedError):
        return f"connection refused ({text})"
    return text


class _Protocol(asyncio.Protocol, asyncio.DatagramProtocol):
    """Bridges one asyncio connection to its Transport; ignored once stale."""

    def __init__(self, owner: "Transport") -> None:
        self.owner = owner
        self.made: asyncio.Future[asyncio.BaseTransport] = (
            asyncio.get_running_loop().create_future()
        )

    def connection_made(self, transport: asyncio.BaseTransport) -> None:  # type: ignore[override]
        if not self.made.done():
            self.made.set_result(transport)
        self.owner._made(self, transport)

    def data_received(self, data: bytes) -> None:
        self.owner._data(self, data)

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.owner._data(self, data)

    def error_received(self, exc: Exception) -> None:
        self.owner._datagram_error(self, exc)

    def eof_received(self) -> bool:
        return False  # half-closed streams are closed: the device went away

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.made.done():
            self.made.set_exception(exc or ConnectionError("closed before connected"))
        self.owner._lost(self, exc)


class Transport:
    """Base: the reconnect loop, callback ordering and ``send``; kinds add ``_connect``."""

    kind = "transport"

    def __init__(
        self,
        *,
        on_data: DataCallback = _noop,
        on_connected: ConnectedCallback = _noop,
        on_disconnected: DisconnectedCallback = _noop,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        backoff: Backoff | None = None,
        max_write_buffer: int = 1 << 20,
    ) -> None:
        self.on_data = on_data
        self.on_connected = on_connected
        self.on_disconnected = on_disconnected
        self.log = logger or _log
        self.backoff = backoff or Backoff()
        self.max_write_buffer = max_write_buffer
        self.connected = False
        self._proto: _Protocol | None = None
        self._aio: asyncio.BaseTransport | None = None
        self._lost_event: asyncio.Event | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._icmp_logged = False

    # -- public API -----------------------------------------------------------------

    @property
    def describe(self) -> str:
        """Short name for messages, e.g. ``tcp 127.0.0.1:4001``."""
        return self.kind

    async def open(self) -> bool:
        """Start connecting; return after the first attempt, True if it connected."""
        if self._task is not None:
            raise TransportError(f"{self.describe}: already opened")
        self._closing = False
        first: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._task = asyncio.create_task(self._run(first), name=f"transport {self.describe}")
        await first
        return self.connected

    def send(self, data: bytes) -> None:
        """Queue bytes for the device; never blocks, never decodes."""
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"{self.describe}: send needs bytes, got {type(data).__name__}")
        aio = self._aio
        if not self.connected or aio is None or aio.is_closing():
            raise NotConnectedError(
                f"{self.describe}: cannot send {len(data)} bytes: not connected"
            )
        pending = aio.get_write_buffer_size()  # type: ignore[attr-defined]
        if pending + len(data) > self.max_write_buffer:
            raise SendBufferFull(
                f"{self.describe}: cannot send {len(data)} bytes: {pending} bytes still "
                f"waiting (limit {self.max_write_buffer}); is the device reading?"
            )
        self._write(aio, bytes(data))

    def set_reading(self, on: bool) -> bool:
        """Pause or resume reading from the device (flow control towards a slow driver).
        Returns False where the transport cannot (datagrams, or not connected)."""
        method = getattr(self._aio, "resume_reading" if on else "pause_reading", None)
        if method is None:
            return False
        try:
            method()
        except (RuntimeError, AttributeError, OSError):
            return False
        return True

    async def close(self) -> None:
        """Stop reconnecting and close the connection (``on_disconnected("closed")``)."""
        self._closing = True
        task, self._task = self._task, None
        aio = self._aio
        if aio is not None and not aio.is_closing():
            self._close_aio(aio)
        lost = self._lost_event
        if self.connected and lost is not None:
            # A peer that does not read can hold a graceful close forever: abort after 1 s.
            for step in ("abort", "give up"):
                try:
                    await asyncio.wait_for(lost.wait(), 1.0)
                    break
                except asyncio.TimeoutError:
                    if step == "abort" and aio is not None:
                        aio.abort()  # type: ignore[attr-defined]
                    elif self._proto is not None:
                        self.log.warning("%s: close did not finish; dropping it", self.describe)
                        self._lost(self._proto, None)
        if task is not None:
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass

    # -- for kinds --------------------------------------------------------------------

    async def _connect(self, proto: _Protocol) -> None:
        """Open one connection bound to ``proto``; raise on failure."""
        raise NotImplementedError

    def _write(self, aio: asyncio.BaseTransport, data: bytes) -> None:
        aio.write(data)  # type: ignore[attr-defined]

    def _close_aio(self, aio: asyncio.BaseTransport) -> None:
        aio.close()  # graceful: pending bytes are written first

    async def _pause(self, delay: float) -> None:
        """Wait before the next connect attempt; kinds may cut it short."""
        await asyncio.sleep(delay)

    # -- the reconnect loop -----------------------------------------------------------

    async def _run(self, first: asyncio.Future[None]) -> None:
        loop = asyncio.get_running_loop()
        attempt = 0
        outage_logged = False
        try:
            while not self._closing:
                proto = _Protocol(self)
                self._proto = proto
                self._lost_event = asyncio.Event()
                try:
                    await self._connect(proto)
                    await asyncio.wait_for(asyncio.shield(proto.made), 10.0)
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    if self._proto is proto:
                        self._proto = None
                    reason = _describe(exc)
                    if not outage_logged:
                        self.log.warning("%s: cannot connect: %s (retrying)", self.describe, reason)
                        outage_logged = True
                    else:
                        self.log.debug("%s: cannot connect: %s", self.describe, reason)
                    if not first.done():
                        first.set_result(None)
                    await self._pause(self.backoff.delay(attempt))
                    attempt += 1
                    continue
                outage_logged = False
                started = loop.time()
                if not first.done():
                    first.set_result(None)
                await self._lost_event.wait()
                if self._closing:
                    break
                if loop.time() - started >= self.backoff.stable:
                    attempt = 0
                await self._pause(self.backoff.delay(attempt))
                attempt += 1
        finally:
            if not first.done():
                first.set_result(None)

    # -- protocol callbacks (loop thread) ---------------------------------------------

    def _made(self, proto: _Protocol, aio: asyncio.BaseTransport) -> None:
        if proto is not self._proto or self._closing:
            aio.close()
            return
        self._aio = aio
        self.connected = True
        self._icmp_logged = False
        self.log.info("%s: connected", self.describe)
        self._call("on_connected", self.on_connected)

    def _data(self, proto: _Protocol, data: bytes) -> None:
        if proto is self._proto and self.connected:
            self._icmp_logged = False
            self._call("on_data", self.on_data, data)

    def _datagram_error(self, proto: _Protocol, exc: Exception) -> None:
        # ICMP port unreachable and friends: the device may come back; keep the socket.
        if proto is not self._proto:
            return
        if not self._icmp_logged:
            self.log.warning("%s: send error: %s (keeping the socket)", self.describe, exc)
            self._icmp_logged = True
        else:
            self.log.debug("%s: send error: %s", self.describe, exc)

    def _lost(self, proto: _Protocol, exc: Exception | None) -> None:
        if proto is not self._proto:
            return
        self._proto = None
        self._aio = None
        was_connected = self.connected
        self.connected = False
        if self._lost_event is not None:
            self._lost_event.set()
        if not was_connected:
            return
        reason = "closed" if self._closing else _describe(exc)
        if self._closing:
            self.log.info("%s: closed", self.describe)
        else:
            self.log.warning("%s: disconnected: %s", self.describe, reason)
        self._call("on_disconnected", self.on_disconnected, reason)

    def _call(self, name: str, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            self.log.exception("%s: %s callback failed", self.describe, name)


class TcpTransport(Transport):
    """A TCP client; peer close or refusal leads to reconnect."""

    kind = "tcp"

    def __init__(
        self, host: str, port: int, *, connect_timeout: float = 5.0, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.port = port
        self.connect_timeout = connect_timeout

    @property
    def describe(self) -> str:
        return f"tcp {self.host}:{self.port}"

    async def _connect(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        aio, _ = await asyncio.wait_for(
            loop.create_connection(lambda: proto, self.host, self.port), self.connect_timeout
        )
        sock = aio.get_extra_info("socket")
        if sock is not None:
            # A dead peer (cable pulled) is noticed eventually even when we only listen.
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            except OSError as exc:
                self.log.debug("%s: cannot enable keepalive: %s", self.describe, exc)


class UdpTransport(Transport):
    """A connected UDP socket: ``connected`` once it is set up; ICMP errors are logged."""

    kind = "udp"

    def __init__(self, host: str, port: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host
        self.port = port

    @property
    def describe(self) -> str:
        return f"udp {self.host}:{self.port}"

    async def _connect(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: proto, remote_addr=(self.host, self.port))

    def _write(self, aio: asyncio.BaseTransport, data: bytes) -> None:
        aio.sendto(data)  # type: ignore[attr-defined]


class _NonBlockingSerial(serial.Serial):  # type: ignore[misc, valid-type]
    """pyserial's port with a write that really does not block.

    With ``write_timeout = 0`` (which the asyncio layer sets) pyserial 3.5 swallows EAGAIN
    and retries in a busy loop, so a device that stops reading (flow control, a full pty)
    would freeze the whole event loop. Raising BlockingIOError lets the asyncio transport
    buffer the rest and wait for the port to become writable.
    """

    def write(self, data: bytes | bytearray | memoryview) -> int:  # type: ignore[override]
        if not self.is_open:
            raise serial.PortNotOpenError()
        try:
            return os.write(self.fd, data)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError as exc:
            raise serial.SerialException(f"write failed: {exc}") from exc


class SerialTransport(Transport):
    """A serial line through pyserial; a vanished port is polled for and reopened.

    While the port's path is missing (adapter unplugged) the path is checked every
    ``poll_interval`` seconds, so a replugged adapter is reopened at once instead of
    after the (possibly 30 s) backoff. ``exclusive`` takes a flock so two drivers cannot
    share one line by mistake.
    """

    kind = "serial"

    def __init__(
        self,
        port: str,
        baudrate: int = 9600,
        bytesize: int = 8,
        parity: str = "N",
        stopbits: float = 1,
        rtscts: bool = False,
        xonxoff: bool = False,
        exclusive: bool = True,
        *,
        poll_interval: float = 0.5,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.port = port
        self.poll_interval = poll_interval
        self.serial_settings = {
            "baudrate": baudrate,
            "bytesize": bytesize,
            "parity": parity,
            "stopbits": stopbits,
            "rtscts": rtscts,
            "xonxoff": xonxoff,
            "exclusive": exclusive,
        }

    @property
    def describe(self) -> str:
        return f"serial {self.port}"

    async def _connect(self, proto: _Protocol) -> None:
        loop = asyncio.get_running_loop()
        if "://" in self.port:  # pyserial URL handlers (socket://, rfc2217://)
            await serial_asyncio_fast.create_serial_connection(
                loop, lambda: proto, self.port, **self.serial_settings
            )
            return
        if not os.path.exists(self.port):
            raise TransportError(f"port {self.port} does not exist")  # unplugged: poll
        port = await loop.run_in_executor(
            None, partial(_NonBlockingSerial, self.port, **self.serial_settings)
        )
        await serial_asyncio_fast.connection_for_serial(loop, lambda: proto, port)

    def _close_aio(self, aio: asyncio.BaseTransport) -> None:
        # The graceful close runs tcdrain, which blocks for good (in an executor thread)
        # when the line is stalled by flow control or a peer that does not read.
        aio.abort()  # type: ignore[attr-defined]

    async def _pause(self, delay: float) -> None:
        """Back off, but reopen at once when a missing port reappears (USB replugged)."""
        if "://" in self.port or os.path.exists(self.port):
            await asyncio.sleep(delay)
            return
        loop = asyncio.get_running_loop()
        end = loop.time() + delay
        while (left := end - loop.time()) > 0:
            await asyncio.sleep(min(self.poll_interval, left))
            if os.path.exists(self.port):
                return


# -- settings validation ------------------------------------------------------------------

_COMMON_KEYS = ("reconnect_min", "reconnect_max")
TRANSPORT_KEYS: dict[str, tuple[str, ...]] = {
    "serial": ("port", "baudrate", "bytesize", "parity", "stopbits", "rtscts", "xonxoff",
               "exclusive") + _COMMON_KEYS,
    "tcp": ("host", "port", "connect_timeout") + _COMMON_KEYS,
    "udp": ("host", "port") + _COMMON_KEYS,
}
_PARITY = {"n": "N", "none": "N", "e": "E", "even": "E", "o": "O", "odd": "O",
           "m": "M", "mark": "M", "s": "S", "space": "S"}


def _int(kind: str, key: str, value: Any, lo: int, hi: int | None = None) -> int:
    if isinstance(value, float) and math.isfinite(value) and value.is_integer():
        value = int(value)  # Lua and TOML numbers may arrive as floats
    if isinstance(value, bool) or not isinstance(value, int) or value < lo or (
        hi is not None and value > hi
    ):
        what = f"an integer in {lo}..{hi}" if hi is not None else (
            "a positive integer" if lo == 1 else f"an integer >= {lo}")
        raise ValueError(f"{kind} transport: {key} must be {what}, got {value!r}")
    return value


def _seconds(kind: str, key: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
        math.isfinite(value) and value > 0
    ):
        raise ValueError(f"{kind} transport: {key} must be a positive number of seconds, got {value!r}")
    return float(value)


def _bool(kind: str, key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"{kind} transport: {key} must be true or false, got {value!r}")
    return value


def _text(kind: str, key: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ValueError(f"{kind} transport: {key} must be a non-empty string, got {value!r}")
    return value


def validate_settings(kind: str, settings: dict[str, Any]) -> dict[str, Any]:
    """Check a device's transport settings; return constructor keyword arguments."""
    if kind not in TRANSPORT_KEYS:
        raise ValueError(
            f"unknown transport kind {kind!r} (expected one of {', '.join(TRANSPORT_KEYS)})"
        )
    if not isinstance(settings, dict):
        raise ValueError(f"{kind} transport: settings must be a table, got {type(settings).__name__}")
    allowed = TRANSPORT_KEYS[kind]
    for key in settings:
        if key not in allowed:
            raise ValueError(
                f"{kind} transport: unknown setting {key!r} (allowed: {', '.join(allowed)})"
            )
    out: dict[str, Any] = {}
    s = settings
    if kind == "serial":
        if "port" not in s:
            raise ValueError("serial transport: port is required (e.g. /dev/ttyUSB0)")
        out["port"] = _text(kind, "port", s["port"])
        if "baudrate" in s:
            out["baudrate"] = _int(kind, "baudrate", s["baudrate"], 1)
        if "bytesize" in s:
            out["bytesize"] = _int(kind, "bytesize", s["bytesize"], 5, 8)
        if "parity" in s:
            p = s["parity"]
            if not isinstance(p, str) or p.lower() not in _PARITY:
                raise ValueError(
                    f"serial transport: parity must be one of N, E, O, M, S, got {p!r}"
                )
            out["parity"] = _PARITY[p.lower()]
        if "stopbits" in s:
            sb = s["stopbits"]
            if isinstance(sb, bool) or sb not in (1, 1.5, 2):
                raise ValueError(f"serial transport: stopbits must be 1, 1.5 or 2, got {sb!r}")
            out["stopbits"] = int(sb) if sb != 1.5 else 1.5
        for key in ("rtscts", "xonxoff", "exclusive"):
            if key in s:
                out[key] = _bool(kind, key, s[key])
    else:
        for key in ("host", "port"):
            if key not in s:
                raise ValueError(f"{kind} transport: {key} is required")
        out["host"] = _text(kind, "host", s["host"])
        out["port"] = _int(kind, "port", s["port"], 1, 65535)
        if "connect_timeout" in s:
            out["connect_timeout"] = _seconds(kind, "connect_timeout", s["connect_timeout"])
    lo = _seconds(kind, "reconnect_min", s["reconnect_min"]) if "reconnect_min" in s else None
    hi = _seconds(kind, "reconnect_max", s["reconnect_max"]) if "reconnect_max" in s else None
    if lo is not None or hi is not None:
        lo = lo if lo is not None else min(Backoff.initial, hi or Backoff.initial)
        hi = hi if hi is not None else max(Backoff.maximum, lo)
        if hi < lo:
            raise ValueError(
                f"{kind} transport: reconnect_max ({hi}) must be >= reconnect_min ({lo})"
            )
        out["backoff"] = Backoff(initial=lo, maximum=hi)
    return out


_KINDS: dict[str, type[Transport]] = {
    "serial": SerialTransport,
    "tcp": TcpTransport,
    "udp": UdpTransport,
}


def make_transport(
    kind: str,
    settings: dict[str, Any],
    *,
    on_data: DataCallback = _noop,
    on_connected: ConnectedCallback = _noop,
    on_disconnected: DisconnectedCallback = _noop,
    logger: logging.Logger | logging.LoggerAdapter | None = None,
    backoff: Backoff | None = None,
) -> Transport:
    """Validate ``settings`` for ``kind`` and build the transport (not yet opened).

    An explicit ``backoff`` overrides ``reconnect_min``/``reconnect_max`` from settings.
    """
    kwargs = validate_settings(kind, settings)
    if backoff is not None:
        kwargs["backoff"] = backoff
    return _KINDS[kind](
        on_data=on_data,
        on_connected=on_connected,
        on_disconnected=on_disconnected,
        logger=logger,
        **kwargs,
    )
