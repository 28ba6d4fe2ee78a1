"""Simulated devices that answer like real ones, for the demo and the tests.

They talk over real pseudo-terminals and real loopback sockets, so the transports under
test do exactly what they do with hardware. Both run on the asyncio loop.

ProjectorSimulator (serial, over a pty; every line ends with ``\\r``)::

    PWR ON | PWR OFF | PWR?        -> PWR=ON | PWR=OFF
    SOURCE HDMI1|HDMI2|VGA | SOURCE?  -> SOURCE=HDMI1      (ERR while powered off)
    VOL 0..100 | VOL?              -> VOL=40
    anything else                  -> ERR

DisplaySimulator (TCP on 127.0.0.1; lines end with ``\\r\\n``, a bare ``\\n`` is accepted)::

    power on | power off | power?  -> power=on | power=off    ("power ?" works too)
    input hdmi1|hdmi2|dp | input?  -> input=hdmi1
    volume 0..100 | volume?        -> volume=40
    anything else                  -> error: unknown command
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import tempfile
import tty


class _LineDevice:
    """Shared state machine: a powered device with an input and a volume."""

    inputs: tuple[str, ...] = ()

    def __init__(self) -> None:
        self.power = False
        self.input = self.inputs[0] if self.inputs else ""
        self.volume = 40
        self.received: list[bytes] = []
        self.mute = False  # True: swallow commands without answering (to test timeouts)


class ProjectorSimulator(_LineDevice):
    """A projector behind a pseudo-terminal; ``port`` is a stable path (a symlink).

    ``unplug()`` closes the pty and removes the link like a USB adapter pulled out;
    ``replug()`` makes a new pty behind the same link.
    """

    inputs = ("HDMI1", "HDMI2", "VGA")
    max_pending = 1 << 20

    def __init__(self, *, link_name: str = "ttyPROJ0") -> None:
        super().__init__()
        self._dir = tempfile.mkdtemp(prefix="hubhost-sim-")
        self.port = os.path.join(self._dir, link_name)
        self.slave_path: str | None = None
        self._master: int | None = None
        self._slave: int | None = None
        self._buf = bytearray()
        self._out = bytearray()
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def plugged(self) -> bool:
        return self._master is not None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._plug()

    async def stop(self) -> None:
        self._unplug()
        shutil.rmtree(self._dir, ignore_errors=True)

    async def unplug(self) -> None:
        self._unplug()

    async def replug(self) -> None:
        if self._master is None:
            self._plug()

    def notify(self, line: bytes) -> None:
        """Send an unsolicited line (``\\r`` appended), like a status push."""
        self._write(line + b"\r")

    def _plug(self) -> None:
        master, slave = os.openpty()
        # Raw from the start, and keep our slave end open: the master then never sees EIO
        # while the driver's side is closed between reconnects.
        tty.setraw(slave)
        os.set_blocking(master, False)
        self._master, self._slave = master, slave
        self.slave_path = os.ttyname(slave)
        self._buf.clear()
        self._out.clear()
        tmp = self.port + ".new"
        if os.path.lexists(tmp):
            os.unlink(tmp)
        os.symlink(self.slave_path, tmp)
        os.replace(tmp, self.port)
        assert self._loop is not None
        self._loop.add_reader(master, self._readable)

    def _unplug(self) -> None:
        if self._master is None:
            return
        assert self._loop is not None
        self._loop.remove_reader(self._master)
        self._loop.remove_writer(self._master)
        if os.path.lexists(self.port):
            os.unlink(self.port)
        for fd in (self._master, self._slave):
            if fd is not None:
                os.close(fd)
        self._master = self._slave = None

    def _readable(self) -> None:
        assert self._master is not None
        try:
            data = os.read(self._master, 4096)
        except BlockingIOError:
            return
        except OSError as exc:
            if exc.errno == errno.EIO:
                return
            raise
        self._buf += data
        while True:
            pos = self._buf.find(b"\r")
            if pos < 0:
                break
            line = bytes(self._buf[:pos])
            del self._buf[:pos + 1]
            if not line:
                continue
            self.received.append(line)
            if not self.mute:
                self._write(self.answer(line) + b"\r")
        if len(self._buf) > 4096:  # garbage without CR: a real device would drop it too
            self._buf.clear()

    def answer(self, line: bytes) -> bytes:
        """The projector's reply to one command line (without the CR)."""
        if line == b"PWR ON":
            self.power = True
        elif line == b"PWR OFF":
            self.power = False
        elif line == b"PWR?":
            pass
        elif line.startswith(b"SOURCE"):
            if not self.power:
                return b"ERR"
            arg = line[len(b"SOURCE"):].strip().decode("ascii", "replace")
            if arg != "?":
                if arg not in self.inputs:
                    return b"ERR"
                self.input = arg
            return f"SOURCE={self.input}".encode()
        elif line.startswith(b"VOL"):
            arg = line[len(b"VOL"):].strip()
            if arg != b"?":
                if not arg.isdigit() or int(arg) > 100:
                    return b"ERR"
                self.volume = int(arg)
            return f"VOL={self.volume}".encode()
        else:
            return b"ERR"
        return b"PWR=ON" if self.power else b"PWR=OFF"

    def _write(self, data: bytes) -> None:
        if self._master is None:
            return
        if len(self._out) + len(data) > self.max_pending:
            return  # nobody is reading; a real device would lose it as well
        self._out += data
        self._flush()

    def _flush(self) -> None:
        assert self._master is not None and self._loop is not None
        try:
            n = os.write(self._master, self._out)
        except BlockingIOError:
            n = 0
        except OSError as exc:
            if exc.errno != errno.EIO:
                raise
            n = len(self._out)  # no reader: gone, like bytes on an unconnected line
        del self._out[:n]
        if self._out:
            self._loop.add_writer(self._master, self._writable)
        else:
            self._loop.remove_writer(self._master)

    def _writable(self) -> None:
        if self._master is not None:
            self._flush()


