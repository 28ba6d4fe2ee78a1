"""The hub's TOML configuration (DESIGN section 6), checked at start.

A bad config is refused with one message naming the file, the key and the problem, e.g.
`hub.toml: drivers[0].devices[2].index: must be a positive integer, got 'one'`.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hubhost.sandbox.runtime import DEFAULT_LIMITS, DeviceInfo

TRANSPORTS = ("serial", "tcp", "udp")
LOG_LEVELS = ("trace", "debug", "info", "warning", "warn", "error", "critical")
_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]{0,127}$")
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(B|KiB|MiB|GiB|KB|MB|GB|k|K|M|G)?\s*$")
_UNITS = {None: 1, "B": 1, "KiB": 1024, "MiB": 1024**2, "GiB": 1024**3, "KB": 1000, "MB": 1000**2,
          "GB": 1000**3, "k": 1024, "K": 1024, "M": 1024**2, "G": 1024**3}
DEVICE_KEYS = {"id", "label", "system", "module", "index", "transport", "config", "hub", "needs"}


def valid_id(text: str) -> bool:
    """An id as the config allows them (hubs, drivers, devices)."""
    return bool(_ID.match(text))


class ConfigError(ValueError):
    """A config file that cannot be used; the message names file, key and reason."""


@dataclass
class RedisConfig:
    url: str
    prefix: str = ""
    socket_timeout: float = 2.0
    connect_timeout: float = 2.0
    cluster: bool = False          # a Redis Cluster: redis-py's cluster client routes by key


@dataclass
class FleetHub:
    """A hub as the shared config lists it ([[fleet.hubs]]); unlisted hubs: weight 1, no tags."""

    id: str
    weight: float = 1.0
    tags: frozenset[str] = frozenset()


@dataclass
class Placement:
    """Where a device may run: pinned to one hub (`hub`), or movable among hubs carrying
    every tag in `needs`."""

    hub: str | None = None
    needs: tuple[str, ...] = ()


@dataclass
class FleetConfig:
    """[fleet] (DESIGN section 8): every hub of a fleet loads the same file."""

    id: str
    ttl: float = 10.0
    hubs: dict[str, FleetHub] = field(default_factory=dict)
    placement: dict[str, Placement] = field(default_factory=dict)   # device id -> where
    config_hash: str = ""          # of the file's bytes: hubs with another file are flagged

    def hub(self, hub_id: str) -> FleetHub:
        return self.hubs.get(hub_id) or FleetHub(hub_id)

    def movable(self, device_id: str) -> bool:
        p = self.placement.get(device_id)
        return p is None or p.hub is None


@dataclass
class DriverConfig:
    id: str
    path: Path
    devices: list[DeviceInfo] = field(default_factory=list)
    flush_interval: float = 10.0
    max_memory: int = 64 * 1024 * 1024
    cpu_limit: float = 1.0
    group: str | None = None      # drivers of one group share a worker process (shared fate)
    max_subscriptions: int = 1000  # subscriptions of driver code to other devices' status
    log_level: str | None = None  # this driver's own level (else the hub's); live on reload
    # fleet mode: devices of this driver the config lists that other hubs drive now (they
    # are not "removed": their persistent_store lives on in Redis)
    elsewhere: tuple[str, ...] = ()
    # per-driver caps (README "Limits"; DriverRuntime kwargs of the same names)
    max_timers: int = DEFAULT_LIMITS["max_timers"]
    max_pending_requests: int = DEFAULT_LIMITS["max_pending_requests"]
    max_send_backlog: int = DEFAULT_LIMITS["max_send_backlog"]
    max_status_value: int = DEFAULT_LIMITS["max_status_value"]
    max_status_fields: int = DEFAULT_LIMITS["max_status_fields"]

    def runtime_limits(self) -> dict[str, int]:
        """The caps as DriverRuntime keyword arguments."""
        return {name: getattr(self, name) for name in DEFAULT_LIMITS}

    @property
    def worker_name(self) -> str:
        """The worker that runs this driver: its group, or a worker of its own."""
        return f"group:{self.group}" if self.group else f"driver:{self.id}"


@dataclass
class HubConfig:
    hub_id: str = "hub"
    state_dir: str | None = None
    flush_interval: float = 10.0
    log_level: str = "info"
    redis: RedisConfig | None = None
    drivers: list[DriverConfig] = field(default_factory=list)
    api: dict[str, Any] = field(default_factory=dict)
    source: Path | None = None
    # resident anonymous memory a worker may hold beyond its drivers' max_memory
    worker_overhead: int = 64 * 1024 * 1024
    fleet: FleetConfig | None = None
    given_hub_id: str | None = None   # --hub-id / $HUBHOST_HUB_ID: wins over the file's hub_id


class _Checker:
    def __init__(self, source: str) -> None:
        self.source = source

    def fail(self, key: str, problem: str) -> None:
        raise ConfigError(f"{self.source}: {key}: {problem}")

    def typed(self, table: dict, name: str, key: str, kinds: tuple[type, ...], what: str, default: Any = None) -> Any:
        if name not in table:
            return default
        v = table[name]
        if not isinstance(v, kinds) or (isinstance(v, bool) and bool not in kinds):
            self.fail(key, f"must be {what}, got {v!r}")
        return v

    def number(self, table: dict, name: str, key: str, default: float, *, minimum: float = 0.0) -> float:
        v = self.typed(table, name, key, (int, float), "a number", default)
        if not v > minimum:
            self.fail(key, f"must be greater than {minimum:g}, got {v!r}")
        return float(v)

    def count(self, table: dict, name: str, key: str, default: int) -> int:
        v = self.typed(table, name, key, (int,), "a positive integer", default)
        if v < 1:
            self.fail(key, f"must be a positive integer, got {v!r}")
        return v

    def size(self, table: dict, name: str, key: str, default: int, *, minimum: int = 1024 * 1024) -> int:
        if name not in table:
            return default
        v = table[name]
        if isinstance(v, int) and not isinstance(v, bool):
            n = v
        elif isinstance(v, str) and (m := _SIZE.match(v)):
            n = int(float(m.group(1)) * _UNITS[m.group(2)])
        else:
            self.fail(key, f"must be a size in bytes or like \"64MiB\", got {v!r}")
        if n < minimum:
            shown = f"{minimum // (1024 * 1024)}MiB" if minimum >= 1024 * 1024 else f"{minimum} bytes"
            self.fail(key, f"must be at least {shown}, got {v!r}")
        return n

    def ident(self, table: dict, name: str, key: str) -> str:
        if name not in table:
            self.fail(key, "is required")
        v = table[name]
        if not isinstance(v, str) or not _ID.match(v):
            self.fail(key, f"must be an id of letters, digits and _.:- (max 128), got {v!r}")
        return v

    def unknown(self, table: dict, allowed: set[str], key: str) -> None:
        for k in table:
            if k not in allowed:
                self.fail(f"{key}{k}" if not key else f"{key}.{k}", "unknown key")


API_LEVELS = ("none", "support", "administrator")
METRICS_MODES = ("token", "open", "off")


def _loopback(host: str) -> bool:
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _api(c: _Checker, raw: dict[str, Any], base: Path) -> dict[str, Any]:
    """[api]: the local HTTP/WebSocket API (hubhost/api.py). Returns normalised settings:
    socket (path or None for the default), socket_mode, tcp ((host, port) or None),
    tokens ([{token, level}]), exec_timeout, driver_level, driver_levels, metrics
    ("token" | "open" | "off"), metrics_token (or None), console_tcp ((host, port): where
    `hubhost console` opens a listener when tcp is not set; loopback only)."""
    c.unknown(raw, {"enabled", "socket", "socket_mode", "tcp", "tokens", "exec_timeout",
                    "driver_level", "driver_levels", "metrics", "metrics_token", "console_tcp"}, "api")
    out: dict[str, Any] = {"enabled": c.typed(raw, "enabled", "api.enabled", (bool,), "true or false", True)}
    sock = c.typed(raw, "socket", "api.socket", (str,), "a path")
    out["socket"] = str((base / sock).resolve()) if sock else None
    mode = raw.get("socket_mode", 0o660)
    if isinstance(mode, str) and re.fullmatch(r"0?[0-7]{3}", mode):
        mode = int(mode, 8)
    if not isinstance(mode, int) or isinstance(mode, bool) or not 0 <= mode <= 0o777:
        c.fail("api.socket_mode", f"must be an octal mode string such as \"0660\", got {mode!r}")
    if mode & 0o007:
        c.fail("api.socket_mode", f"must not give access to other users (got {mode:o}); "
                                  "the socket grants administrator level")
    out["socket_mode"] = mode
    tcp = c.typed(raw, "tcp", "api.tcp", (str,), "\"host:port\" such as \"127.0.0.1:8765\"")
    out["tcp"] = None
    if tcp:
        m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", tcp)
        if not m or not 0 <= int(m.group(2)) < 65536:   # port 0: any free port (tests)
            c.fail("api.tcp", f"must be \"host:port\" such as \"127.0.0.1:8765\", got {tcp!r}")
        out["tcp"] = (m.group(1) or "127.0.0.1", int(m.group(2)))
    ctcp = c.typed(raw, "console_tcp", "api.console_tcp", (str,), "\"host:port\" such as \"127.0.0.1:8766\"")
    out["console_tcp"] = ("127.0.0.1", 0)
    if ctcp:
        m = re.fullmatch(r"\[?([^\[\]]*?)\]?:(\d{1,5})", ctcp)
        if not m or not 0 <= int(m.group(2)) < 65536:
            c.fail("api.console_tcp", f"must be \"host:port\" such as \"127.0.0.1:8766\", got {ctcp!r}")
        if not _loopback(m.group(1) or "127.0.0.1"):
            c.fail("api.console_tcp", f"must be a loopback address (127.0.0.1, ::1 or localhost), got "
                                      f"{m.group(1)!r}: to serve the console on another address set "
                                      "api.tcp instead")
        out["console_tcp"] = (m.group(1) or "127.0.0.1", int(m.group(2)))
    tokens = c.typed(raw, "tokens", "api.tokens", (list,), "an array of tables ([[api.tokens]])", [])
    out["tokens"] = []
    seen: set[str] = set()
    for i, t in enumerate(tokens):
        k = f"api.tokens[{i}]"
        if not isinstance(t, dict):
            c.fail(k, "must be a table with token and level")
        c.unknown(t, {"token", "level", "name"}, k)
        tok = c.typed(t, "token", f"{k}.token", (str,), "a string")
        if not tok or len(tok) < 16 or not tok.isprintable() or " " in tok:
            c.fail(f"{k}.token", "must be at least 16 printable characters without spaces")
        if tok in seen:
            c.fail(f"{k}.token", "duplicate token")
        seen.add(tok)
        level = c.typed(t, "level", f"{k}.level", (str,), "a string", "none")
        if level not in API_LEVELS:
            c.fail(f"{k}.level", f"must be one of {', '.join(API_LEVELS)}, got {level!r}")
        out["tokens"].append({"token": tok, "level": level,
                              "name": c.typed(t, "name", f"{k}.name", (str,), "a string", f"token {i}")})
    metrics = c.typed(raw, "metrics", "api.metrics", (str,), "a string", "token")
    if metrics not in METRICS_MODES:
        c.fail("api.metrics", "must be \"token\" (GET /metrics on TCP needs api.metrics_token or an "
                              "administrator token), \"open\" (no token, on a loopback api.tcp only) "
                              f"or \"off\" (no /metrics on TCP), got {metrics!r}")
    out["metrics"] = metrics
    mtok = c.typed(raw, "metrics_token", "api.metrics_token", (str,), "a string")
    if mtok is not None:
        if len(mtok) < 16 or not mtok.isprintable() or " " in mtok:
            c.fail("api.metrics_token", "must be at least 16 printable characters without spaces")
        if mtok in seen:
            c.fail("api.metrics_token", "must differ from every [[api.tokens]] token (it reads "
                                        "/metrics only)")
        if metrics != "token":
            c.fail("api.metrics_token", f"is set but api.metrics = {metrics!r}, where no token is "
                                        "checked; remove one of them")
    out["metrics_token"] = mtok
    if metrics == "open":
        if not out["tcp"]:
            c.fail("api.metrics", "\"open\" serves GET /metrics without a token on api.tcp, but "
                                  "api.tcp is not set")
        if not _loopback(out["tcp"][0]):
            c.fail("api.metrics", f"\"open\" needs a loopback api.tcp (127.0.0.1, ::1 or localhost), "
                                  f"got {out['tcp'][0]!r}: anyone who reaches that address could "
                                  "read the hub's metrics; set api.metrics_token instead")
    if out["tcp"] and not out["tokens"] and mtok is None and metrics != "open":
        c.fail("api.tcp", "needs at least one [[api.tokens]] entry (TCP clients must present a token)")
    out["exec_timeout"] = c.number(raw, "exec_timeout", "api.exec_timeout", 10.0)
    out["driver_level"] = c.typed(raw, "driver_level", "api.driver_level", (str,), "a string", "support")
    if out["driver_level"] not in API_LEVELS:
        c.fail("api.driver_level", f"must be one of {', '.join(API_LEVELS)}, got {out['driver_level']!r}")
    levels = c.typed(raw, "driver_levels", "api.driver_levels", (dict,), "a table of driver id = level", {})
    for did, level in levels.items():
        if level not in API_LEVELS:
            c.fail(f"api.driver_levels.{did}", f"must be one of {', '.join(API_LEVELS)}, got {level!r}")
    out["driver_levels"] = dict(levels)
    return out


def _check_transport(c: _Checker, key: str, kind: str, settings: dict[str, Any]) -> None:
    """Transport settings are checked here, at start, by the transports' own validator;
    the message names the offending setting's key."""
    from hubhost.devices.transports import TRANSPORT_KEYS, validate_settings

    for name in settings:
        if name not in TRANSPORT_KEYS[kind]:
            c.fail(f"{key}.{name}", f"unknown key for a {kind} device "
                   f"(allowed: {', '.join(sorted(DEVICE_KEYS))}, {', '.join(TRANSPORT_KEYS[kind])})")
    try:
        validate_settings(kind, settings)
    except ValueError as e:
        m = re.search(r"transport: (\w+)", str(e))
        name = m.group(1) if m and m.group(1) in TRANSPORT_KEYS[kind] else "transport"
        c.fail(f"{key}.{name}", str(e))


