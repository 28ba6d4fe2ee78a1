"""GET /metrics: the hub in the Prometheus exposition format (docs/metrics.md).

One custom collector reads the supervisor's state at scrape time: nothing is counted per
event here beyond the plain integers the supervisor keeps anyway (status changes per
device, exec outcomes, datastore flushes) and the aggregates workers send once a second
(handler histograms and faults, hubhost/metrics.py). Label values come from the
configuration only (driver ids, device ids, handler kinds, fault kinds, exec codes), so the
number of series is bounded by the config, never by requests or values.
"""

from __future__ import annotations

from typing import Any, Iterator

from prometheus_client.core import (CollectorRegistry, CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from hubhost import metrics
from hubhost.functions import CODES

EXEC_CODES = ("ok", *CODES)


def _buckets(bounds: tuple[float, ...], counts: list[Any]) -> list[tuple[str, float]]:
    """Non-cumulative counts (+Inf last) -> prometheus_client's cumulative (le, count)."""
    out, acc = [], 0
    for le, n in zip(bounds, counts):
        acc += n
        out.append((repr(float(le)), acc))
    acc += counts[len(bounds)]
    out.append(("+Inf", acc))
    return out


class HubCollector(Collector):
    """Every hubhost_* metric, built from `sup` when scraped."""

    def __init__(self, sup: Any) -> None:
        self.sup = sup

    def describe(self) -> list[Metric]:
        return []      # register() must not scrape the hub

    def collect(self) -> Iterator[Metric]:
        sup = self.sup
        slots = list(sup.slots.values())

        up = GaugeMetricFamily("hubhost_driver_up", "1 while the driver instance is running, else 0",
                               labels=["driver"])
        restarts = CounterMetricFamily("hubhost_driver_restarts", "Restarts of the driver instance "
                                       "(crashes inside its worker and deaths of its worker)",
                                       labels=["driver"])
        memory = GaugeMetricFamily("hubhost_driver_memory_bytes", "Lua heap of the driver instance, "
                                   "as its worker last reported (once a second)", labels=["driver"])
        handler = HistogramMetricFamily("hubhost_handler_seconds", "Wall time of each Lua handler "
                                        "call (until it returns or yields), by handler kind",
                                        labels=["driver", "kind"])
        faults = CounterMetricFamily("hubhost_handler_faults", "Handlers that failed: kind is error "
                                     "(a Lua error), cpu or memory (a limit hit); handler is the "
                                     "handler kind", labels=["driver", "handler", "kind"])
        bounds = metrics.HANDLER_BUCKETS
        for s in slots:
            did = s.id
            up.add_metric([did], 1.0 if s.state == "running" else 0.0)
            restarts.add_metric([did], float(s.restarts))
            memory.add_metric([did], float(s.memory))
            base_h, base_f = s.handler_base
            cur_h, cur_f = s.handler_stats
            for kind in metrics.HANDLER_KINDS:
                h, b = cur_h.get(kind), base_h.get(kind)
                if h is None and b is None:
                    continue
                if h is None or b is None:
                    h = h or b
                else:
                    h = [x + y for x, y in zip(h, b)]
                handler.add_metric([did, kind], _buckets(bounds, h), h[-1])
            if cur_f or base_f:
                for kind in metrics.HANDLER_KINDS:
                    c, b = cur_f.get(kind, {}), base_f.get(kind, {})
                    for fk in metrics.FAULT_KINDS:
                        n = c.get(fk, 0) + b.get(fk, 0)
                        if n:
                            faults.add_metric([did, kind, fk], float(n))
        yield up
        yield restarts
        yield handler
        yield faults
        yield memory

        connected = GaugeMetricFamily("hubhost_device_connected", "1 while the device's status says "
                                      "connected = true, else 0", labels=["driver", "device"])
        changes = CounterMetricFamily("hubhost_status_changes", "Status fields of the device that "
                                      "changed value (as the supervisor applied them)",
                                      labels=["driver", "device"])
        status, counted = sup.status, sup.status_changes
        for s in slots:
            for dev in s.cfg.devices:
                connected.add_metric([s.id, dev.id], 1.0 if status.get(dev.id, "connected") == "true" else 0.0)
                changes.add_metric([s.id, dev.id], float(counted.get(dev.id, 0)))
        yield connected
        yield changes

        m_conn = GaugeMetricFamily("hubhost_mirror_connected", "1 while the Redis mirror is "
                                   "connected, 0 while not (absent without [redis])")
        m_pend = GaugeMetricFamily("hubhost_mirror_pending", "Distinct status fields not yet "
                                   "written to Redis")
        m_lag = GaugeMetricFamily("hubhost_mirror_lag_seconds", "Age of the oldest change not yet "
                                  "written to Redis (0 when in sync)")
        mirror = getattr(sup, "mirror", None)
        if mirror is not None:
            st = mirror.state()
            m_conn.add_metric([], 1.0 if st.get("connected") else 0.0)
            m_pend.add_metric([], float(st.get("pending") or 0))
            m_lag.add_metric([], float(st.get("lag_seconds") or 0.0))
        yield m_conn
        yield m_pend
        yield m_lag

        flush = HistogramMetricFamily("hubhost_datastore_flush_seconds", "Time to write one "
                                      "datastore snapshot to disk (atomic replace with fsync)")
        fh = sup.flush_hist
        flush.add_metric([], _buckets(metrics.FLUSH_BUCKETS, fh), fh[-1])
        yield flush
        yield CounterMetricFamily("hubhost_datastore_flush_failures", "Datastore snapshots that "
                                  "could not be written (disk errors) or were refused (not valid "
                                  "JSON)", value=float(sup.flush_failures))

        ex = CounterMetricFamily("hubhost_exec", "Function calls (API, WebSocket, CLI and driver to "
                                 "driver) by outcome: ok or the error code", labels=["code"])
        fns = getattr(sup, "functions", None)
        counts = getattr(fns, "exec_counts", None) or {}
        for code in EXEC_CODES:
            ex.add_metric([code], float(counts.get(code, 0)))
        yield ex

        fleet = getattr(sup, "fleet", None)
        if fleet is not None:
            yield from _fleet_metrics(fleet)


def _fleet_metrics(fleet: Any) -> Iterator[Metric]:
    """Fleet mode only. The `hub` label takes the hubs the shared config lists plus this
    one (hubs that merely registered in Redis are not labels: Redis is not the config)."""
    hubs = sorted(set(fleet.fc.hubs) | {fleet.hub_id})
    up = GaugeMetricFamily("hubhost_fleet_hub_up", "1 while the hub is registered and serving, as "
                           "this hub last read the fleet", labels=["hub"])
    for h in hubs:
        rec = fleet.hubs.get(h)
        up.add_metric([h], 1.0 if rec and rec.get("serving") else 0.0)
    yield up
    yield GaugeMetricFamily("hubhost_fleet_leader", "1 while this hub is the fleet's leader",
                            value=1.0 if fleet.is_leader else 0.0)
    yield GaugeMetricFamily("hubhost_fleet_epoch", "The fleet's epoch as this hub last read it",
                            value=float(fleet.epoch))
    yield GaugeMetricFamily("hubhost_fleet_ready", "1 while this hub drives exactly what the fleet "
                            "gives it, for the current epoch", value=1.0 if fleet.ready else 0.0)
    yield GaugeMetricFamily("hubhost_fleet_fenced", "1 while this hub's leases are past their fence "
                            "(it could not renew: its movable devices are stopped)",
                            value=1.0 if fleet._fenced() or fleet.suspect else 0.0)
    yield GaugeMetricFamily("hubhost_fleet_devices_held", "Movable devices whose lease this hub holds",
                            value=float(len(fleet.held)))


class HubMetrics:
    """The registry /metrics renders: only the hub's collector (no process or GC metrics of
    the supervisor: node_exporter or the systemd unit's accounting have those)."""

    def __init__(self, sup: Any) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(HubCollector(sup))

    def render(self, accept: str | None = None) -> tuple[bytes, str]:
        """The text exposition format (version 0.0.4), whatever the Accept header asks."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


__all__ = ["HubCollector", "HubMetrics", "EXEC_CODES"]
