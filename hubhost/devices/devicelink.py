"""Per-device glue between a transport, its framer, its request queue and the driver.

Threads (DESIGN section 2): transports and request queues live on the asyncio loop; Lua runs
on the driver's actor thread. A received chunk is framed where framing is cheapest:

* ``delimiter`` / ``length`` / no framing: on the loop, right where the request queue is, so
  an answer resolves its request without a trip through the driver thread;
* ``pattern`` (a Lua tokenizer): on the driver thread, then the frames come back to the loop
  for request matching.

Either way every frame passes the loop's ``RequestQueue.on_frame`` first: a frame that
answers the request in flight goes to the requester only; every other frame goes to
``on_receive`` (in arrival order, a batch per actor post). ``device:answer(frame)`` (from
``on_receive``) marks the request in flight answered.

``connected`` / ``disconnected`` lifecycle handlers follow the transport; the Lua glue sets
``device.status.connected`` first. Queued requests fail with ``nil, "disconnected"`` when
the connection drops. A driver's links close when it stops, crashes or restarts; closing
for those reasons runs no ``disconnected`` handler (the runtime is going away) but still
sets ``connected`` to false.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING, Any, Callable

import lupa.luajit21 as lupa

from hubhost.devices.framing import FramingError, TokenizerError, make_framer
from hubhost.devices.requests import RequestQueue, Result
from hubhost.sandbox.runtime import DeviceInfo, DriverRuntime
from hubhost.devices.transports import SendBufferFull, Transport, TransportError, make_transport
from hubhost.loops import soon

if TYPE_CHECKING:
    from hubhost.worker.actor import Actor
    from hubhost.supervisor.supervisor import DriverSlot, Supervisor

log = logging.getLogger("hubhost.device")

# Received data the driver has not handled yet, per device, in bytes plus FRAME_COST per
# queued frame (tiny frames add up). Past PAUSE_AT the transport stops reading (the kernel
# buffer, flow control or the TCP window push back on the device) until the backlog is
# below RESUME_AT; past MAX_BACKLOG (datagrams cannot be paused) data is dropped.
PAUSE_AT = 1 << 20
RESUME_AT = 256 << 10
MAX_BACKLOG = 8 << 20


def _tuned_limits() -> None:
    """HUBHOST_LINK_LIMITS="pause,resume,max" (bytes) sets the receive backlog limits of
    every worker started after it is set (tests and benchmarks use small ones)."""
    global PAUSE_AT, RESUME_AT, MAX_BACKLOG
    import os
    raw = os.environ.get("HUBHOST_LINK_LIMITS")
    if raw:
        PAUSE_AT, RESUME_AT, MAX_BACKLOG = (int(x) for x in raw.split(","))


_tuned_limits()
FRAME_COST = 64
LUA_BATCH = 256         # frames per call into Lua (varargs stay well under LuaJIT's limits)


class _Prefixed(logging.LoggerAdapter):
    """Names the driver and device in every line, like the driver's own log lines."""

    def process(self, msg: Any, kwargs: Any) -> tuple[Any, Any]:
        return f"{self.extra['prefix']} {msg}", kwargs


def _cost(frames: list[bytes]) -> int:
    return sum(map(len, frames)) + FRAME_COST * len(frames)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


def request_options(timeout: float, retries: Any, priority: Any, name: bytes | None,
                    match: bytes | None) -> dict[str, Any]:
    """RequestQueue.submit options from device:request's (already checked) Lua options;
    `match` is a prefix the response frame must start with."""
    options: dict[str, Any] = {"timeout": timeout, "retries": retries, "priority": priority}
    if name:
        options["name"] = name.decode("utf-8", "replace")
    if match:
        options["match"] = lambda frame, p=bytes(match): frame.startswith(p)
    return options


