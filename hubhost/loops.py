"""Scheduling onto an event loop from wherever the caller is.

Inside a worker every driver call runs on the loop's own thread, where `call_soon` is
enough; `call_soon_threadsafe` would write to the loop's self-pipe and wake its selector on
every event (a system call each way). Code shared with threads (writer threads of the
datastore) still needs the thread-safe form: this picks the right one.
"""

from __future__ import annotations

import asyncio
from typing import Any, Callable


def soon(loop: asyncio.AbstractEventLoop, fn: Callable[..., Any], *args: Any) -> None:
    try:
        running = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        loop.call_soon(fn, *args)
    else:
        loop.call_soon_threadsafe(fn, *args)
