"""Assembles a running hub: the supervisor plus the parts that plug into it."""

from __future__ import annotations

import logging
from pathlib import Path

from .config import HubConfig
from .supervisor import Supervisor, run_hub

log = logging.getLogger("hubhost")


def install_parts(sup: Supervisor) -> None:
    """Plug the optional parts (datastore, status, mirror, transports, API) into `sup`."""
    for mod_name in ("hubhost.datastore", "hubhost.status_glue", "hubhost.transport_glue",
                     "hubhost.sdnotify_glue", "hubhost.api"):
        try:
            mod = __import__(mod_name, fromlist=["install"])
        except ImportError as e:
            if e.name != mod_name:
                raise
            continue
        install = getattr(mod, "install", None)
        if install is not None:
            install(sup)


async def run(config: HubConfig, state_dir: Path, *, demo: bool = False) -> int:
    log.info("hubhost starting: hub %s, state in %s%s", config.hub_id, state_dir, " (demo)" if demo else "")
    return await run_hub(config, state_dir, setup=install_parts)
