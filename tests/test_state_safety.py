"""Issue 12: state that is never lost or shared. Start-up, recovery and shutdown paths of the
datastore and the state dir, each with real processes, real signals and real files (a small
tmpfs for a full disk when this process may mount one, RLIMIT_FSIZE otherwise)."""

from __future__ import annotations

import contextlib
import hashlib
import os
import resource
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable
FILE = "datastore.json"


def env(**extra: str) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("STATE_DIRECTORY", "RUNTIME_DIRECTORY", "HUBHOST_FAULT_KILL_AT", "NOTIFY_SOCKET")}
    e["PYTHONPATH"] = str(ROOT) + (os.pathsep + e["PYTHONPATH"] if e.get("PYTHONPATH") else "")
    e.update(extra)
    return e


# -- a real hub in its own process ------------------------------------------------------------

class HubProc:
    """`python -m hubhost run` as an operator runs it; stderr goes to a file we poll."""

    def __init__(self, tmp: Path, config: Path, state: Path, *args: str, name: str = "hub",
                 preexec: object = None, extra_env: dict[str, str] | None = None) -> None:
        self.log_path = tmp / f"{name}.log"
        self.log_file = open(self.log_path, "wb")
        cmd = [PY, "-m", "hubhost", "run", "--config", str(config), "--state-dir", str(state), *args]
        # under RLIMIT_FSIZE the hub could not write a log file itself: it writes to a pipe
        # and a thread here copies it
        out = subprocess.PIPE if preexec is not None else self.log_file
        self.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=tmp,
                                     env=env(**(extra_env or {})), preexec_fn=preexec)  # type: ignore[arg-type]
        self.copier: threading.Thread | None = None
        if preexec is not None:
            self.copier = threading.Thread(target=self._copy, daemon=True)
            self.copier.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for chunk in iter(lambda: self.proc.stdout.read1(65536), b""):  # type: ignore[union-attr]
            self.log_file.write(chunk)
            self.log_file.flush()

    def text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            t = self.text()
            if needle in t:
                return t
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        raise AssertionError(f"no {needle!r} within {timeout} s (exit {self.proc.poll()}); log:\n{self.text()[-3000:]}")

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        finally:
            self.close()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.copier is not None:
            self.copier.join(10)
        if not self.log_file.closed:
            self.log_file.close()


@contextlib.contextmanager
def hub(tmp: Path, config: Path, state: Path, *args: str, **kw: object) -> Iterator[HubProc]:
    h = HubProc(tmp, config, state, *args, **kw)  # type: ignore[arg-type]
    try:
        yield h
    finally:
        h.close()


def driver(tmp: Path, name: str, src: str) -> Path:
    d = tmp / "drivers" / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "init.lua").write_text(textwrap.dedent(src))
    return d


HEALTHY = """
local driver_helper = require "driver_helper"
local log = require "log"
return driver_helper.init {
  name = "healthy",
  lifecycle = { init = function(driver, device)
    driver:call_on_schedule(0.2, function() log.info("healthy tick") end, "tick")
  end },
}
"""

QUIET = """
local driver_helper = require "driver_helper"
return driver_helper.init { name = "quiet" }
"""


def config(tmp: Path, drivers: list[tuple[str, Path, str]], name: str = "hub.toml") -> Path:
    """drivers: (id, path, extra TOML lines); each gets one device `<id>-dev`."""
    parts = ['hub_id = "t12"\n']
    for did, path, extra in drivers:
        parts.append(f'[[drivers]]\nid = "{did}"\npath = "{path}"\n{extra}\n'
                     f'[[drivers.devices]]\nid = "{did}-dev"\n')
    p = tmp / name
    p.write_text("".join(parts))
    return p


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- recovery: a kill between every pair of file operations -----------------------------------

LOADER = """
import sys
from pathlib import Path
from hubhost.state.datastore import StoreFile
raw = StoreFile(Path(sys.argv[1]), "d").load()
sys.stdout.buffer.write(b"NONE" if raw is None else raw)
"""

