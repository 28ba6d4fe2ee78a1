"""Durable, atomic file replacement (temp file, fsync, rename, fsync of the folder).

Why one helper: every state file of the hub (datastores, the known-devices list) must
survive power loss at any instant, and the sequence is easy to get subtly wrong.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes, *, backup: bool = False) -> None:
    """Replace `path` with `data` so that a crash leaves either the old or the new file.

    With `backup`, the previous generation is kept as `<name>.bak` (a hard link made before
    the rename, so there is no moment without a complete file under either name).
    Raises OSError (ENOSPC, EFBIG, EIO, ...) with the old file untouched.
    """
    path = Path(path)
    folder = path.parent
    tmp = folder / f".{path.name}.tmp-{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640)
    try:
        view = memoryview(data)
        while view:
            n = os.write(fd, view)
            view = view[n:]
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
        if backup and path.exists():
            bak = folder / (path.name + ".bak")
            bak_tmp = folder / f".{path.name}.bak-{os.getpid()}"
            try:
                os.unlink(bak_tmp)
            except FileNotFoundError:
                pass
            os.link(path, bak_tmp)
            os.replace(bak_tmp, bak)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    fsync_dir(folder)


def read_regular(path: Path) -> bytes:
    """The bytes of `path`, which must be a regular file: a FIFO, a device or a directory
    under a state file's name is refused at once (OSError naming the file) instead of
    hanging or reading without end."""
    import stat

    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(f"{path} is not a regular file")
        chunks = []
        while True:
            b = os.read(fd, 1 << 20)
            if not b:
                break
            chunks.append(b)
        return b"".join(chunks)
    finally:
        os.close(fd)
