"""Transports against real parts: pty pairs, loopback TCP and UDP, simulated devices."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import tty

import pytest

from hubhost.devices.framing import make_framer
from hubhost.devices.simulators import DisplaySimulator, ProjectorSimulator
from hubhost.devices.transports import (
    Backoff,
    NotConnectedError,
    SendBufferFull,
    SerialTransport,
    TcpTransport,
    Transport,
    UdpTransport,
    make_transport,
)

ALL = bytes(range(256))
FAST = Backoff(initial=0.01, maximum=0.05, stable=0.0)


def run(coro, timeout: float = 15.0):
    return asyncio.run(asyncio.wait_for(coro, timeout))


async def until(pred, what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


def free_port(kind: int = socket.SOCK_STREAM) -> int:
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Recorder:
    """Collects callbacks in order; framing as the driver thread would do it."""

    def __init__(self, framing: dict | None = None, tokenizer=None) -> None:
        self.events: list = []
        self.chunks: list[bytes] = []
        self.framer = make_framer(framing or {}, tokenizer=tokenizer)
        self.frames: list[bytes] = []

    def on_data(self, chunk: bytes) -> None:
        self.chunks.append(chunk)
        self.events.append("data")
        self.frames += self.framer.feed(chunk)

    def on_connected(self) -> None:
        self.events.append("connected")

    def on_disconnected(self, reason: str) -> None:
        self.events.append(("disconnected", reason))

    @property
    def callbacks(self) -> dict:
        return {
            "on_data": self.on_data,
            "on_connected": self.on_connected,
            "on_disconnected": self.on_disconnected,
        }

    def count(self, name: str) -> int:
        return sum(1 for e in self.events if e == name or (isinstance(e, tuple) and e[0] == name))


# -- device ends for the byte-exact round trips ----------------------------------------


class PtyDevice:
    """The device end of a real pty pair; the transport opens the slave path."""

    async def start(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.inbox = bytearray()

    def transport(self, rec: Recorder) -> Transport:
        return SerialTransport(self.path, 115200, backoff=FAST, **rec.callbacks)

    async def write(self, data: bytes) -> None:
        os.write(self.master, data)

    async def read(self, n: int) -> bytes:
        while len(self.inbox) < n:
            try:
                self.inbox += os.read(self.master, 4096)
            except BlockingIOError:
                await asyncio.sleep(0.002)
        out, self.inbox = bytes(self.inbox[:n]), self.inbox[n:]
        return out

    async def stop(self) -> None:
        os.close(self.master)
        os.close(self.slave)


class TcpDevice:
    async def start(self) -> None:
        self.client: asyncio.Future = asyncio.get_running_loop().create_future()
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.client.set_result((r, w))

    def transport(self, rec: Recorder) -> Transport:
        return TcpTransport("127.0.0.1", self.port, backoff=FAST, **rec.callbacks)

    async def write(self, data: bytes) -> None:
        _, w = await self.client
        w.write(data)
        await w.drain()

    async def read(self, n: int) -> bytes:
        r, _ = await self.client
        return await r.readexactly(n)

    async def stop(self) -> None:
        if self.client.done():
            self.client.result()[1].close()
        self.server.close()
        await self.server.wait_closed()


class UdpDevice(asyncio.DatagramProtocol):
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self.peer = None
        self.inbox = bytearray()
        self.sock, _ = await loop.create_datagram_endpoint(lambda: self, local_addr=("127.0.0.1", 0))
        self.port = self.sock.get_extra_info("sockname")[1]

    def datagram_received(self, data: bytes, addr) -> None:
        self.peer = addr
        self.inbox += data

    def transport(self, rec: Recorder) -> Transport:
        return UdpTransport("127.0.0.1", self.port, backoff=FAST, **rec.callbacks)

    async def write(self, data: bytes) -> None:
        self.sock.sendto(data, self.peer)

    async def read(self, n: int) -> bytes:
        await until(lambda: len(self.inbox) >= n, "datagrams")
        out, self.inbox = bytes(self.inbox[:n]), self.inbox[n:]
        return out

    async def stop(self) -> None:
        self.sock.close()


def length_prefixed(buf: bytes):
    if not buf or len(buf) < 1 + buf[0]:
        return None, buf
    return buf[1:1 + buf[0]], buf[1 + buf[0]:]


MODES = {
    # payloads contain all 256 byte values in every mode
    "delimiter": ({"delimiter": b"\xff\x00"}, None, [ALL, ALL[::-1], ALL[::-1][100:] + ALL[::-1][:100]],
                  lambda p: p + b"\xff\x00"),
    "length": ({"length": 256}, None, [ALL, ALL[::-1], ALL[7:] + ALL[:7]], lambda p: p),
    "pattern": ({"pattern": "lenprefix"}, length_prefixed,
                [ALL[:255], ALL[1:], ALL[::-2], b""], lambda p: bytes([len(p)]) + p),
}


@pytest.mark.parametrize("mode", list(MODES))
@pytest.mark.parametrize("device_cls", [PtyDevice, TcpDevice, UdpDevice], ids=["serial", "tcp", "udp"])
def test_all_byte_values_round_trip_in_frames(device_cls, mode):
    framing, tokenizer, payloads, encode = MODES[mode]
    payloads = payloads * 3
    stream = b"".join(encode(p) for p in payloads)

    async def main():
        dev = device_cls()
        await dev.start()
        rec = Recorder(framing, tokenizer)
        t = dev.transport(rec)
        try:
            assert await t.open()
            # Host -> device: bytes arrive exactly as sent.
            for i in range(0, len(stream), 300):
                t.send(stream[i:i + 300])
            assert await dev.read(len(stream)) == stream
            # Device -> host in odd-sized pieces: frames span reads, several share one.
            for i in range(0, len(stream), 333):
                await dev.write(stream[i:i + 333])
                await asyncio.sleep(0.002)
            await until(lambda: len(rec.frames) >= len(payloads), "frames")
            assert rec.frames == payloads
            assert b"".join(rec.chunks) == stream
            assert len(rec.chunks) > 1
        finally:
            await t.close()
            await dev.stop()

    run(main())


# -- serial: a port that vanishes and comes back ------------------------------------------


def test_serial_port_unplugged_and_replugged_is_reopened():
    async def main():
        sim = ProjectorSimulator()
        await sim.start()
        rec = Recorder({"delimiter": b"\r"})
        t = SerialTransport(sim.port, 9600, backoff=FAST, **rec.callbacks)
        try:
            assert await t.open() and t.connected
            t.send(b"PWR ON\r")
            await until(lambda: rec.frames == [b"PWR=ON"], "projector answer")

            await sim.unplug()
            await until(lambda: rec.count("disconnected") == 1, "disconnect")
            assert not t.connected
            with pytest.raises(NotConnectedError, match=r"serial .*ttyPROJ0: cannot send 5 bytes: not connected"):
                t.send(b"PWR?\r")
            await asyncio.sleep(0.1)  # several reopen attempts against a missing path
            assert rec.count("connected") == 1

            await sim.replug()
            await until(lambda: t.connected, "reconnect")
            t.send(b"PWR?\r")
            await until(lambda: len(rec.frames) == 2, "answer after replug")
            assert rec.frames[1] == b"PWR=ON"
            assert rec.events[0] == "connected" and rec.events.count("connected") == 2
            kinds = [e if isinstance(e, str) else e[0] for e in rec.events if e != "data"]
            assert kinds == ["connected", "disconnected", "connected"]
        finally:
            await t.close()
            await sim.stop()

    run(main())


def test_replugged_port_is_reopened_without_waiting_out_the_backoff():
    async def main():
        sim = ProjectorSimulator()
        await sim.start()
        rec = Recorder({"delimiter": b"\r"})
        slow = Backoff(initial=10.0, maximum=10.0, jitter=0.0)
        t = SerialTransport(sim.port, backoff=slow, poll_interval=0.02, **rec.callbacks)
        try:
            await t.open()
            await sim.unplug()
            await until(lambda: rec.count("disconnected") == 1, "disconnect")
            await asyncio.sleep(0.05)
            await sim.replug()
            await until(lambda: t.connected, "reopen well before the 10 s backoff", timeout=3.0)
        finally:
            await t.close()
            await sim.stop()

    run(main())


def test_serial_port_missing_at_open_connects_when_it_appears():
    async def main():
        sim = ProjectorSimulator()  # path known, pty not created yet
        rec = Recorder({"delimiter": b"\r"})
        t = make_transport("serial", {"port": sim.port, "baudrate": 19200}, backoff=FAST,
                           **rec.callbacks)
        try:
            assert await t.open() is False
            assert rec.events == []
            await sim.start()
            await until(lambda: t.connected, "port to appear")
            t.send(b"VOL 55\r")
            await until(lambda: rec.frames == [b"VOL=55"], "answer")
        finally:
            await t.close()
            await sim.stop()

    run(main())


# -- TCP: peer close, refused, server restart ------------------------------------------


def test_tcp_peer_close_reconnects_and_traffic_resumes():
    async def main():
        sim = DisplaySimulator()
        await sim.start()
        rec = Recorder({"delimiter": b"\r\n"})
        t = TcpTransport("127.0.0.1", sim.port, backoff=FAST, **rec.callbacks)
        try:
            await t.open()
            t.send(b"power on\r\n")
            await until(lambda: rec.frames == [b"power=on"], "answer")
            sim.drop_clients()
            await until(lambda: rec.count("disconnected") == 1, "disconnect")
            assert ("disconnected", "peer closed") in rec.events
            await until(lambda: rec.count("connected") == 2, "reconnect")
            t.send(b"power?\r\n")
            await until(lambda: len(rec.frames) == 2, "answer after reconnect")
            assert rec.frames[1] == b"power=on"
        finally:
            await t.close()
            await sim.stop()

    run(main())


def test_tcp_server_restart_logs_one_warning_per_outage(caplog):
    caplog.set_level(logging.DEBUG, logger="test.tcp")

    async def main():
        sim = DisplaySimulator()
        await sim.start()
        rec = Recorder({"delimiter": b"\r\n"})
        t = TcpTransport("127.0.0.1", sim.port, backoff=FAST, logger=logging.getLogger("test.tcp"),
                         **rec.callbacks)
        try:
            await t.open()
            await sim.stop()
            await until(lambda: rec.count("disconnected") == 1, "disconnect")
            await until(
                lambda: sum("cannot connect" in r.message for r in caplog.records) >= 5,
                "several refused attempts",
            )
            assert not t.connected
            warnings = [r for r in caplog.records if r.levelno >= logging.WARNING
                        and "cannot connect" in r.message]
            assert len(warnings) == 1 and "connection refused" in warnings[0].message
            await sim.start()  # same port: the device rebooted
            await until(lambda: rec.count("connected") == 2, "reconnect")
            t.send(b"input hdmi2\r\n")
            await until(lambda: rec.frames == [b"input=hdmi2"], "answer after restart")
        finally:
            await t.close()
            await sim.stop()

    run(main())


def test_tcp_refused_at_open_then_device_appears():
    port = free_port()

    async def main():
        rec = Recorder({"delimiter": b"\r\n"})
        t = make_transport("tcp", {"host": "127.0.0.1", "port": port}, backoff=FAST, **rec.callbacks)
        sim = DisplaySimulator(port=port)
        try:
            assert await t.open() is False
            assert not t.connected and rec.events == []
            await sim.start()
            await until(lambda: t.connected, "connect")
            assert rec.events == ["connected"]
        finally:
            await t.close()
            await sim.stop()

    run(main())


def test_close_reports_closed_once_and_stops_reconnecting():
    async def main():
        sim = DisplaySimulator()
        await sim.start()
        rec = Recorder()
        t = TcpTransport("127.0.0.1", sim.port, backoff=FAST, **rec.callbacks)
        await t.open()
        await until(lambda: sim.clients == 1, "server sees client")
        await t.close()
        assert rec.events == ["connected", ("disconnected", "closed")]
        assert not t.connected
        await asyncio.sleep(0.1)
        assert sim.clients == 0 and rec.events[-1] == ("disconnected", "closed")
        with pytest.raises(NotConnectedError):
            t.send(b"x")
        await sim.stop()

    run(main())


# -- UDP ---------------------------------------------------------------------------------


def test_udp_icmp_refused_is_logged_once_and_socket_kept(caplog):
    caplog.set_level(logging.DEBUG, logger="test.udp")
    port = free_port(socket.SOCK_DGRAM)

    async def main():
        rec = Recorder()
        t = UdpTransport("127.0.0.1", port, backoff=FAST, logger=logging.getLogger("test.udp"),
                         **rec.callbacks)
        dev = UdpDevice()
        try:
            assert await t.open() and t.connected
            for _ in range(5):
                t.send(b"ping")
                await asyncio.sleep(0.01)
            assert t.connected
            errors = [r for r in caplog.records if "send error" in r.message]
            assert errors, "ICMP port unreachable should be reported"
            assert sum(r.levelno >= logging.WARNING for r in errors) == 1
            # The device comes up on that port: the same socket works.
            loop = asyncio.get_running_loop()
            dev.inbox = bytearray()
            dev.peer = None
            dev.sock, _ = await loop.create_datagram_endpoint(lambda: dev, local_addr=("127.0.0.1", port))
            t.send(ALL)
            assert await dev.read(256) == ALL
            await dev.write(ALL[::-1])
            await until(lambda: rec.chunks == [ALL[::-1]], "reply datagram")
            assert rec.events == ["connected", "data"]
        finally:
            await t.close()
            if hasattr(dev, "sock"):
                dev.sock.close()

    run(main())


# -- settings and backoff ----------------------------------------------------------------


@pytest.mark.parametrize(
    "kind, settings, message",
    [
        ("serial", {"port": "/dev/ttyUSB0", "baudrate": "fast"},
         "serial transport: baudrate must be a positive integer, got 'fast'"),
        ("serial", {"port": "/dev/ttyUSB0", "baudrate": 0}, "baudrate must be a positive integer"),
        ("serial", {"baudrate": 9600}, "serial transport: port is required"),
        ("serial", {"port": "/dev/ttyUSB0", "parity": "X"}, "parity must be one of N, E, O, M, S"),
        ("serial", {"port": "/dev/ttyUSB0", "bytesize": 9}, r"bytesize must be an integer in 5\.\.8"),
        ("serial", {"port": "/dev/ttyUSB0", "stopbits": 3}, "stopbits must be 1, 1.5 or 2"),
        ("serial", {"port": "/dev/ttyUSB0", "rtscts": "yes"}, "rtscts must be true or false"),
        ("serial", {"port": "/dev/ttyUSB0", "baud": 9600}, "unknown setting 'baud'"),
        ("tcp", {"host": "10.0.0.5"}, "tcp transport: port is required"),
        ("tcp", {"host": "10.0.0.5", "port": 70000}, r"port must be an integer in 1\.\.65535"),
        ("tcp", {"host": "", "port": 23}, "host must be a non-empty string"),
        ("udp", {"host": "10.0.0.5", "port": 9, "connect_timeout": 1}, "unknown setting 'connect_timeout'"),
        ("tcp", {"host": "h", "port": 1, "reconnect_min": 5, "reconnect_max": 1}, "reconnect_max"),
        ("ble", {}, "unknown transport kind 'ble'"),
    ],
)
def test_make_transport_rejects_bad_settings_naming_the_key(kind, settings, message):
    with pytest.raises(ValueError, match=message):
        make_transport(kind, settings)


def test_make_transport_normalises_good_settings():
    t = make_transport("serial", {"port": "/dev/ttyUSB0", "baudrate": 115200.0, "parity": "even",
                                  "stopbits": 2, "rtscts": True, "reconnect_max": 2})
    assert isinstance(t, SerialTransport)
    assert t.serial_settings["baudrate"] == 115200 and t.serial_settings["parity"] == "E"
    assert t.backoff.maximum == 2.0
    assert isinstance(make_transport("udp", {"host": "::1", "port": 9}), UdpTransport)


def test_backoff_grows_caps_and_jitters():
    b = Backoff(initial=0.1, maximum=30.0, jitter=0.25)
    delays = [b.delay(a) for a in range(40)]
    assert all(0.075 <= d <= 30.0 for d in delays)
    assert delays[0] <= 0.1 and 20 <= delays[-1] <= 30.0
    assert len({round(b.delay(20), 6) for _ in range(20)}) > 1  # jittered
    with pytest.raises(ValueError, match="jitter"):
        Backoff(jitter=1.5)


def test_send_to_a_device_that_does_not_read_is_bounded():
    async def main():
        dev = PtyDevice()
        await dev.start()
        t = SerialTransport(dev.path, max_write_buffer=32768, backoff=FAST)
        try:
            await t.open()
            sent = 0
            with pytest.raises(SendBufferFull, match="is the device reading"):
                for _ in range(10000):  # 10 MB if nothing stopped it
                    t.send(b"\x55" * 1024)
                    sent += 1024
            assert t._aio.get_write_buffer_size() <= 32768
            assert sent < 2_000_000  # write buffer limit plus what the kernel holds
            assert t.connected
        finally:
            await t.close()
            await dev.stop()

    run(main())


def test_close_with_a_peer_that_does_not_read_finishes():
    async def main():
        dev = TcpDevice()
        await dev.start()
        rec = Recorder()
        t = TcpTransport("127.0.0.1", dev.port, max_write_buffer=1 << 16, backoff=FAST,
                         **rec.callbacks)
        await t.open()
        with pytest.raises(SendBufferFull):
            for _ in range(100000):
                t.send(b"\xaa" * 4096)
        loop = asyncio.get_running_loop()
        started = loop.time()
        await t.close()
        assert loop.time() - started < 4.0
        assert rec.events == ["connected", ("disconnected", "closed")]
        await dev.stop()

    run(main())


def test_send_rejects_text():
    t = TcpTransport("127.0.0.1", 1)
    with pytest.raises(TypeError, match="send needs bytes"):
        t.send("PWR ON\r")  # type: ignore[arg-type]
