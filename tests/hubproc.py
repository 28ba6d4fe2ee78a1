"""A real `hubhost run` in a subprocess, watched from outside as an operator would: its log
lines as they arrive (stamped on arrival), its API over the Unix socket, the CPU and memory
of the supervisor and of every process under it."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

CLK_TCK = os.sysconf("SC_CLK_TCK")


class _UnixHTTP(http.client.HTTPConnection):
    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("hub", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        s.connect(self._path)
        self.sock = s


class HubProcess:
    def __init__(self, config: Path | None, state: Path, *extra: str, env: dict[str, str] | None = None) -> None:
        """`config` None: no --config (e.g. with "--demo" in `extra`)."""
        self.state = state
        e = {**os.environ, **(env or {})}
        for k in ("NOTIFY_SOCKET", "RUNTIME_DIRECTORY", "JOURNAL_STREAM", "WATCHDOG_USEC"):
            e.pop(k, None)
        where = ["--config", str(config)] if config is not None else []
        self.proc = subprocess.Popen([sys.executable, "-m", "hubhost", "run", *where,
                                      "--state-dir", str(state), *extra],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=e)
        self.lines: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            with self._lock:
                self.lines.append((time.monotonic(), raw.decode("utf-8", "replace").rstrip("\n")))

    # -- logs ----------------------------------------------------------------------------
    def find(self, text: str) -> list[tuple[float, str]]:
        with self._lock:
            return [(t, ln) for t, ln in self.lines if text in ln]

    def wait_for(self, text: str, timeout: float = 10.0, count: int = 1) -> list[tuple[float, str]]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.find(text)
            if len(found) >= count:
                return found
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        raise AssertionError(f"no {count} line(s) with {text!r} in {timeout} s; last lines:\n"
                             + "\n".join(ln for _, ln in self.lines[-30:]))

    def gaps(self, text: str, since: float = 0.0) -> list[float]:
        times = [t for t, _ in self.find(text) if t >= since]
        return [b - a for a, b in zip(times, times[1:])]

    # -- API -------------------------------------------------------------------------------
    def api(self, method: str, path: str, body: Any = None, timeout: float = 5.0) -> tuple[int, Any]:
        conn = _UnixHTTP(str(self.state / "hubhost.sock"), timeout)
        try:
            data = json.dumps(body).encode() if body is not None else None
            conn.request(method, path, body=data, headers={"Content-Type": "application/json"} if data else {})
            r = conn.getresponse()
            raw = r.read()
            return r.status, (json.loads(raw) if raw else None)
        finally:
            conn.close()

    def wait_api(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                if self.api("GET", "/api/v1/health")[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.05)
        raise AssertionError("the hub's API did not answer")

    # -- processes ---------------------------------------------------------------------------
    def tree(self) -> list[int]:
        """The supervisor and every process under it (zygote, workers)."""
        children: dict[int, list[int]] = {}
        for d in os.listdir("/proc"):
            if not d.isdigit():
                continue
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
            except OSError:
                continue
            children.setdefault(int(fields[1]), []).append(int(d))
        out, todo = [], [self.proc.pid]
        while todo:
            p = todo.pop()
            out.append(p)
            todo.extend(children.get(p, []))
        return out

    def workers(self) -> list[int]:
        return [p for p in self.tree() if _comm(p).startswith("hh-") and _comm(p) != "hh-zygote"]

    def cpu_seconds(self) -> float:
        total = 0
        for p in self.tree():
            try:
                with open(f"/proc/{p}/stat", "rb") as f:
                    fields = f.read().rsplit(b")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])
            except OSError:
                pass
        return total / CLK_TCK

    def rss(self, pid: int | None = None) -> int:
        with open(f"/proc/{pid or self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
        return 0

    def anon(self, pid: int) -> int:
        with open(f"/proc/{pid}/statm") as f:
            fields = f.read().split()
        return (int(fields[1]) - int(fields[2])) * os.sysconf("SC_PAGE_SIZE")

    def stop(self, timeout: float = 10.0) -> tuple[int, float]:
        """SIGTERM; returns (exit status, seconds it took)."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"the hub did not stop within {timeout} s of SIGTERM") from None
        self._reader.join(2)
        return code, time.monotonic() - t0

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""
