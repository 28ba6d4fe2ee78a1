"""Request queue: ordering, priority, named replacement, retries, matching, disconnects."""

from __future__ import annotations

import asyncio
import threading

import pytest

from hubhost.devices.framing import make_framer
from hubhost.devices.requests import RequestQueue
from hubhost.devices.simulators import DisplaySimulator, ProjectorSimulator
from hubhost.devices.transports import Backoff, NotConnectedError, SerialTransport, TcpTransport

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


class Wire:
    """The device side of ``send``: records bytes; can be unplugged."""

    def __init__(self) -> None:
        self.sent: list[bytes] = []
        self.up = True

    def __call__(self, data: bytes) -> None:
        if not self.up:
            raise NotConnectedError("test wire: not connected")
        self.sent.append(data)


async def settle() -> None:
    for _ in range(3):
        await asyncio.sleep(0)


# -- queue rules ---------------------------------------------------------------------


def test_one_in_flight_fifo_order():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        futs = [q.submit(b"R%d" % i) for i in range(4)]
        assert wire.sent == [b"R0"] and q.in_flight and len(q) == 3
        for i in range(4):
            assert q.on_frame(b"A%d" % i)
        assert [await f for f in futs] == [(b"A%d" % i, None) for i in range(4)]
        assert wire.sent == [b"R0", b"R1", b"R2", b"R3"]
        assert not q.in_flight and not q.on_frame(b"unsolicited")

    run(main())


def test_higher_priority_first_fifo_within_priority():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        q.submit(b"first")
        for data, prio in [(b"low1", 0), (b"high1", 5), (b"mid", 1), (b"high2", 5), (b"low2", 0)]:
            q.submit(data, priority=prio)
        while q.in_flight:
            q.on_frame(b"ok")
        assert wire.sent == [b"first", b"high1", b"high2", b"mid", b"low1", b"low2"]

    run(main())


def test_named_request_replaces_queued_one_and_keeps_its_place():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        busy = q.submit(b"VOL 1", name="vol")  # in flight: never replaced
        v10 = q.submit(b"VOL 10", name="vol")
        other = q.submit(b"PWR?")
        v20 = q.submit(b"VOL 20", name="vol")
        v30 = q.submit(b"VOL 30", name="vol")
        assert await v10 == (None, "replaced") and await v20 == (None, "replaced")
        assert len(q) == 2
        while q.in_flight:
            q.on_frame(b"ok")
        assert wire.sent == [b"VOL 1", b"VOL 30", b"PWR?"]
        assert (await busy)[0] == b"ok" and (await v30)[0] == b"ok" and (await other)[0] == b"ok"

    run(main())


def test_many_replacements_keep_memory_bounded():
    async def main():
        q = RequestQueue(Wire())
        q.submit(b"busy")
        futs = [q.submit(b"VOL %d" % i, name="vol") for i in range(10000)]
        await settle()
        assert len(q) == 1 and len(q._heap) < 100
        assert sum(f.done() for f in futs) == 9999

    run(main())


def test_timeout_with_retries_resends_then_gives_up():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        f = q.submit(b"PING", timeout=0.02, retries=2)
        nxt = q.submit(b"NEXT", timeout=0.02)
        assert await f == (None, "timeout")
        assert wire.sent == [b"PING", b"PING", b"PING", b"NEXT"]
        assert await nxt == (None, "timeout")

    run(main())


def test_retry_answered_on_second_attempt():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        f = q.submit(b"PING", timeout=0.05, retries=3)
        await until(lambda: len(wire.sent) == 2, "one resend")
        assert q.on_frame(b"PONG")
        assert await f == (b"PONG", None)
        await asyncio.sleep(0.12)
        assert len(wire.sent) == 2  # the answered request's timer is gone

    run(main())


