"""Per-device request queue: one request in flight, matched to the device's reply.

Lives on the asyncio loop (its timers are loop timers); every method must be called on the
loop thread, which is checked so a wrong-thread call fails loudly instead of racing.

Rules (a driver author relies on these through ``device:request``):

* One request is in flight at a time; the next is sent when it is answered, timed out
  after its retries, failed, or cancelled.
* Higher ``priority`` first; FIFO within a priority.
* A request with a ``name`` replaces a still-QUEUED request of the same name, which resolves
  ``(None, "replaced")``. The replacement takes the replaced request's place in arrival
  order (so a volume slider moved continuously is not starved), with its own priority.
  A request already in flight is never replaced.
* ``retries`` resends the same bytes after each timeout; after the last one the request
  resolves ``(None, "timeout")``.
* ``on_frame(frame)``: the first frame received while a request is in flight answers it
  (returns True) unless the request's ``match(frame)`` says no (returns False). A frame
  that answers a request goes to the requester only; the caller passes every frame for
  which ``on_frame`` returned False to the driver's ``on_receive``. ``on_receive`` may
  then call ``answer(frame)`` to mark the in-flight request answered explicitly.
* ``fail_all(reason)`` (on disconnect) resolves the in-flight and every queued request
  with ``(None, reason)``. Submitting while the transport cannot send resolves
  ``(None, "disconnected")`` at once instead of hanging.

Futures resolve to ``(frame_bytes, None)`` or ``(None, reason)``; they never raise.
Cancelling a future withdraws its request.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import math
import threading
from typing import Callable

Result = tuple["bytes | None", "str | None"]
Matcher = Callable[[bytes], bool]

_log = logging.getLogger("hubhost.devices.requests")


class _Request:
    __slots__ = ("data", "timeout", "retries", "priority", "name", "match", "future",
                 "seq", "queued", "attempts")

    def __init__(self, data: bytes, timeout: float, retries: int, priority: float,
                 name: str | None, match: Matcher | None, future: asyncio.Future[Result],
                 seq: int) -> None:
        self.data = data
        self.timeout = timeout
        self.retries = retries
        self.priority = priority
        self.name = name
        self.match = match
        self.future = future
        self.seq = seq
        self.queued = True
        self.attempts = 0


class RequestQueue:
    """One device's requests; ``send`` writes bytes to its transport (may raise)."""

    def __init__(
        self,
        send: Callable[[bytes], None],
        *,
        logger: logging.Logger | logging.LoggerAdapter | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> None:
        self._send = send
        self.log = logger or _log
        self._loop = loop
        self._loop_thread: int | None = None
        # (-priority, arrival seq, unique tiebreak, request); withdrawn entries stay until
        # popped or compacted, counted in _stale so memory stays bounded.
        self._heap: list[tuple[float, int, int, _Request]] = []
        self._stale = 0
        self._ids = itertools.count()
        self._named: dict[str, _Request] = {}
        self._seq = itertools.count()
        self._current: _Request | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- public API -----------------------------------------------------------------

    @property
    def in_flight(self) -> bool:
        return self._current is not None

    def __len__(self) -> int:
        """Requests waiting (not counting the one in flight)."""
        return len(self._heap) - self._stale

    def submit(
        self,
        data: bytes,
        *,
        timeout: float = 1.0,
        retries: int = 0,
        priority: float = 0,
        name: str | None = None,
        match: Matcher | None = None,
    ) -> asyncio.Future[Result]:
        """Queue a request; the future resolves to ``(frame, None)`` or ``(None, reason)``."""
        self._check_thread()
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise TypeError(f"request: data must be bytes, got {type(data).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
            math.isfinite(timeout) and timeout > 0
        ):
            raise ValueError(f"request: timeout must be a positive number of seconds, got {timeout!r}")
        if isinstance(retries, float) and retries.is_integer():
            retries = int(retries)
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ValueError(f"request: retries must be an integer >= 0, got {retries!r}")
        if isinstance(priority, bool) or not isinstance(priority, (int, float)) or not math.isfinite(priority):
            raise ValueError(f"request: priority must be a number, got {priority!r}")
        if name is not None and not isinstance(name, str):
            raise ValueError(f"request: name must be a string, got {type(name).__name__}")
        if match is not None and not callable(match):
            raise ValueError(f"request: match must be a function, got {type(match).__name__}")

        loop = self._loop or asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        seq = next(self._seq)
        if name is not None:
            old = self._named.pop(name, None)
            if old is not None and old.queued:
                self._withdraw(old)
                seq = old.seq
                _resolve(old.future, (None, "replaced"))
        req = _Request(bytes(data), float(timeout), retries, priority, name, match, future, seq)
        if name is not None:
            self._named[name] = req
        heapq.heappush(self._heap, (-priority, seq, next(self._ids), req))
        future.add_done_callback(lambda f, r=req: self._on_done(r))
        self._pump()
        return future

    def on_frame(self, frame: bytes) -> bool:
        """Offer a received frame to the in-flight request; True if it answered it."""
        self._check_thread()
        req = self._current
        if req is None:
            return False
        if req.match is not None:
            try:
                if not req.match(frame):
                    return False
            except Exception:
                self.log.exception("request match function failed; frame not taken as the answer")
                return False
        self._finish(req, (bytes(frame), None))
        return True

    def answer(self, frame: bytes | None = None) -> bool:
        """Mark the in-flight request answered with ``frame``; False if none was in flight."""
        self._check_thread()
        req = self._current
        if req is None:
            return False
        self._finish(req, (bytes(frame) if frame is not None else b"", None))
        return True

    def fail_all(self, reason: str = "disconnected") -> None:
        """Resolve every request, in flight and queued, with ``(None, reason)``."""
        self._check_thread()
        current, self._current = self._current, None
        self._cancel_timer()
        heap, self._heap = self._heap, []
        self._stale = 0
        self._named.clear()
        if current is not None:
            _resolve(current.future, (None, reason))
        for *_, req in sorted(heap):
            if req.queued:
                req.queued = False
                _resolve(req.future, (None, reason))

    # -- internals --------------------------------------------------------------------

    def _check_thread(self) -> None:
        ident = threading.get_ident()
        if self._loop_thread is None:
            self._loop_thread = ident
        elif ident != self._loop_thread:
            raise RuntimeError("RequestQueue used from a thread other than its event loop's")

    def _pump(self) -> None:
        """Start queued requests until one is in flight or the queue is empty."""
        while self._current is None and self._heap:
            *_, req = heapq.heappop(self._heap)
            if not req.queued:
                self._stale -= 1
                continue
            req.queued = False
            if req.name is not None and self._named.get(req.name) is req:
                del self._named[req.name]
            if req.future.done():
                continue
            self._current = req
            error = self._attempt(req)
            if error is not None:  # loop, not recursion: a long queue may all fail here
                self._current = None
                _resolve(req.future, (None, error))

    def _attempt(self, req: _Request) -> str | None:
        """Send the request's bytes and arm its timer; return a failure reason or None."""
        req.attempts += 1
        try:
            self._send(req.data)
        except ConnectionError:
            return "disconnected"
        except Exception as exc:
            return f"send failed: {exc}"
        loop = self._loop or asyncio.get_running_loop()
        self._timer = loop.call_later(req.timeout, self._timed_out, req)
        return None

    def _timed_out(self, req: _Request) -> None:
        self._timer = None
        if req is not self._current:
            return
        if req.attempts <= req.retries:
            self.log.debug("request timed out, retry %d of %d", req.attempts, req.retries)
            error = self._attempt(req)
            if error is not None:
                self._finish(req, (None, error))
        else:
            self._finish(req, (None, "timeout"))

    def _finish(self, req: _Request, result: Result) -> None:
        if self._current is req:
            self._current = None
            self._cancel_timer()
        _resolve(req.future, result)
        self._pump()

    def _on_done(self, req: _Request) -> None:
        """A future was cancelled by its waiter: withdraw the request."""
        if not req.future.cancelled():
            return
        if req.queued:
            self._withdraw(req)
        elif self._current is req:
            self._current = None
            self._cancel_timer()
            self._pump()

    def _withdraw(self, req: _Request) -> None:
        """Take a queued request out of line (lazily); compact when much is stale."""
        req.queued = False
        if req.name is not None and self._named.get(req.name) is req:
            del self._named[req.name]
        self._stale += 1
        if self._stale > 32 and self._stale > len(self._heap) // 2:
            self._heap = [e for e in self._heap if e[3].queued]
            heapq.heapify(self._heap)
            self._stale = 0

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None


def _resolve(future: asyncio.Future[Result], result: Result) -> None:
    if not future.done():
        future.set_result(result)


__all__ = ["RequestQueue", "Result", "Matcher"]