_BUILDER = re.compile(rb"driver_helper\s*\.\s*init_(serial|tcp|udp)\b")


def driver_transport(folder: Path) -> tuple[str, str] | None:
    """The transport a driver is built for, read from its init.lua without running it:
    (kind, "init.lua:LINE") for driver_helper.init_serial/_tcp/_udp, None otherwise."""
    try:
        src = (folder / "init.lua").read_bytes()
    except OSError:
        return None
    for m in _BUILDER.finditer(src):
        line_start = src.rfind(b"\n", 0, m.start()) + 1
        if b"--" in src[line_start:m.start()]:
            continue        # in a comment
        line = src.count(b"\n", 0, m.start()) + 1
        return m.group(1).decode(), f"init.lua:{line}"
    return None


def _fleet(c: _Checker, raw: dict[str, Any]) -> FleetConfig:
    c.unknown(raw, {"id", "ttl", "hubs"}, "fleet")
    fc = FleetConfig(id=c.ident(raw, "id", "fleet.id"))
    fc.ttl = c.number(raw, "ttl", "fleet.ttl", 10.0)
    if fc.ttl < 1.0:
        c.fail("fleet.ttl", f"must be at least 1 second (hubs renew every ttl/3), got {fc.ttl!r}")
    hubs = c.typed(raw, "hubs", "fleet.hubs", (list,), "an array of tables ([[fleet.hubs]])", [])
    for i, h in enumerate(hubs):
        k = f"fleet.hubs[{i}]"
        if not isinstance(h, dict):
            c.fail(k, "must be a table with id, weight and tags")
        c.unknown(h, {"id", "weight", "tags"}, k)
        hid = c.ident(h, "id", f"{k}.id")
        if hid in fc.hubs:
            c.fail(f"{k}.id", f"duplicate hub id {hid!r}")
        weight = c.typed(h, "weight", f"{k}.weight", (int, float), "a number", 1.0)
        if not 0 <= weight < 1e6:
            c.fail(f"{k}.weight", f"must be a number from 0 (takes no movable devices) up, got {weight!r}")
        tags = c.typed(h, "tags", f"{k}.tags", (list,), "an array of tag strings", [])
        if not all(isinstance(t, str) and t for t in tags):
            c.fail(f"{k}.tags", f"must be an array of non-empty strings, got {tags!r}")
        fc.hubs[hid] = FleetHub(hid, float(weight), frozenset(tags))
    return fc


