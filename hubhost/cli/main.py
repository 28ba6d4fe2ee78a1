"""The `hubhost` command line."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

if TYPE_CHECKING:
    import argparse

# argparse, asyncio and orjson are imported where they are used: `hubhost test` (which
# never parses with argparse) starts without them, a tenth of a second on a hub
from hubhost import __version__, logs, paths

log = logging.getLogger("hubhost")


def _cmd_run(args: argparse.Namespace) -> int:
    import asyncio

    from hubhost import config as config_mod
    from hubhost.hub import run
    from hubhost.state.lock import StateDirError, StateDirLock

    if args.demo and args.config:
        print("hubhost run: give either --config or --demo, not both", file=sys.stderr)
        return 2
    import os

    given = args.config or (None if args.demo else os.environ.get("HUBHOST_CONFIG"))
    cfg_path = Path(given) if given else None
    if args.demo:
        cfg_path = paths.drivers_dir() / "demo.toml"
    elif cfg_path is None:
        cfg_path = paths.config_dir() / "hub.toml"
    try:
        cfg = config_mod.load(cfg_path)
    except config_mod.ConfigError as e:
        print(f"hubhost: config refused: {e}", file=sys.stderr)
        return 2
    hub_id = getattr(args, "hub_id", None) or os.environ.get("HUBHOST_HUB_ID")
    if hub_id:
        if not config_mod.valid_id(hub_id):
            print(f"hubhost: --hub-id / $HUBHOST_HUB_ID: must be an id of letters, digits and _.:- "
                  f"(max 128), got {hub_id!r}", file=sys.stderr)
            return 2
        cfg.hub_id = cfg.given_hub_id = hub_id
    logs.setup(args.log_level or cfg.log_level)
    demo_tmp: str | None = None
    if args.demo and not args.state_dir:
        # the demo never touches the user's real state: its driver ids (e.g. `projectors`)
        # would otherwise leave devices that a later real hub sees as `removed`
        import tempfile

        demo_tmp = tempfile.mkdtemp(prefix="hubhost-demo-")
        state = Path(demo_tmp)
        print(f"hubhost: demo state in {state} (a fresh temporary folder, removed when the demo "
              "stops; give --state-dir to keep it)", file=sys.stderr)
    else:
        state = paths.state_dir(args.state_dir, cfg.state_dir)
    lock = StateDirLock(state)
    try:
        lock.acquire()
    except StateDirError as e:
        print(f"hubhost: {e}", file=sys.stderr)
        return 2
    problem = _socket_problem(cfg, state)
    if problem is not None:
        lock.release()
        print(f"hubhost: {problem}", file=sys.stderr)
        return 2
    if args.dev:
        from hubhost.supervisor.devmode import run_dev
        runner = run_dev(cfg, state, demo=args.demo)
    else:
        runner = run(cfg, state, demo=args.demo)
    try:
        return asyncio.run(runner)
    except KeyboardInterrupt:
        return 0
    except OSError as e:   # a socket path, a port or a folder the hub cannot use
        print(f"hubhost: cannot run the hub: {e}", file=sys.stderr)
        return 2
    finally:
        lock.release()
        if demo_tmp is not None:
            import shutil

            shutil.rmtree(demo_tmp, ignore_errors=True)


def _socket_problem(cfg: Any, state: Path) -> str | None:
    """Why the API's Unix socket path cannot be used (None: it can). Checked before any
    driver starts, so a hub never runs half-configured without its API."""
    import os
    import socket as socket_mod
    import stat

    try:
        from hubhost.api.server import ApiSettings, short_unix_path
    except ImportError:
        return None
    settings = ApiSettings.from_config(cfg.api or {}, state)
    if not settings.enabled:
        return None
    path = Path(settings.socket)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return f"API socket {path}: its folder {path.parent} cannot be used: {e.strerror or e}"
    if not path.parent.is_dir():
        return f"API socket {path}: {path.parent} is not a directory"
    if not os.access(path.parent, os.W_OK | os.X_OK):
        return f"API socket {path}: its folder {path.parent} is not writable by this user"
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    except OSError as e:
        return f"API socket {path}: {e.strerror or e}"
    if not stat.S_ISSOCK(st.st_mode):
        return f"API socket {path} exists and is not a socket; refusing to replace it"
    addr, fd = short_unix_path(path)
    probe = socket_mod.socket(socket_mod.AF_UNIX, socket_mod.SOCK_STREAM)
    try:
        probe.connect(addr)
    except OSError:
        return None   # stale: the server replaces it
    finally:
        probe.close()
        if fd is not None:
            os.close(fd)
    return f"API socket {path}: another process is serving the API on it"


def _cmd_check(args: argparse.Namespace) -> int:
    from hubhost.cli.check import check_driver

    logs.setup(args.log_level or "warning")
    ok, report = check_driver(Path(args.driver_dir))
    print(report)
    return 0 if ok else 1


def _cmd_new(args: argparse.Namespace) -> int:
    from hubhost.cli.scaffold import new_driver

    try:
        path = new_driver(args.name, Path(args.dir))
    except (ValueError, FileExistsError) as e:
        print(f"hubhost new: {e}", file=sys.stderr)
        return 2
    print(f"created {path}/init.lua and {path}/spec/; run `hubhost test {path}`")
    return 0


_NO_SPECS = ("hubhost test: no specs found: specs are Lua files named *_spec.lua, usually in "
             "the driver's spec/ folder (see docs/driver-guide.md)")


def run_tests(argv: Sequence[str]) -> int:
    """`hubhost test [PATHS...] [PYTEST OPTIONS...]`: pytest with the spec plugin, for driver
    authors who never touch Python. Everything is passed to pytest as given (so `-k`, `-x`,
    `--lf` work); with no paths pytest runs the current folder (or the project's testpaths).
    A `--` before pytest options, as older versions wanted, is dropped. With only paths
    (and -q/-v) and nothing for pytest there but specs, the fast path runs them without
    pytest's start-up (hubhost/testing/fastrun.py): same items, results and exit status."""
    import os

    args = [a for a in argv if a != "--"] if "--" in argv else list(argv)
    from hubhost.testing import fastrun

    plan = fastrun.plan(args)
    if plan is not None and plan.files:
        try:
            code = fastrun.run(plan)
        except KeyboardInterrupt:
            print("hubhost test: interrupted", file=sys.stderr)
            return fastrun.EXIT_INTERRUPTED
        if code == fastrun.EXIT_NO_TESTS:
            print(_NO_SPECS, file=sys.stderr)
        return code
    try:
        import pytest
    except ImportError:
        print("hubhost test: pytest is not installed; install it with "
              "`pip install 'hubhost[test]'` (or `pip install pytest`)", file=sys.stderr)
        return 2
    # hubhost is imported already (this module), so pytest cannot rewrite the plugin's asserts;
    # its warning would only puzzle an author
    extra = ["-W", "ignore::pytest.PytestAssertRewriteWarning"]
    if os.environ.get("PYTEST_DISABLE_PLUGIN_AUTOLOAD"):
        extra += ["-p", "hubhost.testing.pytest_plugin"]   # entry points are off: load the plugin by name
    counter = _Collected()
    code = int(pytest.main([*extra, *args], plugins=[counter]))
    if code == int(pytest.ExitCode.NO_TESTS_COLLECTED) and counter.items == 0:
        print(_NO_SPECS, file=sys.stderr)
    return code


class _Collected:
    """Counts collected items (before -k deselects any): "nothing found" vs "none selected"."""

    def __init__(self) -> None:
        self.items = 0

    def pytest_itemcollected(self, item: Any) -> None:
        self.items += 1


def _cmd_test(args: argparse.Namespace) -> int:
    return run_tests(args.pytest_args)


def _cmd_datastore(args: argparse.Namespace) -> int:
    import orjson

    from hubhost.state.datastore import read_store_file

    state = paths.state_dir(args.state_dir, _config_state_dir(args))
    try:
        data = read_store_file(paths.driver_state_dir(state, args.driver_id))
    except FileNotFoundError as e:
        print(f"hubhost datastore: {e}", file=sys.stderr)
        return 1
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode() + "\n")
    return 0


