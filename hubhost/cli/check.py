"""`hubhost check`: compile every Lua file of a driver and load it with no devices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson

from hubhost.sandbox.runtime import DriverLoadError, DriverRuntime
from hubhost.sandbox.sandbox import LuaError, Sandbox, chunkname


class _NullPort:
    """A port for a driver that runs no events: timers and waits are ignored."""

    def timer_start(self, *a: Any) -> None: ...
    def timer_cancel(self, *a: Any) -> None: ...
    def wait_timer(self, *a: Any) -> None: ...
    def wait_host(self, rt: DriverRuntime, token: int, what: str, arg: Any) -> None: ...
    def handler_failed(self, *a: Any) -> None: ...


def check_driver(driver_dir: Path) -> tuple[bool, str]:
    """Returns (ok, report). The report names file:line for every problem found."""
    driver_dir = driver_dir.resolve()
    problems: list[str] = []
    if not (driver_dir / "init.lua").is_file():
        return False, f"{driver_dir}: not a driver folder (no init.lua)"
    sb = Sandbox(driver_dir)
    for f in sorted(driver_dir.rglob("*.lua")):
        try:
            sb.compile(f.read_bytes(), chunkname(f).decode()[1:])
        except LuaError as e:
            problems.append(str(e).splitlines()[0])
    metadata = None
    if not problems:
        try:
            rt = DriverRuntime("check", driver_dir, _NullPort())
            rt.load()
            metadata = {"name": rt.driver_name(), **(rt.metadata() or {})}
        except (DriverLoadError, LuaError) as e:
            problems.append(_without_template_traceback(str(e)))
    if problems:
        return False, "\n".join(problems)
    return True, orjson.dumps(metadata, option=orjson.OPT_INDENT_2).decode()


def _without_template_traceback(text: str) -> str:
    """A template error already names the driver's file:line (lua/hubhost/template.lua);
    the traceback under it holds only the library's frames."""
    head, sep, tb = text.partition("\nstack traceback:\n")
    if sep and tb.lstrip().startswith("hubhost/lua/hubhost/template.lua:"):
        return head
    return text