WRITER = """
import sys
from pathlib import Path
from hubhost.state.datastore import StoreFile
f = StoreFile(Path(sys.argv[1]), "d")
f.load()
epoch = f.attach()
f.write(epoch, 1, Path(sys.argv[2]).read_bytes())
"""


def _child(code: str, *args: str, kill_at: str | None = None) -> subprocess.CompletedProcess[bytes]:
    extra = {"HUBHOST_FAULT_KILL_AT": kill_at} if kill_at else {}
    return subprocess.run([PY, "-c", code, *args], env=env(**extra), capture_output=True, timeout=60)


GOOD_OLD = orjson.dumps({"gen": 1, "list": list(range(50)), "s": "é"})
GOOD_NEW = orjson.dumps({"gen": 2, "list": list(range(60)), "s": "ü"})
CORRUPT = b'{"gen": 3, "list": [1, 2'


@pytest.mark.parametrize("main,bak,want", [
    (CORRUPT, GOOD_OLD, GOOD_OLD),      # corrupt main, valid .bak
    (None, GOOD_OLD, GOOD_OLD),         # main missing, valid .bak
    (GOOD_NEW, CORRUPT, GOOD_NEW),      # valid main, corrupt .bak
    (CORRUPT, CORRUPT, None),           # nothing good: start empty, keep both for a human
], ids=["corrupt-main", "missing-main", "corrupt-bak", "both-corrupt"])
def test_a_kill_between_any_two_recovery_steps_still_loads_the_newest_good_generation(
        tmp_path: Path, main: bytes | None, bak: bytes | None, want: bytes | None) -> None:
    steps = 0
    for k in range(30):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        if main is not None:
            (folder / FILE).write_bytes(main)
        if bak is not None:
            (folder / (FILE + ".bak")).write_bytes(bak)
        first = _child(LOADER, str(folder), kill_at=f"recover:{k}")
        if first.returncode == 0:
            steps = k
            assert first.stdout == (want if want is not None else b"NONE")
        else:
            assert first.returncode == -signal.SIGKILL, first.stderr.decode()
        # the next start, without a kill, finds the newest good generation
        second = _child(LOADER, str(folder))
        assert second.returncode == 0, second.stderr.decode()
        assert second.stdout == (want if want is not None else b"NONE"), (k, second.stdout)
        names = sorted(p.name for p in folder.iterdir())
        if want is not None:
            assert (folder / FILE).read_bytes() == want, (k, names)
        if bak is not None and bak != CORRUPT:
            assert (folder / (FILE + ".bak")).read_bytes() == bak       # never touched
        if main == CORRUPT:   # the corrupt file is kept for a human, under its own name
            kept = [n for n in names if n.startswith(FILE + ".corrupt-")]
            assert kept and all((folder / n).read_bytes() == CORRUPT for n in kept)
        if bak == CORRUPT:
            assert any(n.startswith(FILE + ".bak.corrupt-") for n in names), names
            assert not (folder / (FILE + ".bak")).exists() or (folder / (FILE + ".bak")).read_bytes() != CORRUPT
        if first.returncode == 0:
            break
    assert steps >= 1, "the recovery made no file operation at all"


def test_a_kill_between_any_two_steps_of_a_write_keeps_a_good_generation(tmp_path: Path) -> None:
    new = tmp_path / "new.json"
    new.write_bytes(GOOD_NEW)
    for k in range(30):
        folder = tmp_path / f"k{k}"
        folder.mkdir()
        (folder / FILE).write_bytes(GOOD_OLD)
        (folder / (FILE + ".bak")).write_bytes(b'{"gen": 0}')
        first = _child(WRITER, str(folder), str(new), kill_at=f"write:{k}")
        second = _child(LOADER, str(folder))
        assert second.returncode == 0, second.stderr.decode()
        if first.returncode == 0:
            assert second.stdout == GOOD_NEW
            assert (folder / (FILE + ".bak")).read_bytes() == GOOD_OLD
            break
        assert first.returncode == -signal.SIGKILL, first.stderr.decode()
        assert second.stdout in (GOOD_OLD, GOOD_NEW), (k, second.stdout)
    else:
        raise AssertionError("the write never completed")


