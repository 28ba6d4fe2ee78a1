"""The state-dir lock: one hub per state dir, for the hub's whole life.

Why: two hubs on one state dir would run the same drivers against the same devices and
overwrite each other's datastore files. `flock` on `<state_dir>/hub.lock` is released by
the kernel when the holder dies (even by SIGKILL), so a crash never leaves a stale lock;
the holder's pid is written into the file only to name it in the second hub's error.
Read-only commands (`hubhost datastore`, `doctor`) never take the lock.
"""

from __future__ import annotations

import fcntl
import os
import stat
from pathlib import Path

LOCK_NAME = "hub.lock"


class StateDirError(OSError):
    """The state dir cannot be used: not a folder, not writable, or locked by another hub.
    The message is one line naming the path and the reason."""


class StateDirLocked(StateDirError):
    """Another live hub holds the lock (its pid in `pid`, None if it wrote none yet)."""

    def __init__(self, message: str, pid: int | None) -> None:
        super().__init__(message)
        self.pid = pid


def prepare_state_dir(path: Path) -> Path:
    """Create the state dir if needed and check it is a writable folder; StateDirError
    (one line) otherwise."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except FileExistsError:
        raise StateDirError(f"state dir {path} exists and is not a directory") from None
    except OSError as e:
        raise StateDirError(f"state dir {path} cannot be created: {e.strerror or e}") from None
    try:
        st = os.stat(path)
    except OSError as e:
        raise StateDirError(f"state dir {path} is unusable: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StateDirError(f"state dir {path} exists and is not a directory")
    if not os.access(path, os.W_OK | os.X_OK):
        raise StateDirError(f"state dir {path} is not writable by this user (uid {os.getuid()})")
    return path


class StateDirLock:
    """An exclusive, non-blocking flock on `<state_dir>/hub.lock`, held until release()
    (or the process ends). Usable as a context manager."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = Path(state_dir)
        self.path = self.state_dir / LOCK_NAME
        self.fd: int | None = None

    def acquire(self) -> "StateDirLock":
        """Take the lock or raise StateDirLocked naming the other hub's pid (StateDirError
        when the state dir itself is unusable)."""
        prepare_state_dir(self.state_dir)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise StateDirError(f"cannot open the state dir lock {self.path}: {e.strerror or e}") from None
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise StateDirError(f"the state dir lock {self.path} is not a regular file")
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pid = _read_pid(fd)
                who = f"pid {pid}" if pid else "another process"
                raise StateDirLocked(f"state dir {self.state_dir} is in use by another hub ({who} holds "
                                     f"{self.path}); refusing to start a second hub on it", pid) from None
            try:   # the pid only names us in a second hub's error; a full disk must not stop us
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            except OSError:
                pass
        except BaseException:
            os.close(fd)
            raise
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            try:
                os.ftruncate(self.fd, 0)
            except OSError:
                pass
            os.close(self.fd)   # closing the only descriptor drops the flock
            self.fd = None

    def __enter__(self) -> "StateDirLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
        return int(text) if text else None
    except (OSError, ValueError):
        return None


def holder_pid(state_dir: Path) -> int | None:
    """The pid of the hub holding the state dir's lock, None if no hub holds it (read-only:
    for `doctor` and friends)."""
    path = Path(state_dir) / LOCK_NAME
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_pid(fd) or -1
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


__all__ = ["StateDirLock", "StateDirError", "StateDirLocked", "prepare_state_dir", "holder_pid", "LOCK_NAME"]
