"""Assembles a running hub: the supervisor plus the parts that plug into it."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import orjson

from hubhost.config import HubConfig
from hubhost.supervisor.supervisor import Supervisor, run_hub

log = logging.getLogger("hubhost")


def device_systems(config: HubConfig) -> dict[str, dict[str, str]]:
    """system id -> {"<Module>/<index>": device id}, from the config."""
    systems: dict[str, dict[str, str]] = {}
    for d in config.drivers:
        for dev in d.devices:
            if dev.system and dev.module:
                systems.setdefault(dev.system, {})[f"{dev.module}/{dev.index or 1}"] = dev.id
    return systems


def interface_json(sup: Supervisor, device_id: str) -> str:
    """The `interface/<device_id>` metadata of the device's driver (DESIGN section 5)."""
    functions = getattr(sup, "functions", None)   # hubhost/functions.py: ordered, validated
    iface = functions.interface_of(device_id) if functions is not None else None
    if iface is not None:
        return iface.text
    base = {"functions": {}, "implements": [], "requirements": {}, "security": {}}
    return orjson.dumps(base).decode()


def install_mirror(sup: Supervisor) -> None:
    """Mirror status, system indexes and interfaces to Redis when [redis] is configured."""
    rc = sup.config.redis
    if rc is None:
        return
    from hubhost.status.mirror import RedisMirror

    mirror = RedisMirror(sup.status, rc.url, rc.prefix, socket_timeout=rc.socket_timeout,
                         connect_timeout=rc.connect_timeout, cluster=rc.cluster)
    sup.mirror = mirror
    devices = [dev.id for d in sup.config.drivers for dev in d.devices]
    mirror.set_devices(devices)
    if sup.fleet is not None:     # replicas of devices driven elsewhere are never written back
        for d in sup.fleet.driver_of:
            if d not in devices:
                mirror.release_device(d)
    if sup.fleet is None:      # in a fleet, each system's index has one builder (fleet/node.py)
        for system_id, mapping in device_systems(sup.config).items():
            mirror.set_system_index(system_id, mapping)

    def publish_interfaces(s: Supervisor) -> None:
        for dev_id in (dev.id for d in s.config.drivers for dev in d.devices):
            mirror.set_interface(dev_id, interface_json(s, dev_id))

    async def stop(s: Supervisor) -> None:
        await mirror.stop()

    sup.pre_start_hooks.append(mirror.start)
    sup.ready_hooks.append(publish_interfaces)
    sup.shutdown_hooks.append(stop)


def status_line(sup: Supervisor) -> str:
    """The STATUS= text systemd shows (docs/operations.md explains each part)."""
    c = sup.counts()
    if sup.mirror is None:
        redis = "off"
    else:
        redis = "mirrored" if sup.mirror.state().get("connected") else "disconnected"
    return (f"{c['running']} drivers running, {c['failed']} failed, {c['restarting']} restarting; "
            f"redis: {redis}")


def install_systemd(sup: Supervisor) -> None:
    """sd_notify: READY=1 once every driver has started (or failed), STATUS= lines,
    WATCHDOG=1 from the event loop, RELOADING=1/READY=1 around reloads, STOPPING=1."""
    from hubhost.supervisor import sdnotify

    notifier = sdnotify.Notifier.from_env(unset=True)
    sup.notifier = notifier
    if not notifier.enabled:
        return
    last = {"status": ""}

    async def keep_status() -> None:
        while not sup.stopping:
            await asyncio.sleep(1.0)
            line = status_line(sup)
            if line != last["status"]:
                last["status"] = line
                notifier.status(line)

    def ready(s: Supervisor) -> None:
        last["status"] = status_line(s)
        notifier.ready(last["status"])
        s.spawn(keep_status())
        if notifier.watchdog_interval():
            s.spawn(sdnotify.watchdog_loop(notifier))

    sup.ready_hooks.append(ready)
    sup.stopping_hooks.append(lambda s: notifier.stopping("stopping: running shutdown handlers and flushing"))
    sup.reload_hooks.append((lambda s: notifier.reloading("reloading config"),
                             lambda s: notifier.ready(status_line(s))))


def install_parts(sup: Supervisor) -> None:
    """Plug the supervisor's parts (mirror, systemd, functions and the API) into `sup`; the
    datastore glue, transports and timers run inside the workers (hubhost/worker/)."""
    install_mirror(sup)
    install_systemd(sup)
    for mod_name in ("hubhost.api.server",):
        try:
            mod = __import__(mod_name, fromlist=["install"])
        except ImportError as e:
            if e.name != mod_name:
                raise
            continue
        install = getattr(mod, "install", None)
        if install is not None:
            install(sup)


