"""Where things live: the bundled Lua library and drivers, the state and config folders.

The wheel carries `lua/` and `drivers/` inside the package (as `_lua` and `_drivers`); a
source checkout has them beside the package. State and config follow DESIGN section 6:
the command line, then systemd's variables, then platformdirs.
"""

from __future__ import annotations

import os
from pathlib import Path

import platformdirs

PKG = Path(__file__).resolve().parent


def _bundled(installed: str, source: str) -> Path:
    inside = PKG / installed
    if inside.is_dir():
        return inside
    return PKG.parent / source


def lua_library_dir() -> Path:
    return _bundled("_lua", "lua")


def drivers_dir() -> Path:
    return _bundled("_drivers", "drivers")


def state_dir(cli_value: str | os.PathLike[str] | None = None, config_value: str | None = None) -> Path:
    """--state-dir, then the config's state_dir, then $STATE_DIRECTORY, then platformdirs."""
    if cli_value:
        return Path(cli_value)
    if config_value:
        return Path(config_value)
    env = os.environ.get("STATE_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path(platformdirs.user_state_dir("hubhost"))


def config_dir() -> Path:
    """$CONFIGURATION_DIRECTORY (systemd), else platformdirs' user config dir."""
    env = os.environ.get("CONFIGURATION_DIRECTORY")
    if env:
        return Path(env.split(":")[0])
    return Path(platformdirs.user_config_dir("hubhost"))


def driver_state_dir(state: Path, driver_id: str) -> Path:
    return state / "drivers" / driver_id
