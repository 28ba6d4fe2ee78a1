"""`hubhost run --dev`: the driver author's loop.

The hub runs as usual, plus a watcher (watchfiles: inotify underneath, no polling by hand)
on every driver folder and on the config file. When files settle after a save:

1. the config changed: a normal reload (every changed driver restarts, see apply_config);
2. a driver's files changed: its specs (`spec/*_spec.lua`, `*_spec.lua`) run first, in a
   child process (the supervisor runs no driver Lua). If one fails, the change is refused:
   the failures are printed and logged, and the running code keeps running and answering.
   If they pass (or the driver has none), the driver is reloaded, by name, which restarts it
   when its Lua files' hashes differ from the running ones. A change that touched only
   specs runs them and reloads nothing;
3. a driver that was changed in this session logs at debug from then on (unless its config
   sets its own `log_level`).

Specs run with a time limit (SPEC_TIMEOUT); a hung spec counts as failing.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from hubhost.config import HubConfig
from hubhost.supervisor import codehash

log = logging.getLogger("hubhost.dev")

SPEC_TIMEOUT = 60.0
DEBOUNCE_MS = 300     # longest wait to group the writes of one save
STEP_MS = 30          # quiet time that ends a group


def spec_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if f.endswith("_spec.lua")]
    return out


def run_specs_here(folder: Path) -> dict[str, Any]:
    """Run every spec of a driver folder (in this process); a JSON-able summary."""
    from hubhost.testing import specrun

    passed, failures = 0, []
    for spec in spec_files(folder):
        try:
            tests = specrun.collect(spec)
            errors = [t for t in tests if t.error]
            ids = [t.id for t in tests if not t.error and not t.pending]
            results = specrun.run(spec, ids) if ids else {}
        except specrun.SpecLoadError as e:
            failures.append({"spec": str(spec), "test": "(loading the spec)", "message": e.message})
            continue
        for t in errors:
            failures.append({"spec": str(spec), "test": t.name, "message": t.error})
        names = {t.id: t.name for t in tests}
        for tid, r in results.items():
            if r.status in ("success", "pending"):
                passed += r.status == "success"
                continue
            where = f"{r.file}:{r.line}: " if r.file and r.line else ""
            failures.append({"spec": str(spec), "test": names.get(tid, tid),
                             "message": where + (r.message or r.status)})
    return {"passed": passed, "failures": failures}


async def run_specs(folder: Path) -> dict[str, Any]:
    """The specs of a driver in a child process, so no driver Lua runs in the supervisor."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "hubhost.supervisor.devmode", "--specs", str(folder),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        out, err = await asyncio.wait_for(proc.communicate(), SPEC_TIMEOUT)
    except asyncio.TimeoutError:
        proc.kill()
        await proc.wait()
        return {"passed": 0, "failures": [{"spec": str(folder), "test": "(all)",
                                           "message": f"the specs did not finish within {SPEC_TIMEOUT:g} s"}]}
    try:
        return json.loads(out.decode().strip().splitlines()[-1])
    except (ValueError, IndexError):
        return {"passed": 0, "failures": [{"spec": str(folder), "test": "(all)",
                                           "message": "the spec runner failed: " + err.decode()[-2000:]}]}


