"""Durable, atomic file replacement (temp file, fsync, rename, fsync of the folder), and
reading state files that refuses anything but a regular file.

Why one helper: every state file of the hub (datastores, the known-devices list) must
survive power loss at any instant, and the sequence is easy to get subtly wrong.

Crash tests: `HUBHOST_FAULT_KILL_AT=<label>:<k>` makes the process SIGKILL itself just before
the k-th (0-based) file operation counted under `label` ("write" for write_atomic,
"recover" for the datastore's start-up recovery), so a test can stop a real process between
every pair of file operations, one after the other, instead of at random.
"""

from __future__ import annotations

import os
import signal
import stat
from pathlib import Path

_FAULT_ENV = "HUBHOST_FAULT_KILL_AT"
_fault_counts: dict[str, int] = {}


def fault_point(label: str) -> None:
    """One file operation of `label` is about to happen: die here if the test said so."""
    spec = os.environ.get(_FAULT_ENV)
    if not spec:
        return
    want_label, _, want = spec.partition(":")
    if want_label != label:
        return
    n = _fault_counts.get(label, 0)
    _fault_counts[label] = n + 1
    if str(n) == want:
        os.kill(os.getpid(), signal.SIGKILL)


class NotRegularFile(OSError):
    """A state path that is a FIFO, a device, a folder or a symbolic link: never opened."""


def _kind(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    return "not a regular file"


def check_regular(path: Path) -> os.stat_result | None:
    """lstat of `path` (None if it does not exist); NotRegularFile for anything else than a
    regular file, symbolic links included (a link to /dev/zero must not be read)."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return None
    if not stat.S_ISREG(st.st_mode):
        raise NotRegularFile(f"{path} is {_kind(st.st_mode)}, not a regular file; "
                             "refusing to open it as state")
    return st


def read_regular(path: Path) -> bytes | None:
    """The bytes of the regular file `path`, None if it does not exist. Never blocks on a
    FIFO and never follows a symbolic link (O_NONBLOCK | O_NOFOLLOW, then fstat)."""
    if check_regular(path) is None:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    except OSError as e:
        if e.errno == 40:   # ELOOP: replaced by a symbolic link since the lstat
            raise NotRegularFile(f"{path} is a symbolic link, not a regular file; "
                                 "refusing to open it as state") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NotRegularFile(f"{path} is {_kind(st.st_mode)}, not a regular file; "
                                 "refusing to open it as state")
        chunks = []
        while True:
            b = os.read(fd, max(st.st_size + 1, 65536))
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _named(e: OSError, path: Path) -> OSError:
    """The same error with the file named (os.write's ENOSPC names nothing)."""
    if isinstance(e, NotRegularFile) or e.filename is not None or not e.errno:
        return e
    return OSError(e.errno, e.strerror, str(path))


def write_atomic(path: Path, data: bytes, *, backup: bool = False, fault_label: str = "write") -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    With `backup`, the previous generation is kept as `<name>.bak` (a hard link made before
    the rename, so there is no moment without a complete file under either name).
    Raises OSError (ENOSPC, EFBIG, EIO, ...) naming the file, with the old file untouched.
    """
    path = Path(path)
    try:
        _write_atomic(path, data, backup, fault_label)
    except OSError as e:
        named = _named(e, path)
        if named is e:
            raise
        raise named from e


def _write_atomic(path: Path, data: bytes, backup: bool, label: str) -> None:
    folder = path.parent
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    fault_point(label)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
        fault_point(label)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    os.close(fd)
    try:
        if backup and check_regular(path) is not None:
            bak = folder / (path.name + ".bak")
            check_regular(bak)
            bak_tmp = folder / f".{path.name}.bak-{os.getpid()}"
            try:
                os.unlink(bak_tmp)
            except FileNotFoundError:
                pass
            fault_point(label)
            os.link(path, bak_tmp)
            fault_point(label)
            os.replace(bak_tmp, bak)
        elif not backup:
            check_regular(path)
        fault_point(label)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fault_point(label)
    fsync_dir(folder)

