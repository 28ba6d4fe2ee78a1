"""What the console's hub page shows, as one JSON-able document: the page renders it and
the WebSocket's `watch_hub` pushes it again whenever it changes (once a second at most).

Per worker process the CPU and resident memory come from /proc (the supervisor knows each
worker's pid); CPU percent is measured between two samples, so the first sample of a
worker has only its total CPU seconds.
"""

from __future__ import annotations

import os
import time
from typing import Any

from hubhost.supervisor.logring import level_name

__all__ = ["WorkerUsage", "hub_summary"]

_TCK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


class WorkerUsage:
    """CPU seconds, CPU percent since the last sample and RSS of processes, from /proc."""

    def __init__(self) -> None:
        self._last: dict[int, tuple[float, float]] = {}   # pid -> (monotonic, cpu seconds)

    def sample(self, pid: int | None) -> dict[str, Any]:
        if not pid:
            return {"pid": None, "cpu_seconds": None, "cpu_percent": None, "rss_bytes": None}
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
            with open(f"/proc/{pid}/statm", "rb") as f:
                rss = int(f.read().split()[1]) * _PAGE
        except (OSError, IndexError, ValueError):
            return {"pid": pid, "cpu_seconds": None, "cpu_percent": None, "rss_bytes": None}
        cpu = (int(fields[11]) + int(fields[12])) / _TCK
        now = time.monotonic()
        prev = self._last.get(pid)
        self._last[pid] = (now, cpu)
        percent = None
        if prev is not None and now - prev[0] >= 0.2:
            percent = round(100.0 * (cpu - prev[1]) / (now - prev[0]), 1)
        return {"pid": pid, "cpu_seconds": round(cpu, 2), "cpu_percent": percent, "rss_bytes": rss}

    def forget_except(self, pids: set[int]) -> None:
        for pid in [p for p in self._last if p not in pids]:
            del self._last[pid]


def hub_summary(sup: Any, usage: WorkerUsage) -> dict[str, Any]:
    """Drivers (state, restarts, last error, Lua memory, their worker's CPU and RSS), the
    Redis mirror, and fleet mode's status when the hub runs in fleet mode."""
    from hubhost.api.server import condition

    workers: dict[str, dict[str, Any]] = {}
    for name, w in getattr(sup, "workers", {}).items():
        pid = w.pid if getattr(w, "alive", False) else None
        workers[name] = {"name": name, **usage.sample(pid)}
    usage.forget_except({w["pid"] for w in workers.values() if w["pid"]})
    drivers = []
    for s in sup.slots.values():
        w = s.worker
        drivers.append({
            "id": s.id, "name": s.name, "state": s.state, "condition": condition(s),
            "restarts": s.restarts, "last_error": s.last_error, "lua_memory_bytes": s.memory,
            "log_level": level_name(s.log_level) if s.log_level is not None else None,
            "worker": workers.get(w.name) if w is not None else None,
            "devices": [{"id": d.id, "label": d.label} for d in s.cfg.devices],
        })
    mirror = getattr(sup, "mirror", None)
    fleet = getattr(sup, "fleet", None)     # fleet mode (hubhost/fleet/), when the hub has it
    fleet_status = None
    if fleet is not None:
        try:
            fleet_status = fleet.status()
        except Exception as e:  # noqa: BLE001 - the page shows what went wrong instead
            fleet_status = {"error": f"{type(e).__name__}: {e}"}
    return {
        "hub": sup.config.hub_id,
        "counts": sup.counts(),
        "drivers": drivers,
        "mirror": mirror.state() if mirror is not None else None,
        "fleet": fleet_status,
    }
