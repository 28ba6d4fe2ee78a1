"""Shared fixtures for the host's tests (real parts only, DESIGN section 7)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from hypothesis import settings as _hypothesis_settings

# Hypothesis profiles (tests/hypo.py scales example counts with them):
# - ci (default): derandomized, so every run tries the same examples and a failure is
#   reproducible; no example database, so a run does not depend on what earlier runs found.
# - long (HYPOTHESIS_PROFILE=long, not in CI): random examples, 20x as many, and the
#   database in .hypothesis/ so a failure found once is tried first next time.
_hypothesis_settings.register_profile("ci", derandomize=True, database=None, deadline=None,
                                      print_blob=True)
_hypothesis_settings.register_profile("long", derandomize=False, deadline=None, print_blob=True)
_hypothesis_settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

_FORBIDDEN_PORTS = {6379}  # a developer's or the system's own Redis: never touch it


def _free_port() -> int:
    """A free loopback TCP port (never 6379)."""
    while True:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _FORBIDDEN_PORTS:
            return port


class RedisServer:
    """A real redis-server on a loopback port that tests can kill, restart, pause and resume."""

    def __init__(self, binary: str, workdir: Path, port: int | None = None,
                 extra_args: tuple[str, ...] = ()) -> None:
        self.binary = binary
        self.workdir = workdir
        self.port = port or _free_port()
        self.extra_args = extra_args
        assert self.port not in _FORBIDDEN_PORTS
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> None:
        """Start (or restart) on the same port and wait until it answers PING."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.proc = subprocess.Popen(
            [
                self.binary, "--port", str(self.port), "--bind", "127.0.0.1",
                "--save", "", "--appendonly", "no", "--dir", str(self.workdir),
                "--daemonize", "no", "--loglevel", "warning", *self.extra_args,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        self.paused = False
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(
                    f"redis-server exited with {self.proc.returncode} on port {self.port}"
                )
            if self.ping():
                return
            time.sleep(0.01)
        raise RuntimeError(f"redis-server on port {self.port} did not answer within {timeout} s")

    def ping(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                s.sendall(b"PING\r\n")
                return s.recv(16).startswith(b"+PONG")
        except OSError:
            return False

    def stop(self, sig: int = signal.SIGKILL) -> None:
        """Kill the server (SIGKILL by default, like a crash) and reap it."""
        if self.proc is None or self.proc.poll() is not None:
            return
        if self.paused and sig != signal.SIGKILL:
            self.resume()
        self.proc.send_signal(sig)
        self.proc.wait(timeout=10)
        self.paused = False

    def pause(self) -> None:
        """SIGSTOP: the server keeps its sockets but answers nothing (a stall)."""
        assert self.proc is not None and self.proc.poll() is None
        self.proc.send_signal(signal.SIGSTOP)
        self.paused = True

    def resume(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def client(self):  # -> redis.Redis (sync): for assertions in tests
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5)


def _redis_binary() -> str:
    binary = shutil.which("redis-server")
    if binary is None:
        reason = "redis-server not found on PATH (install the redis-server package)"
        if os.environ.get("HUBHOST_REQUIRE_REDIS") == "1":
            pytest.fail(f"{reason}; HUBHOST_REQUIRE_REDIS=1 requires it")
        pytest.skip(reason)
    return binary


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server per test; skipped when redis-server is missing (unless required)."""
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = RedisServer(_redis_binary(), workdir)
    server.start()
    try:
        yield server
    finally:
        server.stop(signal.SIGKILL)


class RedisClusterNodes:
    """Three real redis-server primaries forming a Redis Cluster (slots split evenly)."""

    def __init__(self, nodes: list[RedisServer]) -> None:
        self.nodes = nodes

    @property
    def url(self) -> str:
        return self.nodes[0].url

    def client(self):  # -> redis.cluster.RedisCluster (sync)
        from redis.cluster import RedisCluster

        return RedisCluster(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)


class ReplicatedCluster(RedisClusterNodes):
    """Three primaries, each with one replica (`replicas[i]` follows `nodes[i]`)."""

    def __init__(self, nodes: list[RedisServer], replicas: list[RedisServer]) -> None:
        super().__init__(nodes)
        self.replicas = replicas

    def primary_of(self, key: str) -> int:
        """Index of the primary that serves `key` now."""
        import redis

        c = redis.Redis(host="127.0.0.1", port=self.nodes[0].port, socket_timeout=5)
        try:
            slot = int(c.execute_command("CLUSTER", "KEYSLOT", key))
        finally:
            c.close()
        for i, n in enumerate(self.nodes):
            cc = redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5)
            try:
                for entry in cc.execute_command("CLUSTER", "SLOTS"):
                    if entry[0] <= slot <= entry[1] and int(entry[2][1]) == n.port:
                        return i
            finally:
                cc.close()
        raise LookupError(f"no primary serves slot {slot}")

    def failover(self, i: int, timeout: float = 20.0) -> None:
        """CLUSTER FAILOVER on the replica of primary i (coordinated: no write lost), then
        wait until it serves the slots and the cluster is ok again."""
        import redis

        rep = redis.Redis(host="127.0.0.1", port=self.replicas[i].port, socket_timeout=5)
        try:
            rep.execute_command("CLUSTER", "FAILOVER")
            deadline = time.monotonic() + timeout
            while rep.info("replication").get("role") != "master":
                if time.monotonic() > deadline:
                    raise RuntimeError("the replica did not take over")
                time.sleep(0.02)
            while b"cluster_state:ok" not in rep.execute_command("CLUSTER", "INFO"):
                if time.monotonic() > deadline:
                    raise RuntimeError("the cluster did not settle after the failover")
                time.sleep(0.02)
        finally:
            rep.close()
        self.nodes[i], self.replicas[i] = self.replicas[i], self.nodes[i]


def _cluster_nodes(tmp_path: Path, n: int, nodes: list[RedisServer]) -> list[int]:
    """Start n cluster-enabled redis-servers into `nodes` (so the caller can stop what
    started even if a later one fails); returns their bus ports."""
    binary = _redis_binary()
    bus_ports = []
    for i in range(n):
        workdir = tmp_path / f"cluster{i}"
        workdir.mkdir()
        # The bus defaults to port + 10000, which may be taken or above 65535.
        bus_ports.append(_free_port())
        node = RedisServer(binary, workdir, extra_args=(
            "--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf",
            "--cluster-port", str(bus_ports[-1]), "--cluster-node-timeout", "2000"))
        node.start()
        nodes.append(node)
    return bus_ports


def _form_cluster(clients: list[Any], bus_ports: list[int], nodes: list[RedisServer]) -> None:
    """The slots split evenly over the first three nodes, every node met
    (CLUSTER ADDSLOTSRANGE/MEET: quicker than redis-cli)."""
    step = 16384 // 3
    for i in range(3):
        last = 16383 if i == 2 else (i + 1) * step - 1
        clients[i].execute_command("CLUSTER", "ADDSLOTSRANGE", i * step, last)
    for n, bus in zip(nodes[1:], bus_ports[1:]):
        clients[0].execute_command("CLUSTER", "MEET", "127.0.0.1", n.port, bus)


@pytest.fixture
def redis_cluster_replicated(tmp_path: Path) -> Iterator[ReplicatedCluster]:
    """A Redis Cluster of 3 primaries with one replica each (for failover tests)."""
    import redis

    nodes: list[RedisServer] = []
    try:
        bus = _cluster_nodes(tmp_path, 6, nodes)
        clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5) for n in nodes]
        _form_cluster(clients, bus, nodes)
        ids = [c.execute_command("CLUSTER", "MYID").decode() for c in clients]
        deadline = time.monotonic() + 30
        for i in range(3):
            while True:   # the replica must know its primary before it can follow it
                try:
                    clients[3 + i].execute_command("CLUSTER", "REPLICATE", ids[i])
                    break
                except redis.ResponseError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        while not (all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO") for c in clients)
                   and all(c.info("replication").get("master_link_status") == "up"
                           for c in clients[3:])):
            if time.monotonic() > deadline:
                raise RuntimeError("the replicated cluster did not come up in 30 s")
            time.sleep(0.05)
        for c in clients:
            c.close()
        yield ReplicatedCluster(nodes[:3], nodes[3:])
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)


@pytest.fixture
def redis_cluster(tmp_path: Path) -> Iterator[RedisClusterNodes]:
    """A 3-node Redis Cluster built with CLUSTER ADDSLOTSRANGE/MEET (quicker than redis-cli)."""
    import redis

    nodes: list[RedisServer] = []
    try:
        bus_ports = _cluster_nodes(tmp_path, 3, nodes)
        clients = [redis.Redis(host="127.0.0.1", port=n.port, socket_timeout=5) for n in nodes]
        _form_cluster(clients, bus_ports, nodes)
        deadline = time.monotonic() + 20
        while not all(b"cluster_state:ok" in c.execute_command("CLUSTER", "INFO")
                      for c in clients):
            if time.monotonic() > deadline:
                raise RuntimeError("redis cluster did not reach cluster_state:ok in 20 s")
            time.sleep(0.02)
        for c in clients:
            c.close()
        yield RedisClusterNodes(nodes)
    finally:
        for node in nodes:
            node.stop(signal.SIGKILL)