def test_the_hub_loads_the_bak_when_the_main_file_is_missing_and_says_so(tmp_path: Path) -> None:
    state = tmp_path / "state"
    folder = state / "drivers" / "keeper"
    folder.mkdir(parents=True)
    (folder / (FILE + ".bak")).write_bytes(GOOD_OLD)
    d = driver(tmp_path, "keeper", """
        local driver_helper = require "driver_helper"
        local log = require "log"
        return driver_helper.init { name = "keeper", lifecycle = { init = function(driver, device)
          log.info("gen is " .. tostring(driver.datastore.gen))
        end } }
    """)
    cfg = config(tmp_path, [("keeper", d, "")])
    with hub(tmp_path, cfg, state) as h:
        text = h.wait_for("gen is 1")
        assert h.stop() == 0
    assert f"{FILE} is missing; loading {FILE}.bak" in text
    assert (folder / FILE).read_bytes() == GOOD_OLD


# -- stores that do not fit the driver's memory -----------------------------------------------

def _store_of(size: int) -> bytes:
    chunk = "x" * 1000
    n = size // 1010
    data = orjson.dumps({"blob": [chunk] * n})
    return data


@pytest.mark.parametrize("mb,limit", [(20, "64MiB"), (30, "64MiB"), (40, "64MiB"), (8, "16MiB")])
def test_a_store_too_big_for_max_memory_is_refused_untouched_and_the_neighbour_runs(
        tmp_path: Path, mb: int, limit: str) -> None:
    state = tmp_path / "state"
    folder = state / "drivers" / "big"
    folder.mkdir(parents=True)
    (folder / FILE).write_bytes(_store_of(mb * 1000 * 1000))
    (folder / (FILE + ".bak")).write_bytes(_store_of(mb * 1000 * 1000 - 5000))
    before = {p.name: sha(p) for p in folder.iterdir()}
    size = (folder / FILE).stat().st_size
    cfg = config(tmp_path, [("big", driver(tmp_path, "big", QUIET), f'max_memory = "{limit}"'),
                            ("healthy", driver(tmp_path, "healthy", HEALTHY), "")])
    with hub(tmp_path, cfg, state) as h:
        h.wait_for("healthy tick", 60)
        h.wait_for("[big] driver crashed", 30)
        assert h.stop() == 0
    text = h.text()
    assert "PANIC" not in text and "Traceback" not in text, text[-3000:]
    refusals = [line for line in text.splitlines() if "too big for the driver's max_memory" in line
                or "does not fit the driver's max_memory" in line]
    assert refusals, text[-3000:]
    assert f"{size} bytes" in refusals[0] and "[big]" in refusals[0]
    assert f"{limit[:-3]}.0 MiB" in refusals[0]
    assert "[big] running" not in text
    assert "could not encode" not in text and "corrupt" not in text
    assert {p.name: sha(p) for p in folder.iterdir()} == before     # byte-identical, nothing moved


# -- only regular files are state -------------------------------------------------------------

