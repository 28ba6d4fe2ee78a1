"""Transports end to end: Lua drivers in a running hub talking to real ptys, loopback TCP
and UDP peers (issue 5). Every byte goes through the real transport, the framer, the
request queue, the driver thread and the sandboxed Lua handlers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import tty
from pathlib import Path
from typing import Callable

import pytest

from hubhost import config as config_mod
from hubhost.devices.simulators import ProjectorSimulator
from hubutil import run, running_hub, write_config, write_driver

pytestmark = pytest.mark.timeout(60)

FAST = "reconnect_min = 0.05\nreconnect_max = 0.2"

# Every byte value, in frames that never contain the CR LF delimiter (13 is followed by 14).
FRAMES = [bytes((i + k) % 256 for i in range(256)) for k in range(0, 256, 16)]


async def until(pred: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not pred():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.005)


# -- device peers under test control ------------------------------------------------------


class TcpPeer:
    """A device on 127.0.0.1: records what the hub sends; answers via `responder`.

    `responder(line)` returns the lines to send back for one received line (split at
    `sep`); `hold` queues lines unanswered until `release()`.
    """

    def __init__(self, sep: bytes = b"\n", responder: Callable[[bytes], list[bytes]] | None = None) -> None:
        self.sep = sep
        self.responder = responder
        self.port = 0
        self.raw = bytearray()
        self.lines: list[bytes] = []
        self.hold = False
        self.held: list[bytes] = []
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None
        self.connections = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", self.port, reuse_address=True)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        self.drop()
        if self.server is not None:
            await self.server.wait_closed()
            self.server = None

    def drop(self) -> None:
        for w in list(self.writers):
            w.close()
        self.writers.clear()

    async def send(self, data: bytes) -> None:
        await until(lambda: bool(self.writers), "a client")
        for w in list(self.writers):
            w.write(data)
            await w.drain()

    def release(self) -> None:
        self.hold = False
        held, self.held = self.held, []
        for line in held:
            self._answer(line)

    def _answer(self, line: bytes) -> None:
        if self.responder is None:
            return
        for out in self.responder(line):
            for w in self.writers:
                w.write(out + self.sep)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.add(writer)
        self.connections += 1
        buf = b""
        try:
            while data := await reader.read(65536):
                self.raw += data
                buf += data
                while self.sep in buf:
                    line, buf = buf.split(self.sep, 1)
                    self.lines.append(line)
                    if self.hold:
                        self.held.append(line)
                    else:
                        self._answer(line)
        except (ConnectionError, OSError):
            pass
        finally:
            self.writers.discard(writer)
            writer.close()


class UdpPeer(asyncio.DatagramProtocol):
    """A UDP device on 127.0.0.1: records datagrams, answers `ping` with `pong`."""

    def __init__(self) -> None:
        self.datagrams: list[bytes] = []
        self.addr: tuple[str, int] | None = None
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        self.addr = addr
        self.datagrams.append(data)
        if data == b"ping":
            assert self.transport is not None
            self.transport.sendto(b"pong", addr)


class PtyPeer:
    """A serial device: the master end of a real pty; the driver opens the slave path."""

    def __init__(self) -> None:
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)
        os.set_blocking(self.master, False)
        self.path = os.ttyname(self.slave)
        self.raw = bytearray()

    def start(self) -> None:
        asyncio.get_running_loop().add_reader(self.master, self._readable)

    def _readable(self) -> None:
        try:
            self.raw += os.read(self.master, 65536)
        except (BlockingIOError, OSError):
            pass

    async def send(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.master, view)
            except BlockingIOError:
                n = 0
            view = view[n:]
            if view:
                await asyncio.sleep(0.001)

    def close(self) -> None:
        asyncio.get_running_loop().remove_reader(self.master)
        os.close(self.master)
        os.close(self.slave)


def hub_config(tmp_path: Path, driver: str, device: str, *, extra: str = "") -> Path:
    return write_config(tmp_path / "hub.toml", f"""
        [[drivers]]
        id = "drv"
        path = "{driver}"
        {extra}

        [[drivers.devices]]
        id = "dev"
        {device}
    """)


def connected_history(sup) -> list[str]:
    """Record every change of dev's `connected` status ("true"/"false")."""
    seen: list[str] = []
    sup.status.add_listener(lambda d, n, v: seen.append(v) if (d, n) == ("dev", "connected") else None)
    return seen


