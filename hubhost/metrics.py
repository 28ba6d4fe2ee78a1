"""Handler timing and fault counts, kept in each worker and sent to the supervisor.

The worker aggregates: per driver, a histogram of handler durations (bucket counts by
handler kind) and fault counters (by handler kind and fault kind). Every second its `mem`
message carries the snapshot of each driver whose numbers moved (cumulative since the
worker started); the supervisor checks it (`check_snapshot`) and serves it on `/metrics`
(hubhost/api/metrics.py). No prometheus_client here: workers never import it.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from typing import Any

# upper bounds in seconds (the last bucket, +Inf, is implicit)
HANDLER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1,
                   0.25, 0.5, 1.0, 2.5, 5.0)
FLUSH_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)

HANDLER_KINDS = ("timer", "receive", "function", "resume", "subscription", "lifecycle", "other")
FAULT_KINDS = ("error", "cpu", "memory")

# the first word of a handler's label (runtime.py, functions.py, devicelink.py) -> kind
_KIND_OF = {
    "timer": "timer", "on_receive": "receive", "connection": "receive", "function": "function",
    "resume": "resume", "subscription": "subscription", "init": "lifecycle",
    "added": "lifecycle", "removed": "lifecycle", "shutdown": "lifecycle",
}
_NB = len(HANDLER_BUCKETS) + 1      # bucket counts per kind, +Inf included
MAX_COUNT = 1 << 53


def kind_of(label: str) -> str:
    return _KIND_OF.get(label.partition(" ")[0], "other")


def new_hist(nbuckets: int) -> list[Any]:
    """[count per bucket (not cumulative, +Inf last)..., sum of seconds]"""
    return [0] * (nbuckets + 1) + [0.0]


def observe(hist: list[Any], bounds: tuple[float, ...], seconds: float) -> None:
    hist[bisect_left(bounds, seconds)] += 1
    hist[-1] += seconds


class HandlerStats:
    """One driver's numbers inside its worker (they outlive restarts of its runtime)."""

    __slots__ = ("hist", "faults", "dirty")

    def __init__(self) -> None:
        self.hist: dict[str, list[Any]] = {}
        self.faults: dict[str, dict[str, int]] = {}
        self.dirty = False

    def observe(self, label: str, seconds: float) -> None:
        kind = _KIND_OF.get(label.partition(" ")[0], "other")
        h = self.hist.get(kind)
        if h is None:
            h = self.hist[kind] = new_hist(len(HANDLER_BUCKETS))
        h[bisect_left(HANDLER_BUCKETS, seconds)] += 1
        h[-1] += seconds
        self.dirty = True

    def fault(self, label: str, fault_kind: str) -> None:
        per = self.faults.setdefault(kind_of(label), {})
        fk = fault_kind if fault_kind in FAULT_KINDS else "error"
        per[fk] = per.get(fk, 0) + 1
        self.dirty = True

    def snapshot(self) -> list[Any]:
        self.dirty = False
        return [{k: list(v) for k, v in self.hist.items()},
                {k: dict(v) for k, v in self.faults.items()}]


def _count(v: Any) -> int:
    if type(v) is not int or not 0 <= v <= MAX_COUNT:
        raise ValueError(f"a count must be an integer in [0, 2^53], got {str(v)[:40]!r}")
    return v


def check_snapshot(entry: Any) -> tuple[dict[str, list[Any]], dict[str, dict[str, int]]]:
    """A worker's snapshot of one driver, checked: known kinds only, the right number of
    buckets, counts and a finite sum only. Raises ValueError on anything else."""
    if not isinstance(entry, (list, tuple)) or len(entry) != 2:
        raise ValueError("handler stats must be [histograms, faults]")
    hist_in, faults_in = entry
    if not isinstance(hist_in, dict) or not isinstance(faults_in, dict):
        raise ValueError("handler stats must be [histograms, faults] of tables")
    hist: dict[str, list[Any]] = {}
    for kind, h in hist_in.items():
        if kind not in HANDLER_KINDS:
            raise ValueError(f"an unknown handler kind {str(kind)[:40]!r}")
        if not isinstance(h, (list, tuple)) or len(h) != _NB + 1:
            raise ValueError(f"a {kind} histogram must have {_NB} bucket counts and a sum")
        counts = [_count(c) for c in h[:-1]]
        total = h[-1]
        if type(total) not in (int, float) or not math.isfinite(total) or total < 0:
            raise ValueError(f"a {kind} histogram's sum must be a finite number >= 0")
        hist[kind] = counts + [float(total)]
    faults: dict[str, dict[str, int]] = {}
    for kind, per in faults_in.items():
        if kind not in HANDLER_KINDS or not isinstance(per, dict):
            raise ValueError(f"faults of an unknown handler kind {str(kind)[:40]!r}")
        out = faults[kind] = {}
        for fk, n in per.items():
            if fk not in FAULT_KINDS:
                raise ValueError(f"an unknown fault kind {str(fk)[:40]!r}")
            out[fk] = _count(n)
    return hist, faults


def add_into(base: tuple[dict, dict], more: tuple[dict, dict]) -> None:
    """Fold one worker incarnation's totals into the driver's base (counters stay monotonic
    when a worker is replaced)."""
    bh, bf = base
    mh, mf = more
    for kind, h in mh.items():
        b = bh.get(kind)
        bh[kind] = list(h) if b is None else [x + y for x, y in zip(b, h)]
    for kind, per in mf.items():
        b = bf.setdefault(kind, {})
        for fk, n in per.items():
            b[fk] = b.get(fk, 0) + n


__all__ = ["HANDLER_BUCKETS", "FLUSH_BUCKETS", "HANDLER_KINDS", "FAULT_KINDS", "HandlerStats",
           "check_snapshot", "add_into", "kind_of", "new_hist", "observe"]