def test_a_fifo_a_directory_and_a_symlink_to_dev_zero_are_refused_in_one_line(tmp_path: Path) -> None:
    state = tmp_path / "state"
    for name in ("fifo", "folder", "zero"):
        (state / "drivers" / name).mkdir(parents=True)
    os.mkfifo(state / "drivers" / "fifo" / FILE)
    (state / "drivers" / "folder" / FILE).mkdir()
    os.symlink("/dev/zero", state / "drivers" / "zero" / FILE)
    q = driver(tmp_path, "quiet", QUIET)
    cfg = config(tmp_path, [("fifo", q, ""), ("folder", q, ""), ("zero", q, ""),
                            ("healthy", driver(tmp_path, "healthy", HEALTHY), "")])
    with hub(tmp_path, cfg, state) as h:
        h.wait_for("healthy tick", 30)
        for name, kind in (("fifo", "a FIFO"), ("folder", "a directory"), ("zero", "a symbolic link")):
            h.wait_for(f"{state / 'drivers' / name / FILE} is {kind}, not a regular file", 10)
        t0 = time.monotonic()
        assert h.stop() == 0
        assert time.monotonic() - t0 < 10
    text = h.text()
    assert "Traceback" not in text
    assert stat_kind(state / "drivers" / "fifo" / FILE) == "fifo"
    assert os.readlink(state / "drivers" / "zero" / FILE) == "/dev/zero"


def stat_kind(p: Path) -> str:
    import stat as st
    return "fifo" if st.S_ISFIFO(os.lstat(p).st_mode) else "other"


# -- signals during start-up ------------------------------------------------------------------

def test_sigterm_during_a_slow_start_stops_the_hub_within_10_s(tmp_path: Path) -> None:
    slow = driver(tmp_path, "slow", """
        local log = require "log"
        log.info("slow entry chunk begins")
        local t, x = os.clock(), 0
        while os.clock() - t < 40 do x = x + 1 end
        local driver_helper = require "driver_helper"
        return driver_helper.init { name = "slow" }
    """)
    cfg = config(tmp_path, [("slow", slow, "cpu_limit = 120.0"),
                            ("healthy", driver(tmp_path, "healthy", HEALTHY), "")])
    with hub(tmp_path, cfg, tmp_path / "state") as h:
        h.wait_for("slow entry chunk begins", 30)
        time.sleep(0.5)
        t0 = time.monotonic()
        code = h.stop(timeout=20)
        took = time.monotonic() - t0
    assert took < 10, (took, h.text()[-2000:])
    assert code == 0, h.text()[-2000:]
    assert "stop requested during start-up" in h.text()


# -- a full disk: a small tmpfs when we may mount one, RLIMIT_FSIZE otherwise -----------------

def _can_mount(tmp: Path) -> bool:
    probe = tmp / "probe"
    probe.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                       capture_output=True)
    if r.returncode != 0:
        return False
    subprocess.run(["umount", str(probe)], check=True)
    return True


@contextlib.contextmanager
def small_disk(tmp: Path, size: str = "2m") -> Iterator[Path | None]:
    """A tmpfs of `size` at tmp/disk (None: this process cannot mount; use RLIMIT_FSIZE)."""
    if os.geteuid() != 0 or os.environ.get("HUBHOST_TEST_NO_TMPFS") == "1" or not _can_mount(tmp):
        yield None
        return
    mnt = tmp / "disk"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(mnt)], check=True)
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(mnt: Path) -> None:
    """Write until the filesystem says ENOSPC."""
    with open(mnt / "filler", "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    for i in range(10000):     # the last partial page, too
        try:
            with open(mnt / f"f{i}", "wb") as f:
                f.write(b"\0" * 512)
        except OSError:
            break


def _fsize_limit(limit: int) -> object:
    def preexec() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))
    return preexec


NEW_DEVICE = """
local driver_helper = require "driver_helper"
local log = require "log"
return driver_helper.init {
  name = "writer",
  lifecycle = { init = function(driver, device)
    driver:call_on_schedule(0.1, function(d)
      d.datastore.n = (d.datastore.n or 0) + 1
      d.datastore.pad = string.rep("p", 4000)
      if d.datastore.n % 5 == 0 then log.info("writer n=" .. d.datastore.n) end
    end, "count")
  end },
}
"""


