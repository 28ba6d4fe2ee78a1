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


class SpecRunner:
    """A warm child process that runs specs (no driver Lua runs in the supervisor): it has
    lupa and the library loaded already, so a run costs what the specs cost. One request at
    a time, a folder per line in, one JSON line out; restarted after a time-out or a death."""

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None
        self.lock = asyncio.Lock()

    async def _start(self) -> asyncio.subprocess.Process:
        if self.proc is None or self.proc.returncode is not None:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "hubhost.supervisor.devmode", "--serve",
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.DEVNULL)
            assert self.proc.stdout is not None
            try:
                while (await asyncio.wait_for(self.proc.stdout.readline(), SPEC_TIMEOUT)) not in (b"READY\n", b""):
                    pass
            except asyncio.TimeoutError:
                pass
        return self.proc

    async def warm(self) -> None:
        async with self.lock:
            await self._start()

    async def run(self, folder: Path) -> dict[str, Any]:
        async with self.lock:
            proc = await self._start()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(str(folder).encode() + b"\n")
                await proc.stdin.drain()
                while True:
                    line = await asyncio.wait_for(proc.stdout.readline(), SPEC_TIMEOUT)
                    if not line:
                        raise ConnectionError("the spec runner exited")
                    if line.startswith(b"RESULT "):
                        return json.loads(line[7:])
            except asyncio.TimeoutError:
                self.kill()
                return _failure(folder, f"the specs did not finish within {SPEC_TIMEOUT:g} s")
            except (ConnectionError, ValueError) as e:
                self.kill()
                return _failure(folder, f"the spec runner failed: {e}")

    def kill(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
        self.proc = None


def _failure(folder: Path, message: str) -> dict[str, Any]:
    return {"passed": 0, "failures": [{"spec": str(folder), "test": "(all)", "message": message}]}


_runner = SpecRunner()


async def run_specs(folder: Path) -> dict[str, Any]:
    return await _runner.run(folder)


def _serve() -> int:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:   # warm: the library compiled, lupa loaded
        (Path(tmp) / "warm_spec.lua").write_text('describe("warm", function() it("runs", function() end) end)\n')
        run_specs_here(Path(tmp))
    sys.stdout.write("READY\n")
    sys.stdout.flush()
    for line in sys.stdin:
        folder = line.strip()
        if not folder:
            continue
        try:
            result = run_specs_here(Path(folder))
        except Exception as e:  # noqa: BLE001 - reported to the author, never fatal
            result = {"passed": 0, "failures": [{"spec": folder, "test": "(all)", "message": repr(e)}]}
        sys.stdout.write("RESULT " + json.dumps(result) + "\n")
        sys.stdout.flush()
    return 0


def _under(p: Path, folder: Path) -> bool:
    try:
        p.resolve().relative_to(folder)
        return True
    except ValueError:
        return False


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
        _runner.kill()
        if self.task is not None:
            self.task.cancel()

    async def _run(self) -> None:
        import watchfiles

        await _runner.warm()     # the spec runner is ready before the first save
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
                log.debug("dev: changes: %s", sorted(p for _, p in changes))
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
        if src is not None and p.resolve() == Path(src).resolve():
            return True
        if p.suffix != ".lua":
            return False
        return any(_under(p, f) for f in self.folders().values())

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
        if slot.cfg.log_level is None:
            self.changed_drivers.add(did)
            self.sup.set_driver_level(did, "debug")   # the restarted slot keeps it
        try:
            report = await reload_config(self.sup, only={did})
        except ConfigReloadError as e:
            self.out(f"dev: {did}: not reloaded: {e}")
            return
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
    if argv == ["--serve"]:
        logging.basicConfig(level=logging.CRITICAL)
        return _serve()
    if len(argv) == 2 and argv[0] == "--specs":
        logging.basicConfig(level=logging.CRITICAL)
        print(json.dumps(run_specs_here(Path(argv[1]))))
        return 0
    print("usage: python -m hubhost.supervisor.devmode --specs DRIVER_DIR", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
