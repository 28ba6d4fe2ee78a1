"""Helpers for tests that run real hubs: driver folders on disk, configs, and an in-process
supervisor in the test's own event loop, with driver log lines captured as they happen."""

from __future__ import annotations

import asyncio
import logging
import textwrap
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator

from hubhost import config as config_mod
from hubhost.hub import install_parts
from hubhost.supervisor.supervisor import Supervisor


def write_driver(root: Path, name: str, init_src: str, **files: str) -> Path:
    """Create a driver folder `root/name` with init.lua and extra files ({"a/b.lua": src})."""
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "init.lua").write_text(textwrap.dedent(init_src))
    for rel, src in files.items():
        p = d / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(textwrap.dedent(src))
    return d


def write_config(path: Path, text: str) -> Path:
    path.write_text(textwrap.dedent(text))
    return path


@dataclass
class Captured:
    """Log records of the hub, with the time they were emitted."""

    records: list[logging.LogRecord] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def lines(self, contains: str = "") -> list[str]:
        with self.lock:
            return [r.getMessage() for r in self.records if contains in r.getMessage()]

    def times(self, contains: str) -> list[float]:
        with self.lock:
            return [r.created for r in self.records if contains in r.getMessage()]

    def errors(self) -> list[str]:
        with self.lock:
            return [r.getMessage() for r in self.records if r.levelno >= logging.ERROR]

    async def wait_for(self, contains: str, timeout: float = 5.0, count: int = 1) -> list[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            found = self.lines(contains)
            if len(found) >= count:
                return found
            await asyncio.sleep(0.02)
        raise AssertionError(f"no {count} log line(s) containing {contains!r} within {timeout} s; "
                             f"last lines: {self.lines()[-15:]}")


class _Handler(logging.Handler):
    def __init__(self, cap: Captured) -> None:
        super().__init__(logging.DEBUG)
        self.cap = cap

    def emit(self, record: logging.LogRecord) -> None:
        if not record.name.startswith("hubhost"):
            return  # asyncio/aiohttp debug lines would match the tests' searches
        with self.cap.lock:
            self.cap.records.append(record)


@asynccontextmanager
async def running_hub(cfg_path: Path, state_dir: Path) -> AsyncIterator[tuple[Supervisor, Captured]]:
    """Start a hub from a config file inside the current event loop; stop it on exit."""
    cap = Captured()
    handler = _Handler(cap)
    root = logging.getLogger()
    old_level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    cfg = config_mod.load(cfg_path)
    sup = Supervisor(cfg, state_dir)
    try:
        install_parts(sup)
        await sup.start()
        yield sup, cap
    finally:
        await sup.stop()
        root.removeHandler(handler)
        root.setLevel(old_level)


def run(coro: Any) -> Any:
    return asyncio.run(coro)