def test_a_full_disk_when_a_new_device_is_first_seen_names_devices_json(tmp_path: Path) -> None:
    w = driver(tmp_path, "writer", NEW_DEVICE)
    cfg = config(tmp_path, [("writer", w, "flush_interval = 3600.0")])
    with small_disk(tmp_path) as mnt:
        if mnt is not None:
            state = mnt / "state"
            (state / "drivers" / "writer").mkdir(parents=True)
            fill(mnt)
            kw: dict[str, object] = {}
        else:
            state = tmp_path / "state"
            kw = {"preexec": _fsize_limit(16)}
        with hub(tmp_path, cfg, state, **kw) as h:   # type: ignore[arg-type]
            h.wait_for("writer n=10", 30)
            code = h.stop()
    text = h.text()
    line = [x for x in text.splitlines() if "could not record the known devices" in x]
    assert line and str(state / "drivers" / "writer" / "devices.json") in line[0], text[-3000:]
    assert "driver crashed" not in text
    del code


def test_a_shutdown_that_cannot_flush_exits_1_and_names_the_driver(tmp_path: Path) -> None:
    w = driver(tmp_path, "writer", NEW_DEVICE)
    cfg = config(tmp_path, [("writer", w, "flush_interval = 3600.0"),
                            ("healthy", driver(tmp_path, "healthy", HEALTHY), "")])
    with small_disk(tmp_path) as mnt:
        state = (mnt or tmp_path) / "state"
        with hub(tmp_path, cfg, state, **({} if mnt else {"preexec": _fsize_limit(1000)})) as h:  # type: ignore[arg-type]
            h.wait_for("writer n=10", 30)
            if mnt is not None:
                fill(mnt)
            code = h.stop()
    text = h.text()
    assert code == 1, text[-3000:]
    last = [x for x in text.splitlines() if "were NOT written to disk" in x]
    assert last and "writer" in last[0] and "healthy" not in last[0], text[-3000:]


# -- one hub per state dir --------------------------------------------------------------------

SAVER = """
local driver_helper = require "driver_helper"
local log = require "log"
return driver_helper.init { name = "saver", lifecycle = { init = function(driver, device)
  driver.datastore.hello = "world"
  assert(driver.datastore:save())
  log.info("saved")
end } }
"""


def test_a_second_hub_on_the_same_state_dir_exits_2_naming_the_first(tmp_path: Path) -> None:
    state = tmp_path / "state"
    cfg = config(tmp_path, [("saver", driver(tmp_path, "saver", SAVER), "")])
    with hub(tmp_path, cfg, state, name="first") as first:
        first.wait_for("saved", 30)
        t0 = time.monotonic()
        second = subprocess.run([PY, "-m", "hubhost", "run", "--config", str(cfg), "--state-dir", str(state)],
                                env=env(), capture_output=True, timeout=30, cwd=tmp_path)
        assert time.monotonic() - t0 < 10
        assert second.returncode == 2
        err = second.stderr.decode().strip().splitlines()
        assert len(err) == 1 and f"pid {first.proc.pid}" in err[0] and str(state) in err[0], err
        shown = subprocess.run([PY, "-m", "hubhost", "datastore", "saver", "--state-dir", str(state)],
                               env=env(), capture_output=True, timeout=30)
        assert shown.returncode == 0 and orjson.loads(shown.stdout)["hello"] == "world"
        assert first.proc.poll() is None
        assert first.stop() == 0
    # the lock dies with its hub, even by SIGKILL
    with hub(tmp_path, cfg, state, name="third") as third:
        third.wait_for("saved", 30)
        third.stop(signal.SIGKILL)
    with hub(tmp_path, cfg, state, name="fourth") as fourth:
        fourth.wait_for("saved", 30)
        assert fourth.stop() == 0


# -- the demo and unusable paths --------------------------------------------------------------

