"""The run queue of one driver inside its worker.

Before the process boundary every driver had a thread of its own so that a driver stuck in C
could not stall the hub. A worker process gives that guarantee from outside (the supervisor
kills a worker whose handler overruns its budget), so inside the worker a driver's calls run
on the worker's event loop thread, in order: no thread per driver, no cross-thread wake-up
per event. The interface is the old actor's (`post`, `call`), so the device links and the
datastore glue did not change.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from typing import Any, Callable

log = logging.getLogger("hubhost.worker.actor")


class Actor:
    """Runs posted calls one at a time, in order, on the worker's loop thread."""

    def __init__(self, name: str, loop: asyncio.AbstractEventLoop) -> None:
        self.name = name
        self.loop = loop
        self._thread = threading.get_ident()   # the loop's thread: the worker's main thread
        self.stopped = False

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        if threading.get_ident() == self._thread:
            self.loop.call_soon(self._run, fn, args)
        else:
            self.loop.call_soon_threadsafe(self._run, fn, args)

    def _run(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        if self.stopped and fn != self._stop:
            return
        try:
            fn(*args)
        except Exception:
            log.exception("driver %s: unexpected error in %r", self.name, fn)

    def call(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) after what is already queued; the future holds its result."""
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                if not fut.done():
                    fut.set_exception(e)
            else:
                if not fut.done():
                    fut.set_result(result)

        self.post(run)
        return fut

    def stop(self) -> None:
        """Calls posted after this are dropped (the runtime they were for is gone); calls
        already queued still run, in order (a crash's final flush is one of them)."""
        self.post(self._stop)

    def _stop(self) -> None:
        self.stopped = True
