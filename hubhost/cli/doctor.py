"""`hubhost doctor`: what an operator would check on a hub, one line per check.

Each line reads `OK|FAIL|WARN <check>: <what was found>` and a FAIL carries a hint. The exit
status is 1 if any check failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Callable

from hubhost import config as config_mod
from hubhost import paths

UNIT_PATHS = (Path("/etc/systemd/system/hubhost.service"), Path("/lib/systemd/system/hubhost.service"),
              Path("/usr/lib/systemd/system/hubhost.service"))
MIN_FREE = 50 * 1024 * 1024


class Report:
    def __init__(self, out: Callable[[str], None] = print) -> None:
        self.out = out
        self.failed = 0

    def ok(self, check: str, what: str) -> None:
        self.out(f"OK   {check}: {what}")

    def warn(self, check: str, what: str, hint: str = "") -> None:
        self.out(f"WARN {check}: {what}" + (f" (hint: {hint})" if hint else ""))

    def fail(self, check: str, what: str, hint: str) -> None:
        self.failed += 1
        self.out(f"FAIL {check}: {what} (hint: {hint})")


def _check_state_dir(r: Report, state: Path) -> None:
    try:
        state.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=state, prefix=".doctor-") as f:
            f.write(b"x")
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        r.fail("state dir", f"{state} is not writable: {e.strerror or e}",
               "create it and give the hub's user write access (systemd: StateDirectory=hubhost)")
        return
    free = shutil.disk_usage(state).free
    if free < MIN_FREE:
        r.fail("state dir", f"{state}: only {free // (1024 * 1024)} MiB free",
               "free space: datastores are written atomically and need room for a second copy")
    else:
        r.ok("state dir", f"{state} writable, {free // (1024 * 1024)} MiB free")


def _check_serial(r: Report, device_id: str, port: str) -> None:
    check = f"serial {device_id}"
    if not os.path.exists(port):
        r.fail(check, f"{port} does not exist", "is the adapter plugged in? use a /dev/serial/by-id/ path "
               "so the name survives replugging")
        return
    try:
        import serial

        s = serial.Serial(port, timeout=0, exclusive=True)
        s.close()
    except Exception as e:  # noqa: BLE001 - pyserial raises several kinds
        r.fail(check, f"{port} cannot be opened: {e}",
               "add the hub's user to the dialout group, or check another program holds the port")
        return
    r.ok(check, f"{port} opens")


def _check_redis(r: Report, cfg: config_mod.RedisConfig) -> None:
    import redis

    try:
        client = redis.Redis.from_url(cfg.url, socket_timeout=cfg.socket_timeout,
                                      socket_connect_timeout=cfg.connect_timeout)
        client.ping()
        client.close()
    except Exception as e:  # noqa: BLE001
        r.fail("redis", f"{_redact(cfg.url)} unreachable: {e}",
               "start redis-server or fix [redis] url; the hub runs without Redis, but does not mirror")
        return
    r.ok("redis", f"{_redact(cfg.url)} answers PING")


def _redact(url: str) -> str:
    if "@" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url


def _check_tcp(r: Report, device_id: str, host: str, port: int) -> None:
    check = f"tcp {device_id}"
    try:
        with socket.create_connection((host, int(port)), timeout=2):
            pass
    except OSError as e:
        r.warn(check, f"{host}:{port} not reachable now: {e.strerror or e}",
               "the hub reconnects by itself; check the device is powered and on the network")
        return
    r.ok(check, f"{host}:{port} accepts connections")


def run_doctor(config_path: Path, state_dir: str | None, out: Callable[[str], None] = print) -> int:
    from hubhost.cli.check import check_driver

    r = Report(out)
    try:
        cfg = config_mod.load(config_path)
    except config_mod.ConfigError as e:
        r.fail("config", str(e), "fix the named key; `hubhost run` refuses this config")
        return 1
    r.ok("config", f"{config_path} parses ({len(cfg.drivers)} drivers)")
    for d in cfg.drivers:
        ok, report = check_driver(d.path)
        if ok:
            r.ok(f"driver {d.id}", f"{d.path} loads")
        else:
            r.fail(f"driver {d.id}", report.splitlines()[0] if report else "does not load",
                   f"run `hubhost check {d.path}` for details")
    _check_state_dir(r, paths.state_dir(state_dir, cfg.state_dir))
    for d in cfg.drivers:
        for dev in d.devices:
            if dev.transport == "serial":
                _check_serial(r, dev.id, str(dev.transport_settings.get("port", "")))
            elif dev.transport == "tcp" and "host" in dev.transport_settings:
                _check_tcp(r, dev.id, str(dev.transport_settings["host"]), dev.transport_settings.get("port", 0))
    if cfg.redis is not None:
        _check_redis(r, cfg.redis)
    else:
        r.ok("redis", "not configured (status stays in memory)")
    unit = next((p for p in UNIT_PATHS if p.exists()), None)
    if unit:
        r.ok("unit", f"{unit} installed")
    else:
        r.warn("unit", "hubhost.service is not installed",
               "copy systemd/hubhost.service to /etc/systemd/system/ and `systemctl enable --now hubhost`")
    return 1 if r.failed else 0


def _cmd(args: argparse.Namespace) -> int:
    given = args.config or os.environ.get("HUBHOST_CONFIG")
    cfg = Path(given) if given else paths.config_dir() / "hub.toml"
    return run_doctor(cfg, args.state_dir)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("doctor", help="check config, drivers, state dir, serial ports, Redis, unit")
    p.add_argument("--config", help="hub config (default: $HUBHOST_CONFIG, else <config dir>/hub.toml)")
    p.add_argument("--state-dir")
    p.set_defaults(func=_cmd)