def framing_spec(table: Any) -> tuple[dict[str, Any], Any]:
    """A template's Lua ``framing`` table as make_framer's dict, plus the pattern function."""
    if table is None:
        return {}, None
    if lupa.lua_type(table) != "table":
        raise FramingError(f"framing must be a table, got {lupa.lua_type(table) or type(table).__name__}")
    spec: dict[str, Any] = {}
    pattern = None
    for key, value in table.items():
        name = key.decode("utf-8", "replace") if isinstance(key, bytes) else key
        kind = lupa.lua_type(value)
        if name == "pattern":
            if kind != "function":
                raise FramingError(
                    f"framing: pattern must be a function (buffer) -> frame, rest, got {kind or type(value).__name__}"
                )
            pattern = value
            spec["pattern"] = True
        elif kind == "table":
            items = sorted(value.items(), key=lambda kv: (not isinstance(kv[0], int), kv[0]))
            if any(not isinstance(k, int) for k, _ in items):
                raise FramingError(f"framing: {name} must be a list, got a table with named keys")
            spec[name] = [v for _, v in items]
        elif kind is not None:
            raise FramingError(f"framing: {name} must not be a {kind}")
        else:
            spec[name] = value
    return spec, pattern


def check_framing(table: Any) -> bytes | None:
    """For the template check in Lua: the problem with a framing table, or None."""
    try:
        spec, _ = framing_spec(table)
        make_framer(spec, tokenizer=lambda buf: (None, buf))
    except FramingError as e:
        return str(e).encode()
    return None