def test_the_demo_uses_a_fresh_temporary_state_dir_and_says_where(tmp_path: Path) -> None:
    home = tmp_path / "home"
    xdg = tmp_path / "xdg-state"
    home.mkdir()
    e = env(HOME=str(home), XDG_STATE_HOME=str(xdg), TMPDIR=str(tmp_path))
    log_path = tmp_path / "demo.log"
    with open(log_path, "wb") as out:
        p = subprocess.Popen([PY, "-m", "hubhost", "run", "--demo"], env=e, stdout=out,
                             stderr=subprocess.STDOUT, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 60
            while "drivers running" not in log_path.read_text() and time.monotonic() < deadline:
                assert p.poll() is None, log_path.read_text()
                time.sleep(0.1)
            text = log_path.read_text()
            where = [x for x in text.splitlines() if x.startswith("hubhost: demo state in ")]
            assert where, text
            demo_state = Path(where[0].split(" in ", 1)[1].split(" ", 1)[0])
            assert demo_state.is_dir() and demo_state.is_relative_to(tmp_path)
            assert (demo_state / "drivers").is_dir()
            p.send_signal(signal.SIGINT)
            assert p.wait(20) == 0
        finally:
            if p.poll() is None:
                p.kill()
    assert not xdg.exists() or not any(xdg.rglob("*")), list(xdg.rglob("*"))
    assert not any(home.rglob("*"))
    assert not demo_state.exists()


def test_unusable_state_dir_and_socket_path_give_one_line_and_exit_2(tmp_path: Path) -> None:
    cfg = config(tmp_path, [("quiet", driver(tmp_path, "quiet", QUIET), "")])
    afile = tmp_path / "afile"
    afile.write_text("x")

    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([PY, "-m", "hubhost", "run", "--config", str(cfg), *args], env=env(),
                              capture_output=True, timeout=60, cwd=tmp_path)

    for state, reason in ((afile, "is not a directory"), (afile / "sub", "cannot be created")):
        r = run("--state-dir", str(state))
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1, lines
        assert str(state) in lines[0] and reason in lines[0]
    # a config path that is a folder, and a config dir that is a file
    r = subprocess.run([PY, "-m", "hubhost", "run", "--config", str(tmp_path), "--state-dir", str(tmp_path / "s1")],
                       env=env(), capture_output=True, timeout=60, cwd=tmp_path)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(tmp_path) in lines[0], lines
    r = subprocess.run([PY, "-m", "hubhost", "run", "--state-dir", str(tmp_path / "s1")],
                       env=env(CONFIGURATION_DIRECTORY=str(afile)), capture_output=True, timeout=60, cwd=tmp_path)
    lines = r.stderr.decode().strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and str(afile / "hub.toml") in lines[0], lines
    # a config whose [api] socket sits in a folder that is a file
    bad = tmp_path / "badsock.toml"
    bad.write_text(cfg.read_text().replace('hub_id = "t12"\n', f'hub_id = "t12"\n[api]\nsocket = "{afile}/hub.sock"\n'))
    r = subprocess.run([PY, "-m", "hubhost", "run", "--config", str(bad), "--state-dir", str(tmp_path / "s2")],
                       env=env(), capture_output=True, timeout=60, cwd=tmp_path)
    assert r.returncode == 2, r.stderr.decode()[-2000:]
    err = [x for x in r.stderr.decode().splitlines() if x.startswith("hubhost: ")]
    assert err and str(afile) in err[-1] and "Traceback" not in r.stderr.decode(), r.stderr.decode()[-2000:]
    # a read-only parent, when we may mount one
    with small_disk(tmp_path, "1m") as mnt:
        if mnt is None:
            return
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = run("--state-dir", str(mnt / "state"))
        lines = r.stderr.decode().strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and str(mnt / "state") in lines[0], lines
        assert "Read-only file system" in lines[0]


# -- out of memory, then a normal event, in a real hub ----------------------------------------

def test_after_an_out_of_memory_abort_the_hub_serves_the_next_call(tmp_path: Path) -> None:
    oom = ROOT / "tests" / "lua" / "oomdriver"
    state = tmp_path / "state"
    cfg = config(tmp_path, [("d1", oom, 'max_memory = "16MiB"'),
                            ("healthy", driver(tmp_path, "healthy", HEALTHY), "")])

    def exec_(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([PY, "-m", "hubhost", "exec", "--state-dir", str(state), "--timeout", "20",
                               "d1-dev", *args], env=env(), capture_output=True, timeout=60)

    with hub(tmp_path, cfg, state) as h:
        h.wait_for("drivers running", 30)
        for n in (100000, 16000, 100000):
            r = exec_("big", f"n={n}")
            assert b"not enough memory" in r.stdout + r.stderr, (r.stdout, r.stderr)
            t0 = time.monotonic()
            r = exec_("echo", "v=1")
            assert r.returncode == 0 and r.stdout.strip() == b"1", (r.stdout, r.stderr, h.text()[-2000:])
            assert time.monotonic() - t0 < 5
        assert h.stop() == 0
    assert "Traceback" not in h.text()


# -- a store that outgrows max_memory while running -------------------------------------------

def test_a_store_that_outgrows_max_memory_fails_its_flush_clearly_and_recovers(tmp_path: Path) -> None:
    sys.path.insert(0, str(ROOT / "tests"))
    from drivers_datastore.kit import BASIC, NullPort
    from hubhost.sandbox.runtime import DriverRuntime
    from hubhost.state.datastore import DatastoreBinding, StoreTooLarge

    folder = tmp_path / "drivers" / "grow"
    rt = DriverRuntime("grow", BASIC, NullPort(), max_memory=16 * 1024 * 1024)
    b = DatastoreBinding(rt, folder)
    rt.load()
    run = rt.sandbox.compile(b"local ds = require('datastore').init() ds.small = 'yes'", "t", rt.sandbox.new_env())
    run()
    assert b.flush_now()
    before = sha(folder / FILE)
    grow = rt.sandbox.compile(b"local ds = require('datastore').init() "
                              b"for i = 1, 6 do ds['k' .. i] = string.rep(string.char(64 + i), 1000000) end",
                              "t", rt.sandbox.new_env())
    grow()
    with pytest.raises(StoreTooLarge) as err:
        b.flush_now()
    msg = str(err.value)
    assert "[grow]" in msg and "16.0 MiB" in msg and "could not be encoded" in msg
    assert f"{(folder / FILE).stat().st_size} bytes" in msg
    assert sha(folder / FILE) == before and b.is_dirty()
    shrink = rt.sandbox.compile(b"local ds = require('datastore').init() for i = 2, 6 do ds['k' .. i] = nil end",
                                "t", rt.sandbox.new_env())
    shrink()
    assert b.flush_now()            # the runtime and the store work again
    assert set(orjson.loads((folder / FILE).read_bytes())) == {"small", "k1"}


def test_a_restore_that_hits_a_full_disk_never_rotates_the_corrupt_file_into_the_bak(tmp_path: Path) -> None:
    from hubhost.state.datastore import StoreFile

    with small_disk(tmp_path, "1m") as mnt:
        if mnt is None:
            pytest.skip("needs a tmpfs (root and mount); RLIMIT_FSIZE cannot fail only the restore")
        folder = mnt / "d"
        folder.mkdir()
        (folder / FILE).write_bytes(CORRUPT)
        (folder / (FILE + ".bak")).write_bytes(GOOD_OLD)
        fill(mnt)
        f = StoreFile(folder, "d")
        assert f.load() == GOOD_OLD and f.restore_failed     # loaded; the write-back failed
        (mnt / "filler").unlink()
        f.write(f.attach(), 1, GOOD_NEW)
        assert (folder / FILE).read_bytes() == GOOD_NEW
        assert (folder / (FILE + ".bak")).read_bytes() == GOOD_OLD   # not the corrupt one