def test_match_decides_which_frame_answers():
    async def main():
        q = RequestQueue(Wire())
        f = q.submit(b"VOL?", match=lambda fr: fr.startswith(b"VOL="))
        assert q.on_frame(b"PWR=ON") is False  # caller passes it to on_receive
        assert not f.done()
        assert q.on_frame(b"VOL=30") is True
        assert await f == (b"VOL=30", None)

    run(main())


def test_match_that_raises_does_not_answer():
    async def main():
        q = RequestQueue(Wire())
        f = q.submit(b"X", match=lambda fr: 1 / 0)
        assert q.on_frame(b"Y") is False and not f.done()
        f.cancel()

    run(main())


def test_explicit_answer_from_on_receive():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        f = q.submit(b"LIST?", match=lambda fr: False)  # multi-line reply, driver decides
        q.submit(b"AFTER")
        assert not q.on_frame(b"item 1") and not q.on_frame(b"END")
        assert q.answer(b"item 1;END")
        assert await f == (b"item 1;END", None)
        assert wire.sent == [b"LIST?", b"AFTER"]
        assert q.answer() and not q.answer()

    run(main())


def test_fail_all_and_submit_while_disconnected():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        futs = [q.submit(b"R%d" % i, name="n%d" % i) for i in range(5)]
        wire.up = False
        q.fail_all("disconnected")
        assert [await f for f in futs] == [(None, "disconnected")] * 5
        assert not q.in_flight and len(q) == 0
        assert await q.submit(b"late") == (None, "disconnected")  # fails at once, no hang
        wire.up = True
        f = q.submit(b"again", name="n1")
        assert q.on_frame(b"ok") and await f == (b"ok", None)

    run(main())


def test_long_queue_failing_on_send_does_not_recurse():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        first = q.submit(b"first")
        futs = [q.submit(b"x") for _ in range(5000)]
        wire.up = False
        assert q.on_frame(b"ok")
        assert await first == (b"ok", None)
        assert all(f.result() == (None, "disconnected") for f in futs)

    run(main())


def test_other_send_errors_are_reported():
    async def main():
        def broken(_data: bytes) -> None:
            raise BufferError("buffer full")

        q = RequestQueue(broken)
        assert await q.submit(b"x") == (None, "send failed: buffer full")

    run(main())


def test_cancelled_requests_are_withdrawn():
    async def main():
        wire = Wire()
        q = RequestQueue(wire)
        a = q.submit(b"A")
        b = q.submit(b"B")
        c = q.submit(b"C")
        b.cancel()
        await settle()
        a.cancel()  # in flight: the queue moves on
        await settle()
        assert wire.sent == [b"A", b"C"]
        assert q.on_frame(b"c") and await c == (b"c", None)

    run(main())


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"timeout": 0}, "timeout must be a positive number"),
        ({"timeout": float("nan")}, "timeout must be a positive number"),
        ({"retries": -1}, "retries must be an integer >= 0"),
        ({"retries": 1.5}, "retries must be an integer >= 0"),
        ({"priority": "high"}, "priority must be a number"),
        ({"name": 5}, "name must be a string"),
        ({"match": "VOL"}, "match must be a function"),
    ],
)
def test_bad_request_options_are_rejected(kwargs, message):
    async def main():
        q = RequestQueue(Wire())
        with pytest.raises(ValueError, match=message):
            q.submit(b"x", **kwargs)
        with pytest.raises(TypeError, match="data must be bytes"):
            q.submit("text")  # type: ignore[arg-type]

    run(main())


def test_use_from_another_thread_fails_loudly():
    async def main():
        q = RequestQueue(Wire())
        q.submit(b"x")
        errors: list[BaseException] = []

        def other() -> None:
            try:
                q.on_frame(b"y")
            except RuntimeError as exc:
                errors.append(exc)

        th = threading.Thread(target=other)
        th.start()
        th.join()
        assert errors and "thread" in str(errors[0])

    run(main())


# -- with real transports and simulated devices -------------------------------------------


