"""A thread per driver: the driver's Lua runs there, so a busy or stuck driver never stalls
the event loop or the other drivers (lupa releases the GIL while Lua runs)."""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from typing import Any, Callable

log = logging.getLogger("hubhost.worker.actor")
_STOP = object()


class Actor:
    """Runs posted calls one at a time, in order, on its own thread."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._inbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.busy_since: float | None = None  # monotonic start of the running call
        self.busy_what: str = ""
        self.abandoned = False
        self._thread = threading.Thread(target=self._run, name=f"driver-{name}", daemon=True)
        self._thread.start()

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        self._inbox.put((fn, args))

    def _run(self) -> None:
        inbox = self._inbox
        while True:
            item = inbox.get()
            if item is _STOP:
                return
            fn, args = item
            self.busy_since = time.monotonic()
            try:
                fn(*args)
            except Exception:
                log.exception("driver %s: unexpected error in %r", self.name, fn)
            finally:
                self.busy_since = None
            if self.abandoned:
                return

    def call(self, loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> asyncio.Future:
        """Run fn(*args) on the actor's thread; the future resolves on `loop`."""
        fut = loop.create_future()

        def run() -> None:
            try:
                result = fn(*args)
            except BaseException as e:  # noqa: BLE001 - handed to the awaiting task
                loop.call_soon_threadsafe(_set_exc, fut, e)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self.post(run)
        return fut

    def stop(self) -> None:
        self._inbox.put(_STOP)

    def join(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def busy_for(self) -> float:
        b = self.busy_since
        return time.monotonic() - b if b is not None else 0.0


def _set_result(fut: asyncio.Future, value: Any) -> None:
    if not fut.done():
        fut.set_result(value)


def _set_exc(fut: asyncio.Future, exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
