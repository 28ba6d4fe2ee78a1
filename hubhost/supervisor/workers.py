"""Worker processes as the supervisor sees them: the zygote that forks them, and one handle
per worker with its channel, its heartbeat and its death.

Nothing a worker sends is trusted: every message is checked for shape and for what that
worker may speak about (its own drivers and devices), within size caps; a message that does
not pass is a protocol violation and the worker is killed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Any, Callable

import orjson

from hubhost.worker.channel import AsyncChannel, ProtocolError

log = logging.getLogger("hubhost.supervisor.workers")

FORK_TIMEOUT = 5.0   # seconds for the zygote to fork a worker before it is replaced


class Zygote:
    """The pre-loaded process workers are forked from (hubhost/worker/zygote.py)."""

    def __init__(self) -> None:
        self.proc: subprocess.Popen | None = None
        self.ctl: socket.socket | None = None
        self._forks: dict[int, asyncio.Future] = {}
        self._ready: asyncio.Future | None = None
        self._req = 0
        self.on_exit: Callable[[int, int], None] = lambda pid, code: None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.proc = subprocess.Popen([sys.executable, "-m", "hubhost.worker.zygote"],
                                     stdin=child, close_fds=True)
        child.close()
        parent.setblocking(False)
        self.ctl = parent
        self._ready = self.loop.create_future()
        self.loop.add_reader(parent.fileno(), self._readable)
        try:
            await asyncio.wait_for(asyncio.shield(self._ready), 60.0)
        except asyncio.TimeoutError:
            raise RuntimeError("the worker zygote did not start within 60 s") from None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None and self.ctl is not None

    def _readable(self) -> None:
        assert self.ctl is not None
        while True:
            try:
                data = self.ctl.recv(65536)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._lost()
                return
            try:
                msg = orjson.loads(data)
            except orjson.JSONDecodeError:
                continue
            kind = msg[0]
            if kind == "ready" and self._ready and not self._ready.done():
                self._ready.set_result(msg[1])
            elif kind == "forked":
                fut = self._forks.pop(msg[1], None)
                if fut is not None and not fut.done():
                    fut.set_result(int(msg[2]))
            elif kind == "exit":
                self.on_exit(int(msg[1]), int(msg[2]))

    def _lost(self) -> None:
        if self.loop is not None and self.ctl is not None:
            self.loop.remove_reader(self.ctl.fileno())
            self.ctl.close()
        self.ctl = None
        for fut in self._forks.values():
            if not fut.done():
                fut.set_exception(RuntimeError("the worker zygote exited"))
        self._forks.clear()
        if self._ready is not None and not self._ready.done():
            self._ready.set_exception(RuntimeError("the worker zygote exited while starting"))

    async def fork(self) -> tuple[int, socket.socket]:
        """A new worker: its pid and the supervisor's end of its channel."""
        if not self.alive:
            if self.ctl is not None:
                self._lost()
            log.warning("the worker zygote is gone; starting a new one")
            await self.start()
        assert self.ctl is not None and self.loop is not None
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        self._req += 1
        req = self._req
        fut = self.loop.create_future()
        self._forks[req] = fut
        try:
            socket.send_fds(self.ctl, [orjson.dumps(["fork", req])], [theirs.fileno()])
        finally:
            theirs.close()
        try:
            pid = await asyncio.wait_for(fut, FORK_TIMEOUT)
        except asyncio.TimeoutError:
            ours.close()
            self._forks.pop(req, None)
            log.error("the worker zygote did not fork within %g s; replacing it", FORK_TIMEOUT)
            self.replace()
            raise RuntimeError(f"the worker zygote did not answer within {FORK_TIMEOUT:g} s "
                               "(it was replaced)") from None
        return pid, ours

    def replace(self) -> None:
        """Kill an unresponsive zygote; the next fork starts a new one (running workers do
        not depend on it)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            try:
                self.proc.wait(2.0)
            except subprocess.TimeoutExpired:
                pass
        if self.ctl is not None:
            self._lost()

    async def stop(self) -> None:
        if self.ctl is not None and self.loop is not None:
            self.loop.remove_reader(self.ctl.fileno())
            self.ctl.close()
            self.ctl = None
        if self.proc is not None:
            try:
                self.proc.wait(2.0)   # it exits when its control socket closes
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


PAGE = os.sysconf("SC_PAGE_SIZE")


def anon_memory(pid: int) -> int | None:
    """Resident anonymous bytes of a process (resident minus file-backed, from
    /proc/<pid>/statm): its heaps, the Lua state and the pages it still shares with the
    zygote. Cheap enough to read for every worker every second (smaps_rollup, which would
    tell shared from private, costs milliseconds per read)."""
    try:
        with open(f"/proc/{pid}/statm", "rb") as f:
            fields = f.read().split()
    except OSError:
        return None
    return (int(fields[1]) - int(fields[2])) * PAGE


def describe_exit(code: int | None) -> str:
    if code is None:
        return "exited"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name}"
    return f"exited with status {code}"


def kill(pid: int | None, pidfd: int | None) -> None:
    if pidfd is not None:
        try:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
            return
        except (OSError, AttributeError):
            pass
    if pid:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def open_pidfd(pid: int) -> int | None:
    try:
        return os.pidfd_open(pid)
    except (OSError, AttributeError):
        return None


async def read_messages(ch: AsyncChannel, handle: Callable[[list[Any], bytes], None]) -> str | None:
    """Feed every message to `handle` until end of stream; returns a protocol violation's
    description, or None at a clean end."""
    while True:
        try:
            got = await ch.recv()
        except ProtocolError as e:
            return str(e)
        if got is None:
            return None
        try:
            handle(*got)
        except ProtocolError as e:
            return str(e)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            return f"a malformed {str(got[0][0])[:40]!r} message ({type(e).__name__}: {e})"


__all__ = ["Zygote", "anon_memory", "describe_exit", "kill", "open_pidfd", "read_messages", "time"]