class Device:
    """Transport + framer + queue wired the way the driver runtime wires them."""

    def __init__(self, transport_cls, *args, delimiter: bytes) -> None:
        self.framer = make_framer({"delimiter": delimiter})
        self.received: list[bytes] = []  # what on_receive would get
        self.events: list[str] = []
        self.transport = transport_cls(
            *args,
            backoff=FAST,
            on_data=self._data,
            on_connected=lambda: self.events.append("connected"),
            on_disconnected=self._lost,
        )
        self.queue = RequestQueue(self.transport.send)

    def _data(self, chunk: bytes) -> None:
        for frame in self.framer.feed(chunk):
            if not self.queue.on_frame(frame):
                self.received.append(frame)

    def _lost(self, reason: str) -> None:
        self.events.append("disconnected")
        self.framer.reset()
        self.queue.fail_all("disconnected")


def test_requests_over_tcp_display_with_unsolicited_frames_and_restart():
    async def main():
        sim = DisplaySimulator()
        await sim.start()
        dev = Device(TcpTransport, "127.0.0.1", sim.port, delimiter=b"\r\n")
        try:
            await dev.transport.open()
            on = dev.queue.submit(b"power on\r\n")
            vol = dev.queue.submit(b"volume 70\r\n", match=lambda f: f.startswith(b"volume="))
            assert await on == (b"power=on", None)
            sim.notify(b"temperature=41")  # arrives while "volume 70" is in flight
            assert await vol == (b"volume=70", None)
            await until(lambda: dev.received == [b"temperature=41"], "unsolicited frame")

            sim.mute = True  # the display stops answering
            f = dev.queue.submit(b"input?\r\n", timeout=0.03, retries=2)
            assert await f == (None, "timeout")
            assert sim.received.count(b"input?") == 3

            stuck = dev.queue.submit(b"power?\r\n", timeout=5)
            queued = [dev.queue.submit(b"volume %d\r\n" % i, name="vol") for i in range(3)]
            await until(lambda: sim.received[-1:] == [b"power?"], "request on the wire")
            await sim.stop()  # display reboots: queued work fails, nothing hangs
            assert await stuck == (None, "disconnected")
            assert [await q for q in queued] == [(None, "replaced")] * 2 + [(None, "disconnected")]
            sim.mute = False
            await sim.start()
            await until(lambda: dev.transport.connected, "reconnect")
            assert await dev.queue.submit(b"volume?\r\n") == (b"volume=70", None)
            assert dev.events == ["connected", "disconnected", "connected"]
        finally:
            await dev.transport.close()
            await sim.stop()

    run(main())


def test_requests_over_pty_projector_unplugged_mid_request():
    async def main():
        sim = ProjectorSimulator()
        await sim.start()
        dev = Device(SerialTransport, sim.port, 9600, delimiter=b"\r")
        try:
            await dev.transport.open()
            assert await dev.queue.submit(b"PWR ON\r") == (b"PWR=ON", None)
            assert await dev.queue.submit(b"SOURCE HDMI2\r") == (b"SOURCE=HDMI2", None)
            assert await dev.queue.submit(b"BOGUS\r") == (b"ERR", None)

            sim.mute = True
            pending = [dev.queue.submit(b"VOL?\r", timeout=5), dev.queue.submit(b"PWR?\r")]
            await until(lambda: sim.received[-1:] == [b"VOL?"], "request on the wire")
            await sim.unplug()
            assert [await p for p in pending] == [(None, "disconnected")] * 2
            assert await dev.queue.submit(b"PWR?\r") == (None, "disconnected")

            sim.mute = False
            await sim.replug()
            await until(lambda: dev.transport.connected, "reopen")
            assert await dev.queue.submit(b"SOURCE?\r") == (b"SOURCE=HDMI2", None)
            assert dev.events == ["connected", "disconnected", "connected"]
        finally:
            await dev.transport.close()
            await sim.stop()

    run(main())
