"""What a reload compares: the content of a driver's Lua files, by hash (never by mtime).

`code_hashes(folder)` maps every `*.lua` file under the driver's folder (relative path) to
the SHA-256 of its bytes. The specs (`spec/` and `*_spec.lua`) do not count: editing a spec
does not change the running driver. `changed_files(old, new)` names the files that differ
(added, removed or edited), which is what a reload reports as its reason.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

MAX_FILES = 2000          # a driver folder bigger than this is not hashed file by file
MAX_BYTES = 64 << 20


def is_spec(rel: str) -> bool:
    parts = rel.split("/")
    return parts[0] == "spec" or rel.endswith("_spec.lua")


def code_hashes(folder: Path) -> dict[str, str]:
    """{relative path: sha256 hex} of the driver's Lua files (specs left out)."""
    out: dict[str, str] = {}
    folder = Path(folder)
    total = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.endswith(".lua") or name.startswith("."):
                continue
            p = Path(root) / name
            rel = p.relative_to(folder).as_posix()
            if is_spec(rel):
                continue
            try:
                data = p.read_bytes()
            except OSError as e:
                out[rel] = f"unreadable: {e.strerror}"
                continue
            total += len(data)
            out[rel] = hashlib.sha256(data).hexdigest()
            if len(out) >= MAX_FILES or total > MAX_BYTES:
                return out
    return out


def changed_files(old: dict[str, str], new: dict[str, str]) -> list[str]:
    return sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))


def describe_change(files: list[str]) -> str:
    shown = ", ".join(files[:5]) + (f" and {len(files) - 5} more" if len(files) > 5 else "")
    return f"code changed ({shown})"