def _config_state_dir(args: argparse.Namespace) -> str | None:
    """The state dir a config (--config, else $HUBHOST_CONFIG) names, if any."""
    import os
    from hubhost import config as config_mod

    given = getattr(args, "config", None) or os.environ.get("HUBHOST_CONFIG")
    if not given:
        return None
    return config_mod.load(given).state_dir


def build_parser() -> argparse.ArgumentParser:
    import argparse

    p = argparse.ArgumentParser(prog="hubhost", description="Embedded Lua driver host for edge hubs.")
    p.add_argument("--version", action="version", version=f"hubhost {__version__}")
    sub = p.add_subparsers(dest="command", required=True)

    r = sub.add_parser("run", help="run the hub")
    r.add_argument("--config", help="hub config (TOML); default: $HUBHOST_CONFIG, else <config dir>/hub.toml")
    r.add_argument("--demo", action="store_true", help="run the bundled demo hub (no hardware, no Redis)")
    r.add_argument("--state-dir", help="where datastores and state live")
    r.add_argument("--log-level", help="trace, debug, info, warning, error")
    r.add_argument("--hub-id", help="this hub's id (default: $HUBHOST_HUB_ID, else the config's "
                                    "hub_id), so every hub of a fleet can run the same config file")
    r.add_argument("--dev", action="store_true",
                   help="watch the driver folders and the config: run a changed driver's specs, then reload it")
    r.set_defaults(func=_cmd_run)

    c = sub.add_parser("check", help="load a driver in the sandbox and print its metadata")
    c.add_argument("driver_dir")
    c.add_argument("--log-level")
    c.set_defaults(func=_cmd_check)

    n = sub.add_parser("new", help="scaffold a new driver folder with a spec")
    n.add_argument("name")
    n.add_argument("--dir", default=".", help="parent folder (default: current)")
    n.set_defaults(func=_cmd_new)

    t = sub.add_parser("test", help="run driver specs (pytest with the hubhost plugin)",
                       usage="hubhost test [PATHS...] [PYTEST OPTIONS...]",
                       description="Run Lua specs (*_spec.lua) and any Python tests under PATHS "
                                   "(default: the current folder). Every argument goes to pytest: "
                                   "-k NAME, -x, --lf, -v, --junitxml=FILE, ...")
    t.add_argument("pytest_args", nargs=argparse.REMAINDER, metavar="ARGS",
                   help="paths and pytest options")
    t.set_defaults(func=_cmd_test)

    d = sub.add_parser("datastore", help="print a driver's persisted datastore as JSON (read-only)")
    d.add_argument("driver_id")
    d.add_argument("--state-dir", help="the hub's state dir (default: the config's, else the default)")
    d.add_argument("--config", help="the hub's config, for its state dir (default: $HUBHOST_CONFIG)")
    d.set_defaults(func=_cmd_datastore)

    for extra in _extra_commands():
        extra(sub)
    return p


def _extra_commands() -> list[Any]:
    """Commands contributed by other modules (API client, doctor), if present."""
    found = []
    for mod_name in ("hubhost.api.client", "hubhost.cli.doctor", "hubhost.fleet.cli"):
        try:
            mod = __import__(mod_name, fromlist=["add_commands"])
        except ImportError:
            continue
        found.append(mod.add_commands)
    return found


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["test"] and argv[1:2] not in (["-h"], ["--help"]):
        return run_tests(argv[1:])   # pytest parses these, options included
    args = build_parser().parse_args(argv)
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        return _closed_pipe()
    except KeyboardInterrupt:
        return 130
    except ValueError as e:    # a config that does not load (ConfigError) names file and key
        from hubhost.config import ConfigError
        if not isinstance(e, ConfigError):
            raise
        print(f"hubhost {args.command}: {e}", file=sys.stderr)
        return 2


def _closed_pipe() -> int:
    """`hubhost doctor | head -3`: the reader left; exit quietly (no traceback, no
    "Exception ignored" at exit) with the shell's code for SIGPIPE."""
    import os
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except OSError:
        pass
    return 141


if __name__ == "__main__":
    raise SystemExit(main())
