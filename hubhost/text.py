"""Untrusted text made safe to show: one line, no terminal control.

Drivers make status names, descriptions, error messages and log text; the supervisor's log,
the journal and the CLI's output show them. Every control character but the tab (newlines,
ANSI escapes, NUL, C1 controls, Unicode line separators and bidi overrides) is written as an
escape, so nothing a driver says can forge a line or drive the operator's terminal.
"""

from __future__ import annotations

import re

CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\x80-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_NAMED = {"\n": "\\n", "\r": "\\r", "\x1b": "\\e"}


def _escape(m: "re.Match[str]") -> str:
    c = m.group(0)
    named = _NAMED.get(c)
    if named is not None:
        return named
    n = ord(c)
    return f"\\x{n:02x}" if n < 0x100 else f"\\u{n:04x}"


def escape_controls(s: str) -> str:
    """`s` with every control character but the tab written as an escape."""
    return CONTROL.sub(_escape, s) if CONTROL.search(s) else s


def one_line(text: object, cap: int = 8 << 10) -> str:
    """`text` as one printable line of at most `cap` characters (a marker tells the cut)."""
    s = str(text)
    if len(s) > cap:
        s = s[:cap] + f"... [{len(s) - cap} more characters cut]"
    return escape_controls(s)
