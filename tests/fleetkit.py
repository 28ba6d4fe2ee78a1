"""A fleet of real `hubhost run` processes sharing one config on a real Redis (or Redis
Cluster), and TCP device simulators that record every moment two hubs were connected to one
device at once (the thing fencing and stop-before-start exist to prevent)."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

from hubhost.fleet import hrw
from hubhost.fleet.keys import FleetKeys, lease_holder

from hubproc import HubProcess

DRIVER = Path(__file__).parent / "drivers_fleet" / "counter"


class DeviceSim:
    """A loopback TCP device. `max_active` > 1 means two hubs drove it at once.

    One thread and one selector: in each round, connections that closed are counted out
    before new ones are counted in, so a hub that closes and reconnects (a FIN sent before
    the next SYN) never looks like two connections; only a connection still open when
    another one arrives does."""

    def __init__(self, name: str) -> None:
        import selectors

        self.name = name
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.sock.setblocking(False)
        self.port = self.sock.getsockname()[1]
        self.active = 0
        self.max_active = 0
        self.connections = 0
        self.lines: list[str] = []
        self.overlaps: list[float] = []
        self._closed = False
        self._sel = selectors.DefaultSelector()
        self._sel.register(self.sock, selectors.EVENT_READ, None)
        self._bufs: dict[socket.socket, bytes] = {}
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while not self._closed:
            try:
                events = self._sel.select(0.2)
            except (OSError, ValueError):
                return
            accept = False
            for key, _ in events:          # reads and closes first ...
                if key.data is None:
                    accept = True
                    continue
                self._read(key.fileobj)  # type: ignore[arg-type]
            if accept:                     # ... then new connections
                while True:
                    try:
                        c, _ = self.sock.accept()
                    except (BlockingIOError, OSError):
                        break
                    c.setblocking(False)
                    self._bufs[c] = b""
                    self._sel.register(c, 1, "conn")
                    self.active += 1
                    self.connections += 1
                    self.max_active = max(self.max_active, self.active)
                    if self.active > 1:
                        self.overlaps.append(time.monotonic())

    def _read(self, c: socket.socket) -> None:
        try:
            data = c.recv(65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._sel.unregister(c)
            self._bufs.pop(c, None)
            c.close()
            self.active -= 1
            return
        buf = self._bufs.get(c, b"") + data
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            self.lines.append(line.decode(errors="replace"))
        self._bufs[c] = buf

    def close(self) -> None:
        self._closed = True
        try:
            self.sock.close()
        except OSError:
            pass


class Fleet:
    """Hubs a, b, c (by default) on one config: `movable` network devices that may run on
    any hub, and one device pinned to each hub."""

    def __init__(self, tmp: Path, redis_url: str, *, cluster: bool, hubs: tuple[str, ...] = ("a", "b", "c"),
                 movable: int = 9, ttl: float = 3.0, prefix: str = "t:", fleet_id: str = "f1",
                 weights: dict[str, float] | None = None) -> None:
        self.tmp = tmp
        self.hub_ids = hubs
        self.ttl = ttl
        self.redis_url = redis_url
        self.cluster = cluster
        self.keys = FleetKeys(prefix, fleet_id)
        self.weights = weights or {}
        self.sims: dict[str, DeviceSim] = {}
        self.movable = [f"dev-{i}" for i in range(movable)]
        self.pinned = {f"p-{h}": h for h in hubs}
        lines = [f'hub_id = "unset"', "flush_interval = 0.2", 'log_level = "info"',
                 "[redis]", f'url = "{redis_url}"', f'prefix = "{prefix}"',
                 f"cluster = {'true' if cluster else 'false'}", "socket_timeout = 1.0",
                 "[fleet]", f'id = "{fleet_id}"', f"ttl = {ttl}"]
        for h in hubs:
            lines += ["[[fleet.hubs]]", f'id = "{h}"', f"weight = {self.weights.get(h, 1.0)}"]
        lines += ["[[drivers]]", 'id = "counter"', f'path = "{DRIVER}"', "flush_interval = 0.2"]
        for dev in self.movable + list(self.pinned):
            sim = self.sims[dev] = DeviceSim(dev)
            lines += ["[[drivers.devices]]", f'id = "{dev}"', 'transport = "tcp"', 'host = "127.0.0.1"',
                      f"port = {sim.port}", 'system = "S1"', 'module = "Counter"',
                      f"index = {len(self.sims)}"]
            if dev in self.pinned:
                lines.append(f'hub = "{self.pinned[dev]}"')
        self.config = tmp / "fleet.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.procs: dict[str, HubProcess] = {}

    # -- processes -------------------------------------------------------------------------
    def start(self, hub: str) -> HubProcess:
        p = HubProcess(self.config, self.tmp / f"state-{hub}", "--hub-id", hub)
        self.procs[hub] = p
        return p

    def stop_all(self) -> None:
        for p in self.procs.values():
            if p.proc.poll() is None:
                try:
                    os.kill(p.proc.pid, signal.SIGCONT)
                except OSError:
                    pass
                p.kill()
        for s in self.sims.values():
            s.close()

    # -- Redis -------------------------------------------------------------------------------
    def client(self, url: str) -> Any:
        from hubhost.fleet.clients import sync_client
        return sync_client(url, self.cluster, 5.0)

    def start_all(self, r: Any, timeout: float = 40) -> None:
        """Start every hub and wait until the fleet has settled on all of them."""
        for h in self.hub_ids:
            self.start(h)
        self.wait_settled(r, list(self.hub_ids), timeout)

    def leases(self, r: Any) -> dict[str, str | None]:
        return {d: lease_holder(r.get(self.keys.lease(d))) for d in self.movable}

    def live(self, r: Any) -> dict[str, dict[str, Any]]:
        out = {}
        for h in r.smembers(self.keys.hubs):
            v = r.get(self.keys.hub(h))
            if v:
                out[h] = json.loads(v)
        return out

    def expected(self, hubs: list[str]) -> dict[str, str | None]:
        cands = [hrw.Candidate(h, self.weights.get(h, 1.0)) for h in hubs]
        return {d: hrw.winner(d, cands) for d in self.movable}

    def settled(self, r: Any, hubs: list[str]) -> bool:
        """Every movable device leased by its HRW winner among `hubs`, connected once."""
        want = self.expected(hubs)
        if self.leases(r) != want:
            return False
        return all(self.sims[d].active == 1 for d in self.movable)

    def wait_settled(self, r: Any, hubs: list[str], timeout: float) -> float:
        t0 = time.monotonic()
        deadline = t0 + timeout
        while time.monotonic() < deadline:
            if self.settled(r, hubs):
                return time.monotonic() - t0
            time.sleep(0.05)
        raise AssertionError(f"fleet did not settle on {hubs} in {timeout} s: leases {self.leases(r)}, "
                             f"want {self.expected(hubs)}, connections "
                             f"{ {d: s.active for d, s in self.sims.items()} }\n" + self.tail())

    def tail(self, n: int = 25) -> str:
        out = []
        for h, p in self.procs.items():
            out.append(f"--- hub {h} (exit {p.proc.poll()}) ---")
            out += [ln for _, ln in p.lines[-n:]]
        return "\n".join(out)

    def double_driven(self) -> dict[str, int]:
        return {d: s.max_active for d, s in self.sims.items() if s.max_active > 1}


def failover_seconds(tmp: Path, ttl: float) -> float:
    """Seconds from `kill -9` of the hub driving the most devices until every one of them
    is connected from its new owner (bench/fleet.py)."""
    import statistics  # noqa: F401 - keeps this helper importable alone

    from conftest import RedisServer, _redis_binary

    (tmp / "redis").mkdir()
    server = RedisServer(_redis_binary(), tmp / "redis")
    server.start()
    f = Fleet(tmp, server.url, cluster=False, ttl=ttl)
    r = f.client(server.url)
    try:
        f.start_all(r, 60)
        time.sleep(1.0)
        leases = f.leases(r)
        victim = max(f.hub_ids, key=lambda h: sum(1 for v in leases.values() if v == h))
        moved = [d for d, h in leases.items() if h == victim]
        before = {d: f.sims[d].connections for d in moved}
        t0 = time.monotonic()
        f.procs[victim].kill()
        while time.monotonic() < t0 + ttl + 30:
            if all(f.sims[d].connections > before[d] and f.sims[d].active == 1 for d in moved):
                took = time.monotonic() - t0
                break
            time.sleep(0.01)
        else:
            raise RuntimeError("the devices did not move within ttl + 30 s:\n" + f.tail())
        if f.double_driven():
            raise RuntimeError(f"a device was driven twice: {f.double_driven()}")
        return took
    finally:
        r.close()
        f.stop_all()
        server.stop()
