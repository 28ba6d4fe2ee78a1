"""Log output: readable on a terminal, journald-friendly under systemd.

Under systemd (`JOURNAL_STREAM` set) records go to the journal's native socket
(`/run/systemd/journal/socket`, or `$HUBHOST_JOURNAL_SOCKET`) with their priority and, for
records of a driver, the fields `HUBHOST_DRIVER=` and `HUBHOST_DEVICE=`, so
`journalctl -u hubhost HUBHOST_DRIVER=projectors` follows one driver. Without that socket
each line goes to stderr with a `<N>` syslog priority prefix and no timestamp (the journal
adds its own), so `journalctl -p err` still filters driver errors.
"""

from __future__ import annotations

import logging
import os
import socket
import sys

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for lvl, p in sorted(_PRIORITY.items(), reverse=True) if record.levelno >= lvl), 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


JOURNAL_SOCKET = "/run/systemd/journal/socket"


def _field(name: str, value: str) -> bytes:
    data = value.encode("utf-8", "replace")
    if b"\n" in data:
        return name.encode() + b"\n" + len(data).to_bytes(8, "little") + data + b"\n"
    return name.encode() + b"=" + data + b"\n"


class JournalHandler(logging.Handler):
    """The journal's native protocol: one datagram per record with its fields."""

    def __init__(self, path: str, identifier: str = "hubhost") -> None:
        super().__init__()
        self.path = path
        self.identifier = identifier
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.fallback = logging.StreamHandler(sys.stderr)
        self.fallback.setFormatter(JournalFormatter("%(name)s: %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prio = next((p for lvl, p in sorted(_PRIORITY.items(), reverse=True) if record.levelno >= lvl), 7)
            msg = f"{record.name}: {record.getMessage()}"
            if record.exc_info:
                msg += "\n" + logging.Formatter().formatException(record.exc_info)
            parts = [_field("MESSAGE", msg), _field("PRIORITY", str(prio)),
                     _field("SYSLOG_IDENTIFIER", self.identifier), _field("LOGGER", record.name)]
            driver = getattr(record, "hubhost_driver", None)
            device = getattr(record, "hubhost_device", None)
            if driver:
                parts.append(_field("HUBHOST_DRIVER", driver))
            if device:
                parts.append(_field("HUBHOST_DEVICE", device))
            self.sock.sendto(b"".join(parts), self.path)
        except OSError:
            self.fallback.emit(record)    # a record too big for a datagram, or no journal
        except Exception:  # noqa: BLE001 - logging never raises
            self.handleError(record)


def journal_socket() -> str | None:
    path = os.environ.get("HUBHOST_JOURNAL_SOCKET") or JOURNAL_SOCKET
    try:
        import stat
        return path if stat.S_ISSOCK(os.stat(path).st_mode) else None
    except OSError:
        return None


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def level_of(name: str) -> int:
    name = name.lower()
    return {"trace": logging.DEBUG - 5, "warn": logging.WARNING}.get(name) or getattr(logging, name.upper(), logging.INFO)


def setup(level: str = "info") -> None:
    handler: logging.Handler = logging.StreamHandler(sys.stderr)
    native = journal_socket() if under_journal() else None
    if native is not None:
        handler = JournalHandler(native)
    elif under_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level_of(level))