# -- all 256 byte values, each framing mode, each transport ---------------------------------

ECHO = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local n = 0
    return driver_helper.{init} {{
      name = "echo",
      framing = {framing},
      lifecycle = {{
        connected = function(driver, device) log.info("EV connected") end,
      }},
      on_receive = function(driver, device, frame)
        n = n + 1
        device.status.frames = n
        device:send({encode})
      end,
    }}
"""

TOKENIZER = """{ pattern = function(buf)
          if #buf < 2 then return nil end
          local n = buf:byte(1) * 256 + buf:byte(2)
          if #buf < 2 + n then return nil end
          return buf:sub(3, 2 + n), buf:sub(3 + n)
        end }"""

MODES = {
    # name: (framing table, Lua re-encoding of a frame, Python encoding)
    "delimiter": ('{ delimiter = "\\r\\n" }', 'frame .. "\\r\\n"', lambda f: f + b"\r\n"),
    "length": ("{ length = 256 }", "frame", lambda f: f),
    "pattern": (TOKENIZER, 'string.char(math.floor(#frame / 256), #frame % 256) .. frame',
                lambda f: len(f).to_bytes(2, "big") + f),
}


async def _echo_exchange(sup, peer, encode) -> None:
    """Many frames in one write, then frames split at every awkward place."""
    await until(lambda: sup.status.get("dev", "connected") == "true", "connected")
    wire = b"".join(encode(f) for f in FRAMES)
    await peer.send(wire)                                       # many frames per read
    await until(lambda: len(peer.raw) >= len(wire), "echo of the batch")
    assert bytes(peer.raw) == wire
    peer.raw.clear()
    for f in FRAMES[:4]:
        data = encode(f)
        for cut in (1, 255, len(data) - 1):                     # incl. inside CR LF
            await peer.send(data[:cut])
            await asyncio.sleep(0.02)
            await peer.send(data[cut:])
    expected = b"".join(encode(f) * 3 for f in FRAMES[:4])
    await until(lambda: len(peer.raw) >= len(expected), "echo of the split frames")
    assert bytes(peer.raw) == expected
    assert sup.status.get("dev", "frames") == str(len(FRAMES) + 12)


@pytest.mark.parametrize("mode", list(MODES))
def test_all_byte_values_round_trip_over_tcp(tmp_path: Path, mode: str) -> None:
    framing, lua_encode, encode = MODES[mode]
    write_driver(tmp_path, "echo", ECHO.format(init="init_tcp", framing=framing, encode=lua_encode))

    async def main() -> None:
        peer = TcpPeer()
        await peer.start()
        cfg = hub_config(tmp_path, "echo", f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await _echo_exchange(sup, peer, encode)
                assert not cap.errors()
        finally:
            await peer.stop()

    run(main())


@pytest.mark.parametrize("mode", list(MODES))
def test_all_byte_values_round_trip_over_a_pty(tmp_path: Path, mode: str) -> None:
    framing, lua_encode, encode = MODES[mode]
    write_driver(tmp_path, "echo", ECHO.format(init="init_serial", framing=framing, encode=lua_encode))

    async def main() -> None:
        peer = PtyPeer()
        peer.start()
        cfg = hub_config(tmp_path, "echo", f'transport = "serial"\nport = "{peer.path}"\nbaudrate = 115200\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await _echo_exchange(sup, peer, encode)
                assert not cap.errors()
        finally:
            peer.close()

    run(main())


UDP_DRIVER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init_udp {
      name = "udp-echo",
      lifecycle = {
        connected = function(driver, device)
          local answer, err = device:request("ping", { timeout = 1 })
          log.info("EV ping", answer, err)
        end,
      },
      on_receive = function(driver, device, datagram) device:send(datagram) end,
    }
"""


