"""Log output: readable on a terminal, journald-friendly under systemd.

Under systemd (`JOURNAL_STREAM` set) each line carries a `<N>` syslog priority prefix and
no timestamp (the journal adds its own), so `journalctl -p err` filters driver errors.
"""

from __future__ import annotations

import logging
import os
import sys

_PRIORITY = {logging.CRITICAL: 2, logging.ERROR: 3, logging.WARNING: 4, logging.INFO: 6, logging.DEBUG: 7}


class JournalFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        prio = next((p for lvl, p in sorted(_PRIORITY.items(), reverse=True) if record.levelno >= lvl), 7)
        text = super().format(record)
        return "\n".join(f"<{prio}>{line}" for line in text.splitlines() or [""])


def under_journal() -> bool:
    return bool(os.environ.get("JOURNAL_STREAM"))


def level_of(name: str) -> int:
    name = name.lower()
    return {"trace": logging.DEBUG - 5, "warn": logging.WARNING}.get(name) or getattr(logging, name.upper(), logging.INFO)


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if under_journal():
        handler.setFormatter(JournalFormatter("%(name)s: %(message)s"))
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level_of(level))
