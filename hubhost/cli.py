"""The `hubhost` command line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path
from typing import Any, Sequence

import orjson

from . import __version__, logs, paths

log = logging.getLogger("hubhost")


def _cmd_run(args: argparse.Namespace) -> int:
    from . import config as config_mod
    from .hub import run

    if args.demo and args.config:
        print("hubhost run: give either --config or --demo, not both", file=sys.stderr)
        return 2
    cfg_path = Path(args.config) if args.config else None
    if args.demo:
        cfg_path = paths.drivers_dir() / "demo.toml"
    elif cfg_path is None:
        cfg_path = paths.config_dir() / "hub.toml"
    try:
        cfg = config_mod.load(cfg_path)
    except config_mod.ConfigError as e:
        print(f"hubhost: config refused: {e}", file=sys.stderr)
        return 2
    logs.setup(args.log_level or cfg.log_level)
    state = paths.state_dir(args.state_dir, cfg.state_dir)
    try:
        return asyncio.run(run(cfg, state, demo=args.demo))
    except KeyboardInterrupt:
        return 0


def _cmd_check(args: argparse.Namespace) -> int:
    from .check import check_driver

    logs.setup(args.log_level or "warning")
    ok, report = check_driver(Path(args.driver_dir))
    print(report)
    return 0 if ok else 1


def _cmd_new(args: argparse.Namespace) -> int:
    from .scaffold import new_driver

    try:
        path = new_driver(args.name, Path(args.dir))
    except (ValueError, FileExistsError) as e:
        print(f"hubhost new: {e}", file=sys.stderr)
        return 2
    print(f"created {path}/init.lua and {path}/spec/; run `hubhost test {path}`")
    return 0


def _cmd_test(args: argparse.Namespace) -> int:
    import pytest

    return int(pytest.main([*args.paths, *args.pytest_args]))


def _cmd_datastore(args: argparse.Namespace) -> int:
    from .datastore import read_store_file

    state = paths.state_dir(args.state_dir)
    try:
        data = read_store_file(paths.driver_state_dir(state, args.driver_id))
    except FileNotFoundError as e:
        print(f"hubhost datastore: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hubhost", description="Embedded Lua driver host for edge hubs.")
    p.add_argument("--version", action="version", version=f"hubhost {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the hub")
    r.add_argument("--config", help="hub config (TOML); default: <config dir>/hub.toml")
    r.add_argument("--demo", action="store_true", help="run the bundled demo hub (no hardware, no Redis)")
    r.add_argument("--state-dir", help="where datastores and state live")
    r.add_argument("--log-level", help="trace, debug, info, warning, error")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="load a driver in the sandbox and print its metadata")
    c.add_argument("driver_dir")
    c.add_argument("--log-level")
    c.set_defaults(func=_cmd_check)

    n = sub.add_parser("new", help="scaffold a new driver folder with a spec")
    n.add_argument("name")
    n.add_argument("--dir", default=".", help="parent folder (default: current)")
    n.set_defaults(func=_cmd_new)

    t = sub.add_parser("test", help="run driver specs (pytest with the hubhost plugin)")
    t.add_argument("paths", nargs="*", default=["."])
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, help="extra pytest arguments after --")
    t.set_defaults(func=_cmd_test)

    d = sub.add_parser("datastore", help="print a driver's persisted datastore as JSON (read-only)")
    d.add_argument("driver_id")
    d.add_argument("--state-dir")
    d.set_defaults(func=_cmd_datastore)

    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands() -> list[Any]:
    """Commands contributed by other modules (API client, doctor), if present."""
    found = []
    for mod_name in ("hubhost.client", "hubhost.doctor"):
        try:
            mod = __import__(mod_name, fromlist=["add_commands"])
        except ImportError:
            continue
        found.append(mod.add_commands)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