class DevWatcher:
    """Watches the config and the driver folders of a running supervisor."""

    def __init__(self, sup: Any, out: Any = None) -> None:
        self.sup = sup
        self.out = out or (lambda text: print(text, file=sys.stderr, flush=True))
        self.task: asyncio.Task | None = None
        self.changed_drivers: set[str] = set()
        self.stop_event = asyncio.Event()
        self.busy = asyncio.Lock()

    def folders(self) -> dict[str, Path]:
        return {d.id: Path(d.path).resolve() for d in self.sup.config.drivers}

    def start(self) -> None:
        self.task = self.sup.spawn(self._run())

    async def stop(self) -> None:
        self.stop_event.set()
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        import watchfiles

        while not self.stop_event.is_set():
            cfg = self.sup.config.source
            watched = {str(p) for p in self.folders().values()}
            if cfg is not None:
                watched.add(str(Path(cfg).resolve().parent))
            self.out(f"dev: watching {len(self.folders())} driver folder(s)"
                     + (f" and {cfg}" if cfg else "") + " for changes")
            restart = False
            async for changes in watchfiles.awatch(*sorted(watched), stop_event=self.stop_event,
                                                   debounce=DEBOUNCE_MS, step=STEP_MS,
                                                   watch_filter=self._interesting, recursive=True):
                try:
                    restart = await self.changed({Path(p) for _, p in changes})
                except asyncio.CancelledError:
                    raise
                except Exception:  # noqa: BLE001 - the watcher must outlive a bad change
                    log.exception("dev: handling a change failed")
                if restart:
                    break        # the set of folders changed: watch the new ones
            if not restart:
                return

    def _interesting(self, change: Any, path: str) -> bool:
        p = Path(path)
        if p.name.startswith(".") or p.name.endswith(("~", ".swp", ".swx")):
            return False
        src = self.sup.config.source
        return p.suffix == ".lua" or (src is not None and p.resolve() == Path(src).resolve())

    async def changed(self, paths: set[Path]) -> bool:
        """Act on one group of changed files; True when the watched folders changed."""
        from hubhost.api.server import ConfigReloadError, reload_config

        async with self.busy:
            src = self.sup.config.source
            folders_before = self.folders()
            if src is not None and Path(src).resolve() in {p.resolve() for p in paths}:
                self.out(f"dev: {src} changed: reloading the config")
                try:
                    report = await reload_config(self.sup)
                except ConfigReloadError as e:
                    self.out(f"dev: config refused, the running one stays: {e}")
                    return False
                self._print_report(report)
                return self.folders() != folders_before
            hit: dict[str, list[Path]] = {}
            for did, folder in folders_before.items():
                for p in paths:
                    try:
                        p.resolve().relative_to(folder)
                    except ValueError:
                        continue
                    hit.setdefault(did, []).append(p)
            for did, files in hit.items():
                await self._driver_changed(did, folders_before[did], files)
            return False

    async def _driver_changed(self, did: str, folder: Path, files: list[Path]) -> None:
        from hubhost.api.server import ConfigReloadError, reload_config

        slot = self.sup.slots.get(did)
        if slot is None:
            return
        shown = ", ".join(sorted({str(p.resolve().relative_to(folder)) for p in files}))
        t0 = time.monotonic()
        specs = spec_files(folder)
        if specs:
            result = await run_specs(folder)
            if result["failures"]:
                self.out(f"dev: {did}: {shown} changed, but {len(result['failures'])} spec(s) fail; "
                         "the change is refused and the running code stays:")
                for f in result["failures"]:
                    self.out(f"  {f['spec']}: {f['test']}: {f['message']}")
                log.error("[%s] dev: change refused: %d spec(s) fail", did, len(result["failures"]))
                return
            self.out(f"dev: {did}: {result['passed']} spec(s) pass ({time.monotonic() - t0:.2f} s)")
        code_changed = codehash.changed_files(slot.code, await asyncio.to_thread(codehash.code_hashes, folder))
        if not code_changed and slot.state in ("running", "starting"):
            self.out(f"dev: {did}: only specs changed; the running code stays")
            return
        if slot.cfg.log_level is None and did not in self.changed_drivers:
            self.changed_drivers.add(did)
        try:
            report = await reload_config(self.sup, only={did})
        except ConfigReloadError as e:
            self.out(f"dev: {did}: not reloaded: {e}")
            return
        for d in self.changed_drivers:
            if d in self.sup.slots and self.sup.slots[d].cfg.log_level is None:
                self.sup.set_driver_level(d, "debug")
        self._print_report(report)
        new = self.sup.slots.get(did)
        state = new.state if new is not None else "gone"
        self.out(f"dev: {did}: reloaded in {time.monotonic() - t0:.2f} s, now {state}"
                 + (f" - {new.last_error}" if new is not None and state != "running" and new.last_error else ""))

    def _print_report(self, report: dict[str, Any]) -> None:
        for did, why in report.get("reasons", {}).items():
            self.out(f"dev: {did}: {why}")


async def run_dev(config: HubConfig, state_dir: Path, *, demo: bool = False) -> int:
    """`hubhost run --dev`: run() plus the watcher."""
    from hubhost.hub import install_demo, install_parts
    from hubhost.supervisor.supervisor import run_hub

    log.info("hubhost starting in dev mode: hub %s, state in %s", config.hub_id, state_dir)

    def setup(sup: Any) -> None:
        if demo:
            install_demo(sup)
        install_parts(sup)
        watcher = DevWatcher(sup)
        sup.dev = watcher
        sup.ready_hooks.append(lambda s: watcher.start())
        sup.stopping_hooks.append(lambda s: s.spawn(watcher.stop()))

    return await run_hub(config, state_dir, setup=setup)


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--specs":
        logging.basicConfig(level=logging.CRITICAL)
        print(json.dumps(run_specs_here(Path(argv[1]))))
        return 0
    print("usage: python -m hubhost.supervisor.devmode --specs DRIVER_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
