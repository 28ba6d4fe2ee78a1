"""`hubhost fleet status`: the fleet as Redis holds it, read with nothing but the config
(any hub's, since they share it): hubs, the leader, and who owns and drives every device."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any

from hubhost.fleet import hrw
from hubhost.fleet.clients import sync_client
from hubhost.fleet.keys import FleetKeys, lease_holder


def add_commands(sub: Any) -> None:
    f = sub.add_parser("fleet", help="fleet mode: the hubs sharing this config and who drives what")
    fs = f.add_subparsers(dest="fleet_command", required=True)
    st = fs.add_parser("status", help="hubs (serving, ready, epoch, weight, age, config hash), the "
                                      "leader, and the owner and lease holder of every device")
    st.add_argument("--config", help="the fleet's shared config (default: $HUBHOST_CONFIG)")
    st.add_argument("--json", action="store_true", help="print JSON instead of tables")
    st.set_defaults(func=_cmd_status)


def read_status(cfg: Any, r: Any) -> dict[str, Any]:
    """The fleet's state: what `hubhost fleet status` prints (and its --json)."""
    fc = cfg.fleet
    k = FleetKeys(cfg.redis.prefix, fc.id)
    ids = sorted(set(r.smembers(k.hubs)) | set(fc.hubs))
    raw = r.mget([k.hub(h) for h in ids]) if ids else []
    recs = {}
    for h, v in zip(ids, raw):
        try:
            recs[h] = json.loads(v) if v else None
        except ValueError:
            recs[h] = None
    leader = lease_holder(r.get(k.leader))
    lead_hash = (recs.get(leader) or {}).get("config") if leader else None
    now = time.time()
    hubs = []
    for h in ids:
        rec = recs.get(h)
        if rec is None or rec.get("left"):
            hubs.append({"id": h, "live": False, "left": bool(rec and rec.get("left"))})
            continue
        hubs.append({"id": h, "live": True, "serving": bool(rec.get("serving")), "ready": bool(rec.get("ready")),
                     "epoch": rec.get("epoch"), "weight": rec.get("weight"), "tags": rec.get("tags", []),
                     "age": round(now - float(rec.get("started", now)), 1), "config": rec.get("config"),
                     "config_differs": bool(lead_hash) and rec.get("config") != lead_hash,
                     "leader": h == leader})
    cands = [hrw.Candidate(h["id"], float(h.get("weight") or 1.0), frozenset(h.get("tags") or ()))
             for h in hubs if h.get("live") and h.get("serving")]
    devices = []
    for d in cfg.drivers:
        for dev in d.devices:
            p = fc.placement.get(dev.id)
            if p is not None and p.hub is not None:
                devices.append({"id": dev.id, "driver": d.id, "placement": f"pinned:{p.hub}",
                                "owner": p.hub, "lease": None})
                continue
            needs = p.needs if p is not None else ()
            devices.append({"id": dev.id, "driver": d.id,
                            "placement": "movable" + (f" needs {','.join(needs)}" if needs else ""),
                            "owner": hrw.winner(dev.id, cands, needs),
                            "lease": lease_holder(r.get(k.lease(dev.id)))})
    return {"fleet": fc.id, "epoch": int(r.get(k.epoch) or 0), "state": r.get(k.state), "leader": leader,
            "hubs": hubs, "devices": devices}


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def _cmd_status(args: argparse.Namespace) -> int:
    from hubhost import config as config_mod

    path = args.config or os.environ.get("HUBHOST_CONFIG")
    if not path:
        print("hubhost fleet status: give --config (the fleet's shared config) or set $HUBHOST_CONFIG",
              file=sys.stderr)
        return 2
    cfg = config_mod.load(path)
    if cfg.fleet is None:
        print(f"hubhost fleet status: {path} has no [fleet] section (this hub is not in a fleet)",
              file=sys.stderr)
        return 2
    try:
        r = sync_client(cfg.redis.url, cfg.redis.cluster, 5.0)
        st = read_status(cfg, r)
    except Exception as e:  # noqa: BLE001 - redis-py's connection errors
        print(f"hubhost fleet status: cannot read the fleet from {cfg.redis.url}: {type(e).__name__}: {e}",
              file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"fleet {st['fleet']}: epoch {st['epoch']}, {st['state'] or 'not ready'}, "
          f"leader {st['leader'] or '(none)'}")
    rows = [["HUB", "STATE", "READY", "EPOCH", "WEIGHT", "TAGS", "AGE", "CONFIG"]]
    for h in st["hubs"]:
        if not h["live"]:
            rows.append([h["id"], "left" if h.get("left") else "down", "-", "-", "-", "-", "-", "-"])
            continue
        state = ("leader" if h["leader"] else "serving") if h["serving"] else "starting/stopping"
        rows.append([h["id"], state, "yes" if h["ready"] else "no", str(h["epoch"]), f"{h['weight']:g}",
                     ",".join(h["tags"]) or "-", f"{h['age']:.0f}s",
                     (h["config"] or "?") + ("  DIFFERS from the leader's" if h["config_differs"] else "")])
    print(_table(rows))
    print()
    rows = [["DEVICE", "DRIVER", "PLACEMENT", "OWNER", "LEASE"]]
    for d in st["devices"]:
        lease = d["lease"] or "-"
        if d["placement"].startswith("movable") and d["lease"] != d["owner"]:
            lease += "  (moving)" if d["lease"] else "  (not running)"
        rows.append([d["id"], d["driver"], d["placement"], d["owner"] or "(no hub)", lease])
    print(_table(rows))
    differs = [h["id"] for h in st["hubs"] if h.get("config_differs")]
    if differs:
        print(f"\nwarning: {', '.join(differs)} run{'s' if len(differs) == 1 else ''} a config that "
              "differs from the leader's: every hub of a fleet must load the same file", file=sys.stderr)
    return 0