class DeviceLink:
    """One device's connection: transport + framer + request queue, bridged to its driver.

    Built on the driver thread (framing needs the Lua template); used on the loop, except
    ``send_from_driver`` / ``_drain`` / pattern framing, which run on the driver thread.
    """

    def __init__(self, owner: "DriverLinks", info: DeviceInfo, kind: str,
                 spec: dict[str, Any], pattern: Any) -> None:
        self.owner = owner
        self.id = info.id
        self.id_b = info.id.encode()
        self.kind = kind
        self.log = _Prefixed(log, {"prefix": f"[{owner.slot.id}/{info.id}]"})
        self.frame_on_loop = pattern is None
        self.framer = make_framer(spec, tokenizer=self._tokenizer(pattern),
                                  on_overflow=self._overflow)
        self.transport: Transport = make_transport(
            kind, info.transport_settings, on_data=self._on_data, on_connected=self._on_connected,
            on_disconnected=self._on_disconnected, logger=self.log)
        self.queue = RequestQueue(self.transport.send, logger=self.log, loop=owner.loop)
        self.connected = False          # written on the loop, read by the driver thread
        self.closing = False
        self._posted = 0                # bytes posted to the driver thread (loop writes)
        self._handled = 0               # bytes it has handled (driver thread writes)
        self._backlog_warned = False
        self._tokenizer_failing = False
        self._no_handler_logged = False
        self._waiting: dict[asyncio.Future[Result], int] = {}   # request -> Lua wait token
        self._frames: deque[bytes] = deque()   # for on_receive: loop appends, driver pops
        self._drain_posted = False
        self._paused = False            # reading paused for backpressure (loop writes)
        self.pauses = 0                 # how many times reading was paused (diagnostics)

    def _tokenizer(self, pattern: Any) -> Callable[[bytes], tuple[bytes | None, bytes]] | None:
        """The Lua `pattern` function as the framer's tokenizer (driver thread, CPU budget)."""
        if pattern is None:
            return None
        label = f"framing pattern [{self.id}]".encode()
        tokenize = self.owner.lua.tokenize

        def tokenizer(buf: bytes) -> tuple[bytes | None, bytes]:
            r = tokenize(pattern, buf, label)
            if not r[0]:
                raise FramingError(_text(r[1]))
            return r[1], r[2]

        return tokenizer

    @property
    def backlog(self) -> int:
        """Bytes received but not yet handed to the driver's handlers."""
        return self._posted - self._handled

    # -- loop thread ---------------------------------------------------------------------
    async def open(self) -> None:
        prev = self.owner.previous
        if prev is not None:
            await prev.retire()   # e.g. the same serial port held by a runtime that got stuck
        if self.closing or not self.owner.alive:
            return
        await self.transport.open()

    async def close(self) -> None:
        self.closing = True
        try:
            await self.transport.close()
        finally:
            self.connected = False
            self.queue.fail_all("disconnected")

    def _on_connected(self) -> None:
        self.connected = True
        self._paused = False   # a new connection reads
        self.owner.post(self.owner.lua.connection, self.id_b, True, None)

    def _on_disconnected(self, reason: str) -> None:
        self.connected = False
        if self.frame_on_loop:
            self.framer.reset()
        else:
            self.owner.post(self.framer.reset)
        if not self.closing:
            self.owner.post(self.owner.lua.connection, self.id_b, False, reason.encode())
        # after the disconnected handler (actor order): requesters see status false
        self.queue.fail_all("disconnected")

    def _on_data(self, chunk: bytes) -> None:
        if self.frame_on_loop:
            frames = self.framer.feed(chunk)
            if frames:
                self._route(frames)
        elif self._admit(len(chunk)):
            self.owner.post(self._feed_pattern, chunk)

    def _route(self, frames: list[bytes]) -> None:
        """Answers go to their requesters, the rest to on_receive, in arrival order."""
        queue = self.queue
        if queue.in_flight:
            kept: list[bytes] = []
            for frame in frames:
                if queue.in_flight and queue.on_frame(frame):
                    if kept:
                        self._post_frames(kept)
                        kept = []
                    self._resume_answered()
                else:
                    kept.append(frame)
            frames = kept
        if frames:
            self._post_frames(frames)

    def _post_frames(self, frames: list[bytes]) -> None:
        """Queue frames for on_receive; one drain is posted until the driver starts it, so
        a busy driver takes everything that arrived meanwhile in one go."""
        if self._admit(_cost(frames)):
            self._frames.extend(frames)
            if not self._drain_posted:
                self._drain_posted = True
                self.owner.post(self._drain)

    def _admit(self, nbytes: int) -> bool:
        """Bound memory when the driver falls behind: pause reading, else drop (warned once
        per burst)."""
        backlog = self.backlog + nbytes
        if self.backlog > MAX_BACKLOG:   # one read's worth more is always taken
            if not self._backlog_warned:
                self._backlog_warned = True
                self.log.warning("driver is %d bytes behind this device; dropping received data "
                                 "until it catches up", self.backlog)
            return False
        self._backlog_warned = False
        self._posted += nbytes
        if backlog > PAUSE_AT and not self._paused:
            self._set_reading(False)
        return True

    def _set_reading(self, on: bool) -> None:
        """Pause or resume reading from the device (stream transports; datagrams cannot)."""
        if not self.transport.set_reading(on):
            return
        self._paused = not on
        if not on:
            self.pauses += 1
        self.log.debug("reading %s: the driver is %d bytes behind", "resumed" if on else "paused",
                       self.backlog)

    def _maybe_resume(self) -> None:
        if self._paused and self.backlog <= RESUME_AT:
            self._set_reading(True)

    def submit(self, token: int, data: bytes, options: dict[str, Any]) -> None:
        """Queue a request from Lua; its handler resumes with (frame, nil) or (nil, reason)."""
        resume = self.owner.rt.resume
        if self.closing or not self.owner.alive:
            self.owner.post(resume, token, None, b"disconnected")
            return
        try:
            fut = self.queue.submit(data, **options)
        except (TypeError, ValueError) as e:
            self.owner.post(resume, token, None, str(e).encode())
            return
        self._waiting[fut] = token
        fut.add_done_callback(self._request_done)

    def _request_done(self, fut: asyncio.Future[Result]) -> None:
        token = self._waiting.pop(fut, None)
        if token is not None:
            self._resume(fut, token)

    def answer(self, frame: bytes) -> None:
        """device:answer from on_receive: the request in flight (if any) gets ``frame``."""
        if self.queue.answer(frame):
            self._resume_answered()

    def _resume_answered(self) -> None:
        """Resume requesters answered just now, without waiting a loop iteration for the
        futures' callbacks (which then find nothing left to do)."""
        for fut in [f for f in self._waiting if f.done()]:
            self._resume(fut, self._waiting.pop(fut))

    def _resume(self, fut: asyncio.Future[Result], token: int) -> None:
        frame, reason = fut.result() if not fut.cancelled() else (None, "cancelled")
        self.owner.post(self.owner.rt.resume, token, frame, reason.encode() if reason else None)

    def write(self, data: bytes) -> None:
        self.owner.send_written += len(data)   # loop thread: the send backlog shrinks
        try:
            self.transport.send(data)
        except SendBufferFull as e:
            self.log.warning("device:send dropped: %s", e)
        except TransportError as e:
            self.log.debug("device:send dropped: %s", e)

    def _overflow(self, nbytes: int) -> None:
        self.log.warning(
            "dropped an oversized frame (%d bytes or more, max_frame %d); later oversized "
            "frames are dropped without a warning until a good frame arrives",
            nbytes, self.framer.max_frame)

    # -- driver thread -------------------------------------------------------------------
    def send_from_driver(self, data: bytes) -> tuple[bool | None, bytes | None]:
        if not self.connected:
            return None, (f"{self.id} is not connected ({self.transport.describe}); "
                          "wait for the connected handler, or use device:request, which "
                          "returns nil, \"disconnected\"").encode()
        owner = self.owner
        limit = owner.rt.max_send_backlog
        backlog = owner.send_backlog
        # one send bigger than the cap still goes when nothing waits (its bytes were in the
        # driver's own heap); after it, nothing more until the transports took it
        if backlog > 0 and backlog + len(data) > limit:
            return None, (f"send backlog full: {backlog} bytes of this driver's sends are waiting "
                          f"to be written and this one is {len(data)}; limit of {limit} bytes per "
                          "driver reached (max_send_backlog)").encode()
        owner.send_posted += len(data)   # driver thread
        owner.to_loop(self.write, bytes(data))
        return True, None

    def _feed_pattern(self, chunk: bytes) -> None:
        self._handled += len(chunk)
        if self._paused and self.backlog <= RESUME_AT:
            self.owner.to_loop(self._maybe_resume)
        try:
            frames = self.framer.feed(chunk)
            self._tokenizer_failing = False
        except TokenizerError as e:
            frames = e.frames
            if not self._tokenizer_failing:
                self._tokenizer_failing = True
                self.log.error("%s; buffered bytes dropped (further failures are logged at debug "
                               "level until a frame is cut)", e)
            else:
                self.log.debug("%s", e)
        if frames:
            # back to the loop, where the request queue takes its answers
            self.owner.to_loop(self._route, frames)

    def _drain(self) -> None:
        """Run on_receive for each queued frame; re-post the rest after a slice of time."""
        self._drain_posted = False   # frames queued from now on post another drain
        frames = self._frames
        owner = self.owner
        if not owner.alive:
            frames.clear()
            return
        receive = owner.lua.receive
        while frames:
            part = [frames.popleft() for _ in range(min(len(frames), LUA_BATCH))]
            self._handled += _cost(part)
            if self._paused and self.backlog <= RESUME_AT:
                self.owner.to_loop(self._maybe_resume)   # sent when this drain ends
            result = owner.rt_call("on_receive", receive, self.id_b, *part)
            if result is None:   # the glue itself failed (logged): this part is lost
                continue
            done, has_handler = int(result[0]), result[1]
            if not has_handler and not self._no_handler_logged:
                self._no_handler_logged = True
                self.log.warning("the driver has no on_receive; received frames are dropped")
            if done < len(part):
                # let timers, answers and other devices in before the rest
                rest = part[done:]
                self._handled -= _cost(rest)
                frames.extendleft(reversed(rest))
                self._drain_posted = True
                owner.post(self._drain)
                return