class DisplaySimulator(_LineDevice):
    """A display with a text protocol on a loopback TCP port.

    ``port=0`` picks a free port at the first ``start()``; later starts reuse it, so
    ``stop()`` + ``start()`` looks like a device reboot. ``drop_clients()`` closes the
    connections but keeps listening (a peer close).
    """

    inputs = ("hdmi1", "hdmi2", "dp")

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__()
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def clients(self) -> int:
        return len(self._writers)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._serve, self.host, self.port, reuse_address=True
        )
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self.drop_clients()
        if self._server is not None:
            await self._server.wait_closed()
            self._server = None

    def drop_clients(self) -> None:
        for w in list(self._writers):
            w.close()
        self._writers.clear()

    def notify(self, line: bytes) -> None:
        """Push an unsolicited line to every client."""
        for w in self._writers:
            w.write(line + b"\r\n")

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            while True:
                try:
                    raw = await reader.readuntil(b"\n")
                except asyncio.IncompleteReadError:
                    break
                except asyncio.LimitOverrunError:
                    await reader.read(65536)  # overlong garbage: drop it
                    continue
                line = raw.rstrip(b"\r\n")
                if not line:
                    continue
                self.received.append(line)
                if not self.mute:
                    writer.write(self.answer(line) + b"\r\n")
        except (ConnectionError, OSError):
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    def answer(self, line: bytes) -> bytes:
        """The display's reply to one command line (without the line end)."""
        words = line.decode("ascii", "replace").split()
        if len(words) == 1 and words[0].endswith("?"):
            words = [words[0][:-1], "?"]  # "power?" is the same query as "power ?"
        if len(words) != 2:
            return b"error: unknown command"
        cmd, arg = words
        if cmd == "power":
            if arg in ("on", "off"):
                self.power = arg == "on"
            elif arg != "?":
                return b"error: power takes on, off or ?"
            return b"power=on" if self.power else b"power=off"
        if cmd == "input":
            if arg != "?":
                if arg not in self.inputs:
                    return b"error: unknown input"
                self.input = arg
            return f"input={self.input}".encode()
        if cmd == "volume":
            if arg != "?":
                if not arg.isdigit() or int(arg) > 100:
                    return b"error: volume takes 0..100"
                self.volume = int(arg)
            return f"volume={self.volume}".encode()
        return b"error: unknown command"
