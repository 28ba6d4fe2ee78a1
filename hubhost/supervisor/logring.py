"""Recent log records per driver, in memory, for `hubhost logs` and `hubhost describe`.

Every record a worker sends passes `WorkerHandle._h_log`, which hands it here after the
checks (one line, escaped, naming only the worker's own drivers). Each driver has a ring
of at most RING_SIZE records and RING_BYTES of text (older ones drop off; nothing is written to disk: the journal
or the log file is the long-term store). Followers (`hubhost logs -f`) get a queue that is
fed as records arrive; a follower that falls FOLLOW_BACKLOG records behind is told how many
it missed instead of growing without bound.
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, Iterable

RING_SIZE = 1000          # records kept per driver ...
RING_BYTES = 256 << 10    # ... and at most this much text per driver (a record is <= 8 KiB)
FOLLOW_BACKLOG = 5000     # records queued for one follower before it is cut short

_HEAD = re.compile(r"^\[([^\]/]+)(?:/([^\]]+))?\] ?")

LEVEL_NAMES = {logging.DEBUG - 5: "trace", logging.DEBUG: "debug", logging.INFO: "info",
               logging.WARNING: "warn", logging.ERROR: "error", logging.CRITICAL: "critical"}


def level_name(level: int) -> str:
    best = "trace"
    for lvl, name in sorted(LEVEL_NAMES.items()):
        if level >= lvl:
            best = name
    return best


@dataclass(frozen=True)
class Entry:
    time: float          # UTC seconds since the epoch
    level: int
    driver: str
    device: str | None
    text: str            # the line as logged, "[driver/device] ..." included

    def to_json(self) -> dict[str, Any]:
        return {"time": round(self.time, 6), "level": level_name(self.level), "driver": self.driver,
                "device": self.device, "text": self.text}


def split_head(text: str) -> tuple[str | None, str | None]:
    """"[driver/device] text" -> (driver, device); (None, None) without a head."""
    m = _HEAD.match(text)
    if m is None:
        return None, None
    return m.group(1), m.group(2)


class _Follower:
    def __init__(self, match: "Filter") -> None:
        self.match = match
        self.queue: asyncio.Queue[Entry | int] = asyncio.Queue()
        self.dropped = 0


@dataclass
class Filter:
    drivers: frozenset[str] | None = None    # None: every driver
    device: str | None = None
    level: int = 0
    since: float = 0.0

    def __call__(self, e: Entry) -> bool:
        return ((self.drivers is None or e.driver in self.drivers)
                and (self.device is None or e.device == self.device)
                and e.level >= self.level and e.time >= self.since)


class LogRing:
    """Bounded rings per driver and the live followers."""

    def __init__(self, size: int = RING_SIZE, max_bytes: int = RING_BYTES) -> None:
        self.size = size
        self.max_bytes = max_bytes
        self.rings: dict[str, deque[Entry]] = {}
        self.bytes: dict[str, int] = {}
        self.followers: set[_Follower] = set()

    def add(self, level: int, driver: str, device: str | None, text: str, when: float | None = None) -> None:
        e = Entry(time.time() if when is None else when, level, driver, device, text)
        ring = self.rings.get(driver)
        if ring is None:
            ring = self.rings[driver] = deque()
        ring.append(e)
        used = self.bytes.get(driver, 0) + len(text)
        while len(ring) > self.size or (used > self.max_bytes and len(ring) > 1):
            used -= len(ring.popleft().text)
        self.bytes[driver] = used
        for f in self.followers:
            if f.match(e):
                if f.queue.qsize() >= FOLLOW_BACKLOG:
                    f.dropped += 1
                    continue
                if f.dropped:
                    f.queue.put_nowait(f.dropped)
                    f.dropped = 0
                f.queue.put_nowait(e)

    def forget(self, keep: Iterable[str]) -> None:
        """Drop the rings of drivers that left the config."""
        keep = set(keep)
        for did in list(self.rings):
            if did not in keep:
                del self.rings[did]
                self.bytes.pop(did, None)

    def recent(self, match: Filter, limit: int = RING_SIZE) -> list[Entry]:
        out = [e for ring in self.rings.values() for e in ring if match(e)]
        out.sort(key=lambda e: e.time)
        return out[-limit:] if limit else out

    def follow(self, match: Filter) -> _Follower:
        f = _Follower(match)
        self.followers.add(f)
        return f

    def unfollow(self, f: _Follower) -> None:
        self.followers.discard(f)


__all__ = ["LogRing", "Entry", "Filter", "split_head", "level_name", "RING_SIZE"]