class DriverLinks:
    """The links of one driver runtime; retired as a whole when the runtime goes away."""

    def __init__(self, glue: "TransportGlue", slot: "DriverSlot", rt: DriverRuntime,
                 previous: "DriverLinks | None") -> None:
        self.glue = glue
        self.slot = slot
        self.rt = rt
        self.actor: Actor = slot.actor  # type: ignore[assignment]
        self.loop = glue.sup.loop
        self.previous = previous
        self.alive = True
        self.links: dict[str, DeviceLink] = {}
        self.closing: dict[str, asyncio.Task[None]] = {}   # links closing one by one
        self._retire: asyncio.Task[None] | None = None
        self._outbox: list[tuple[Callable[..., Any], tuple[Any, ...]]] | None = None
        self._next_request: tuple[Any, ...] | None = None
        self.lua: Any = None
        # device:send bytes handed to the loop (driver thread writes) and written to the
        # transports (loop writes): their difference is the send backlog (max_send_backlog)
        self.send_posted = 0
        self.send_written = 0

    @property
    def send_backlog(self) -> int:
        return self.send_posted - self.send_written

    def install(self) -> None:
        """On the driver thread, before the entry chunk: host functions and the Lua glue."""
        rt = self.rt
        rt.sandbox.expose(
            link_open=self.open_device,
            link_close=self.close_device,
            link_send=self.send,
            link_answer=self.answer,
            link_request=self.prepare_request,
            link_check_framing=check_framing,
        )
        self.lua = rt.sandbox.run_private("devicelink.lua", rt.R, rt.R.caps, rt.sandbox.host,
                                          rt.sandbox.sb, rt.cpu_limit)

    def post(self, fn: Callable[..., Any], *args: Any) -> None:
        """Run fn on the driver thread, unless this runtime has gone away."""
        if self.alive:
            self.actor.post(self._batched, fn, args)

    def _batched(self, fn: Callable[..., Any], args: tuple[Any, ...]) -> None:
        """Driver thread: run fn, holding back what it sends to the loop until it is done.

        One wake-up of the loop per actor call instead of one per device:send/request, and
        the loop is not woken while this thread still needs the GIL to finish the call.
        """
        self._outbox = []
        try:
            fn(*args)
        finally:
            out, self._outbox = self._outbox, None
            if out:
                soon(self.loop, _run_all, out)

    def to_loop(self, fn: Callable[..., Any], *args: Any) -> None:
        """Driver thread: run fn on the loop, in order with everything else sent there."""
        if self._outbox is not None:
            self._outbox.append((fn, args))
        else:
            soon(self.loop, fn, *args)

    def rt_call(self, label: str, fn: Any, *args: Any) -> Any:
        # the runtime's guard: a Lua error escaping the glue counts as a failed handler
        return self.rt.guarded(label, fn, *args)

    # -- host functions (driver thread) ----------------------------------------------------
    def open_device(self, device_id: bytes, driver_kind: Any) -> bool:
        """A device started: build its link (if it has a transport) and open it on the loop."""
        dev_id = device_id.decode()
        info = next((d for d in self.slot.cfg.devices if d.id == dev_id), None)
        prefix = f"[{self.slot.id}/{dev_id}]"
        if info is None:
            return False
        kind = info.transport or (driver_kind.decode() if driver_kind else None)
        if kind is None:
            return False
        if not driver_kind:
            log.warning("%s has %s transport settings, but its driver was built with "
                        "driver_helper.init (no transport): not opened", prefix, kind)
            return False
        if info.transport is None:
            log.error("%s has no transport settings; its driver needs %s (e.g. transport = "
                      "\"%s\" with its settings in the device's config entry): not opened",
                      prefix, kind, kind)
            return False
        old = self.links.pop(dev_id, None)
        if old is not None:   # started again (config reload): the new settings win
            soon(self.loop, self._close_link, old)
        try:
            spec, pattern = framing_spec(self.rt.framing())
            link = DeviceLink(self, info, kind, spec, pattern)
        except (FramingError, ValueError) as e:
            log.error("%s cannot set up its %s transport: %s", prefix, kind, e)
            return False
        self.links[dev_id] = link
        soon(self.loop, self._open_link, link)
        return True

    def close_device(self, device_id: bytes) -> None:
        link = self.links.pop(device_id.decode(), None)
        if link is not None:
            soon(self.loop, self._close_link, link)

    def send(self, device_id: bytes, data: bytes) -> tuple[bool | None, bytes | None]:
        link = self.links.get(device_id.decode())
        if link is None:
            return None, (device_id + b" has no transport (it needs transport = ... and its "
                          b"settings in its config entry)")
        return link.send_from_driver(data)

    def answer(self, device_id: bytes, frame: Any) -> None:
        link = self.links.get(device_id.decode())
        if link is not None:
            self.to_loop(link.answer, frame if frame else b"")

    def prepare_request(self, device_id: bytes, data: bytes, timeout: float, retries: float,
                        priority: float, name: Any, match: Any) -> None:
        """Host function: the request the handler is about to wait for (checked in Lua)."""
        self._next_request = (device_id, data, timeout, retries, priority, name, match)

    def request(self, token: int) -> None:
        """The `request` host wait: submit the prepared request on the loop."""
        spec, self._next_request = self._next_request, None
        if spec is None:
            self.post(self.rt.resume, token, None, b"request: nothing to send")
            return
        device_id, data, timeout, retries, priority, name, match = spec
        link = self.links.get(device_id.decode())
        if link is None:
            self.post(self.rt.resume, token, None, b"disconnected")
            return
        self.to_loop(link.submit, token, data, request_options(timeout, retries, priority, name, match))

    # -- loop thread -----------------------------------------------------------------------
    def _open_link(self, link: DeviceLink) -> None:
        if self.alive and not link.closing:
            self.glue.sup.spawn(self._guarded(link.open(), link, "open"))

    def _close_link(self, link: DeviceLink) -> None:
        t = self.closing[link.id] = self.glue.sup.spawn(self._guarded(link.close(), link, "close"))
        t.add_done_callback(lambda _t, i=link.id: self.closing.pop(i, None) if self.closing.get(i) is _t else None)

    async def closed(self, device_ids: list[str]) -> None:
        """Wait until the links of these devices are closed (their close was asked for)."""
        await asyncio.sleep(0)      # the close is scheduled with call_soon
        tasks = [t for d in device_ids if (t := self.closing.get(d)) is not None]
        if tasks:
            await asyncio.wait(tasks)

    @staticmethod
    async def _guarded(coro: Any, link: DeviceLink, what: str) -> None:
        try:
            await coro
        except Exception:
            link.log.exception("%s failed", what)

    def retire(self) -> asyncio.Task[None]:
        """Close every link (once); ``connected`` becomes false. Loop thread."""
        if self._retire is None:
            self.alive = False
            links = list(self.links.values())
            for link in links:   # at once: nothing of this runtime talks to it any more
                self.glue.sup.status.set(link.id, "connected", "false")
            self._retire = self.loop.create_task(self._close_all(links))
        return self._retire

    async def _close_all(self, links: list[DeviceLink]) -> None:
        await asyncio.gather(*(self._guarded(link.close(), link, "close") for link in links))