def install_demo(sup: Supervisor) -> None:
    """`hubhost run --demo` only: start the simulated devices before the drivers and point
    each device whose config names a `simulator` at its own one ("projector": a pty,
    "display": TCP on 127.0.0.1, port picked at start). Normal configs never come here."""
    from hubhost.devices.simulators import DisplaySimulator, ProjectorSimulator

    sims: list[Any] = []

    async def start() -> None:
        for drv in sup.config.drivers:
            for dev in drv.devices:
                kind = dev.config.get("simulator")
                if kind is None:
                    continue
                if kind == "projector":
                    sim: Any = ProjectorSimulator(link_name=f"tty-{dev.id}")
                    await sim.start()
                    dev.transport = "serial"
                    dev.transport_settings = {**dev.transport_settings, "port": sim.port}
                elif kind == "display":
                    sim = DisplaySimulator()
                    await sim.start()
                    dev.transport = "tcp"
                    dev.transport_settings = {**dev.transport_settings, "host": sim.host,
                                              "port": sim.port}
                else:
                    log.error("demo: device %s: unknown simulator %r (projector, display)", dev.id, kind)
                    continue
                sims.append(sim)
                log.info("demo: simulated %s for %s at %s", kind, dev.id,
                         dev.transport_settings.get("port") if kind == "projector"
                         else f"{sim.host}:{sim.port}")

    async def stop(s: Supervisor) -> None:
        for sim in sims:
            await sim.stop()

    sup.pre_start_hooks.append(start)
    sup.shutdown_hooks.append(stop)
    sup.ready_hooks.append(lambda s: print(demo_next_steps(s), flush=True))


def demo_next_steps(sup: Supervisor) -> str:
    """The paragraph `hubhost run --demo` prints once its drivers run: what to try from
    another terminal against this very hub."""
    api = getattr(sup, "api", None)
    sock = getattr(api, "socket_path", None) or getattr(getattr(api, "settings", None), "socket", None)
    where = f"--socket {sock}" if sock else f"--state-dir {sup.state_dir}"
    dev = next((d for drv in sup.config.drivers for d in drv.devices if d.system and d.module), None)
    lines = [
        "",
        "The demo hub is running. Next steps, from another terminal:",
        f"  hubhost ls {where}                      # its devices and drivers",
        f"  hubhost status {where}                  # drivers running, failed, restarting",
    ]
    if dev is not None:
        lines.append(f"  hubhost watch {dev.system} {dev.module} {dev.index or 1} temperature {where}"
                     if "thermo" in str(dev.id) or dev.module == "Thermostat" else
                     f"  hubhost watch {dev.system} {dev.module} {dev.index or 1} power {where}")
    proj = next((d for drv in sup.config.drivers for d in drv.devices
                 if d.config.get("simulator") == "projector"), None)
    if proj is not None:
        lines.append(f"  hubhost exec {proj.id} power state=false {where}   # call a driver function")
        lines.append(f"  hubhost describe {proj.id} {where}        # functions, status, recent errors")
        lines.append(f"  hubhost logs {proj.id} -f {where}         # follow one device's log")
    lines += ["Ctrl-C here stops the hub (datastores are saved). Write your own driver: hubhost new NAME;",
              "docs/driver-guide.md and docs/api.md explain the rest.", ""]
    return "\n".join(lines)


def install_fleet(sup: Supervisor, full: HubConfig) -> None:
    """Fleet mode ([fleet]): this hub's membership, leases and movable devices."""
    from hubhost.fleet.node import FleetNode

    node = FleetNode(sup, full, sup.config.hub_id)
    sup.fleet = node
    sup.pre_start_hooks.append(node.start)
    sup.stopping_hooks.append(node.stopping)
    sup.shutdown_hooks.insert(0, node.shutdown)   # hand over before anything else winds down


async def run(config: HubConfig, state_dir: Path, *, demo: bool = False) -> int:
    log.info("hubhost starting: hub %s, state in %s%s", config.hub_id, state_dir, " (demo)" if demo else "")
    full = config
    if config.fleet is not None:
        from hubhost.fleet.node import local_view
        log.info("fleet %s: this hub runs its pinned devices now and takes movable ones as the "
                 "fleet decides (ttl %g s)", config.fleet.id, config.fleet.ttl)
        config = local_view(full, full.hub_id, set())

    def setup(sup: Supervisor) -> None:
        if demo:
            install_demo(sup)
        if full.fleet is not None:
            install_fleet(sup, full)
        install_parts(sup)

    return await run_hub(config, state_dir, setup=setup)