def load(path: str | Path) -> HubConfig:
    """Read and check a hub config file."""
    path = Path(path)
    try:
        data = path.read_bytes()
        raw = tomllib.loads(data.decode("utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    except (UnicodeDecodeError, OSError) as e:
        raise ConfigError(f"{path}: cannot read: {e}") from None
    cfg = parse(raw, source=str(path), base=path.parent)
    if cfg.fleet is not None:
        import hashlib
        cfg.fleet.config_hash = hashlib.sha256(data).hexdigest()[:12]
    return cfg


def parse(raw: dict[str, Any], *, source: str = "<config>", base: Path | None = None) -> HubConfig:
    c = _Checker(source)
    base = base or Path.cwd()
    c.unknown(raw, {"hub_id", "state_dir", "flush_interval", "log_level", "redis", "drivers", "api",
                    "worker_overhead", "fleet"}, "")
    cfg = HubConfig(source=Path(source) if source != "<config>" else None)
    if "hub_id" in raw:
        cfg.hub_id = c.ident(raw, "hub_id", "hub_id")
    sd = c.typed(raw, "state_dir", "state_dir", (str,), "a path")
    cfg.state_dir = str((base / sd).resolve()) if sd else None
    cfg.flush_interval = c.number(raw, "flush_interval", "flush_interval", 10.0)
    cfg.worker_overhead = c.size(raw, "worker_overhead", "worker_overhead", 64 * 1024 * 1024)
    level = c.typed(raw, "log_level", "log_level", (str,), "a string", "info")
    if level.lower() not in LOG_LEVELS:
        c.fail("log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {level!r}")
    cfg.log_level = level.lower()
    cfg.api = _api(c, c.typed(raw, "api", "api", (dict,), "a table", {}), base)

    if "redis" in raw:
        r = c.typed(raw, "redis", "redis", (dict,), "a table")
        c.unknown(r, {"url", "prefix", "socket_timeout", "connect_timeout", "cluster"}, "redis")
        url = c.typed(r, "url", "redis.url", (str,), "a string")
        if not url:
            c.fail("redis.url", "is required in a [redis] section")
        if not re.match(r"^(redis|rediss|unix)://", url):
            c.fail("redis.url", f"must start with redis://, rediss:// or unix://, got {url!r}")
        cfg.redis = RedisConfig(
            url=url,
            prefix=c.typed(r, "prefix", "redis.prefix", (str,), "a string", ""),
            socket_timeout=c.number(r, "socket_timeout", "redis.socket_timeout", 2.0),
            connect_timeout=c.number(r, "connect_timeout", "redis.connect_timeout", 2.0),
            cluster=c.typed(r, "cluster", "redis.cluster", (bool,), "true or false", False),
        )
    if "fleet" in raw:
        cfg.fleet = _fleet(c, c.typed(raw, "fleet", "fleet", (dict,), "a table"))
        if cfg.redis is None:
            c.fail("fleet", "fleet mode needs a [redis] section (hubs meet in Redis)")

    drivers = c.typed(raw, "drivers", "drivers", (list,), "an array of tables ([[drivers]])", [])
    seen_drivers: set[str] = set()
    seen_devices: dict[str, str] = {}
    for i, d in enumerate(drivers):
        k = f"drivers[{i}]"
        if not isinstance(d, dict):
            c.fail(k, "must be a table")
        c.unknown(d, {"id", "path", "devices", "flush_interval", "max_memory", "cpu_limit", "group", "max_subscriptions",
                      "log_level", *DEFAULT_LIMITS}, k)
        did = c.ident(d, "id", f"{k}.id")
        if did in seen_drivers:
            c.fail(f"{k}.id", f"duplicate driver id {did!r}")
        seen_drivers.add(did)
        p = c.typed(d, "path", f"{k}.path", (str,), "a path")
        if not p:
            c.fail(f"{k}.path", "is required")
        dpath = (base / p).resolve()
        if not (dpath / "init.lua").is_file():
            c.fail(f"{k}.path", f"{dpath} is not a driver folder (no init.lua)")
        dc = DriverConfig(
            id=did,
            path=dpath,
            flush_interval=c.number(d, "flush_interval", f"{k}.flush_interval", cfg.flush_interval),
            max_memory=c.size(d, "max_memory", f"{k}.max_memory", 64 * 1024 * 1024),
            cpu_limit=c.number(d, "cpu_limit", f"{k}.cpu_limit", 1.0),
            group=c.ident(d, "group", f"{k}.group") if "group" in d else None,
            max_subscriptions=c.count(d, "max_subscriptions", f"{k}.max_subscriptions", 1000),
            max_timers=c.count(d, "max_timers", f"{k}.max_timers", DEFAULT_LIMITS["max_timers"]),
            max_pending_requests=c.count(d, "max_pending_requests", f"{k}.max_pending_requests",
                                         DEFAULT_LIMITS["max_pending_requests"]),
            max_send_backlog=c.size(d, "max_send_backlog", f"{k}.max_send_backlog",
                                    DEFAULT_LIMITS["max_send_backlog"], minimum=1024),
            max_status_value=c.size(d, "max_status_value", f"{k}.max_status_value",
                                    DEFAULT_LIMITS["max_status_value"], minimum=64),
            max_status_fields=c.count(d, "max_status_fields", f"{k}.max_status_fields",
                                      DEFAULT_LIMITS["max_status_fields"]),
        )
        if "log_level" in d:
            lvl = c.typed(d, "log_level", f"{k}.log_level", (str,), "a string")
            if lvl.lower() not in LOG_LEVELS:
                c.fail(f"{k}.log_level", f"must be one of {', '.join(LOG_LEVELS)}, got {lvl!r}")
            dc.log_level = lvl.lower()
        needs = driver_transport(dpath)
        devs = c.typed(d, "devices", f"{k}.devices", (list,), "an array of tables ([[drivers.devices]])", [])
        for j, dev in enumerate(devs):
            dk = f"{k}.devices[{j}]"
            if not isinstance(dev, dict):
                c.fail(dk, "must be a table")
            dev_id = c.ident(dev, "id", f"{dk}.id")
            if dev_id in seen_devices:
                c.fail(f"{dk}.id", f"duplicate device id {dev_id!r} (also in {seen_devices[dev_id]})")
            seen_devices[dev_id] = dk
            label = c.typed(dev, "label", f"{dk}.label", (str,), "a string", dev_id)
            system = c.typed(dev, "system", f"{dk}.system", (str,), "a system id")
            module = c.typed(dev, "module", f"{dk}.module", (str,), "a module name such as \"Display\"")
            index = c.typed(dev, "index", f"{dk}.index", (int,), "a positive integer")
            if index is not None and index < 1:
                c.fail(f"{dk}.index", f"must be a positive integer, got {index!r}")
            if (module is None) != (system is None):
                c.fail(f"{dk}.system" if system is None else f"{dk}.module",
                       "system and module go together (a device is indexed as system/Module/index)")
            if module is not None and index is None:
                index = 1
            transport = c.typed(dev, "transport", f"{dk}.transport", (str,), "a string")
            if transport is not None and transport not in TRANSPORTS:
                c.fail(f"{dk}.transport", f"must be one of {', '.join(TRANSPORTS)}, got {transport!r}")
            conf = c.typed(dev, "config", f"{dk}.config", (dict,), "a table", {})
            settings = {kk: vv for kk, vv in dev.items() if kk not in DEVICE_KEYS}
            if settings and transport is None:
                c.fail(f"{dk}.{next(iter(settings))}", "unknown key (transport settings need `transport = ...`)")
            if transport is not None:
                _check_transport(c, dk, transport, settings)
            elif needs is not None and "simulator" not in conf:   # the demo's are wired at start
                c.fail(f"{dk}.transport", f"driver {did!r} is built with driver_helper.init_{needs[0]} "
                       f"({needs[1]}), so its devices need a transport: add transport = \"{needs[0]}\" "
                       "and its settings")
            pinned = c.ident(dev, "hub", f"{dk}.hub") if "hub" in dev else None
            tags = c.typed(dev, "needs", f"{dk}.needs", (list,), "an array of tag strings", [])
            if not all(isinstance(t, str) and t for t in tags):
                c.fail(f"{dk}.needs", f"must be an array of non-empty strings, got {tags!r}")
            if pinned is not None and tags:
                c.fail(f"{dk}.needs", "a device pinned to a hub (hub = ...) cannot also need tags")
            if (pinned is not None or tags) and "fleet" not in raw:
                c.fail(f"{dk}.{'hub' if pinned is not None else 'needs'}",
                       "only means something in fleet mode (add a [fleet] section)")
            if cfg.fleet is not None:
                if (transport == "serial" or (transport is None and needs is not None
                                              and needs[0] == "serial")) and pinned is None:
                    c.fail(f"{dk}.hub", "a serial device is wired to one hub: pin it with "
                                        "hub = \"<hub id>\" (only network devices can move)")
                cfg.fleet.placement[dev_id] = Placement(pinned, tuple(tags))
            dc.devices.append(DeviceInfo(id=dev_id, label=label, config=conf, system=system,
                                         module=module, index=index, transport=transport,
                                         transport_settings=settings))
        cfg.drivers.append(dc)
    return cfg