def _run_all(calls: list[tuple[Callable[..., Any], tuple[Any, ...]]]) -> None:
    for fn, args in calls:
        try:
            fn(*args)
        except Exception:
            log.exception("device link call %r failed", fn)


class TransportGlue:
    """Plugs device links into a supervisor: runtime hook, request wait, crash and stop."""

    def __init__(self, sup: "Supervisor") -> None:
        self.sup = sup
        self.drivers: dict[str, DriverLinks] = {}   # slot id -> links of its current runtime

    def link(self, driver_id: str, device_id: str) -> DeviceLink | None:
        """The live link of a device (for tests, benchmarks and diagnostics)."""
        dl = self.drivers.get(driver_id)
        return dl.links.get(device_id) if dl is not None else None

    def _runtime_hook(self, slot: "DriverSlot", rt: DriverRuntime) -> None:
        previous = self.drivers.get(slot.id)
        dl = DriverLinks(self, slot, rt, previous)
        dl.install()
        self.drivers[slot.id] = dl
        if previous is not None:
            # normally retired by the crash/stop hook already; a stuck runtime is not
            soon(self.sup.loop, previous.retire)

    def _wait_request(self, slot: "DriverSlot", rt: DriverRuntime, token: int, arg: Any) -> None:
        dl = self.drivers.get(slot.id)
        if dl is None or dl.rt is not rt:
            if slot.actor is not None:
                slot.actor.post(rt.resume, token, None, b"disconnected")
            return
        dl.request(token)

    def _crash_hook(self, slot: "DriverSlot", rt: DriverRuntime, actor: Any) -> None:
        dl = self.drivers.get(slot.id)
        if dl is not None and dl.rt is rt:
            dl.retire()

    async def _stop_hook(self, slot: "DriverSlot", rt: DriverRuntime, actor: Any) -> None:
        dl = self.drivers.get(slot.id)
        if dl is not None:
            await dl.retire()


def install(sup: "Supervisor") -> TransportGlue:
    """Give every driver runtime of ``sup`` its device links (hub.install_parts calls this)."""
    glue = TransportGlue(sup)
    sup.runtime_hooks.append(glue._runtime_hook)
    sup.wait_handlers["request"] = glue._wait_request
    sup.crash_hooks.append(glue._crash_hook)
    sup.stop_hooks.append(glue._stop_hook)
    sup.devicelinks = glue  # type: ignore[attr-defined]
    return glue


__all__ = ["DeviceLink", "DriverLinks", "TransportGlue", "install", "check_framing", "framing_spec"]
