"""The zygote: a pre-loaded process that forks driver workers.

Started once per hub (`python -m hubhost.worker.zygote`, its control socket on fd 0). It
imports everything a worker needs (lupa, the runtime, device I/O, the datastore glue),
compiles hubhost's own Lua to bytecode by building one throw-away runtime, then calls
`gc.freeze()` so the collector never touches (and so never un-shares) those pages in the
children. Each `fork` request carries the worker's end of a fresh socketpair (SCM_RIGHTS);
the child runs `hubhost.worker.main` on it and never returns here.

The zygote is single-threaded, so forking it is safe. It reaps its children and tells the
supervisor how each one ended. Control messages are one JSON array per SOCK_SEQPACKET
datagram: `["fork", req]` + fd  ->  `["forked", req, pid]`; later `["exit", pid, status]`
(status: exit code, or -signal).
"""

from __future__ import annotations

import ctypes
import gc
import os
import select
import signal
import socket
import sys
import tempfile
from pathlib import Path

import orjson

PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """Linux: get SIGKILL when the parent goes away (a hub that was SIGKILLed leaves no
    orphaned zygote or worker behind)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):
        pass


def preload() -> None:
    """Import the worker's code and compile the bundled Lua once, before any fork."""
    import concurrent.futures.thread  # noqa: F401 - lazy in concurrent.futures; every worker uses it
    import queue  # noqa: F401

    import hubhost.worker.main as worker_main  # noqa: F401 - imported for the children

    from hubhost.sandbox.runtime import DriverRuntime

    class _Port:
        def timer_start(self, *a: object) -> None: ...
        def timer_cancel(self, *a: object) -> None: ...
        def wait_timer(self, *a: object) -> None: ...
        def wait_host(self, *a: object) -> None: ...
        def handler_failed(self, *a: object) -> None: ...

    with tempfile.TemporaryDirectory(prefix="hubhost-zygote-") as tmp:
        d = Path(tmp)
        (d / "init.lua").write_text(
            'local driver_helper = require "driver_helper"\n'
            'local log = require "log"\n'
            'local datastore = require "datastore"\n'
            'local json = require "hubhost.json"\n'
            'return driver_helper.init_tcp { name = "zygote-warm-up" }\n')
        try:
            rt = DriverRuntime("zygote", d, _Port(), max_memory=32 << 20)
            from hubhost.devices import devicelink  # noqa: F401
            rt.sandbox.run_private("devicelink.lua", rt.R, rt.R.caps, rt.sandbox.host,
                                   rt.sandbox.sb, rt.cpu_limit)
            rt.load()
        except Exception:  # noqa: BLE001 - warming up is an optimisation only
            pass
        rt = None

    async def _warm() -> None:   # asyncio's lazy parts, set up once here instead of per worker
        import asyncio
        await asyncio.sleep(0)

    import asyncio
    asyncio.run(_warm())
    gc.collect()
    gc.freeze()


def serve(ctl: socket.socket) -> None:
    children: set[int] = set()
    while True:
        try:
            ready, _, _ = select.select([ctl], [], [], 0.2)
        except InterruptedError:
            ready = []
        _reap(ctl, children)
        if not ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(ctl, 65536, 4)
        except OSError:
            return
        if not data:
            return   # the supervisor is gone
        try:
            msg = orjson.loads(data)
        except orjson.JSONDecodeError:
            for fd in fds:
                os.close(fd)
            continue
        if msg[0] == "fork" and len(fds) == 1:
            pid = os.fork()
            if pid == 0:
                _child(ctl, fds[0])   # never returns
            os.close(fds[0])
            children.add(pid)
            _send(ctl, ["forked", msg[1], pid])
        else:
            for fd in fds:
                os.close(fd)


def _child(ctl: socket.socket, fd: int) -> None:
    code = 70
    try:
        ctl.close()
        # no PR_SET_PDEATHSIG here: a worker outlives a zygote that died (its channel to the
        # supervisor is what it lives by; it exits when that closes)
        from hubhost.worker.main import run_worker
        code = run_worker(fd)
    except BaseException:  # noqa: BLE001 - a worker never unwinds into the zygote's loop
        import traceback
        traceback.print_exc()
    finally:
        os._exit(code)


def _reap(ctl: socket.socket, children: set[int]) -> None:
    while children:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            children.clear()
            return
        if pid == 0:
            return
        children.discard(pid)
        code = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        _send(ctl, ["exit", pid, code])


def _send(ctl: socket.socket, msg: list) -> None:
    try:
        ctl.send(orjson.dumps(msg))
    except OSError:
        pass


def main() -> None:
    die_with_parent()
    if os.getppid() == 1:
        sys.exit(0)
    # the hub's signals are the supervisor's: a Ctrl-C or a SIGTERM to the whole group must
    # not kill workers before the supervisor has asked them to flush
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    ctl = socket.socket(fileno=0)
    try:
        with open("/proc/self/comm", "w") as f:
            f.write("hh-zygote")
    except OSError:
        pass
    preload()
    _send(ctl, ["ready", os.getpid()])
    serve(ctl)


if __name__ == "__main__":
    main()