def test_udp_datagrams_round_trip_and_request(tmp_path: Path) -> None:
    write_driver(tmp_path, "udp", UDP_DRIVER)

    async def main() -> None:
        loop = asyncio.get_running_loop()
        transport, peer = await loop.create_datagram_endpoint(UdpPeer, local_addr=("127.0.0.1", 0))
        port = transport.get_extra_info("sockname")[1]
        cfg = hub_config(tmp_path, "udp", f'transport = "udp"\nhost = "127.0.0.1"\nport = {port}\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await cap.wait_for("EV ping pong nil")            # request answered over UDP
                assert peer.datagrams == [b"ping"] and peer.addr is not None
                for f in FRAMES:                                   # each datagram is a frame
                    transport.sendto(f, peer.addr)
                await until(lambda: len(peer.datagrams) == 1 + len(FRAMES), "echoed datagrams")
                assert sorted(peer.datagrams[1:]) == sorted(FRAMES)
                assert sup.status.get("dev", "connected") == "true"
        finally:
            transport.close()

    run(main())


# -- the request queue through Lua ---------------------------------------------------------

SCRIPTED = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    local items = {}
    return driver_helper.init_tcp {
      name = "scripted",
      framing = { delimiter = "\\n" },
      lifecycle = {
        connected = function(driver, device)
          log.info("EV connected", tostring(device.status.connected))
          for _, step in ipairs(device.config.script or {}) do
            driver:call_with_delay(step.at, function()
              local opts = {}
              for _, k in ipairs({ "timeout", "retries", "priority", "name", "match" }) do
                opts[k] = step[k]
              end
              log.info("SUBMIT", step.data)
              local answer, err = device:request(step.data .. "\\n", opts)
              log.info("RESULT", step.data, tostring(answer), tostring(err),
                       tostring(device.status.connected))
            end)
          end
        end,
        disconnected = function(driver, device, reason)
          local ok, err = pcall(device.send, device, "x")
          log.info("EV disconnected", reason, tostring(device.status.connected), err)
        end,
      },
      on_receive = function(driver, device, frame)
        log.info("RECV", frame)
        if frame == "END" then
          device:answer(table.concat(items, ","))
          items = {}
        elseif frame:sub(1, 5) == "item:" then
          items[#items + 1] = frame:sub(6)
        end
      end,
    }
"""


def _script(steps: list[str]) -> str:
    return "config = { script = [" + ", ".join(steps) + "] }"


def _results(cap) -> dict[str, tuple[str, str]]:
    out = {}
    for line in cap.lines("RESULT "):
        _, data, answer, err, _ = line.split("] ", 1)[1].split(" ", 4)
        out[data] = (answer, err)
    return out


def test_request_order_priority_and_named_replacement(tmp_path: Path) -> None:
    write_driver(tmp_path, "scripted", SCRIPTED)
    steps = [
        '{ at = 0.01, data = "first" }',
        '{ at = 0.03, data = "low1" }',
        '{ at = 0.04, data = "high", priority = 5 }',
        '{ at = 0.05, data = "vol1", name = "vol" }',
        '{ at = 0.06, data = "mid", priority = 1 }',
        '{ at = 0.07, data = "vol2", name = "vol" }',
        '{ at = 0.08, data = "vol3", name = "vol" }',
        '{ at = 0.09, data = "low2" }',
    ]

    async def main() -> None:
        peer = TcpPeer(responder=lambda line: [b"ok:" + line])
        peer.hold = True
        await peer.start()
        cfg = hub_config(tmp_path, "scripted",
                         f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}\n{_script(steps)}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await cap.wait_for("SUBMIT", count=len(steps))
                await cap.wait_for("RESULT vol2")                 # replaced while queued
                await asyncio.sleep(0.1)
                assert peer.lines == [b"first"]                   # one request in flight
                peer.release()
                await cap.wait_for("RESULT", count=len(steps))
                assert peer.lines == [b"first", b"high", b"mid", b"low1", b"vol3", b"low2"]
                results = _results(cap)
                for data in ("first", "high", "mid", "low1", "vol3", "low2"):
                    assert results[data] == (f"ok:{data}", "nil"), data   # its own answer
                assert results["vol1"] == ("nil", "replaced")
                assert results["vol2"] == ("nil", "replaced")
                await peer.send(b"unsolicited\n")                 # no request in flight
                await cap.wait_for("RECV unsolicited")
                assert not cap.lines("RECV ok:")                  # answers never reach on_receive
        finally:
            await peer.stop()

    run(main())


def test_request_timeout_retries_matching_and_explicit_answer(tmp_path: Path) -> None:
    write_driver(tmp_path, "scripted", SCRIPTED)
    steps = [
        '{ at = 0.01, data = "ping", timeout = 0.1, retries = 2 }',
        '{ at = 0.02, data = "vol?", match = "volume=" }',
        '{ at = 0.03, data = "list?", match = "never" }',
    ]

    def respond(line: bytes) -> list[bytes]:
        if line == b"vol?":
            return [b"temp=41", b"volume=30"]
        if line == b"list?":
            return [b"item:a", b"item:b", b"END"]
        return []

    async def main() -> None:
        peer = TcpPeer(responder=respond)
        await peer.start()
        cfg = hub_config(tmp_path, "scripted",
                         f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}\n{_script(steps)}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await cap.wait_for("RESULT", count=3)
                results = _results(cap)
                assert results["ping"] == ("nil", "timeout")
                assert peer.lines[:3] == [b"ping"] * 3             # sent, then 2 retries
                assert results["vol?"] == ("volume=30", "nil")
                assert results["list?"] == ("a,b", "nil")           # device:answer from on_receive
                assert cap.lines("RECV ") and [ln.split("RECV ")[1] for ln in cap.lines("RECV ")] == [
                    "temp=41", "item:a", "item:b", "END"]
        finally:
            await peer.stop()

    run(main())


# -- connection life -----------------------------------------------------------------------


def test_peer_close_and_server_restart(tmp_path: Path) -> None:
    write_driver(tmp_path, "scripted", SCRIPTED)
    steps = [f'{{ at = 0.01, data = "q{i}", timeout = 30 }}' for i in range(3)]

    async def main() -> None:
        peer = TcpPeer(responder=lambda line: [b"ok:" + line])
        peer.hold = True
        await peer.start()
        cfg = hub_config(tmp_path, "scripted",
                         f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}\n{_script(steps)}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                history = connected_history(sup)
                await cap.wait_for("SUBMIT", count=3)
                await until(lambda: len(peer.lines) == 1, "a request on the wire")
                peer.drop()                                       # the device closes
                await cap.wait_for("RESULT", count=3)
                # the disconnected handler ran first: requesters see the status already false
                assert [r.split("] ", 1)[1] for r in cap.lines("RESULT")] == [
                    f"RESULT q{i} nil disconnected false" for i in range(3)]
                disc = cap.lines("EV disconnected")[0]
                assert "peer closed false" in disc and "not connected" in disc  # send refused
                await cap.wait_for("EV connected", count=2)       # reconnected by itself
                peer.release()
                await cap.wait_for("RESULT", count=6)             # traffic resumes
                assert all(r.endswith("nil true") for r in cap.lines("RESULT")[3:])

                await peer.stop()                                 # the device reboots
                await cap.wait_for("EV disconnected", count=2)
                assert sup.status.get("dev", "connected") == "false"
                await asyncio.sleep(0.3)                          # refused meanwhile: retrying
                await peer.start()
                await cap.wait_for("EV connected", count=3, timeout=5)
                await cap.wait_for("RESULT", count=9)
                assert [ln.split("] ", 1)[1].split(" ", 2)[1] for ln in cap.lines("EV ")] == [
                    "connected", "disconnected", "connected", "disconnected", "connected"]
                assert history[-4:] == ["false", "true", "false", "true"]
            assert history[-1] == "false"                          # closed at shutdown
        finally:
            await peer.stop()

    run(main())


SERIAL_DRIVER = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init_serial {
      name = "proj",
      framing = { delimiter = "\\r" },
      lifecycle = {
        connected = function(driver, device)
          log.info("EV connected")
          local answer, err = device:request("PWR ON\\r")
          log.info("EV power", answer, err)
        end,
        disconnected = function(driver, device, reason) log.info("EV disconnected", reason) end,
      },
      on_receive = function(driver, device, frame)
        log.info("RECV", frame)
        if frame == "GO" then   -- two requests from two handlers: one in flight, one queued
          driver:call_with_delay(0.01, function()
            log.info("RESULT", "a", device:request("VOL?\\r", { timeout = 30 }))
          end)
          driver:call_with_delay(0.02, function()
            log.info("RESULT", "b", device:request("PWR?\\r", { timeout = 30 }))
          end)
        end
      end,
    }
"""


def test_pty_unplugged_and_replugged(tmp_path: Path) -> None:
    write_driver(tmp_path, "proj", SERIAL_DRIVER)

    async def main() -> None:
        sim = ProjectorSimulator()
        await sim.start()
        cfg = hub_config(tmp_path, "proj",
                         f'transport = "serial"\nport = "{sim.port}"\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                history = connected_history(sup)
                await cap.wait_for("EV power PWR=ON nil")
                sim.mute = True
                sim.notify(b"GO")
                await until(lambda: sim.received[-1:] == [b"VOL?"], "a request on the wire")
                await sim.unplug()                                # USB adapter pulled
                await cap.wait_for("RESULT", count=2)
                assert sorted(ln.split("RESULT ")[1] for ln in cap.lines("RESULT")) == [
                    "a nil disconnected", "b nil disconnected"]
                assert cap.lines("EV disconnected")
                assert sup.status.get("dev", "connected") == "false"
                sim.mute = False
                await sim.replug()                                # and back
                await cap.wait_for("EV power PWR=ON nil", count=2)
                assert sup.status.get("dev", "connected") == "true"
                sim.notify(b"LAMP=OK")
                await cap.wait_for("RECV LAMP=OK")
                assert history[-2:] == ["false", "true"]
        finally:
            await sim.stop()

    run(main())


CRASHY = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init_serial {
      name = "crashy",
      framing = { delimiter = "\\r" },
      lifecycle = { connected = function(driver, device) log.info("EV connected") end },
      on_receive = function(driver, device, frame)
        if frame == "spin" then while true do end end
        log.info("RECV", frame)
        device:send("echo " .. frame .. "\\r")
      end,
    }
"""


def test_crash_closes_the_port_and_the_restart_reopens_it(tmp_path: Path) -> None:
    write_driver(tmp_path, "crashy", CRASHY)

    async def main() -> None:
        peer = PtyPeer()
        peer.start()
        cfg = hub_config(tmp_path, "crashy", f'transport = "serial"\nport = "{peer.path}"\n{FAST}',
                         extra="cpu_limit = 0.02")
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await cap.wait_for("EV connected")
                await peer.send(b"spin\r" * 5)                    # 5 CPU faults: the driver crashes
                await cap.wait_for("driver crashed")
                assert sup.status.get("dev", "connected") == "false"
                await cap.wait_for("EV connected", count=2, timeout=6)  # exclusive port reopened
                await peer.send(b"hello\r")
                await until(lambda: b"echo hello\r" in peer.raw, "echo after the restart")
        finally:
            peer.close()

    run(main())


# -- oversized frames ----------------------------------------------------------------------

FLOOD = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init_tcp {
      name = "flood",
      framing = { delimiter = "\\n", max_frame = 1024 },
      on_receive = function(driver, device, frame) log.info("RECV", #frame, frame:sub(1, 8)) end,
    }
"""


def test_oversized_frame_flood_is_bounded_and_warned_once_per_burst(tmp_path: Path) -> None:
    write_driver(tmp_path, "flood", FLOOD)

    async def main() -> None:
        peer = TcpPeer()
        await peer.start()
        cfg = hub_config(tmp_path, "flood", f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await until(lambda: sup.status.get("dev", "connected") == "true", "connected")
                peak = 0
                for _ in range(64):                               # 4 MiB without a delimiter
                    await peer.send(b"x" * 65536)
                    link = await sup.link_stats("drv", "dev")
                    peak = max(peak, link["buffered"], link["backlog"])
                await peer.send(b"\nok1\n")
                await cap.wait_for("RECV 3 ok1")
                await peer.send(b"".join(b"y" * 5000 + b"\n" for _ in range(50)) + b"ok2\n")
                await cap.wait_for("RECV 3 ok2")
                link = await sup.link_stats("drv", "dev")
                peak = max(peak, link["buffered"])
                assert peak <= 1024 + 2 * 65536, peak             # bounded by max_frame + a read
                warnings = cap.lines("oversized frame")
                assert len(warnings) == 2, warnings               # one per burst
                assert "[drv/dev]" in warnings[0] and "max_frame 1024" in warnings[0]
                assert [ln.split("RECV ")[1] for ln in cap.lines("RECV")] == ["3 ok1", "3 ok2"]
                assert link["dropped_frames"] == 51
        finally:
            await peer.stop()

    run(main())


# -- configuration and template errors -----------------------------------------------------


def test_bad_transport_settings_are_refused_at_load(tmp_path: Path) -> None:
    write_driver(tmp_path, "echo", ECHO.format(init="init_tcp", framing="{}", encode="frame"))
    for device, key, problem in [
        ('transport = "tcp"\nhost = "127.0.0.1"\nport = 70000', "devices[0].port", "1..65535"),
        ('transport = "tcp"\nhost = "127.0.0.1"', "devices[0].port", "port is required"),
        ('transport = "serial"\nport = "/dev/ttyUSB0"\nparity = "X"', "devices[0].parity", "parity"),
        ('transport = "udp"\nhost = "h"\nport = 1\nbaud = 9600', "devices[0].baud", "unknown key"),
    ]:
        cfg = hub_config(tmp_path, "echo", device)
        with pytest.raises(config_mod.ConfigError) as info:
            config_mod.load(cfg)
        msg = str(info.value)
        assert msg.startswith(f"{cfg}: drivers[0].{key}: ") and problem in msg, msg


def test_bad_framing_fails_the_driver_at_load_naming_the_line(tmp_path: Path) -> None:
    write_driver(tmp_path, "bad", """
        local driver_helper = require "driver_helper"
        local driver = driver_helper.init_tcp {
          name = "bad",
          framing = { delimiter = "\\r", length = 4 },
        }
        return driver
    """)
    cfg = hub_config(tmp_path, "bad", 'transport = "tcp"\nhost = "127.0.0.1"\nport = 9')

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("driver crashed")
            msg = cap.lines("driver crashed")[0]
            assert "init.lua:3:" in msg and "template.framing: choose one of" in msg, msg

    run(main())


def test_send_without_connection_and_devices_without_settings(tmp_path: Path) -> None:
    write_driver(tmp_path, "nosettings", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init_tcp {
          name = "nosettings",
          lifecycle = { init = function(driver, device)
            local ok, err = pcall(device.send, device, "x")
            log.info("EV send", tostring(ok), err)
            local ok2, err2 = pcall(device.send, device, 42)
            log.info("EV send2", err2)
            local ok3, err3 = pcall(function() local a = device:request("x", { retries = -1 }) return a end)
            log.info("EV request", err3)
          end },
        }
    """)
    cfg = hub_config(tmp_path, "nosettings", "")
    # a TCP driver's device without transport settings is refused by the config check now
    with pytest.raises(config_mod.ConfigError, match=r"devices\[0\]\.transport: driver 'drv' is built with "
                       r"driver_helper\.init_tcp \(init\.lua:4\), so its devices need a transport"):
        config_mod.load(cfg)
    # ... which leaves the run-time answers for a driver built without a transport
    init = tmp_path / "nosettings" / "init.lua"
    init.write_text(init.read_text().replace("driver_helper.init_tcp", "driver_helper.init"))

    async def main() -> None:
        async with running_hub(cfg, tmp_path / "state") as (sup, cap):
            await cap.wait_for("EV request")
            assert "EV send false" in cap.lines("EV send ")[0] and "dev has no transport" in cap.lines("EV send ")[0]
            assert "data must be a string of bytes, got number" in cap.lines("EV send2")[0]
            assert "retries must be an integer >= 0, got -1" in cap.lines("EV request")[0]
            assert "init.lua:" in cap.lines("EV request")[0]      # names the driver's line

    run(main())


# -- the demo ------------------------------------------------------------------------------


def test_demo_hub_talks_to_its_simulated_devices(tmp_path: Path) -> None:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.Popen(
        [sys.executable, "-m", "hubhost", "run", "--demo", "--state-dir", str(tmp_path / "state")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, text=True)
    lines: list[str] = []
    try:
        assert proc.stdout is not None
        want = {"[projectors/projector-1] power on, input HDMI1, volume 40",
                "[displays/display-1] power on, input hdmi1, volume 40"}
        for line in proc.stdout:
            lines.append(line)
            want = {w for w in want if w not in line}
            if not want:
                break
        assert not want, "".join(lines[-30:])
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=15)
    lines.append(out)
    text = "".join(lines)
    assert proc.returncode == 0, text
    assert "demo: simulated projector for projector-1" in text
    assert "demo: simulated display for display-1 at 127.0.0.1:" in text
    assert "projector connected" in text and "display connected" in text


PATTERN_REQUESTS = """
    local driver_helper = require "driver_helper"
    local log = require "log"
    return driver_helper.init_tcp {
      name = "stx",
      -- frames are STX .. body .. ETX; bytes before an STX are noise; "!" breaks the tokenizer
      framing = { pattern = function(buf)
        if buf:find("!", 1, true) then error("tokenizer refuses '!'") end
        local s = buf:find("\\2", 1, true)
        if not s then return nil, "" end
        local e = buf:find("\\3", s + 1, true)
        if not e then return nil, buf:sub(s) end
        return buf:sub(s + 1, e - 1), buf:sub(e + 1)
      end },
      lifecycle = {
        connected = function(driver, device)
          local answer, err = device:request("\\2Q1\\3")
          log.info("RESULT", answer, err)
        end,
      },
      on_receive = function(driver, device, frame) log.info("RECV", frame) end,
    }
"""


def test_pattern_framing_answers_requests_and_survives_a_failing_tokenizer(tmp_path: Path) -> None:
    write_driver(tmp_path, "stx", PATTERN_REQUESTS)

    async def main() -> None:
        peer = TcpPeer(sep=b"\3", responder=lambda line: [b"noise\2ev:before"] if line == b"\2Q1" else [])
        await peer.start()
        cfg = hub_config(tmp_path, "stx", f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                # the first frame after the request is its answer, cut by the Lua tokenizer
                await cap.wait_for("RESULT ev:before nil")
                await peer.send(b"\2one\3xx\2tw")
                await asyncio.sleep(0.02)
                await peer.send(b"o\3")
                await cap.wait_for("RECV two")
                await peer.send(b"\2bad!\3")                       # tokenizer error: logged once
                await peer.send(b"\2bad!\3")
                await asyncio.sleep(0.1)
                await peer.send(b"\2three\3")
                await cap.wait_for("RECV three")
                assert [ln.split("RECV ")[1] for ln in cap.lines("RECV")] == ["one", "two", "three"]
                errors = [e for e in cap.errors() if "tokenizer" in e]
                assert len(errors) == 1 and "[drv/dev]" in errors[0] and "refuses '!'" in errors[0], errors
        finally:
            await peer.stop()

    run(main())


SLOW = """
    local driver_helper = require "driver_helper"
    local n = 0
    return driver_helper.init_tcp {
      name = "slow",
      framing = { delimiter = "\\n" },
      on_receive = function(driver, device, frame)
        local x = 0
        for i = 1, 2000 do x = x + i end   -- a driver slower than its device
        n = n + 1
        device.status.count = n
      end,
    }
"""


def test_a_slow_driver_pushes_back_on_a_fast_device_instead_of_dropping(tmp_path: Path, monkeypatch) -> None:
    # small limits for the workers of this test's hub (devicelink reads them at start)
    monkeypatch.setenv("HUBHOST_LINK_LIMITS", f"{32 << 10},{8 << 10},{256 << 10}")
    write_driver(tmp_path, "slow", SLOW)
    total = 20000

    async def main() -> None:
        peer = TcpPeer()
        await peer.start()
        cfg = hub_config(tmp_path, "slow", f'transport = "tcp"\nhost = "127.0.0.1"\nport = {peer.port}\n{FAST}')
        try:
            async with running_hub(cfg, tmp_path / "state") as (sup, cap):
                await until(lambda: sup.status.get("dev", "connected") == "true", "connected")
                peak = 0
                sender = asyncio.ensure_future(peer.send(b"".join(b"f%08d\n" % i for i in range(total))))
                while sup.status.get("dev", "count") != str(total):
                    link = await sup.link_stats("drv", "dev")
                    peak = max(peak, link["backlog"])
                    await asyncio.sleep(0.001)
                await sender
                # pushed back, never dropped: at most the limit plus one read (256 KiB of data)
                link = await sup.link_stats("drv", "dev")
                assert link["pauses"] >= 1                         # reading was paused, then
                assert peak <= (256 << 10) + (256 << 10) // 10 * 74, peak
                assert not cap.lines("dropping received data")
                assert cap.lines("reading resumed")
        finally:
            await peer.stop()

    run(main())
